"""The fine-tuning pipeline as a Prefect flow: validate → format → QLoRA SFT → DPO → evaluate → gate.

Reads top to bottom like the recipe it is; the logic lives in tasks/.
"""
from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from ftflow.configs.loader import apply_overrides, config_from_dict, load_config
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import stages
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.tracking import RunLogger, ui_command


def transient_only(task, task_run, state) -> bool:
    """Retry what can heal by itself (I/O, a busy registry), never bad input or a bad config."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False


def _log(msg: str) -> None:
    get_run_logger().info(msg)


def _progress(artifact_id, label: str):
    logger = get_run_logger()

    def update(step: int, max_steps: int, metrics: dict[str, float]) -> None:
        shown = {k: metrics[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "learning_rate") if k in metrics}
        logger.info(f"{label} step {step}/{max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if artifact_id is not None and max_steps:
            update_progress_artifact(artifact_id, progress=100.0 * step / max_steps,
                                     description=f"{label}: step {step}/{max_steps}, loss {metrics.get('loss', float('nan')):.4f}")
    return update


@task(name="resolve-model", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def resolve_model(cfg: PipelineConfig) -> stages.ModelInfo:
    return stages.resolve_model(cfg)


@task(name="collect-data", cache_policy=NO_CACHE)
def collect_data(cfg: PipelineConfig, work_dir: Path) -> dict[str, Optional[str]]:
    return stages.data_paths(cfg, work_dir)


def _content_key(context, parameters) -> str:
    # validated_dir is named by the content hash of inputs, settings and checking code (stages.data_cache_key);
    # its full path is part of the key so a cached result always points at report files that exist.
    where = hashlib.sha256(str(Path(parameters["validated_dir"]).resolve()).encode()).hexdigest()[:12]
    return f"{context.task.name}-{Path(parameters['validated_dir']).name}-{where}"


@task(name="validate-data", cache_key_fn=_content_key, persist_result=True, cache_expiration=timedelta(days=7))
def validate_data(cfg: PipelineConfig, model: stages.ModelInfo, paths: dict, validated_dir: Path) -> stages.CleanData:
    return stages.validate_data(cfg, model, paths, validated_dir, _log)


@task(name="format-chat", cache_key_fn=_content_key, persist_result=True, cache_expiration=timedelta(days=7))
def format_chat(cfg: PipelineConfig, model: stages.ModelInfo, data: stages.CleanData, validated_dir: Path):
    return stages.format_stage(cfg, model, data)


@task(name="log-data", cache_policy=NO_CACHE)
def log_data(data: stages.CleanData, train_set, model: stages.ModelInfo, run: RunLogger) -> None:
    from ftflow.tasks.data.report import report_markdown

    stages.log_data(data, run)
    stages.log_format(train_set, model, run)
    sections = [f"## {split}\n\n{report_markdown(report)}" for split, report in data.reports.items()]
    create_markdown_artifact("# Data validation\n\n" + "\n\n".join(sections), key="data-validation",
                             description="Rows in and out per reason, contracts, quarantine counts")


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def train(kind: str, cfg: PipelineConfig, model: stages.ModelInfo, examples: list[dict], work_dir: Path,
          run: RunLogger, sft_adapter: Optional[str] = None):
    artifact = create_progress_artifact(progress=0.0, key=f"{kind}-progress", description=f"{kind} training")
    result = stages.train_stage(kind, cfg, model, examples, work_dir, run, _progress(artifact, kind), sft_adapter)
    update_progress_artifact(artifact, progress=100.0, description=f"{kind} done: {result.global_step} steps")
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, model: stages.ModelInfo, train_sft: list[dict], heldout: list[dict],
             heldout_pairs: list[dict], adapters: dict[str, str], run: Optional[RunLogger], candidate: Optional[str],
             precomputed: Optional[dict] = None):
    return stages.evaluate_stage(cfg, model, train_sft, heldout, heldout_pairs, adapters, run, _log, candidate,
                                 precomputed)


@task(name="find-champion", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def find_champion(cfg: PipelineConfig, model: stages.ModelInfo) -> Optional[stages.Champion]:
    return stages.find_champion(cfg, model, _log)


@task(name="promotion-gate", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def promotion_gate(cfg: PipelineConfig, model: stages.ModelInfo, results: dict, candidate: str, adapter_dir: str,
                   champion: Optional[stages.Champion], run: RunLogger) -> dict[str, Any]:
    return stages.gate_stage(cfg, model, results, candidate, adapter_dir, champion, run, _log)


def resolve_config(config: Optional[PipelineConfig], recipe: Optional[str], overrides: list[str]) -> PipelineConfig:
    if recipe:
        return load_config(recipe, overrides)
    base = (config or PipelineConfig()).model_dump(mode="json")
    return config_from_dict(apply_overrides(base, overrides), "flow parameters") if overrides else (config or PipelineConfig())


@flow(name="fine-tune")
def pipeline_flow(
    config: PipelineConfig = PipelineConfig(),
    recipe: Optional[str] = None,
    overrides: list[str] = [],
    resume_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """One pipeline run: validate → format → QLoRA SFT → DPO → evaluate → promotion gate.

    Args:
        config: The whole run, section by section; ignored when recipe is set.
        recipe: A recipe in configs/ (e.g. production) or a YAML path; replaces config.
        overrides: key.sub=value edits applied last, e.g. lora.r=8.
        resume_run_id: Continue an interrupted run: same MLflow run, training from its last checkpoint.
    """
    cfg = resolve_config(config, recipe, list(overrides))
    run = RunLogger.resume(cfg, resume_run_id) if resume_run_id else RunLogger.start(cfg, tags={"pipeline": "fine-tune"})
    return run_pipeline(cfg, run)


@dataclass
class Prepared:
    model: stages.ModelInfo
    data: stages.CleanData
    train_set: Any
    heldout_set: Any
    validated_dir: Path


@dataclass
class Trained:
    adapters: dict[str, str]
    histories: dict[str, list]
    results: dict
    candidate: str
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    trainable_params: int = 0


def prepare(cfg: PipelineConfig, run: RunLogger, work_dir: Path, failure_files: list) -> Prepared:
    """Resolve the model, validate and format the data (cached by content), and log the data to `run`."""
    model = resolve_model(cfg)
    paths = collect_data(cfg, work_dir)
    validated_dir = Path(cfg.output_dir) / "validated" / stages.data_cache_key(cfg, model, paths)
    failure_files.append(validated_dir)
    data = validate_data(cfg, model, paths, validated_dir)
    train_set, heldout_set = format_chat(cfg, model, data, validated_dir)
    log_data(data, train_set, model, run)
    return Prepared(model, data, train_set, heldout_set, validated_dir)


def train_and_evaluate(cfg: PipelineConfig, prep: Prepared, run: RunLogger, work_dir: Path,
                       champion: Optional[stages.Champion], baselines: Optional[dict] = None) -> Trained:
    """SFT, then DPO from the SFT adapter, then every variant (and the champion, if any) on the held-out set."""
    sft = train("sft", cfg, prep.model, prep.train_set.sft, work_dir, run)
    adapters, histories = {"sft": sft.adapter_dir}, {"sft": sft.history}
    wall, peak = sft.wall_s, sft.peak_memory_mb
    if cfg.dpo.enabled and prep.train_set.preference:
        dpo = train("dpo", cfg, prep.model, prep.train_set.preference, work_dir, run, sft_adapter=sft.adapter_dir)
        adapters["dpo"], histories["dpo"] = dpo.adapter_dir, dpo.history
        wall, peak = wall + dpo.wall_s, max(peak, dpo.peak_memory_mb)
    candidate = list(adapters)[-1]
    scored = dict(adapters)
    if champion is not None and champion.adapter_dir:
        scored["champion"] = champion.adapter_dir
    results = evaluate(cfg, prep.model, prep.train_set.sft, prep.heldout_set.sft, prep.heldout_set.preference,
                       scored, run, candidate, baselines)
    run.log_artifact(stages.plot_losses(histories, work_dir / "loss_curves.png"), "plots")
    return Trained(adapters, histories, results, candidate, wall, peak, sft.trainable_params)


def fail_run(run: RunLogger, err: BaseException, failure_files: list, label: str = "Fine-tune run") -> None:
    """Mark the MLflow run FAILED with the reason, keep what explains it, and leave a Prefect artifact."""
    reason = f"{type(err).__name__}: {err}"
    for path in failure_files:
        if Path(path).exists():
            run.log_artifact(path, "data")  # the quarantine and reports explain most data failures
    get_run_logger().error(f"{label} failed: {reason}")
    run.set_tags({"failure_reason": reason[:5000]})
    run.log_text(traceback.format_exc(), "failure/traceback.txt")
    run.finish("FAILED")
    create_markdown_artifact(f"# {label} failed\n\nMLflow run `{run.run_id}`\n\n**Reason:** {reason}\n",
                             key="run-failure", description="Why the run failed")


def run_pipeline(cfg: PipelineConfig, run: RunLogger) -> dict[str, Any]:
    """The body of the flow: any failure marks the MLflow run FAILED and is re-raised."""
    work_dir = Path(cfg.output_dir) / run.run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    failure_files: list = []
    try:
        run.log_config(cfg)
        prep = prepare(cfg, run, work_dir, failure_files)
        champion = find_champion(cfg, prep.model)
        trained = train_and_evaluate(cfg, prep, run, work_dir, champion)
        results, candidate = trained.results, trained.candidate

        gate = None
        if cfg.registry.enabled:
            gate = promotion_gate(cfg, prep.model, results, candidate, trained.adapters[candidate], champion, run)

        rows = stages.comparison_rows(results)
        table = stages.comparison_table(rows)
        if gate is not None:
            table += (f"\n\nRegistry: {cfg.registry.model_name} v{gate['version']} -> @{gate['alias']}"
                      f"\nGate: {'; '.join(gate['reasons'])}")
        create_table_artifact(rows, key="heldout-comparison", description="Held-out comparison: base vs few-shot vs SFT vs DPO")
        summary = (f"# Fine-tune run `{run.run_id}`\n\nMLflow run: [{run.run_id}]({run.url()})\n\n{table}\n\n"
                   f"Open the MLflow UI: `{ui_command(cfg)}`\n")
        create_markdown_artifact(summary, key="fine-tune-summary", description="Pipeline summary")
        run.log_text(summary, "summary.md")
        run.finish("FINISHED")
        print(f"\n{table}\n\nMLflow run {run.run_id}: {run.url()}\nOpen the MLflow UI: {ui_command(cfg)}\n")
        return {"run_id": run.run_id, "metrics": {v: r.metrics for v, r in results.items()}, "work_dir": str(work_dir),
                "gate": gate}
    except BaseException as err:
        fail_run(run, err, failure_files)
        raise
