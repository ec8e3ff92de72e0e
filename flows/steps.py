"""The stages in tasks/ as Prefect tasks, with their retry and cache policies, and the wiring both flows share.

Each task is the stage function itself, `task(...)(stages.x)`: no wrapper in between, so what runs in a
flow is exactly what a test or a launched training process runs. Prefect reaches a stage only through
the StageContext built here (the run logger as `log`, progress artifacts as `progress`).
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from ftflow import console
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import stages
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.evaluate import judge
from ftflow.tasks.tracking import RunLogger
from ftflow.tasks.train import trainer

if TYPE_CHECKING:
    from ftflow.tasks.data.formatting import FormattedData
    from ftflow.tasks.evaluate.evaluation import EvalSets


def transient_only(task, task_run, state) -> bool:
    """Retry what can heal by itself (I/O, a busy registry), never bad input or a bad config."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False


def _folder_key(task_name: str, folder: str) -> str:
    # The folder is named by the content hash of inputs, settings and checking code (stages.data_cache_key);
    # its full path is part of the key so a cached result always points at report files that exist.
    where = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]
    return f"{task_name}-{Path(folder).name}-{where}"


def _validated_key(context, parameters: dict[str, Any]) -> str:
    return _folder_key(context.task.name, parameters["out_dir"])


def _formatted_key(context, parameters: dict[str, Any]) -> str:
    # The training window decides which rows survive formatting and where the loss falls.
    cfg = parameters["ctx"].cfg
    window = "|".join(
        str(v)
        for v in (
            cfg.sft.max_length,
            cfg.sft.truncation,
            cfg.sft.loss_on,
            cfg.sft.assistant_only_loss,
            cfg.dpo.max_length,
            cfg.dpo.truncation,
            cfg.data.system_prompt,
        )
    )
    digest = hashlib.sha256(window.encode()).hexdigest()[:8]
    return f"{_folder_key(context.task.name, parameters['data'].out_dir)}-{digest}"


def log(message: str) -> None:
    get_run_logger().info(message)


def progress(label: str, total: int) -> stages.Update:
    """A `<label>-progress` artifact on the dashboard, moved on every update, and a live bar or periodic log lines."""
    artifact = create_progress_artifact(progress=0.0, key=f"{label}-progress", description=f"{label} training")
    shown = console.progress(label, total, get_run_logger().info)

    def update(step: int, metrics: dict[str, float]) -> None:
        shown(step, metrics)
        if not total:
            return
        description = (
            f"{label} done: {step} steps"
            if step >= total
            else f"{label}: step {step}/{total}, loss {metrics.get('loss', float('nan')):.4f}"
        )
        update_progress_artifact(artifact, progress=min(100.0, 100.0 * step / total), description=description)

    return update


def registry_limit_name(model_name: str) -> str:
    return "ftflow-registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


REGISTRY_LOCK_TIMEOUT_S = 3600


def registry_lock(name: str) -> ContextManager:
    """`name` ("registry:<model>") held by one gate at a time, across flows, deployments and processes that
    share this Prefect API: a global concurrency limit of 1 (a deployment's own limit covers only its runs).

    Prefect 3 no longer creates a missing limit on acquisition (it would skip the lock with a warning), so it
    is created here first; `strict=True` refuses to run unlocked. A holder that dies frees it when its
    lease (300 s, renewed while alive) runs out."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = registry_limit_name(name.split(":", 1)[-1])
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
        except ObjectAlreadyExists:
            pass  # made by an earlier gate, or by a concurrent one just now
    return concurrency(limit, occupy=1, strict=True, timeout_seconds=REGISTRY_LOCK_TIMEOUT_S)


def context(cfg: PipelineConfig, model: stages.ModelInfo, run: RunLogger) -> stages.StageContext:
    return stages.StageContext(cfg, model, run, stages.run_dir(cfg, run), log, progress, registry_lock)


def prepare(ctx: stages.StageContext, explains_failure: list[Path]) -> tuple[FormattedData, EvalSets]:
    """Collect, validate (cached by content), format and log the data: (train set, what evaluation reads:
    validation for selection, held-out for the report and the gate).

    The validated folder joins `explains_failure` first: its reports say why a contract stopped the run."""
    _, train_set, sets = prepare_data(ctx, explains_failure)
    return train_set, sets


def prepare_data(
    ctx: stages.StageContext, explains_failure: list[Path]
) -> tuple[stages.CleanData, FormattedData, EvalSets]:
    """`prepare`, with the validated rows too (the OpenAI backend exports those, not the formatted ones)."""
    paths = collect_data(ctx)
    data_dir = stages.validated_dir(ctx, paths)
    explains_failure.append(data_dir)
    data = validate(ctx, paths, data_dir)
    train_set, heldout_set, validation_set = format_chat(ctx, data)
    stages.add_window_drops(data, {"train": train_set, "heldout": heldout_set, "validation": validation_set})
    stages.check_trainable(ctx, train_set, data)
    create_markdown_artifact(
        log_data(ctx, data, train_set),
        key="data-validation",
        description="Rows in and out per reason, contracts, quarantine counts",
    )
    return data, train_set, stages.eval_sets(data, train_set, heldout_set, validation_set)


def fail(run: RunLogger, err: BaseException, keep: list[Path], label: str = "Fine-tune run") -> None:
    """Mark the MLflow run FAILED with what explains it, and say why on the dashboard."""
    reason = stages.record_failure(run, err, keep, label)
    get_run_logger().error(f"{label} failed: {type(err).__name__}: {err}")
    create_markdown_artifact(reason, key="run-failure", description="Why the run failed")


# No retries: a judge endpoint that is down fails the run at once, before anything is trained.
check_judge = task(name="check-judge", cache_policy=NO_CACHE)(judge.check_endpoint)
resolve_model = task(
    name="resolve-model",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)(stages.resolve_model)
collect_data = task(name="collect-data", cache_policy=NO_CACHE)(stages.data_paths)
validate = task(
    name="validate-data", cache_key_fn=_validated_key, persist_result=True, cache_expiration=timedelta(days=7)
)(stages.validate_data)
format_chat = task(
    name="format-chat", cache_key_fn=_formatted_key, persist_result=True, cache_expiration=timedelta(days=7)
)(stages.format_chat)
log_data = task(name="log-data", cache_policy=NO_CACHE)(stages.log_data)
find_champion = task(
    name="find-champion",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)(stages.find_champion)
train = task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)(
    trainer.train
)
align = task(name="align", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)(
    trainer.align
)
select_candidate = task(name="select-candidate", cache_policy=NO_CACHE)(stages.select_candidate)
evaluate = task(name="evaluate", cache_policy=NO_CACHE)(stages.evaluate)
promotion_gate = task(
    name="promotion-gate",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)(stages.gate)
