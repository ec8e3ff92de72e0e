"""Hyperparameter search: an Optuna study over the typed search space, one MLflow child run per trial.

Validation, formatting and the base model's and champion's scores are done once for all trials, as in the
rank sweep. Each trial trains in its own child run with the pruning callback reporting the validation metric
to the study, and scores only its candidate on held-out; trials are ranked on validation (the study's
objective) and only the best completed trial meets the gate, on held-out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import optuna
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftflow import lifecycle, steps
from ftflow.configs.schema import PipelineConfig
from ftflow.sweep import train_arm
from ftflow.tasks import stages
from ftflow.tasks.evaluate import search, sweeps
from ftflow.tasks.tracking import RunLogger, strip_credentials, ui_command

IN_MEMORY = ("trained", "results")


def run_trial(
    ctx: stages.StageContext, trial: optuna.Trial, inputs: sweeps.ArmInputs, outcomes: dict[int, dict[str, Any]]
) -> float:
    """One trial in a child run of ctx.run; its validation score, or `search.Pruned` / the trial's error."""
    edits = search.overrides(trial, ctx.cfg.search)
    cfg = sweeps.config_with(ctx.cfg, edits)
    run = RunLogger.start(
        cfg,
        run_name=f"trial-{trial.number}",
        parent_run_id=ctx.run.run_id,
        tags={"pipeline": "search-trial", "optuna.trial": str(trial.number), **lifecycle.flow_run_tags()},
    )
    arm = replace(ctx, cfg=cfg, run=run, work_dir=stages.run_dir(cfg, run))
    pruning = search.PruningCallback(trial, arm, inputs.sets.validation, cfg.search.eval_every)
    try:
        outcome = train_arm(replace(arm, callbacks=(pruning,)), inputs.train_set, inputs.sets, inputs.baselines)
    except search.Pruned as err:
        run.set_tags({"optuna.state": "PRUNED", "failure_reason": str(err)})
        run.log_metrics({"search/pruned_at_step": pruning.last})
        run.finish("KILLED")
        raise
    except Exception as err:
        steps.fail(run, err, [], label=f"Search trial {trial.number}")
        raise
    run.set_tags({"optuna.state": "COMPLETE"})
    outcomes[trial.number] = {**outcome, "trial": trial.number, "overrides": edits, "params": dict(trial.params)}
    return outcome["validation"][cfg.eval.resolved_primary_metric]


def trial_rows(study: optuna.Study, outcomes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "trial": t.number,
            "state": t.state.name,
            "value": t.value,
            "last_step": t.last_step,
            **{f"param_{k}": v for k, v in t.params.items()},
            "run_id": outcomes.get(t.number, {}).get("run_id"),
        }
        for t in study.trials
    ]


@flow(name="search", on_crashed=[lifecycle.mark_crashed], on_cancellation=[lifecycle.mark_cancelled])
def search_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
) -> dict[str, Any]:
    """Search `search.space` for `search.n_trials` trials (Optuna, pruned early on validation); the best trial is gated.

    Args:
        config: The whole run, section by section (search lists the space, budget and pruner); ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. search) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. search.n_trials=4.
    """
    cfg = stages.resolve_config(config, recipe, list(overrides))
    parent = lifecycle.open_run(cfg, {"pipeline": "search"}, run_name=f"search-{cfg.search.n_trials}-trials")
    explains_failure: list[Path] = []
    try:
        parent.log_config(cfg)
        ctx = steps.context(cfg, steps.resolve_model(cfg), parent)
        steps.check_judge(ctx)
        train_set, sets = steps.prepare(ctx, explains_failure)
        champion = steps.find_champion(ctx)
        baselines = steps.evaluate(replace(ctx, run=None), sets, stages.rescorable(champion))
        inputs = sweeps.ArmInputs(cfg.model_dump(mode="json"), ctx.model, train_set, sets, baselines)

        name = cfg.search.study_name or f"search-{parent.run_id}"
        study = search.study(cfg, name)
        parent.set_tags({"search.study": name, "search.storage": strip_credentials(search.storage_url(cfg))})
        outcomes: dict[int, dict[str, Any]] = {}
        # A failed trial is recorded (FAIL in the study, FAILED in MLflow) and the search goes on.
        study.optimize(
            lambda trial: run_trial(ctx, trial, inputs, outcomes), n_trials=cfg.search.n_trials, catch=(Exception,)
        )

        rows = trial_rows(study, outcomes)
        parent.log_table(sweeps.table_frame(rows), "search/trials.json")
        best = search.outcome_of(study, outcomes)
        if best is None:
            raise RuntimeError(f"no trial of study {name} completed: " + ", ".join(r["state"] for r in rows))
        parent.log_params({"search.best_trial": best["trial"], "search.best_run_id": best["run_id"]})
        parent.log_params({f"search.best.{k}": v for k, v in best["params"].items()})
        parent.log_metrics({f"search/best_{k}": v for k, v in best["metrics"].items()})
        parent.client.set_tag(best["run_id"], "best_trial", "true")

        gate = None
        if cfg.registry.enabled:
            best_cfg = sweeps.config_with(cfg, best["overrides"]).model_copy(update={"registry": cfg.registry})
            best_ctx = replace(ctx, cfg=best_cfg, run=RunLogger(best_cfg, best["run_id"]))
            gate = steps.promotion_gate(
                best_ctx, best["results"], best["trained"], champion, sets.heldout_accounting, sets
            )

        pruned = sum(r["state"] == "PRUNED" for r in rows)
        summary = (
            f"# Search `{name}`\n\nMLflow parent run: [{parent.run_id}]({parent.url()})\n\n"
            f"{sweeps.markdown(rows)}\n\n{pruned} of {len(rows)} trials pruned. Best trial: {best['trial']} "
            f"{best['params']}"
            + (f"; registry: v{gate['version']} -> @{gate['alias']}" if gate else "")
            + f"\n\nCompare the trials: `{ui_command(cfg)}`, open the experiment, select the child runs, Compare.\n"
        )
        create_table_artifact(rows, key="search-trials", description="Optuna search: one row per trial")
        create_markdown_artifact(summary, key="search-summary", description="Search summary")
        parent.log_text(summary, "summary.md")
        parent.finish("FINISHED")
        get_run_logger().info(summary)
        return {
            "parent_run_id": parent.run_id,
            "study": name,
            "trials": rows,
            "best": {k: v for k, v in best.items() if k not in IN_MEMORY},
            "gate": gate,
        }
    except BaseException as err:
        steps.fail(parent, err, explains_failure, label="Search")
        raise
