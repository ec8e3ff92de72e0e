"""A tiny rank sweep against a real `mlflow server` on loopback, queried back over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import SweepConfig
from ftflow.sweep import sweep_flow
from ftflow.tasks.evaluate import sweeps


def test_sweep_lands_as_parent_with_three_children(prefect_harness, tiny_cfg, mlflow_server_port):
    mlflow_server = f"http://127.0.0.1:{mlflow_server_port}"
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                f"tracking.tracking_uri={mlflow_server}",
                "sweep.ranks=[8,16,32]",
                "sft.max_steps=2",
                "dpo.max_steps=2",
                "registry.enabled=false",
                "eval.max_examples=2",
                "eval.few_shot_k=0",
            ],
        )
    )
    out = sweep_flow(config=cfg)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    pairs = sorted((int(c.data.params["lora.r"]), int(c.data.params["lora.alpha"])) for c in children)
    assert pairs == [(8, 16), (16, 32), (32, 64)]
    headline = [{k for k in c.data.metrics if k.count("/") < 2} for c in children]
    assert headline[0] == headline[1] == headline[2]
    assert {"eval/heldout_exact", "arm/wall_s", "arm/peak_memory_mb", "arm/trainable_params"} <= headline[0]
    for c in children:
        # Held-out scores of the arm's candidate only: the adapter validation passed over is not scored on it.
        chosen, passed_over = c.data.tags["candidate"], {"sft": "dpo", "dpo": "sft"}[c.data.tags["candidate"]]
        assert f"eval/{chosen}/heldout_exact" in c.data.metrics and "eval/base/heldout_exact" in c.data.metrics
        assert not any(k.startswith(f"eval/{passed_over}/") for k in c.data.metrics)
        assert f"validation/{passed_over}/heldout_exact" in c.data.metrics
    params = sorted(c.data.metrics["arm/trainable_params"] for c in children)
    assert params[0] * 2 == params[1] and params[1] * 2 == params[2]  # LoRA parameters grow linearly with r

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/comparison.json", "sweep/sweep_chart.png"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/comparison.json")).read_text())
    assert sorted(row[table["columns"].index("r")] for row in table["data"]) == [8, 16, 32]
    best = [c for c in children if c.data.tags.get("best_arm") == "true"]
    assert len(best) == 1 and parent.data.params["sweep.best_run_id"] == best[0].info.run_id
    # The arms were ranked on validation: each child logged its adapters' validation scores.
    assert all("validation/sft/heldout_exact" in c.data.metrics for c in children)
    assert "validation_heldout_exact" in table["columns"]
    # One validation for three arms: the arms log no data of their own.
    assert all(not c.inputs.dataset_inputs for c in children) and parent.inputs.dataset_inputs


def test_arms_and_best_arm_rules():
    assert sweeps.arms(SweepConfig()) == [(8, 16), (16, 32), (32, 64)]
    assert sweeps.arms(SweepConfig(ranks=[4, 8], alphas=[4, 8])) == [(4, 4), (8, 8)]
    assert sweeps.arms(SweepConfig(ranks=[8], alpha_multiplier=0.5)) == [(8, 4)]
    with pytest.raises(ValueError, match="sweep.alphas"):
        sweeps.arms(SweepConfig(ranks=[4, 8], alphas=[4]))
    outcomes = [
        {"r": 32, "status": "FINISHED", "validation": {"heldout_exact": 0.9}, "metrics": {"heldout_exact": 0.5}},
        {"r": 8, "status": "FINISHED", "validation": {"heldout_exact": 0.9}, "metrics": {"heldout_exact": 0.4}},
        {"r": 16, "status": "FAILED", "validation": {}, "metrics": {}},
    ]
    assert sweeps.best_arm(outcomes, "heldout_exact")["r"] == 8  # a tie goes to the smaller rank
    assert sweeps.best_arm([outcomes[2]], "heldout_exact") is None
    # Ranked on validation in the metric's direction; the held-out scores play no part.
    by_loss = [
        {"r": 8, "status": "FINISHED", "validation": {"heldout_loss": 2.0}, "metrics": {"heldout_loss": 1.0}},
        {"r": 16, "status": "FINISHED", "validation": {"heldout_loss": 1.5}, "metrics": {"heldout_loss": 3.0}},
    ]
    assert sweeps.best_arm(by_loss, "heldout_loss")["r"] == 16


def test_champion_scored_once_and_each_arm_scores_its_candidate_only(prefect_harness, tiny_cfg, monkeypatch, tmp_path):
    """With a champion in the registry, a sweep re-scores and judges it once, beside the base, not once per arm;
    each arm scores only the adapter it chose on validation, and logs the champion's verdicts beside its own.
    A spy records what each evaluation call actually scored. The judge is tests/openai_standin.py, standing in
    for a paid API: every reply is "I am not sure.", so the verdicts are ties and only the calls are counted."""
    from openai_standin import Script, StandIn

    from ftflow.pipeline import pipeline_flow
    from ftflow.tasks.evaluate import evaluation

    overrides = ["eval.primary_metric=heldout_logprob", "eval.max_examples=2", "eval.few_shot_k=0", "dpo.max_steps=1"]
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), [*overrides, "sft.max_steps=1"]))
    first = pipeline_flow(config=cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    # Whatever the first gate decided: its version is made the champion, as an operator could.
    client.set_registered_model_alias(cfg.registry.model_name, "champion", first["gate"]["version"])

    scored: list[list[str]] = []
    real = evaluation.evaluate_variants

    def spy(ctx, model, tokenizer, variants, sets, precomputed=None):
        scored.append([v for v in variants if v not in (precomputed or {})])
        return real(ctx, model, tokenizer, variants, sets, precomputed)

    monkeypatch.setattr(evaluation, "evaluate_variants", spy)
    script = Script()
    with StandIn(script) as judge_url:
        judge = ["eval.judge.enabled=true", f"eval.judge.base_url={judge_url}", "eval.judge.model=judge"]
        sweep = ["sweep.ranks=[4,8]", "sft.max_steps=2", "dpo.max_steps=1", *judge, "eval.judge.max_examples=1"]
        out = sweep_flow(config=config_from_dict(apply_overrides(cfg.model_dump(mode="json"), sweep)))

    assert scored[0] == ["base", "champion"]  # once, for both arms
    candidates = [arm["candidate"] for arm in out["arms"]]
    assert scored[1:] == [[c] for c in candidates]
    children = [client.get_run(arm["run_id"]) for arm in out["arms"]]
    champion_scores = {c.data.metrics["eval/champion/heldout_logprob"] for c in children}
    assert len(champion_scores) == 1  # each arm logged the one champion score
    assert out["gate"] is not None and "vs champion" in out["gate"]["summary"]
    # Pairwise: two calls (both orders) per judged answer; the champion once, then each arm's candidate.
    assert sum(path == "/v1/chat/completions" for _, path in script.requests) == 2 * (1 + len(children))
    for child, candidate in zip(children, candidates):
        table = json.loads(
            Path(client.download_artifacts(child.info.run_id, "eval/judge.json", str(tmp_path))).read_text()
        )
        assert sorted(row[table["columns"].index("variant")] for row in table["data"]) == sorted(
            ["champion", candidate]
        )
        assert child.data.metrics["eval/champion/judge_win_rate"] == 0.5  # a tie: the stand-in never picks
