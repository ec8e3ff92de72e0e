"""The stages of `backend: openai`: the same validated data, evaluation, gate and registry as the local path,
with training done by OpenAI's fine-tuning API (tasks/train/openai_api.py).

validate (shared) → export JSONL + offline format check + cost estimate → key check → upload + job + poll
(events and metrics into MLflow) → score base vs `ft:` model on the held-out prompts through chat completions
→ the local gate's decision (tasks/registry/gate.py) → a registry version that points at the `ft:` model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ftflow.configs.schema import OpenAIMethod
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.stages import CleanData, StageContext, _require_run
from ftflow.tasks.train import openai_api

BASE, TUNED = "base", "openai_ft"


@dataclass
class ApiFiles:
    """The exported training (and validation) files with what the offline check found in each."""

    training: Path
    validation: Optional[Path]
    reports: dict[str, openai_api.FormatReport]

    @property
    def estimate(self) -> dict[str, Any]:
        train = self.reports["training"]
        return {
            "examples": train.examples,
            "file_tokens": sum(train.tokens),
            "n_epochs": train.n_epochs,
            "billed_tokens": train.billed_tokens,
            "usd": train.usd,
            "counted_with": train.counted_with,
        }


def check_scorable(ctx: StageContext) -> None:
    """The API returns text only: the primary metric must be one computed from generations."""
    from ftflow.tasks.evaluate import registry

    name = ctx.cfg.eval.resolved_primary_metric
    if registry.get(name).source != "generation":
        raise PipelineError(
            f"eval.primary_metric={name}: backend=openai scores through chat completions, which return text only; "
            f"choose a generation metric: {', '.join(m.name for m in registry.METRICS if m.source == 'generation')}"
        )


def export_files(ctx: StageContext, data: CleanData) -> ApiFiles:
    """The API's JSONL from the validated rows, checked offline; a file that fails the check stops the run here."""
    from ftflow.tasks.train.model import load_tokenizer

    cfg, system = ctx.cfg.openai, ctx.cfg.data.system_prompt
    out = ctx.work_dir / "openai"
    if cfg.method == OpenAIMethod.supervised:
        training = openai_api.write_jsonl(openai_api.sft_records(data.sft, system), out / "training.jsonl")
        validation_rows = openai_api.sft_records(data.validation, system)
    else:
        training = openai_api.write_jsonl(openai_api.dpo_records(data.preference, system), out / "training.jsonl")
        validation_rows = []
    validation = openai_api.write_jsonl(validation_rows, out / "validation.jsonl") if validation_rows else None
    tokenizer = load_tokenizer(ctx.model.path, ctx.cfg.model)
    count = openai_api.token_counter(tokenizer)
    counted_with = f"local tokenizer of {ctx.cfg.model.name_or_path} (OpenAI's is not available offline)"
    reports = {"training": openai_api.check_file(training, cfg, count, counted_with)}
    if validation is not None:
        # The API needs no minimum for a validation file; the per-example checks still apply.
        reports["validation"] = openai_api.check_file(
            validation, cfg.model_copy(update={"min_examples": 1}), count, counted_with
        )
    files = ApiFiles(training, validation, reports)
    _log_files(ctx, files)
    for report in reports.values():
        if not report.ok:
            raise PipelineError(report.error_line())
    return files


def _log_files(ctx: StageContext, files: ApiFiles) -> None:
    run = _require_run(ctx)
    for name, report in files.reports.items():
        run.log_dict(report.summary(), f"openai/{name}_check.json")
    run.log_artifact(files.training.parent, "openai")
    est = files.estimate
    run.log_metrics(
        {
            "openai/examples": est["examples"],
            "openai/file_tokens": est["file_tokens"],
            "openai/estimated_billed_tokens": est["billed_tokens"],
            **({"openai/estimated_usd": est["usd"]} if est["usd"] is not None else {}),
        }
    )
    price = "no price in openai.prices" if est["usd"] is None else f"about ${est['usd']:.2f}"
    ctx.log(
        f"openai: {est['examples']} examples, {est['file_tokens']} tokens x {est['n_epochs']} epochs = "
        f"{est['billed_tokens']} billed tokens, {price} ({est['counted_with']})"
    )


def check_key(ctx: StageContext) -> None:
    """A missing key fails the run before anything is uploaded."""
    openai_api.api_key(ctx.cfg.openai)


def start_job(ctx: StageContext, files: ApiFiles) -> str:
    """Upload the files and create the job; returns its id, tagged on the run."""
    cfg = ctx.cfg.openai
    api = openai_api.client(cfg, openai_api.api_key(cfg))
    training_id = openai_api.upload(api, files.training)
    validation_id = openai_api.upload(api, files.validation) if files.validation else None
    job_id = openai_api.create_job(api, cfg, (training_id, validation_id), ctx.cfg.seed)
    _require_run(ctx).set_tags({"openai.job_id": job_id, "openai.training_file": training_id})
    ctx.log(f"openai: job {job_id} created on {cfg.model}")
    return job_id


def watch_job(ctx: StageContext, job_id: str) -> str:
    """Wait for the job; returns the `ft:` model id. Its events go to the log, its metrics to the MLflow run.

    Safe to retry: it only reads the job, so an outage while polling costs a retry, not a second job."""
    cfg, run = ctx.cfg.openai, _require_run(ctx)
    api = openai_api.client(cfg, openai_api.api_key(cfg))

    def on_event(event) -> None:
        step_metrics = openai_api.event_metrics(event)
        if step_metrics is not None:
            step, numbers = step_metrics
            run.log_metrics({f"openai/{k}": v for k, v in numbers.items()}, step)
        else:
            ctx.log(f"openai job {job_id}: {event.message}")

    job = openai_api.wait(api, openai_api.JobWatch(job_id), cfg, on_event)
    run.set_tags({"openai.fine_tuned_model": job.fine_tuned_model})
    if getattr(job, "trained_tokens", None):
        run.log_metrics({"openai/trained_tokens": float(job.trained_tokens)})
    return job.fine_tuned_model


def heldout_prompts(data: CleanData, system_prompt: Optional[str]) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references): each held-out conversation up to its last answer, and that answer."""
    prompts, references = [], []
    for record in data.heldout:
        messages = openai_api.with_system(record.row["messages"], system_prompt)
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
    return prompts, references


def evaluate(ctx: StageContext, data: CleanData, tuned_model: str) -> dict[str, Any]:
    """The base model and the fine-tuned one on the held-out prompts, scored by the local pipeline's metrics."""
    from ftflow.tasks.evaluate.evaluation import score_variant
    from ftflow.tasks.evaluate.metrics import load_suite

    if not data.heldout:
        raise PipelineError("backend=openai: no held-out rows to score the fine-tuned model on")
    cfg = ctx.cfg.openai
    api = openai_api.client(cfg, openai_api.api_key(cfg))
    prompts, references = heldout_prompts(data, ctx.cfg.data.system_prompt)
    suite = load_suite()
    results = {}
    for variant, model in ((BASE, cfg.model), (TUNED, tuned_model)):
        generations = openai_api.complete(api, model, prompts, cfg, ctx.cfg.seed)
        results[variant] = score_variant(variant, generations, references, prompts, None, suite)
    run = _require_run(ctx)
    for variant, result in results.items():
        run.log_metrics({f"eval/{variant}/{k}": v for k, v in result.metrics.items()})
    run.log_metrics({f"eval/{k}": v for k, v in results[TUNED].metrics.items()})
    rows = results[BASE].predictions + results[TUNED].predictions
    run.log_table({k: [row.get(k) for row in rows] for k in rows[0]}, "eval/predictions.json")
    return results


def gate(ctx: StageContext, results: dict[str, Any], tuned_model: str) -> dict[str, Any]:
    """The local gate's decision (primary metric vs the base model, with its interval), then a registry version
    whose model calls `tuned_model` through the API: @champion when the gate promotes, @challenger otherwise."""
    from ftflow.tasks.registry import api_model
    from ftflow.tasks.registry import gate as registry

    cfg, run = ctx.cfg, _require_run(ctx)
    decision = registry.decide(TUNED, results, cfg)
    run.log_dict(decision.as_dict(), "gate/decision.json")
    run.set_tags({"gate.decision": decision.summary()[:5000]})
    ctx.log(f"gate: {decision.summary()}")
    client = registry.registry_client(cfg)
    with ctx.exclusive(f"registry:{cfg.registry.model_name}"):
        logged = api_model.log_api_model(cfg, tuned_model, run.run_id, client)
        version = registry.register_candidate(
            client, cfg.registry.model_name, run.run_id, source=logged.model_uri, model_id=logged.model_id
        )
        alias = registry.apply_decision(client, cfg.registry.model_name, version, decision, run.run_id)
        client.set_model_version_tag(cfg.registry.model_name, version, "openai.fine_tuned_model", tuned_model)
        client.update_model_version(
            cfg.registry.model_name, version, description=api_model.describe(decision, tuned_model, run.run_id)
        )
    return {
        "promoted": decision.promote,
        "alias": alias,
        "version": version,
        "summary": decision.summary(),
        "reasons": decision.reasons,
    }
