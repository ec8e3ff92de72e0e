"""A model card per registered version, in the Hugging Face layout (YAML front matter + Markdown).

`build_card(facts)` is pure: everything it writes comes from `CardFacts`, which `gather_facts`
reads from what the run logged to MLflow (params, the resolved config, dataset inputs with their
digests, `data/` validation metrics, `eval/<variant>/` held-out metrics, the gate's tags). The card
goes to the run as `model_card/README.md` and next to exported weights as `README.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Held-out rows in the order a reader compares them: prompting baselines first, then the tuned models.
VARIANT_ORDER = ("base", "base_fewshot", "sft", "dpo", "champion")
HELDOUT_COLUMNS = (
    "heldout_exact",
    "heldout_field_accuracy",
    "heldout_json_valid",
    "heldout_rougeL",
    "heldout_chrf",
    "eos_stop_rate",
    "heldout_loss",
    "preference_accuracy",
)
# qlora is LoRA trained on a quantized base: the same adapter format and card rows.
LORA_METHODS = ("lora", "qlora")
VALIDATION_FIGURES = ("rows_in", "rows_kept", "rows_dropped", "kept_ratio", "contract_passed")


@dataclass
class CardFacts:
    base_model: str
    method: str
    stage: str
    run_id: str
    primary_metric: str
    model_name: Optional[str] = None
    version: Optional[str] = None
    aliases: list[str] = field(default_factory=list)
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, target_modules
    quantization: str = "4bit"
    datasets: list[dict[str, Any]] = field(default_factory=list)  # name, digest, context, rows
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> figures, dropped reasons
    heldout: list[dict[str, Any]] = field(default_factory=list)  # {"model": variant, metric: value, ...}
    few_shot_k: int = 0
    gate_summary: Optional[str] = None
    manual_promotion: Optional[str] = None
    template_fingerprint: Optional[str] = None
    system_prompt: Optional[str] = None
    run_url: Optional[str] = None
    license: Optional[str] = None
    intended_use: Optional[str] = None
    limitations: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    library_versions: dict[str, str] = field(default_factory=dict)


def _count(value: Any) -> str:
    return "-" if value is None else str(int(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _front_matter(f: CardFacts) -> str:
    meta: dict[str, Any] = {
        "base_model": f.base_model,
        "library_name": "peft" if f.method in (*LORA_METHODS, "prompt_tuning") else "transformers",
    }
    if f.license:
        meta["license"] = f.license
    if f.languages:
        meta["language"] = list(f.languages)
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [
        "ftflow",
        f.method,
        f.stage,
        *(["trl", "sft"] if f.stage == "sft" else []),
        *(["trl", "dpo"] if f.stage == "dpo" else []),
    ]
    meta["tags"] = list(dict.fromkeys(meta["tags"]))
    # No `datasets:` key: the card's data sets are local files, and the Hub reads that key as Hub dataset ids.
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _heldout_table(f: CardFacts) -> list[str]:
    columns = [c for c in HELDOUT_COLUMNS if any(row.get(c) is not None for row in f.heldout)]
    if f.primary_metric not in columns and any(row.get(f.primary_metric) is not None for row in f.heldout):
        columns.insert(0, f.primary_metric)
    names = {
        "base": "base, zero-shot",
        "base_fewshot": f"base, {f.few_shot_k}-shot prompt",
        "sft": "SFT adapter",
        "dpo": "DPO adapter",
        "champion": "previous champion",
    }
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in f.heldout:
        label = names.get(row["model"], row["model"])
        if row["model"] == f.stage:
            label = f"**{label} (this model)**"
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines


def build_card(f: CardFacts) -> str:
    """The card's Markdown, with YAML front matter; a pure function of `f`."""
    title = f"{f.model_name} v{f.version}" if f.model_name and f.version else f"ftflow {f.method} adapter"
    out = [_front_matter(f), f"# {title}", ""]
    out.append(
        f"A {'LoRA' if f.method in LORA_METHODS else f.method} adapter for `{f.base_model}`, trained by the "
        f"ftflow pipeline ({'SFT then DPO' if f.stage == 'dpo' else 'SFT'}) and registered in MLflow"
        + (
            f" with alias{'es' if len(f.aliases) > 1 else ''} {', '.join(f'`@{a}`' for a in f.aliases)}"
            if f.aliases
            else ""
        )
        + "."
    )
    out += [
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{f.base_model}` |",
        f"| method | {f.method} ({f.stage}) |",
    ]
    if f.method in LORA_METHODS and f.lora:
        out.append(
            f"| LoRA | r = {f.lora.get('r')}, alpha = {f.lora.get('alpha')}, dropout = {f.lora.get('dropout')} |"
        )
        if f.lora.get("target_modules"):
            out.append(f"| target modules | {', '.join(f.lora['target_modules'])} |")
    out.append(f"| training quantization | {f.quantization} |")
    if f.template_fingerprint:
        out.append(f"| chat-template fingerprint | `{f.template_fingerprint}` |")
    if f.system_prompt:
        out.append(f"| system prompt | {f.system_prompt} |")
    out.append(f"| MLflow run | {f'[{f.run_id}]({f.run_url})' if f.run_url else f'`{f.run_id}`'} |")

    out += ["", "## Training data", ""]
    if f.datasets:
        out += ["| data set | role | rows | digest |", "|---|---|---|---|"]
        out += [
            f"| {d['name']} | {d.get('context', '-')} | {_fmt(d.get('rows'))} | `{d['digest']}` |" for d in f.datasets
        ]
    else:
        out.append("No data sets were logged with the run.")
    if f.validation:
        out += [
            "",
            "Validation (rows in, kept, dropped, kept share, contract):",
            "",
            "| split | rows in | kept | dropped | kept ratio | contract | dropped by reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for split, v in f.validation.items():
            # Held-out splits are small by design: the pipeline checks their contract but does not enforce it.
            contract = (
                "not enforced"
                if split.startswith("heldout")
                else {1.0: "passed", 0.0: "failed"}.get(v.get("contract_passed"), "-")
            )
            reasons = ", ".join(f"{r} {int(n)}" for r, n in sorted(v.get("reasons", {}).items()) if n) or "-"
            out.append(
                f"| {split} | {_count(v.get('rows_in'))} | {_count(v.get('rows_kept'))} | "
                f"{_count(v.get('rows_dropped'))} | {_fmt(v.get('kept_ratio'))} | {contract} | {reasons} |"
            )

    out += [
        "",
        "## Evaluation",
        "",
        f"Greedy generations on the held-out prompts; the gate ranks on `{f.primary_metric}`. The few-shot row is "
        "the prompting baseline the adapter has to beat.",
        "",
    ]
    out += _heldout_table(f) if f.heldout else ["No held-out metrics were logged with the run."]

    out += ["", "## Registry decision", "", f.gate_summary or "This version did not go through the promotion gate."]
    if f.manual_promotion:
        out += ["", f"Manual promotion: {f.manual_promotion}"]

    out += [
        "",
        "## Intended use",
        "",
        f.intended_use
        or "The task the training data describes, through the base model's own chat template (the fingerprint "
        "above; ftflow refuses to serve the adapter under another). Use greedy decoding, as evaluated.",
        "",
        "## Limitations",
        "",
        "- Figures come from the held-out split of the same data source: they do not measure other tasks, "
        "other languages or other prompt styles.",
        f"- It inherits the base model's limits and biases; fine-tuning on {f.stage.upper()} data does not remove them.",
        "- A LoRA trained on a 4-bit base and merged into 16/32-bit weights is not bit-identical to the model "
        "that was evaluated; `ftflow export` checks the merged copy against it before writing it out."
        if f.method in LORA_METHODS and f.quantization != "none"
        else "- The adapter was evaluated on the base weights it was trained on; other base revisions are untested.",
        "- Nothing here was reviewed for safety beyond the pipeline's data checks (PII flagging, duplicates, "
        "language filter).",
        *(f"- {item}" for item in f.limitations),
    ]
    if f.license:
        out += ["", "## License", "", f"`{f.license}` (from the recipe's `registry.license`)."]
    if f.library_versions:
        out += ["", "## Framework versions", ""]
        out += [f"- {k} {v}" for k, v in f.library_versions.items()]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class CardSubject:
    """What the card describes beyond the run: the registered version, the run's page, how it was trained."""

    model_name: Optional[str] = None
    version: Optional[str] = None
    run_url: Optional[str] = None
    method: str = "lora"
    stage: Optional[str] = None  # empty: "dpo" when the run logged dpo/ metrics, else "sft"


def gather_facts(client, run_id: str, subject: Optional[CardSubject] = None) -> CardFacts:
    """Read what the run logged (and the version's tags) into CardFacts."""
    import tempfile

    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    try:
        with tempfile.TemporaryDirectory(prefix="card-") as scratch:
            local = client.download_artifacts(run_id, "config/resolved_config.yaml", scratch)
            config = yaml.safe_load(Path(local).read_text(encoding="utf-8")) or {}
    except (MlflowException, OSError):
        config = {}
    subject = subject or CardSubject()
    model_name, version, run_url, method = subject.model_name, subject.version, subject.run_url, subject.method
    stage = subject.stage or ("dpo" if any(k.startswith("dpo/") for k in metrics) else "sft")
    aliases, manual, gate = [], None, tags.get("gate.decision")
    if model_name and version:
        mv = client.get_model_version(model_name, version)
        aliases = list(getattr(mv, "aliases", []) or [])
        gate = mv.tags.get("ftflow.gate", gate)
        manual = mv.tags.get("ftflow.manual_promotion")
        if manual:
            try:
                record = json.loads(manual)
                manual = f"{record.get('reason')} (by {record.get('by')}, {record.get('at')}, moved from v{record.get('previous')})"
            except ValueError:
                pass
    datasets = []
    for d in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), None)
        rows = None
        try:
            rows = json.loads(d.dataset.profile or "{}").get("num_rows")
        except ValueError:
            pass
        datasets.append({"name": d.dataset.name, "digest": d.dataset.digest, "context": context, "rows": rows})
    validation: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] != "data" or len(parts) < 3:
            continue
        split, figure = parts[1], "/".join(parts[2:])
        if figure in VALIDATION_FIGURES:
            validation.setdefault(split, {})[figure] = value
        elif figure.startswith("dropped/"):
            validation.setdefault(split, {}).setdefault("reasons", {})[figure[len("dropped/") :]] = value
    heldout = []
    variants = {k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") == 2}
    for variant in [v for v in VARIANT_ORDER if v in variants] + sorted(variants - set(VARIANT_ORDER)):
        prefix = f"eval/{variant}/"
        heldout.append({"model": variant, **{k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}})
    lora = config.get("lora", {})
    alpha = params.get("lora.alpha") or lora.get("alpha") or (2 * int(lora["r"]) if lora.get("r") else None)
    registry = config.get("registry", {})
    return CardFacts(
        base_model=params.get("model.name_or_path") or config.get("model", {}).get("name_or_path", "unknown"),
        method=method,
        stage=stage,
        run_id=run_id,
        primary_metric=params.get("eval.primary_metric")
        or config.get("eval", {}).get("primary_metric", "heldout_exact"),
        model_name=model_name,
        version=str(version) if version else None,
        aliases=aliases,
        lora={
            "r": lora.get("r", params.get("lora.r")),
            "alpha": alpha,
            "dropout": lora.get("dropout"),
            "target_modules": lora.get("target_modules"),
        },
        quantization=config.get("quantization", {}).get("mode", params.get("quantization.mode", "4bit")),
        datasets=datasets,
        validation=validation,
        heldout=heldout,
        few_shot_k=int(config.get("eval", {}).get("few_shot_k", 0) or 0),
        gate_summary=gate,
        manual_promotion=manual,
        template_fingerprint=params.get("chat_template.fingerprint"),
        system_prompt=config.get("data", {}).get("system_prompt"),
        run_url=run_url,
        license=registry.get("license"),
        intended_use=registry.get("intended_use"),
        limitations=list(registry.get("limitations") or []),
        languages=list(config.get("quality", {}).get("languages", []) or []),
        library_versions={
            k[len("version.") :]: v
            for k, v in sorted(params.items())
            if k.startswith("version.") and k[len("version.") :] in ("transformers", "peft", "trl", "torch")
        },
    )
