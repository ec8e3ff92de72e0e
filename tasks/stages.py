"""The pipeline's stages as plain functions: config + inputs in, results out, MLflow by explicit run id.

flows/ wraps each one in a Prefect task; nothing here knows about Prefect, so the same stages run in
tests, in the CLI and in a worker.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import ContractError, DataError
from ftflow.tasks.data.rows import Dropped, Kind, Record
from ftflow.tasks.tracking import RunLogger

Log = Callable[[str], None]


@dataclass
class ModelInfo:
    path: str
    eos_token: str
    template_fingerprint: str
    source_sha256: Optional[str] = None


@dataclass
class CleanData:
    sft: list[Record]
    preference: list[Record]
    heldout: list[Record]
    heldout_preference: list[Record]
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)


def resolve_model(cfg: PipelineConfig) -> ModelInfo:
    from ftflow.tasks.data.formatting import end_of_turn_token, template_fingerprint
    from ftflow.tasks.train.model import load_tokenizer, model_fingerprint, offline_env, resolve_model_path

    offline_env()
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    return ModelInfo(path, end_of_turn_token(tokenizer), template_fingerprint(tokenizer), model_fingerprint(path))


def data_paths(cfg: PipelineConfig, work_dir: Path) -> dict[str, Optional[str]]:
    if cfg.data.demo.enabled:
        from ftflow.tasks.data.demo import generate_demo

        made = generate_demo(cfg.data.demo, work_dir / "demo_data")
        return {k: str(made[k]) for k in ("sft", "preference", "heldout", "heldout_preference")}
    return {
        "sft": cfg.data.sft_path,
        "preference": cfg.data.preference_path if cfg.dpo.enabled else None,
        "heldout": cfg.data.heldout_path,
        "heldout_preference": cfg.data.heldout_preference_path,
    }


def _split(records: list[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    import random

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(records) * share))
    held = set(order[:cut])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def validate_split(path: str, kind: Kind, cfg: PipelineConfig, token_length, out_dir: Path,
                   enforce_contract: bool = True) -> tuple[list[Record], dict[str, Any], dict[str, Path]]:
    """Load → quality checks → GX contract → report files (quarantine included). Raises on a failed contract."""
    from ftflow.tasks.data.contracts import enforce, run_contracts
    from ftflow.tasks.data.formats import load_rows
    from ftflow.tasks.data.quality import run_quality
    from ftflow.tasks.data.report import build_report, write_report_files

    records, schema_dropped = load_rows(path, kind, cfg.data.format)
    result = run_quality(records, kind, cfg.quality, token_length)
    result.dropped = schema_dropped + result.dropped
    result.counts_in += len(schema_dropped)
    for d in schema_dropped:
        result.reasons[d.reason] = result.reasons.get(d.reason, 0) + 1
    if not result.kept:
        files = write_report_files(build_report(result, None), result, out_dir)
        raise DataError(f"no {kind} rows left after validation ({result.counts_in} in; reasons: {result.reasons}); "
                        f"see {files['quarantine']}", path)
    contract = run_contracts(result, cfg.quality)
    report = build_report(result, contract)
    files = write_report_files(report, result, out_dir)
    if enforce_contract:
        enforce(contract)
    return result.kept, report, files


def data_cache_key(cfg: PipelineConfig, model: ModelInfo, paths: dict[str, Optional[str]]) -> str:
    """Content address of validation: the bytes of every input, the checks' settings and code, the template."""
    import hashlib

    h = hashlib.sha256()
    for split in sorted(paths):
        h.update(split.encode())
        path = Path(paths[split]) if paths[split] else None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path and path.is_dir() else [path] if path else []
        for f in files:
            if f.exists():
                h.update(f.read_bytes())
            else:
                h.update(f"missing:{f}".encode())
    h.update(cfg.quality.model_dump_json().encode())
    h.update(cfg.data.model_dump_json(exclude={"demo"}).encode())
    h.update(f"{model.path}|{model.template_fingerprint}|{cfg.seed}".encode())
    # The whole package, not a hand-kept list of modules: an edit anywhere the cached stages reach
    # (formatting, rows, the checks) must invalidate the cache.
    here = Path(__file__).resolve().parent
    for module in sorted(here.rglob("*.py")):
        h.update(module.relative_to(here).as_posix().encode())
        h.update(module.read_bytes())
    for suite in sorted((here.parent / "data_contracts").glob("*.json")):
        h.update(suite.read_bytes())
    return h.hexdigest()[:20]


def validate_data(cfg: PipelineConfig, model: ModelInfo, paths: dict[str, Optional[str]], out_dir: Path,
                  log: Log = print) -> CleanData:
    """Every split through the same checks; leakage between train and held-out fails the run.

    Writes reports and quarantine files under out_dir (content-addressed by the caller, so a cached
    result still points at files that exist)."""
    from ftflow.tasks.train.model import load_tokenizer
    from ftflow.tasks.data.quality import chat_token_lengths, check_leakage

    tokenizer = load_tokenizer(model.path, cfg.model)
    token_length = chat_token_lengths(tokenizer)
    if not paths.get("sft"):
        raise DataError("data.sft_path is not set", "config")
    out: dict[str, list[Record]] = {}
    reports: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, str]] = {}
    for split, kind in (("sft", "sft"), ("preference", "preference"), ("heldout", "sft"),
                        ("heldout_preference", "preference")):
        if not paths.get(split):
            out[split] = []
            continue
        # Held-out sets are small by design; the training-size contracts apply to train splits only.
        kept, report, written = validate_split(paths[split], kind, cfg, token_length, out_dir / split,
                                               enforce_contract=not split.startswith("heldout"))
        out[split], reports[split] = kept, report
        files[split] = {k: str(v) for k, v in written.items()}
        log(f"validated {split}: {report['counts_in']} rows in, {len(kept)} kept, dropped by reason {report['reasons']}")
    if not out["heldout"]:
        out["sft"], out["heldout"] = _split(out["sft"], 0.1, cfg.seed)
        log(f"no held-out file: held out {len(out['heldout'])} SFT rows (seeded split)")
    for train_split, held_split in (("sft", "heldout"), ("preference", "heldout_preference")):
        hits = check_leakage(out[train_split], out[held_split], cfg.quality.near_duplicate_threshold)
        if hits:
            leak_file = out_dir / f"leakage_{held_split}.json"
            leak_file.write_text(json.dumps(hits[:1000], ensure_ascii=False, indent=1, default=str), encoding="utf-8")
            first = hits[0]
            raise ContractError(
                f"train/held-out leakage: {len(hits)} {held_split} row(s) duplicate {train_split} rows "
                f"(first: {first.get('heldout_source')}:{first.get('heldout_line')} ~ "
                f"{first.get('train_source')}:{first.get('train_line')}, {first.get('kind')}); see {leak_file}")
    data = CleanData(out["sft"], out["preference"], out["heldout"], out["heldout_preference"], reports,
                     {k: v for k, v in paths.items() if v})
    data.files = files
    return data


def log_data(data: CleanData, run: RunLogger) -> None:
    from ftflow.tasks.data.report import report_metrics

    for split, report in data.reports.items():
        run.log_metrics(report_metrics(report, prefix=f"data/{split}/"))
        for f in data.files.get(split, {}).values():
            if Path(f).exists():
                run.log_artifact(f, f"data/{split}")
    if "sft" in data.reports:
        run.log_metrics({"data/kept_ratio": data.reports["sft"]["kept_ratio"]})
    for split in ("sft", "preference", "heldout", "heldout_preference"):
        rows = getattr(data, split)
        if rows:
            run.log_dataset([r.row for r in rows], name=split, context="heldout" if split.startswith("heldout") else "train",
                            source=data.paths.get(split, "heldout split of sft"))


def format_stage(cfg: PipelineConfig, model: ModelInfo, data: CleanData):
    from ftflow.tasks.data.formatting import format_data
    from ftflow.tasks.train.model import load_tokenizer

    tokenizer = load_tokenizer(model.path, cfg.model)
    train = format_data(tokenizer, data.sft, data.preference, cfg.data.system_prompt)
    held = format_data(tokenizer, data.heldout, data.heldout_preference, cfg.data.system_prompt)
    return train, held


def log_format(train, model: ModelInfo, run: RunLogger) -> None:
    run.log_metrics({f"format/{k}": v for k, v in train.token_stats.items()})
    run.log_params({"chat_template.fingerprint": train.template_fingerprint, "chat_template.eos": model.eos_token,
                    "model.source_sha256": model.source_sha256 or "n/a"})


def train_stage(kind: str, cfg: PipelineConfig, model: ModelInfo, examples: list[dict], work_dir: Path,
                run: Optional[RunLogger], progress=None, sft_adapter: Optional[str] = None):
    """SFT or DPO; checkpoints live under work_dir so a retried task resumes from the last one."""
    from ftflow.tasks.train.dpo import run_dpo
    from ftflow.tasks.train.sft import run_sft

    log_metrics = run.log_metrics if run is not None else (lambda m, s: None)
    out_dir = work_dir / kind
    if cfg.distributed.num_processes > 1:
        from ftflow.tasks.train.launch import launch
        from ftflow.tasks.train.model import pick_device

        result = launch(kind, cfg, model.path, examples, out_dir, run.run_id if run else None, sft_adapter,
                        pick_device(cfg.model))
    elif kind == "sft":
        result = run_sft(cfg, model.path, examples, out_dir, log_metrics, progress)
    else:
        result = run_dpo(cfg, model.path, sft_adapter, examples, out_dir, log_metrics, progress)
    Path(result.adapter_dir, "ftflow_meta.json").write_text(json.dumps({
        "template_fingerprint": model.template_fingerprint, "eos_token": model.eos_token,
        "base_model": cfg.model.name_or_path, "base_sha256": model.source_sha256, "stage": kind,
        "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.resolved_alpha,
    }, indent=2))
    if run is not None:
        run.log_metrics({f"{kind}/trainable_params": result.trainable_params, f"{kind}/wall_s": result.wall_s,
                         f"{kind}/peak_memory_mb": result.peak_memory_mb, f"{kind}/resumed_from_step": result.resumed_from_step})
        run.log_artifact(result.adapter_dir, f"adapters/{kind}")
    return result


def evaluate_stage(cfg: PipelineConfig, model: ModelInfo, train_sft: list[dict], heldout: list[dict],
                   heldout_pairs: list[dict], adapters: dict[str, str], run: Optional[RunLogger], log: Log = print,
                   candidate: Optional[str] = None, precomputed: Optional[dict] = None):
    """Score base, few-shot and every adapter; `candidate` (default: the last trained) gets the headline eval/ keys.

    With no adapters it scores the base variants alone; `precomputed` base variants are reused."""
    from peft import PeftModel

    from ftflow.tasks.evaluate.evaluation import check_heldout, check_template, evaluate_variants
    from ftflow.tasks.train.model import load_base_model, load_tokenizer

    check_heldout(heldout, train_sft)
    tokenizer = load_tokenizer(model.path, cfg.model)
    for name, adapter_dir in adapters.items():
        if not Path(adapter_dir, "adapter_config.json").exists():
            raise DataError(f"{name} adapter is missing (no adapter_config.json)", adapter_dir)
        check_template(adapter_dir, model.template_fingerprint, tokenizer)
    base = load_base_model(model.path, cfg.model, cfg.quantization)
    base.eval()
    names = list(adapters)
    scored_model = base
    if names:
        scored_model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            scored_model.load_adapter(adapters[name], adapter_name=name)
        scored_model.eval()
    variants = ["base"] + (["base_fewshot"] if cfg.eval.few_shot_k else []) + names
    shots = train_sft[: cfg.eval.few_shot_k]
    results = evaluate_variants(scored_model, tokenizer, variants, heldout, heldout_pairs, shots, cfg.eval,
                                model.eos_token, cfg.dpo.beta, cfg.sft.max_length, log, precomputed)
    if run is not None and names:
        import pandas as pd

        for variant, res in results.items():
            run.log_metrics({f"eval/{variant}/{k}": v for k, v in res.metrics.items()})
        candidate = candidate or names[-1]
        run.log_metrics({f"eval/{k}": v for k, v in results[candidate].metrics.items()})
        table = pd.DataFrame([p for res in results.values() for p in res.predictions])
        run.log_table(table, "eval/predictions.json")
    return results


def comparison_rows(results) -> list[dict[str, Any]]:
    keys = ["heldout_exact", "heldout_field_accuracy", "heldout_rougeL", "heldout_chrf", "eos_stop_rate",
            "heldout_loss", "heldout_perplexity", "preference_accuracy", "reward_margin"]
    return [{"model": v, **{k: res.metrics.get(k) for k in keys}} for v, res in results.items()]


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, also readable in a terminal."""
    headers = list(rows[0])
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(r[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    axes = fig.subplots(1, len(histories)) if len(histories) > 1 else [fig.subplots()]
    for ax, (name, history) in zip(axes, histories.items()):
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if points:
            ax.plot(*zip(*points), marker="o")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@dataclass
class Champion:
    version: str
    run_id: str
    adapter_dir: Optional[str]
    recorded_metrics: dict[str, float]


def find_champion(cfg: PipelineConfig, model: ModelInfo, log: Log = print) -> Optional[Champion]:
    """The current champion, with its adapter when it can be re-scored on this run's held-out prompts."""
    from ftflow.tasks.registry import gate as registry

    if not cfg.registry.enabled:
        return None
    client = registry.registry_client(cfg)
    registry.check_reachable(client, cfg)
    version = registry.champion_version(client, cfg.registry.model_name)
    if version is None:
        log("no champion yet: the candidate is compared with the base model only")
        return None
    adapter = registry.champion_adapter(client, version)
    if adapter is not None:
        meta_path = Path(adapter, "ftflow_meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("template_fingerprint") != model.template_fingerprint or meta.get("base_sha256") != model.source_sha256:
            log(f"champion v{version.version} was trained on another base or template; using its recorded metrics")
            adapter = None
    return Champion(version.version, version.run_id, adapter, registry.champion_recorded_metrics(client, version))


def gate_stage(cfg: PipelineConfig, model: ModelInfo, results: dict, candidate: str, adapter_dir: str,
               champion: Optional[Champion], run: RunLogger, log: Log = print) -> dict[str, Any]:
    """Register the candidate (idempotently) and move `champion` only through the gate; else `challenger`."""
    from ftflow.tasks.registry import gate as registry

    baselines = {name: results[name].metrics for name in ("base", "base_fewshot") if name in results}
    champion_metrics = None
    if champion is not None:
        champion_metrics = results["champion"].metrics if "champion" in results else champion.recorded_metrics
    decision = registry.decide(results[candidate].metrics, baselines, champion_metrics, cfg)
    log(f"gate: {decision.summary()}")
    client = registry.registry_client(cfg)
    registry.check_reachable(client, cfg)
    meta = {"template_fingerprint": model.template_fingerprint, "eos_token": model.eos_token}
    packaged = registry.package_model(cfg, adapter_dir, meta, Path(adapter_dir).parent.parent / "registry")
    run.log_artifact(packaged, "registry_model")
    version = registry.register_candidate(client, cfg.registry.model_name, run.run_id)
    alias = registry.apply_decision(client, cfg.registry.model_name, version, decision, run.run_id)
    run.log_metrics({"gate/promoted": float(decision.promote)})
    run.set_tags({"gate.decision": decision.summary(), "gate.alias": alias, "gate.version": version})
    run.log_dict({"promote": decision.promote, "reasons": decision.reasons, "candidate": decision.candidate,
                  "compared_with": decision.compared_with, "version": version, "alias": alias}, "gate/decision.json")
    return {"promoted": decision.promote, "alias": alias, "version": version, "reasons": decision.reasons}
