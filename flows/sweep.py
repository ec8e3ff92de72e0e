"""LoRA rank sweep: the whole chain (SFT → DPO → evaluation) once per arm, one MLflow child run per arm.

Validation and formatting run once (content-cached) for all arms; every arm gets the same data, seed
and steps. The best arm on the primary held-out metric (ties to the smaller r) goes through the gate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import PipelineConfig
from ftflow.pipeline import (Prepared, evaluate, fail_run, find_champion, prepare, promotion_gate, resolve_config,
                            train_and_evaluate)
from ftflow.tasks.evaluate import sweeps
from ftflow.tasks.tracking import RunLogger, ui_command


def arm_config(cfg: PipelineConfig, r: int, alpha: int) -> PipelineConfig:
    # The gate runs once, on the best arm, from the parent flow.
    return config_from_dict(apply_overrides(cfg.model_dump(mode="json"),
                                            [f"lora.r={r}", f"lora.alpha={alpha}", "registry.enabled=false"]),
                            f"sweep arm r={r}")


# A task, not a subflow: an arm's inputs (the validated data, the base scores) are far larger than the
# API accepts as flow-run parameters, and a task receives them in memory.
@task(name="sweep-arm", cache_policy=NO_CACHE)
def sweep_arm(cfg: PipelineConfig, prep: Prepared, parent_run_id: str, champion=None, baselines=None) -> dict[str, Any]:
    """One arm in its own task run and its own nested MLflow run; a failure is reported, not propagated."""
    run = RunLogger.start(cfg, run_name=f"r{cfg.lora.r}-alpha{cfg.lora.resolved_alpha}", parent_run_id=parent_run_id,
                          tags={"pipeline": "sweep-arm"})
    work_dir = Path(cfg.output_dir) / run.run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        run.log_config(cfg)
        trained = train_and_evaluate(cfg, prep, run, work_dir, champion, baselines)
        metrics = trained.results[trained.candidate].metrics
        run.log_metrics({"arm/wall_s": trained.wall_s, "arm/peak_memory_mb": trained.peak_memory_mb,
                         "arm/trainable_params": trained.trainable_params})
        run.finish("FINISHED")
        return {"r": cfg.lora.r, "alpha": cfg.lora.resolved_alpha, "run_id": run.run_id, "status": "FINISHED",
                "metrics": metrics, "wall_s": trained.wall_s, "peak_memory_mb": trained.peak_memory_mb,
                "trainable_params": trained.trainable_params, "trained": trained}
    except Exception as err:
        fail_run(run, err, [], label=f"Sweep arm r={cfg.lora.r}")
        return {"r": cfg.lora.r, "alpha": cfg.lora.resolved_alpha, "run_id": run.run_id, "status": "FAILED",
                "error": f"{type(err).__name__}: {err}", "metrics": {}}


@flow(name="rank-sweep")
def sweep_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
) -> dict[str, Any]:
    """Compare LoRA ranks (sweep.ranks, alpha = 2r by default) on the held-out set; the best arm meets the gate.

    Args:
        config: The whole run, section by section (sweep.ranks lists the arms); ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. sweep) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. sweep.ranks=[8,16].
    """
    cfg = resolve_config(config, recipe, list(overrides))
    logger = get_run_logger()
    parent = RunLogger.start(cfg, run_name=f"sweep-r{'-'.join(map(str, cfg.sweep.ranks))}", tags={"pipeline": "sweep"})
    work_dir = Path(cfg.output_dir) / parent.run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    failure_files: list = []
    try:
        parent.log_config(cfg)
        arms = sweeps.arms(cfg.sweep)
        parent.log_params({"sweep.arms": ", ".join(f"r={r}/alpha={a}" for r, a in arms)})
        prep = prepare(cfg, parent, work_dir, failure_files)
        champion = find_champion(cfg, prep.model)
        # The base model does not change between arms: score it (zero- and few-shot) once for all of them.
        baselines = evaluate(cfg, prep.model, prep.train_set.sft, prep.heldout_set.sft, prep.heldout_set.preference,
                             {}, None, None)
        configs = [arm_config(cfg, r, a) for r, a in arms]
        if cfg.sweep.concurrent:
            futures = [sweep_arm.submit(c, prep, parent.run_id, champion, baselines) for c in configs]
            outcomes = [f.result() for f in futures]
        else:
            outcomes = [sweep_arm(c, prep, parent.run_id, champion, baselines) for c in configs]

        rows = sweeps.comparison(outcomes, cfg.eval.primary_metric)
        parent.log_table(sweeps.table_frame(rows), "sweep/comparison.json")
        parent.log_artifact(sweeps.plot(rows, cfg.eval.primary_metric, work_dir / "sweep_chart.png"), "sweep")
        best = sweeps.best_arm(outcomes, cfg.eval.primary_metric)
        if best is None:
            raise RuntimeError("every sweep arm failed: " + "; ".join(o.get("error", "") for o in outcomes))
        parent.log_params({"sweep.best_r": best["r"], "sweep.best_alpha": best["alpha"], "sweep.best_run_id": best["run_id"]})
        parent.log_metrics({f"sweep/best_{k}": v for k, v in best["metrics"].items()})
        parent.client.set_tag(best["run_id"], "best_arm", "true")

        gate = None
        if cfg.registry.enabled:
            best_cfg = arm_config(cfg, best["r"], best["alpha"]).model_copy(update={"registry": cfg.registry})
            trained = best["trained"]
            gate = promotion_gate(best_cfg, prep.model, trained.results, trained.candidate,
                                  trained.adapters[trained.candidate], champion,
                                  RunLogger(best_cfg, best["run_id"]))
        table = sweeps.markdown(rows)
        summary = (f"# Rank sweep `{parent.run_id}`\n\nMLflow parent run: [{parent.run_id}]({parent.url()})\n\n{table}\n\n"
                   f"Best arm: r={best['r']}, alpha={best['alpha']}"
                   + (f"; registry: v{gate['version']} -> @{gate['alias']}" if gate else "")
                   + f"\n\nCompare the arms: `{ui_command(cfg)}`, open the experiment, select the child runs, Compare.\n")
        create_table_artifact([{k: v for k, v in r.items()} for r in rows], key="sweep-comparison",
                              description="LoRA rank sweep: one row per arm")
        create_markdown_artifact(summary, key="sweep-summary", description="Rank sweep summary")
        parent.log_text(summary, "summary.md")
        failed = [o for o in outcomes if o["status"] != "FINISHED"]
        if failed:
            parent.set_tags({"failed_arms": ", ".join(f"r={o['r']}" for o in failed)})
        parent.finish("FINISHED")
        print(f"\n{table}\n\nBest arm: r={best['r']} alpha={best['alpha']}\nOpen the MLflow UI: {ui_command(cfg)}\n")
        logger.info(summary)
        return {"parent_run_id": parent.run_id, "arms": [{k: v for k, v in o.items() if k != "trained"} for o in outcomes],
                "best": {k: v for k, v in best.items() if k != "trained"}, "gate": gate}
    except BaseException as err:
        fail_run(parent, err, failure_files, label="Rank sweep")
        raise
