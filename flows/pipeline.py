"""The fine-tuning pipeline as a Prefect flow: validate → format → QLoRA SFT → DPO → evaluate → gate.

Wiring only, in the order of the recipe; every step is a stage function in tasks/ run as a Prefect task
(see steps.py), and the tasks share one StageContext.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftflow import lifecycle, steps
from ftflow.configs.schema import Backend, PipelineConfig
from ftflow.tasks import stages


@flow(name="fine-tune", on_crashed=[lifecycle.mark_crashed], on_cancellation=[lifecycle.mark_cancelled])
def pipeline_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
    resume_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """One pipeline run: validate → format → QLoRA SFT → DPO → select on validation → evaluate → promotion gate.

    Args:
        config: The whole run, section by section; ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. production) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. lora.r=8.
        resume_run_id: Continue an interrupted run: same MLflow run, training from its last checkpoint.
    """
    cfg = stages.resolve_config(config, recipe, list(overrides))
    if cfg.backend == Backend.openai:
        from ftflow.openai_ft import openai_flow

        return openai_flow(cfg)
    run = lifecycle.open_run(cfg, {"pipeline": "fine-tune"}, resume_run_id)
    explains_failure: list[Path] = []
    try:
        run.log_config(cfg)
        ctx = steps.context(cfg, steps.resolve_model(cfg), run)
        steps.check_judge(ctx)
        train_set, sets = steps.prepare(ctx, explains_failure)
        champion = steps.find_champion(ctx)

        sft = steps.train(ctx, "sft", train_set.sft)
        aligned = steps.align(ctx, train_set.sft, train_set.preference, sft.adapter_dir)
        # SFT or its aligned successor (DPO or RLHF), chosen on the validation split; held-out only reports and gates.
        trained = steps.select_candidate(ctx, sets, stages.Trained.of(sft, aligned))

        results = steps.evaluate(ctx, sets, trained.scored(champion), trained.candidate)
        stages.log_losses(ctx, trained)

        gate = (
            steps.promotion_gate(ctx, results, trained, champion, sets.heldout_accounting, sets)
            if cfg.registry.enabled
            else None
        )

        summary = stages.summarize(ctx, results, gate)
        create_table_artifact(
            summary.rows, key="heldout-comparison", description="Held-out comparison: base vs few-shot vs SFT vs DPO"
        )
        create_markdown_artifact(summary.markdown, key="fine-tune-summary", description="Pipeline summary")
        stages.finish(ctx, summary)
        return {
            "run_id": run.run_id,
            "metrics": {v: r.metrics for v, r in results.items()},
            "work_dir": str(ctx.work_dir),
            "candidate": trained.candidate,
            "selection": trained.selection,
            "gate": gate,
        }
    except BaseException as err:
        steps.fail(run, err, explains_failure)
        raise
