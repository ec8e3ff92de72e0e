"""`ftflow search`: a real Optuna study in SQLite over real training of the tiny model, pruned on validation."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import PipelineConfig, SearchConfig
from ftflow.tasks.evaluate import search


def test_four_trials_one_pruned_best_gated(prefect_harness, tiny_cfg):
    from ftflow.search import search_flow

    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                # Loss on validation: it moves after one step even on a random model (exact match would stay 0).
                "eval.primary_metric=heldout_loss",
                "eval.max_examples=2",
                "eval.few_shot_k=0",
                "eval.validation_max_examples=4",
                "sft.max_steps=4",
                "sft.warmup_ratio=0",
                "dpo.max_steps=2",
                "search.n_trials=4",
                "search.space.r=[4,8]",
                "search.space.alpha_multiplier=[2.0]",
                "search.space.learning_rate={low: 1.0e-9, high: 5.0e-2, log: true}",
                "search.space.dpo_loss_type=[sigmoid,ipo]",
                # Trial 0 learns, trial 1 (lr 1e-9) cannot: at its first report it is worse than the median of
                # the one finished trial, so the median pruner stops it; trials 2 and 3 are sampled.
                "search.enqueue=[{r: 8, learning_rate: 1.0e-2}, {r: 8, learning_rate: 1.0e-9}]",
                "search.pruner=median",
                "search.startup_trials=1",
                "search.warmup_steps=0",
                "search.eval_every=2",
            ],
        )
    )
    out = search_flow(config=cfg)

    storage = f"sqlite:///{Path(cfg.output_dir).resolve() / 'optuna.db'}"
    study = optuna.load_study(study_name=out["study"], storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 4
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED and study.trials[1].params["learning_rate"] == 1e-9
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[1].intermediate_values[2] > study.trials[0].intermediate_values[2]  # why it was pruned

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["search.study"] == out["study"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert by_trial[1].data.tags["optuna.state"] == "PRUNED" and by_trial[1].info.status == "KILLED"
    assert by_trial[1].data.metrics["search/pruned_at_step"] == 2
    assert float(by_trial[1].data.params["sft.learning_rate"]) == 1e-9
    assert "search/validation_heldout_loss" in by_trial[0].data.metrics

    # The best completed trial (lowest validation loss) is the one gated and registered.
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value)
    assert out["best"]["trial"] == best.number and study.best_trial.number == best.number
    best_run = by_trial[best.number]
    assert (
        best_run.data.tags.get("best_trial") == "true"
        and parent.data.params["search.best_run_id"] == best_run.info.run_id
    )
    assert out["gate"] is not None
    version = client.get_model_version(cfg.registry.model_name, str(out["gate"]["version"]))
    assert version.run_id == best_run.info.run_id


def test_search_config_errors_name_the_key(tmp_path):
    from pydantic import ValidationError

    from ftflow.cli import parse_args

    assert parse_args(["search"]).recipe == "search"
    assert parse_args(["search", "search.n_trials=2"]).recipe == "search"  # an override alone keeps the recipe

    with pytest.raises(ValidationError, match="low"):
        SearchConfig.model_validate({"space": {"learning_rate": {"low": 1e-3, "high": 1e-5}}})
    with pytest.raises(ValidationError, match="pruner"):
        SearchConfig(pruner="hyperband")
    assert isinstance(search.pruner(SearchConfig(pruner="successive_halving")), optuna.pruners.SuccessiveHalvingPruner)
    # The default storage is its own SQLite file: MLflow's and Optuna's schemas both claim `alembic_version`.
    cfg = PipelineConfig(output_dir=str(tmp_path / "runs"))
    assert search.storage_url(cfg) == f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
