"""MLflow runs that outlive their process.

Every pipeline or sweep run is tagged with its Prefect flow run and its process (host, pid, start time).
- While the process survives a crash or a cancellation, Prefect's `on_crashed` / `on_cancellation` flow
  hooks end its MLflow runs: FAILED or KILLED, with the reason as a tag.
- When it does not (SIGKILL, a lost machine), the next run of the same experiment reconciles: a RUNNING
  run whose Prefect flow run has ended, or whose process is gone from this host (the only evidence under
  the ephemeral API, whose state died with the process), is marked FAILED with the reason as the tag
  `ftflow.reconciled`, and its flow run, if Prefect still shows it running, is marked Crashed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import tracking
from ftflow.tasks.tracking import FLOW_RUN_TAG, RunLogger

logger = logging.getLogger("ftflow.lifecycle")
RECONCILED_TAG = "ftflow.reconciled"
MAX_CHECKED = 500


def flow_run_tags() -> dict[str, str]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return {FLOW_RUN_TAG: str(ctx.flow_run.id)} if ctx is not None and ctx.flow_run is not None else {}


def open_run(
    cfg: PipelineConfig, tags: dict[str, str], resume_run_id: Optional[str] = None, run_name: Optional[str] = None
) -> RunLogger:
    """Reconcile stale runs of the experiment, then start (or resume) this flow run's MLflow run, tagged with it."""
    reconcile(cfg)
    tags = {**tags, **flow_run_tags()}
    if resume_run_id:
        return RunLogger.resume(cfg, resume_run_id, tags)
    return RunLogger.start(cfg, run_name=run_name, tags=tags)


def _flow_run_state(flow_run_id: str):
    """The Prefect state of a flow run, or None when this API does not know it (another server, a lost ephemeral one)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):
        return None


def stale_reason(tags: dict[str, str]) -> Optional[str]:
    """Why a RUNNING run can no longer be running, or None when it may still be."""
    flow_run_id = tags.get(FLOW_RUN_TAG)
    state = _flow_run_state(flow_run_id) if flow_run_id else None
    if state is not None and state.is_final():
        return f"its Prefect flow run {flow_run_id} ended {state.name}" + (
            f" ({state.message})" if state.message else ""
        )
    if tracking.owner_alive(tags) is False:
        return (
            f"its process {tags.get(tracking.PID_TAG)} on {tags.get(tracking.HOST_TAG)} is gone "
            "(killed, or its machine lost)"
        )
    return None


def _mark_flow_run_crashed(flow_run_id: str, reason: str) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=f"ftflow: {reason}"), force=True)


def reconcile(cfg: PipelineConfig) -> list[str]:
    """Mark the experiment's stale RUNNING runs FAILED (reason in `ftflow.reconciled`); returns their ids.

    Never fails the run that calls it: a store or API that cannot answer is logged and skipped."""
    fixed: list[str] = []
    try:
        c = tracking.client(cfg)
        exp = c.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return fixed
        running = c.search_runs(
            [exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=MAX_CHECKED
        )
        for run in running:
            tags = run.data.tags
            reason = stale_reason(tags)
            if reason is None:
                continue
            run_id = run.info.run_id
            c.set_tag(run_id, RECONCILED_TAG, reason[:5000])
            c.set_tag(run_id, "failure_reason", f"reconciled by a later run: {reason}"[:5000])
            c.set_terminated(run_id, status="FAILED")
            fixed.append(run_id)
            logger.warning(f"MLflow run {run_id} was left RUNNING but {reason}: marked FAILED")
            flow_run_id = tags.get(FLOW_RUN_TAG)
            state = _flow_run_state(flow_run_id) if flow_run_id else None
            if state is not None and not state.is_final():
                _mark_flow_run_crashed(flow_run_id, reason)
    except Exception as err:  # reconciliation is housekeeping; the run that does it must still start
        logger.warning(f"could not reconcile stale MLflow runs: {type(err).__name__}: {err}")
    return fixed


def _config_of(flow_run) -> PipelineConfig:
    from ftflow.tasks import stages

    params: dict[str, Any] = dict(flow_run.parameters or {})
    config = params.get("config")
    base = PipelineConfig.model_validate(config) if isinstance(config, dict) else (config or PipelineConfig())
    return stages.resolve_config(base, params.get("recipe"), list(params.get("overrides") or []))


def _end_runs(flow_run, status: str, reason: str) -> list[str]:
    """End the MLflow runs of `flow_run` (and their children) that are still open."""
    cfg = _config_of(flow_run)
    c = tracking.client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    ended = []
    own = c.search_runs([exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run.id}'")
    children = [
        child
        for run in own
        for child in c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        )
    ]
    for run in [*own, *children]:
        # The flow body marks a failing run FAILED itself; a cancellation still turns that into KILLED.
        if run.info.status == "RUNNING" or (status == "KILLED" and run.info.status == "FAILED"):
            c.set_tag(run.info.run_id, "failure_reason", reason[:5000])
            c.set_terminated(run.info.run_id, status=status)
            ended.append(run.info.run_id)
    return ended


def mark_crashed(flow, flow_run, state) -> None:
    """on_crashed hook: the flow run's MLflow runs end FAILED with Prefect's crash message."""
    try:
        _end_runs(flow_run, "FAILED", f"Prefect flow run crashed: {state.message or state.name}")
    except Exception as err:
        logger.error(
            f"on_crashed: could not end the MLflow runs of flow run {flow_run.id}: {type(err).__name__}: {err}"
        )


def mark_cancelled(flow, flow_run, state) -> None:
    """on_cancellation hook: the flow run's MLflow runs end KILLED."""
    try:
        _end_runs(flow_run, "KILLED", f"Prefect flow run cancelled: {state.message or state.name}")
    except Exception as err:
        logger.error(
            f"on_cancellation: could not end the MLflow runs of flow run {flow_run.id}: {type(err).__name__}: {err}"
        )
