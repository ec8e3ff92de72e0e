"""LoRA rank sweep: the whole chain (SFT → DPO → evaluation) once per arm, one MLflow child run per arm.

Validation and formatting run once (content-cached) for all arms, and what no arm changes (the base model
zero- and few-shot, the registry's champion) is scored once; every arm gets the same data, seed and steps.
Each arm picks its candidate (SFT or DPO) on the validation split and scores only that one on the held-out
split: the comparison and the gate read nothing else, and a second adapter's held-out pass would add a
third of an arm's evaluation time on a CPU. The arms are ranked on their validation score (ties to the
smaller r); only the best arm meets the gate, on the held-out split, which no choice here has read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger
from prefect.states import Cancelling

from ftflow import lifecycle, steps
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import stages, tracking
from ftflow.tasks.data.formatting import FormattedData
from ftflow.tasks.evaluate import sweeps
from ftflow.tasks.evaluate.evaluation import EvalSets
from ftflow.tasks.tracking import FLOW_RUN_TAG, RunLogger, ui_command


def train_arm(
    arm: stages.StageContext,
    train_set: FormattedData,
    sets: EvalSets,
    baselines: stages.Results,
) -> dict[str, Any]:
    """The chain for one arm in its own (child) run `arm.run`: train, choose on validation, evaluate; the outcome."""
    cfg, run = arm.cfg, arm.run
    run.log_config(cfg)
    sft = steps.train(arm, "sft", train_set.sft)
    aligned = steps.align(arm, train_set.sft, train_set.preference, sft.adapter_dir)
    trained = steps.select_candidate(arm, sets, stages.Trained.of(sft, aligned))
    candidate = trained.candidate
    results = steps.evaluate(arm, sets, {candidate: trained.adapters[candidate]}, candidate, baselines)
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


def arm_run_name(cfg: PipelineConfig) -> str:
    return f"r{cfg.lora.r}-alpha{cfg.lora.resolved_alpha}"


# A task, not a subflow: an arm's inputs (the formatted data, the base scores) are far larger than the
# API accepts as flow-run parameters, and a task receives them in memory. fan_out=deployment passes them
# by reference instead (flows/arm.py).
@task(name="sweep-arm", cache_policy=NO_CACHE)
def sweep_arm(
    ctx: stages.StageContext,
    train_set: FormattedData,
    sets: EvalSets,
    baselines: stages.Results,
) -> dict[str, Any]:
    """One arm: ctx.cfg is the arm's config and ctx.run the parent run; the arm gets its own nested MLflow run.

    A failure is recorded in the arm's run and reported in the outcome, not propagated."""
    cfg = ctx.cfg
    # parent_run_id is explicit: Prefect runs tasks in threads and MLflow's active run is per thread.
    run = RunLogger.start(cfg, run_name=arm_run_name(cfg), parent_run_id=ctx.run.run_id, tags={"pipeline": "sweep-arm"})
    arm = replace(ctx, run=run, work_dir=stages.run_dir(cfg, run))
    try:
        return train_arm(arm, train_set, sets, baselines)
    except Exception as err:
        steps.fail(run, err, [], label=f"Sweep arm r={cfg.lora.r}")
        return sweeps.outcome(cfg, run.run_id, "FAILED", error=f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------- fan_out=deployment: one flow run per arm


def arm_tag(flow_run_id: Any) -> str:
    """The tag every arm flow run of one sweep flow run carries, so the sweep can find (and cancel) its arms."""
    return f"ftflow.sweep:{flow_run_id}"


def open_arm_run(cfg: PipelineConfig, parent_run_id: str) -> RunLogger:
    """The arm's child run under `parent_run_id`; on a retry of the same flow run, the run it left unfinished,
    resumed, so training continues from that run's last checkpoint (stages.run_dir is keyed by the run id)."""
    tags = {"pipeline": "sweep-arm", **lifecycle.flow_run_tags()}
    flow_run_id = tags.get(FLOW_RUN_TAG)
    if flow_run_id:
        c = tracking.client(cfg)
        exp_id = c.get_run(parent_run_id).info.experiment_id
        earlier = c.search_runs(
            [exp_id],
            f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        )
        unfinished = [r for r in earlier if r.info.status != "FINISHED"]
        if unfinished:
            return RunLogger.resume(cfg, unfinished[0].info.run_id, tags)
    return RunLogger.start(cfg, run_name=arm_run_name(cfg), parent_run_id=parent_run_id, tags=tags)


@task(name="store-arm-inputs", cache_policy=NO_CACHE)
def store_inputs(cfg: PipelineConfig, inputs: sweeps.ArmInputs) -> tuple[str, str]:
    return sweeps.put_inputs(sweeps.store_root(cfg.sweep, cfg.output_dir), inputs)


def launch_arms(cfg: PipelineConfig, uri: str, digest: str, parent_run_id: str, arms: list[tuple[int, int]]) -> list:
    """One flow run of sweep.arm_deployment per arm, all created before any is waited on; the parameters are
    references (Prefect refuses parameters over 512 KB)."""
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    here = FlowRunContext.get()
    tags = [arm_tag(here.flow_run.id)] if here and here.flow_run else []
    return [
        run_deployment(
            cfg.sweep.arm_deployment,
            parameters={
                "inputs_uri": uri,
                "digest": digest,
                "overrides": sweeps.arm_overrides(r, a),
                "parent_run_id": parent_run_id,
            },
            flow_run_name=f"arm-r{r}-alpha{a}",
            tags=tags,
            timeout=0,
        )
        for r, a in arms
    ]


def _arm_child_run(cfg: PipelineConfig, flow_run_id: Any) -> Optional[Any]:
    c = tracking.client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    found = c.search_runs([exp.experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'") if exp else []
    return found[0] if found else None


@task(name="wait-for-arms", cache_policy=NO_CACHE)
def wait_for_arms(cfg: PipelineConfig, flow_run_ids: list[str], uri: str) -> list[dict[str, Any]]:
    """Every arm's outcome once its flow run ended: its stored outcome when it completed, else its final state
    (FAILED, CRASHED, CANCELLED) with Prefect's message, its child run ended FAILED if it was left running."""
    import time
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + cfg.sweep.arm_timeout_s
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(UUID(i)) for i in flow_run_ids]
            if all(fr.state and fr.state.is_final() for fr in current) or time.monotonic() > deadline:
                break
            time.sleep(2)
        for fr in current:
            if not (fr.state and fr.state.is_final()):
                client.set_flow_run_state(fr.id, Cancelling(message="the sweep stopped waiting (sweep.arm_timeout_s)"))
    outcomes = []
    for fr in current:
        arm_cfg = sweeps.config_with(cfg, fr.parameters["overrides"])
        stored = sweeps.get_outcome(sweeps.outcome_uri(uri, str(fr.id))) if fr.state.is_completed() else None
        if stored is not None:
            outcomes.append({**stored, "flow_run_id": str(fr.id)})
            continue
        status = fr.state.type.value if fr.state.is_final() else "TIMED_OUT"
        reason = f"arm flow run {fr.name} ({fr.id}) ended {fr.state.name}: {fr.state.message or 'no message'}"
        child = _arm_child_run(cfg, fr.id)
        if child is not None and child.info.status == "RUNNING":
            c = tracking.client(cfg)
            c.set_tag(child.info.run_id, "failure_reason", reason[:5000])
            c.set_terminated(child.info.run_id, status="FAILED")
        get_run_logger().warning(reason)
        outcomes.append(
            sweeps.outcome(arm_cfg, child.info.run_id if child else "", status, error=reason, flow_run_id=str(fr.id))
        )
    return outcomes


def cancel_arms(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed / on_failure hook: the arms of this sweep still scheduled or running are cancelled
    (their workers stop them); nobody would collect them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    try:
        with get_client(sync_client=True) as client:
            arms = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[arm_tag(flow_run.id)]))
            )
            for arm in arms:
                if arm.state is not None and not arm.state.is_final():
                    client.set_flow_run_state(arm.id, Cancelling(message=f"sweep flow run {flow_run.id} {state.name}"))
    except Exception as err:
        get_logger("ftflow.sweep").error(f"could not cancel the arms of {flow_run.id}: {type(err).__name__}: {err}")


@flow(
    name="rank-sweep",
    on_crashed=[lifecycle.mark_crashed, cancel_arms],
    on_failure=[cancel_arms],
    on_cancellation=[lifecycle.mark_cancelled, cancel_arms],
)
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
        # Neither the base model nor the champion changes between arms: score them once for all of them.
        baselines = steps.evaluate(replace(ctx, run=None), sets, stages.rescorable(champion))

        arm_contexts = [replace(ctx, cfg=sweeps.arm_config(cfg, r, a)) for r, a in arms]
        if cfg.sweep.fan_out == "deployment":
            inputs = sweeps.ArmInputs(cfg.model_dump(mode="json"), ctx.model, train_set, sets, baselines)
            uri, digest = store_inputs(cfg, inputs)
            parent.set_tags({"sweep.fan_out": "deployment", "sweep.inputs_uri": uri, "sweep.inputs_sha256": digest})
            launched = launch_arms(cfg, uri, digest, parent.run_id, arms)
            outcomes = wait_for_arms(cfg, [str(fr.id) for fr in launched], uri)
        elif cfg.sweep.concurrent:
            futures = [sweep_arm.submit(arm, train_set, sets, baselines) for arm in arm_contexts]
            outcomes = [f.result() for f in futures]
        else:
            outcomes = [sweep_arm(arm, train_set, sets, baselines) for arm in arm_contexts]

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
