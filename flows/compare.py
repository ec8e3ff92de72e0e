"""`ftflow compare-methods`: QLoRA, LoRA, full fine-tuning and prompt tuning (and OpenAI's API) side by side.

Validation and formatting run once, and the base model is scored once, for every arm; each method trains
(SFT, then DPO when enabled) in its own MLflow child run, picks its candidate on validation and is scored on
the same held-out prompts. The parent run holds the table. Wiring only: tasks/evaluate/methods.py builds it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ftflow import lifecycle, steps
from ftflow.configs.schema import Alignment, Method, PipelineConfig
from ftflow.tasks import api_stages, stages
from ftflow.tasks.data.formatting import FormattedData
from ftflow.tasks.evaluate import methods, registry
from ftflow.tasks.evaluate.evaluation import EvalSets
from ftflow.tasks.tracking import RunLogger, ui_command


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_and_score(arm: stages.StageContext, train_set: FormattedData, sets: EvalSets, baselines: stages.Results):
    """The chain for one method in its child run: train, choose on validation, score on held-out; (row, results)."""
    started, cpu = time.perf_counter(), _cpu_s()
    cfg, run = arm.cfg, arm.run
    run.log_config(cfg)
    sft = steps.train(arm, "sft", train_set.sft)
    aligned = steps.align(arm, train_set.sft, train_set.preference, sft.adapter_dir)
    trained = steps.select_candidate(arm, sets, stages.Trained.of(sft, aligned))
    results = steps.evaluate(arm, sets, trained.adapters, trained.candidate, baselines)
    metric = registry.get(cfg.eval.resolved_primary_metric)
    mine = results[trained.candidate]
    steps_done = sum(r.global_step for r in trained.by_kind.values())
    row = methods.MethodRow(
        method=cfg.resolved_method.value,
        status="FINISHED",
        run_id=run.run_id,
        trainable_params=trained.trainable_params,
        total_params=trained.by_kind["sft"].total_params,
        peak_memory_mb=trained.peak_memory_mb,
        s_per_step=trained.wall_s / steps_done if steps_done else None,
        wall_s=time.perf_counter() - started,
        cpu_s=_cpu_s() - cpu,
        metric=metric.name,
        value=mine.metrics.get(metric.name),
        interval=methods.interval_vs(metric, mine, results["base"], "base", cfg.seed),
        note=f"candidate {trained.candidate}",
    )
    run.log_metrics(
        {f"compare/{k}": float(v) for k, v in row.as_dict().items() if isinstance(v, (int, float)) and v is not None}
    )
    run.finish("FINISHED")
    return methods.Arm(row, results, trained)


@task(name="compare-arm", cache_policy=NO_CACHE)
def method_arm(arm: stages.StageContext, train_set: FormattedData, sets: EvalSets, baselines: stages.Results):
    """One arm (arm.cfg: its method and alignment) in a child run of arm.run; a failure is recorded in its run and
    its row, not propagated."""
    cfg = arm.cfg
    name = cfg.resolved_method.value + (f"+{cfg.alignment.value}" if cfg.alignment != Alignment.dpo else "")
    run = RunLogger.start(
        cfg,
        run_name=name,
        parent_run_id=arm.run.run_id,
        tags={"pipeline": "compare-arm", "method": cfg.resolved_method.value, "alignment": cfg.alignment.value},
    )
    arm = replace(arm, run=run, work_dir=stages.run_dir(cfg, run))
    try:
        return train_and_score(arm, train_set, sets, baselines)
    except Exception as err:
        steps.fail(run, err, [], label=f"compare-methods arm {name}")
        return methods.Arm(methods.MethodRow(name, "FAILED", run.run_id, note=f"{type(err).__name__}: {err}"[:200]))


@task(name="compare-api-arm", cache_policy=NO_CACHE)
def api_arm(ctx: stages.StageContext, data: stages.CleanData) -> methods.MethodRow:
    """The API row: the offline check and estimate; the job itself only with compare.run_api (it costs money)."""
    try:
        files = api_stages.export_files(ctx, data)
    except Exception as err:
        return methods.MethodRow("openai", "FAILED", note=f"format check: {err}"[:200])
    est = files.estimate
    price = f"est. ${est['usd']:.2f}" if est["usd"] is not None else "no price for the model"
    note = f"{est['billed_tokens']:,} billed tokens est. ({est['examples']} ex x {est['n_epochs']} ep), {price}"
    if not ctx.cfg.compare.run_api:
        return methods.MethodRow("openai", "not run", note=f"format check passed; {note}; compare.run_api=false")
    from ftflow.openai_ft import openai_flow

    out = openai_flow(ctx.cfg.model_copy(update={"registry": ctx.cfg.registry.model_copy(update={"enabled": False})}))
    tuned = out["metrics"]["openai_ft"]
    metric = ctx.cfg.eval.resolved_primary_metric
    return methods.MethodRow("openai", "FINISHED", out["run_id"], metric=metric, value=tuned.get(metric), note=note)


@flow(name="compare-methods", on_crashed=[lifecycle.mark_crashed], on_cancellation=[lifecycle.mark_cancelled])
def compare_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
) -> dict[str, Any]:
    """Train and score each method in compare.methods on the same data; print the measured table.

    Args:
        config: The whole run, section by section; ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. compare-methods) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. compare.methods=[qlora,lora].
    """
    cfg = stages.resolve_config(config, recipe, list(overrides))
    parent = lifecycle.open_run(cfg, {"pipeline": "compare-methods"}, run_name="compare-methods")
    explains_failure: list[Path] = []
    try:
        started = time.perf_counter()
        parent.log_config(cfg)
        ctx = steps.context(cfg, steps.resolve_model(cfg), parent)
        data, train_set, sets = steps.prepare_data(ctx, explains_failure)
        # The base model is the same for every arm: scored once, reused by each.
        baselines = steps.evaluate(replace(ctx, run=None), sets, {})
        arms = {
            m.value: method_arm(replace(ctx, cfg=methods.arm_config(cfg, m)), train_set, sets, baselines)
            for m in cfg.compare.methods
        }
        rows = [arm.row for arm in arms.values()] + [api_arm(ctx, data)]
        results = {name: arm.results[arm.trained.candidate] for name, arm in arms.items() if arm.results}
        metric = registry.get(cfg.eval.resolved_primary_metric)
        claim = methods.qlora_claim(results, metric, cfg.seed)
        # Table 2: the alignments after the same QLoRA SFT; the QLoRA arm above already ran the recipe's one.
        aligned = {}
        for alignment in cfg.compare.alignments:
            if alignment == cfg.alignment and "qlora" in arms:
                aligned[alignment.value] = arms["qlora"]
            elif alignment != Alignment.none:
                arm_cfg = methods.arm_config(cfg, Method.qlora, alignment)
                aligned[alignment.value] = method_arm(replace(ctx, cfg=arm_cfg), train_set, sets, baselines)
        alignment_rows = methods.alignment_rows(aligned, metric, cfg.seed)
        wall = time.perf_counter() - started
        base_value = baselines["base"].metrics.get(metric.name)
        text = (
            f"{methods.table(rows, metric.name)}\n\nbase model {metric.name}: {base_value:.3f}; {claim}\n\n"
            + (f"{methods.alignment_table(alignment_rows, metric.name)}\n\n" if alignment_rows else "")
            + f"whole comparison: {wall:.0f} s"
        )
        parent.log_text(text, "compare/table.md")
        parent.log_dict([r.as_dict() for r in rows], "compare/rows.json")
        parent.log_dict(alignment_rows, "compare/alignment_rows.json")
        parent.log_metrics({"compare/wall_s": wall})
        create_markdown_artifact(text, key="compare-methods", description="Methods side by side (measured)")
        parent.finish("FINISHED")
        print(f"\n{text}\n\nMLflow run {parent.run_id}: {parent.url()}\nOpen the MLflow UI: {ui_command(cfg)}\n")
        return {
            "run_id": parent.run_id,
            "rows": [r.as_dict() for r in rows],
            "alignment_rows": alignment_rows,
            "qlora_claim": claim,
            "wall_s": wall,
        }
    except BaseException as err:
        steps.fail(parent, err, explains_failure, "compare-methods run")
        raise
