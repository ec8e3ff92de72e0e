"""LoRA rank sweep: the whole chain (SFT → DPO → evaluation) once per arm, one MLflow child run per arm.

Validation and formatting run once (content-cached) for all arms, and the base model is scored once;
every arm gets the same data, seed and steps. Each arm picks its candidate (SFT or DPO) on the validation
split, and the arms are ranked on that validation score (ties to the smaller r); only the best arm meets the
gate, on the held-out split, which no choice here has read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from ftflow import lifecycle, steps
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import stages
from ftflow.tasks.data.formatting import FormattedData
from ftflow.tasks.evaluate import sweeps
from ftflow.tasks.evaluate.evaluation import EvalSets
from ftflow.tasks.tracking import RunLogger, ui_command


# A task, not a subflow: an arm's inputs (the formatted data, the base scores) are far larger than the
# API accepts as flow-run parameters, and a task receives them in memory.
@task(name="sweep-arm", cache_policy=NO_CACHE)
def sweep_arm(
    ctx: stages.StageContext,
    train_set: FormattedData,
    sets: EvalSets,
    champion: Optional[stages.Champion],
    baselines: stages.Results,
) -> dict[str, Any]:
    """One arm: ctx.cfg is the arm's config and ctx.run the parent run; the arm gets its own nested MLflow run.

    A failure is recorded in the arm's run and reported in the outcome, not propagated."""
    cfg = ctx.cfg
    # parent_run_id is explicit: Prefect runs tasks in threads and MLflow's active run is per thread.
    run = RunLogger.start(
        cfg,
        run_name=f"r{cfg.lora.r}-alpha{cfg.lora.resolved_alpha}",
        parent_run_id=ctx.run.run_id,
        tags={"pipeline": "sweep-arm"},
    )
    arm = replace(ctx, run=run, work_dir=stages.run_dir(cfg, run))
    try:
        run.log_config(cfg)
        sft = steps.train(arm, "sft", train_set.sft)
        dpo = (
            steps.train(arm, "dpo", train_set.preference, sft.adapter_dir) if stages.runs_dpo(arm, train_set) else None
        )
        trained = steps.select_candidate(arm, sets, stages.Trained.of(sft, dpo))
        results = steps.evaluate(arm, sets, trained.scored(champion), trained.candidate, baselines)
        stages.log_losses(arm, trained)
        cost = {
            "wall_s": trained.wall_s,
            "peak_memory_mb": trained.peak_memory_mb,
            "trainable_params": trained.trainable_params,
        }
        run.log_metrics({f"arm/{k}": v for k, v in cost.items()})
        run.finish("FINISHED")
        primary = cfg.eval.resolved_primary_metric
        return sweeps.outcome(
            cfg,
            run.run_id,
            "FINISHED",
            metrics=results[trained.candidate].metrics,
            **cost,
            candidate=trained.candidate,
            validation={primary: trained.selection["scores"][trained.candidate]},
            trained=trained,
            results=results,
        )
    except Exception as err:
        steps.fail(run, err, [], label=f"Sweep arm r={cfg.lora.r}")
        return sweeps.outcome(cfg, run.run_id, "FAILED", error=f"{type(err).__name__}: {err}")


@flow(name="rank-sweep", on_crashed=[lifecycle.mark_crashed], on_cancellation=[lifecycle.mark_cancelled])
def sweep_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
) -> dict[str, Any]:
    """Compare LoRA ranks (sweep.ranks, alpha = 2r by default) on the validation set; the best arm meets the gate.

    Args:
        config: The whole run, section by section (sweep.ranks lists the arms); ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. sweep) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. sweep.ranks=[8,16].
    """
    cfg = stages.resolve_config(config, recipe, list(overrides))
    parent = lifecycle.open_run(cfg, {"pipeline": "sweep"}, run_name=f"sweep-r{'-'.join(map(str, cfg.sweep.ranks))}")
    explains_failure: list[Path] = []
    try:
        parent.log_config(cfg)
        arms = sweeps.arms(cfg.sweep)
        parent.log_params({"sweep.arms": ", ".join(f"r={r}/alpha={a}" for r, a in arms)})
        ctx = steps.context(cfg, steps.resolve_model(cfg), parent)
        steps.check_judge(ctx)
        train_set, sets = steps.prepare(ctx, explains_failure)
        champion = steps.find_champion(ctx)
        # The base model does not change between arms: score it (zero- and few-shot) once for all of them.
        baselines = steps.evaluate(replace(ctx, run=None), sets, {})

        arm_contexts = [replace(ctx, cfg=sweeps.arm_config(cfg, r, a)) for r, a in arms]
        if cfg.sweep.concurrent:
            futures = [sweep_arm.submit(arm, train_set, sets, champion, baselines) for arm in arm_contexts]
            outcomes = [f.result() for f in futures]
        else:
            outcomes = [sweep_arm(arm, train_set, sets, champion, baselines) for arm in arm_contexts]

        primary = cfg.eval.resolved_primary_metric
        rows = sweeps.comparison(outcomes, cfg)
        parent.log_table(sweeps.table_frame(rows), "sweep/comparison.json")
        parent.log_artifact(
            sweeps.plot(rows, sweeps.validation_key(primary), ctx.work_dir / "sweep_chart.png"), "sweep"
        )
        best = sweeps.best_arm(outcomes, primary)
        if best is None:
            raise RuntimeError("every sweep arm failed: " + "; ".join(o.get("error", "") for o in outcomes))
        parent.log_params(
            {"sweep.best_r": best["r"], "sweep.best_alpha": best["alpha"], "sweep.best_run_id": best["run_id"]}
        )
        parent.log_metrics({f"sweep/best_{k}": v for k, v in best["metrics"].items()})
        parent.client.set_tag(best["run_id"], "best_arm", "true")

        gate = None
        if cfg.registry.enabled:
            best_cfg = sweeps.arm_config(cfg, best["r"], best["alpha"]).model_copy(update={"registry": cfg.registry})
            best_ctx = replace(ctx, cfg=best_cfg, run=RunLogger(best_cfg, best["run_id"]))
            gate = steps.promotion_gate(
                best_ctx, best["results"], best["trained"], champion, sets.heldout_accounting, sets
            )

        table = sweeps.markdown(rows)
        summary = (
            f"# Rank sweep `{parent.run_id}`\n\nMLflow parent run: [{parent.run_id}]({parent.url()})\n\n{table}\n\n"
            f"Best arm: r={best['r']}, alpha={best['alpha']}"
            + (f"; registry: v{gate['version']} -> @{gate['alias']}" if gate else "")
            + f"\n\nCompare the arms: `{ui_command(cfg)}`, open the experiment, select the child runs, Compare.\n"
        )
        create_table_artifact(rows, key="sweep-comparison", description="LoRA rank sweep: one row per arm")
        create_markdown_artifact(summary, key="sweep-summary", description="Rank sweep summary")
        parent.log_text(summary, "summary.md")
        failed = [o for o in outcomes if o["status"] != "FINISHED"]
        if failed:
            parent.set_tags({"failed_arms": ", ".join(f"r={o['r']}" for o in failed)})
        parent.finish("FINISHED")
        print(f"\n{table}\n\nBest arm: r={best['r']} alpha={best['alpha']}\nOpen the MLflow UI: {ui_command(cfg)}\n")
        get_run_logger().info(summary)
        in_memory = ("trained", "results")
        return {
            "parent_run_id": parent.run_id,
            "arms": [{k: v for k, v in o.items() if k not in in_memory} for o in outcomes],
            "best": {k: v for k, v in best.items() if k not in in_memory},
            "gate": gate,
        }
    except BaseException as err:
        steps.fail(parent, err, explains_failure, label="Rank sweep")
        raise
