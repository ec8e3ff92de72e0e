"""The stages in tasks/ as Prefect tasks, with their retry and cache policies, and the wiring both flows share.

Each task is the stage function itself, `task(...)(stages.x)`: no wrapper in between, so what runs in a
flow is exactly what a test or a launched training process runs. Prefect reaches a stage only through
the StageContext built here (the run logger as `log`, progress artifacts as `progress`).
"""
from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

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
    return _folder_key(context.task.name, parameters["data"].out_dir)


def log(message: str) -> None:
    get_run_logger().info(message)


def progress(label: str, total: int) -> stages.Update:
    """A `<label>-progress` artifact on the dashboard, moved on every trainer log, and a log line."""
    artifact = create_progress_artifact(progress=0.0, key=f"{label}-progress", description=f"{label} training")
    logger = get_run_logger()

    def update(step: int, metrics: dict[str, float]) -> None:
        logger.info(stages.progress_line(label, step, total, metrics))
        if not total:
            return
        description = (f"{label} done: {step} steps" if step >= total else
                       f"{label}: step {step}/{total}, loss {metrics.get('loss', float('nan')):.4f}")
        update_progress_artifact(artifact, progress=min(100.0, 100.0 * step / total), description=description)
    return update


def context(cfg: PipelineConfig, model: stages.ModelInfo, run: RunLogger) -> stages.StageContext:
    return stages.StageContext(cfg, model, run, stages.run_dir(cfg, run), log, progress)


def prepare(ctx: stages.StageContext, explains_failure: list[Path]) -> tuple[FormattedData, EvalSets]:
    """Collect, validate (cached by content), format and log the data: (train set, what evaluation reads:
    validation for selection, held-out for the report and the gate).

    The validated folder joins `explains_failure` first: its reports say why a contract stopped the run."""
    paths = collect_data(ctx)
    data_dir = stages.validated_dir(ctx, paths)
    explains_failure.append(data_dir)
    data = validate(ctx, paths, data_dir)
    train_set, heldout_set, validation_set = format_chat(ctx, data)
    create_markdown_artifact(log_data(ctx, data, train_set), key="data-validation",
                             description="Rows in and out per reason, contracts, quarantine counts")
    return train_set, stages.eval_sets(data, train_set, heldout_set, validation_set)


def fail(run: RunLogger, err: BaseException, keep: list[Path], label: str = "Fine-tune run") -> None:
    """Mark the MLflow run FAILED with what explains it, and say why on the dashboard."""
    reason = stages.record_failure(run, err, keep, label)
    get_run_logger().error(f"{label} failed: {type(err).__name__}: {err}")
    create_markdown_artifact(reason, key="run-failure", description="Why the run failed")


# No retries: a judge endpoint that is down fails the run at once, before anything is trained.
check_judge = task(name="check-judge", cache_policy=NO_CACHE)(judge.check_endpoint)
resolve_model = task(name="resolve-model", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=transient_only,
                     cache_policy=NO_CACHE)(stages.resolve_model)
collect_data = task(name="collect-data", cache_policy=NO_CACHE)(stages.data_paths)
validate = task(name="validate-data", cache_key_fn=_validated_key, persist_result=True,
                cache_expiration=timedelta(days=7))(stages.validate_data)
format_chat = task(name="format-chat", cache_key_fn=_formatted_key, persist_result=True,
                   cache_expiration=timedelta(days=7))(stages.format_chat)
log_data = task(name="log-data", cache_policy=NO_CACHE)(stages.log_data)
find_champion = task(name="find-champion", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only,
                     cache_policy=NO_CACHE)(stages.find_champion)
train = task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only,
             cache_policy=NO_CACHE)(trainer.train)
select_candidate = task(name="select-candidate", cache_policy=NO_CACHE)(stages.select_candidate)
evaluate = task(name="evaluate", cache_policy=NO_CACHE)(stages.evaluate)
promotion_gate = task(name="promotion-gate", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only,
                      cache_policy=NO_CACHE)(stages.gate)
