"""`backend: openai` as a Prefect flow: validate → export + check + estimate → fine-tune through the API →
score base vs `ft:` model on the held-out prompts → gate → registry. Wiring only; the stages are in
tasks/api_stages.py. `pipeline_flow` hands a config with `backend: openai` to this flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from ftflow import lifecycle, steps
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import api_stages, stages

export_files = task(name="openai-export", cache_policy=NO_CACHE)(api_stages.export_files)
check_key = task(name="openai-key", cache_policy=NO_CACHE)(api_stages.check_key)
start_job = task(name="openai-start-job", cache_policy=NO_CACHE)(api_stages.start_job)
# Polling only reads the job, so an API outage is retried with backoff instead of failing a paid job's run.
watch_job = task(
    name="openai-watch-job",
    retries=5,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=steps.transient_only,
    cache_policy=NO_CACHE,
)(api_stages.watch_job)
evaluate = task(
    name="openai-evaluate",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=steps.transient_only,
    cache_policy=NO_CACHE,
)(api_stages.evaluate)
gate = task(name="openai-gate", cache_policy=NO_CACHE)(api_stages.gate)


@flow(name="openai-fine-tune", on_crashed=[lifecycle.mark_crashed], on_cancellation=[lifecycle.mark_cancelled])
def openai_flow(config: PipelineConfig) -> dict[str, Any]:
    """Fine-tune through OpenAI's API on the validated data; gate the `ft:` model against its base."""
    cfg = config
    run = lifecycle.open_run(cfg, {"pipeline": "openai-fine-tune", "ftflow.backend": "openai"})
    explains_failure: list[Path] = []
    try:
        run.log_config(cfg)
        ctx = steps.context(cfg, steps.resolve_model(cfg), run)
        api_stages.check_scorable(ctx)
        paths = steps.collect_data(ctx)
        data_dir = stages.validated_dir(ctx, paths)
        explains_failure.append(data_dir)
        data = steps.validate(ctx, paths, data_dir)
        files = export_files(ctx, data)
        estimate = files.estimate
        if cfg.openai.dry_run:
            run.set_tags({"openai.not_run": "dry_run: files checked and estimated, nothing uploaded"})
            run.finish("FINISHED")
            return {"run_id": run.run_id, "estimate": estimate, "fine_tuned_model": None, "gate": None}
        check_key(ctx)
        job_id = start_job(ctx, files)
        tuned = watch_job(ctx, job_id)
        results = evaluate(ctx, data, tuned)
        outcome = gate(ctx, results, tuned) if cfg.registry.enabled else None
        summary = stages.summarize(ctx, results, outcome)
        create_markdown_artifact(summary.markdown, key="openai-fine-tune-summary", description="OpenAI fine-tune")
        stages.finish(ctx, summary)
        return {
            "run_id": run.run_id,
            "estimate": estimate,
            "fine_tuned_model": tuned,
            "job_id": job_id,
            "metrics": {v: r.metrics for v, r in results.items()},
            "gate": outcome,
        }
    except BaseException as err:
        steps.fail(run, err, explains_failure, "OpenAI fine-tune run")
        raise
