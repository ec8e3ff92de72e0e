"""`ftflow export`: a registered adapter as plain Hugging Face weights, checked against what was evaluated.

The LoRA path loads the base in 32-bit on CPU (16-bit on CUDA, or `--dtype`), never 4-bit (a QLoRA base is
loaded as trained and dequantized to that dtype first), applies the version's adapter and merges it
(`merge_and_unload`), then writes safetensors, the tokenizer with
its chat template and pad token, and a greedy `generation_config.json` that stops at the template's
end-of-turn token. Nothing in the folder needs ftflow to load. A full fine-tune is written as it is; a
prompt-tuning model cannot merge (its virtual tokens are inputs), so the base goes to the folder and the
adapter to `prompt_adapter/` beside it, for `peft.PeftModel.from_pretrained`.

A LoRA trained on a 4-bit base and merged into full-precision weights is not the model the gate
scored. So before the folder appears, the merged copy (reloaded from disk, as a user would load it)
and the adapter on the base as evaluated (the run's quantization) answer the run's held-out prompts
(from its `eval/predictions.json`) greedily; the export stands only if the answers agree on at least
`MIN_AGREEMENT` of the prompts and the merged model's primary metric lies inside the 95 % bootstrap
interval of the evaluated model's (2000 resamples of the examples, the same resamples for both). The
figures are printed and logged to the source run under `export/`.

Why that interval and not "the paired difference's interval contains zero": a paired interval of the
difference excludes zero for any shift that is consistent across examples, however small. Merging into
fp32 moves the held-out log-likelihood by ~0.0004 nats on nearly every example of the tiny test model;
that is "significant" and means nothing. What matters for an export is whether the change is inside
the evaluation's own noise. The paired interval of the difference is still computed and reported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ftflow.configs.schema import PipelineConfig, Quantization
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.registry.downloads import download_dir
from ftflow.tasks.registry.packaging import RunSettings

Log = Callable[[str], None]
MIN_AGREEMENT = 0.95
RESAMPLES, LEVEL = 2000, 0.95
FORMATS = ("merged",)
EXPORT_META = "ftflow_export.json"
PROMPT_ADAPTER_DIR = "prompt_adapter"
ADAPTER_PATHS = ("registry_model/artifacts/adapter", "adapters/dpo", "adapters/sft")
# Primary metrics with a per-example form: generation scores average over examples; teacher-forced
# log-likelihood is a token-weighted ratio; BLEU/chrF are corpus statistics recomputed per resample.
PER_EXAMPLE = {
    "heldout_exact": "exact_match",
    "heldout_field_accuracy": "field_accuracy",
    "heldout_json_valid": "json_valid",
    "heldout_rougeL": "rougeL",
    "eos_stop_rate": "stopped",
}
TEACHER_FORCED = ("heldout_logprob", "heldout_loss", "heldout_perplexity")
CORPUS = {"heldout_bleu": "bleu", "heldout_chrf": "chrf"}


@dataclass(frozen=True)
class ExportOptions:
    """How to write and check the export: `fmt` one of FORMATS, `dtype` auto|float32|bfloat16|float16."""

    fmt: str = "merged"
    dtype: str = "auto"
    log: Log = print


class ExportError(PipelineError):
    pass


@dataclass
class Source:
    """A registered version (or a bare run) resolved to its run, adapter files and recorded metadata."""

    spec: str
    run_id: str
    adapter_dir: str
    meta: dict[str, Any]
    run_cfg: RunSettings  # the source run's model, quantization and generation settings
    name: Optional[str] = None
    version: Optional[str] = None

    @property
    def method(self) -> str:
        return self.meta.get("method", "lora")

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else f"run {self.run_id}"


@dataclass
class Equivalence:
    n_examples: int
    agreement: float
    primary_metric: str
    merged_score: float
    reference_score: float
    delta: float
    ci_low: float  # the evaluated model's metric, 95 % bootstrap interval: the merged score must be inside
    ci_high: float
    delta_low: float  # the paired difference (merged - evaluated), 95 % bootstrap interval, for the record
    delta_high: float
    passed: bool
    reasons: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{'PASS' if self.passed else 'FAIL'}: greedy answers agree on {self.agreement:.1%} of "
            f"{self.n_examples} held-out prompts (need >= {MIN_AGREEMENT:.0%}); {self.primary_metric} merged "
            f"{self.merged_score:.4f} vs adapter-on-base {self.reference_score:.4f} "
            f"({LEVEL:.0%} bootstrap interval [{self.ci_low:.4f}, {self.ci_high:.4f}]); "
            f"paired difference {self.delta:+.4f} [{self.delta_low:+.4f}, {self.delta_high:+.4f}]"
        )


# --- resolving what to export --------------------------------------------------------------------------------


def parse_model_uri(spec: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3"); else None."""
    if not spec.startswith("models:/"):
        return None
    rest = spec[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise ExportError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def _version(client, spec: str):
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_uri(spec)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ExportError(f"{spec}: no registered model named {name!r}") from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {number}"
        raise ExportError(f"{spec}: registered model {name!r} has no {what}") from None


def _exists(client, run_id: str, path: str) -> bool:
    parent, _, leaf = path.rpartition("/")
    try:
        return any(f.path == path for f in client.list_artifacts(run_id, parent or None))
    except Exception:  # a missing folder raises on some artifact stores and returns [] on others
        return False


def _is_trained_folder(local: str) -> bool:
    """An adapter, or a full fine-tune's whole weights (with the pipeline's metadata beside them)."""
    folder = Path(local)
    return (folder / "adapter_config.json").exists() or (
        (folder / "config.json").exists() and (folder / "ftflow_meta.json").exists()
    )


def _download_logged_model_adapter(client, model_id: str) -> Optional[str]:
    import mlflow.artifacts

    try:
        location = client.get_logged_model(model_id).artifact_location
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/adapter",
            dst_path=download_dir("adapter-"),
            tracking_uri=client.tracking_uri,
        )
    except Exception:
        return None
    return local if _is_trained_folder(local) else None


def find_adapter(client, run_id: str, version=None) -> Optional[str]:
    """The packaged adapter: the version's LoggedModel, else the run's registry_model/, else its last-stage adapter."""
    model_ids = []
    if version is not None:
        # MLflow 3 versions point at a LoggedModel: by model_id, or (some stores leave that empty) by source.
        source = str(version.source)
        model_ids += [
            m
            for m in (
                getattr(version, "model_id", None),
                source[len("models:/") :] if source.startswith("models:/m-") else None,
            )
            if m
        ]
    run = client.get_run(run_id)
    if run.outputs is not None:
        model_ids += [o.model_id for o in run.outputs.model_outputs]
    for model_id in model_ids:
        local = _download_logged_model_adapter(client, model_id)
        if local:
            return local
    paths = list(ADAPTER_PATHS)
    if version is not None and str(version.source).startswith("runs:/"):
        packaged = str(version.source).split("/", 2)[2].strip("/")
        paths.insert(0, f"{packaged}/artifacts/adapter")
    for path in dict.fromkeys(paths):
        if _exists(client, run_id, path):
            local = client.download_artifacts(run_id, path, download_dir("adapter-"))
            if _is_trained_folder(local):
                return local
    return None


def _run_config(client, run_id: str) -> RunSettings:
    import yaml

    if not _exists(client, run_id, "config/resolved_config.yaml"):
        raise ExportError(f"run {run_id} has no config/resolved_config.yaml; it was not logged by ftflow")
    with tempfile.TemporaryDirectory(prefix="ftflow-cfg-") as scratch:
        local = client.download_artifacts(run_id, "config/resolved_config.yaml", scratch)
        return RunSettings.from_config_dict(yaml.safe_load(Path(local).read_text(encoding="utf-8")) or {})


def resolve_source(client, spec: str) -> Source:
    from mlflow.exceptions import MlflowException

    from ftflow.tasks.registry.packaging import adapter_method

    version = _version(client, spec) if parse_model_uri(spec) else None
    run_id = version.run_id if version is not None else spec
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExportError(
            f"{spec}: not a registered model URI (models:/<name>@<alias>) nor an MLflow run id in this tracking store"
        ) from None
    adapter = find_adapter(client, run_id, version)
    if adapter is None:
        raise ExportError(f"{spec}: run {run_id} has no adapter (none of {', '.join(ADAPTER_PATHS)} was logged)")
    meta_file = Path(adapter, "ftflow_meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    meta.setdefault("template_fingerprint", run.data.params.get("chat_template.fingerprint"))
    meta.setdefault("eos_token", run.data.params.get("chat_template.eos"))
    meta.setdefault("method", adapter_method(adapter))
    if not meta["template_fingerprint"] or not meta["eos_token"]:
        raise ExportError(f"{spec}: the adapter carries no chat-template fingerprint or end-of-turn token")
    return Source(
        spec,
        run_id,
        adapter,
        meta,
        _run_config(client, run_id),
        version.name if version is not None else None,
        str(version.version) if version is not None else None,
    )


# --- writing the weights -------------------------------------------------------------------------------------


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _base_and_tokenizer(source: Source):
    from ftflow.tasks.evaluate.evaluation import check_template
    from ftflow.tasks.train.model import load_tokenizer, model_fingerprint, resolve_model_path

    path = resolve_model_path(source.run_cfg.model)
    tokenizer = load_tokenizer(path, source.run_cfg.model)
    # The adapter means nothing under another template or other base weights.
    check_template(source.adapter_dir, source.meta["template_fingerprint"], tokenizer)
    expected, actual = source.meta.get("base_sha256"), model_fingerprint(path)
    if expected and actual and expected != actual:
        raise ExportError(
            f"{source.spec}: base model {source.run_cfg.model.name_or_path!r} changed since training "
            f"(sha256 {actual[:12]} != {expected[:12]})"
        )
    return path, tokenizer


def _generation_config(base_config, tokenizer, eos_token: str):
    from transformers import GenerationConfig

    eot = tokenizer.convert_tokens_to_ids(eos_token)
    # Stop where the chat template closes the assistant turn (the pipeline's generate() does); the
    # tokenizer's own EOS also stops when it differs (Llama 3: <|eot_id|> vs <|end_of_text|>).
    eos_ids = list(dict.fromkeys([eot, tokenizer.eos_token_id]))
    # Greedy by default, as evaluated; a client still asks for sampling with temperature/top_p.
    return GenerationConfig(
        bos_token_id=getattr(base_config, "bos_token_id", None) or tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eot,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def _base_as_trained(source: Source, path: str, dtype_name: str):
    """The base weights the adapter saw in training, in `dtype`: a 4/8-bit base is loaded as trained and
    dequantized, since its weights are not the originals."""
    from ftflow.tasks.train.model import load_base_model, pick_device

    dtype = _dtype(dtype_name, pick_device(source.run_cfg.model))
    model_cfg = source.run_cfg.model.model_copy(update={"dtype": str(dtype).replace("torch.", "")})
    quantization = source.run_cfg.quantization
    if quantization.mode == Quantization.none:
        return load_base_model(path, model_cfg, quantization), dtype
    # Merging a QLoRA demo adapter into the original full-precision weights changed 19 of 20 greedy answers.
    base = load_base_model(path, model_cfg, quantization).dequantize(dtype=dtype)
    return base.to(dtype), dtype


def _save_whole(model, tokenizer, source: Source, out: Path) -> None:
    """Weights and tokenizer with the run's stop rule, so plain `generate` ends where the evaluation did."""
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(source.meta["eos_token"])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = _generation_config(model.config, tokenizer, source.meta["eos_token"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _merge_lora(source: Source, path: str, tokenizer, out: Path, dtype_name: str, log: Log) -> None:
    from peft import PeftModel

    base, dtype = _base_as_trained(source, path, dtype_name)
    merged = PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload()
    _save_whole(merged, tokenizer, source, out)
    log(f"merged the LoRA adapter into {source.run_cfg.model.name_or_path} in {dtype}")
    del merged, base


def _copy_full(source: Source, path: str, tokenizer, out: Path, dtype_name: str, log: Log) -> None:
    """A full fine-tune is already whole weights: written as they are, with the same tokenizer and stop rule."""
    from transformers import AutoModelForCausalLM

    from ftflow.tasks.train.model import pick_device

    dtype = _dtype(dtype_name, pick_device(source.run_cfg.model))
    model = AutoModelForCausalLM.from_pretrained(source.adapter_dir, dtype=dtype)
    _save_whole(model, tokenizer, source, out)
    log(f"wrote the fully fine-tuned weights of {source.run_cfg.model.name_or_path} in {dtype}")
    del model


def _with_prompt_adapter(source: Source, path: str, tokenizer, out: Path, dtype_name: str, log: Log) -> None:
    """Prompt tuning's virtual tokens are inputs, not a weight delta, so nothing merges: the base as trained
    goes to `out`, the adapter to `out/prompt_adapter`, loaded with `PeftModel.from_pretrained` (peft)."""
    base, dtype = _base_as_trained(source, path, dtype_name)
    _save_whole(base, tokenizer, source, out)
    adapter = out / PROMPT_ADAPTER_DIR
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(Path(source.adapter_dir) / name, adapter / name)
    log(
        f"wrote {source.run_cfg.model.name_or_path} in {dtype} with the prompt-tuning adapter in "
        f"{PROMPT_ADAPTER_DIR}/ (virtual tokens cannot merge into weights)"
    )
    del base


# method -> writer; the packaged meta's `method` picks the path.
# qlora is LoRA trained on a quantized base: merged into the dequantized base it was trained on.
EXPORTERS: dict[str, Callable[..., None]] = {
    "lora": _merge_lora,
    "qlora": _merge_lora,
    "full": _copy_full,
    "prompt_tuning": _with_prompt_adapter,
}


# --- the equivalence check -----------------------------------------------------------------------------------


def heldout_examples(client, source: Source) -> list[dict[str, Any]]:
    """The run's held-out prompts and references, from the predictions table it logged.

    The table keeps each prompt's final user turn; the run's system prompt is put back in front. Earlier
    turns of a multi-turn held-out prompt are not in the table (the demo task is single-turn)."""
    from ftflow.tasks.data.formatting import with_system_prompt

    if not _exists(client, source.run_id, "eval/predictions.json"):
        raise ExportError(
            f"{source.spec}: run {source.run_id} has no eval/predictions.json to check the export against"
        )
    with tempfile.TemporaryDirectory(prefix="ftflow-pred-") as scratch:
        local = client.download_artifacts(source.run_id, "eval/predictions.json", scratch)
        table = json.loads(Path(local).read_text(encoding="utf-8"))
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    if not rows:
        raise ExportError(f"{source.spec}: eval/predictions.json holds no held-out rows")
    # Every variant was asked the same prompts; the adapter's own rows also say what it answered then.
    stage = source.meta.get("stage")
    mine = [r for r in rows if r.get("variant") == stage]
    if not mine:
        first = rows[0].get("variant")
        mine = [{**r, "prediction": None} for r in rows if r.get("variant") == first]
    system = source.run_cfg.system_prompt
    return [
        {
            "prompt": with_system_prompt([{"role": "user", "content": r["prompt"]}], system),
            "reference": r["reference"],
            "logged": r.get("prediction"),
        }
        for r in mine
    ]


def _side(model, tokenizer, examples, source: Source, metric: str) -> dict[str, Any]:
    from ftflow.tasks.evaluate.evaluation import answer_logps, generate
    from ftflow.tasks.evaluate.metrics import per_example_scores

    eos, cfg = source.meta["eos_token"], source.run_cfg.eval
    prompts = [e["prompt"] for e in examples]
    generations = generate(model, tokenizer, prompts, cfg, eos)
    side = {
        "generations": generations,
        "scores": per_example_scores(
            [g["text"] for g in generations],
            [e["reference"] for e in examples],
            eos,
            stopped=[g["stopped"] for g in generations],
        ),
    }
    if metric in TEACHER_FORCED:
        answers = [[{"role": "assistant", "content": e["reference"]}] for e in examples]
        side["logps"], side["counts"] = answer_logps(model, tokenizer, prompts, answers, cfg, source.run_cfg.max_length)
    return side


def metric_statistic(metric: str, side: dict[str, Any], references: list[str], eos: str) -> Callable:
    """index array -> the metric on that resample of the examples."""
    import math

    import numpy as np

    if metric in TEACHER_FORCED:
        logps, counts = np.asarray(side["logps"], float), np.asarray(side["counts"], float)

        def teacher_forced(idx):
            mean = logps[idx].sum() / max(counts[idx].sum(), 1.0)
            return {"heldout_logprob": mean, "heldout_loss": -mean, "heldout_perplexity": math.exp(min(-mean, 50.0))}[
                metric
            ]

        return teacher_forced
    if metric in CORPUS:
        from sacrebleu.metrics import BLEU, CHRF

        from ftflow.tasks.evaluate.metrics._text import cut_at_eos
        from ftflow.tasks.evaluate.metrics.sacre import bleu_tokenizer_for

        hyps = [cut_at_eos(g["text"], eos).strip() for g in side["generations"]]
        refs = [r.strip() for r in references]
        scorer = BLEU(tokenize=bleu_tokenizer_for(refs)) if CORPUS[metric] == "bleu" else CHRF()
        return lambda idx: scorer.corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score / 100.0
    key = PER_EXAMPLE[metric]
    values = np.asarray([float(row[key]) for row in side["scores"]])
    return lambda idx: float(values[idx].mean())


@dataclass
class Bootstrap:
    a: float  # the statistic on all examples
    b: float
    a_low: float  # percentile interval of a over the resamples
    a_high: float
    delta_low: float  # percentile interval of b - a, both computed on the same resamples
    delta_high: float

    @property
    def delta(self) -> float:
        return self.b - self.a


def paired_bootstrap(
    stat_a: Callable, stat_b: Callable, n: int, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Bootstrap:
    """Resample the n examples with replacement; each resample scores both sides on the same indices."""
    import numpy as np

    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    draws = rng.integers(0, n, size=(resamples, n))
    a = np.asarray([stat_a(idx) for idx in draws])
    b = np.asarray([stat_b(idx) for idx in draws])
    tail = (1.0 - level) / 2 * 100
    a_low, a_high = np.percentile(a, [tail, 100 - tail])
    d_low, d_high = np.percentile(b - a, [tail, 100 - tail])
    return Bootstrap(
        float(stat_a(everything)), float(stat_b(everything)), float(a_low), float(a_high), float(d_low), float(d_high)
    )


def check_equivalence(
    source: Source, path: str, tokenizer, exported: Path, examples: list[dict], options: ExportOptions
) -> Equivalence:
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftflow.tasks.train.model import load_base_model, pick_device

    # An empty eval.primary_metric means the task preset's choice (free text ranks on chrF, not exact match).
    log = options.log
    metric = getattr(source.run_cfg.eval, "resolved_primary_metric", None) or source.run_cfg.eval.primary_metric
    compared = metric if metric in PER_EXAMPLE or metric in TEACHER_FORCED or metric in CORPUS else "heldout_exact"
    if compared != metric:
        log(f"{metric} has no per-example form here; the bootstrap compares heldout_exact instead")
    device = pick_device(source.run_cfg.model)
    # The merged copy as a user loads it: from the folder, plain transformers (and peft for a prompt adapter).
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=_dtype(options.dtype, device)).to(device).eval()
    if (exported / PROMPT_ADAPTER_DIR).is_dir():
        merged = PeftModel.from_pretrained(merged, exported / PROMPT_ADAPTER_DIR).eval()
    mine = _side(merged, tokenizer, examples, source, compared)
    del merged
    gc.collect()
    # The model as evaluated: the adapter on the base in the run's quantization, or a full fine-tune's own weights.
    if source.method == "full":
        base = None
        reference = load_base_model(source.adapter_dir, source.run_cfg.model, source.run_cfg.quantization).eval()
    else:
        base = load_base_model(path, source.run_cfg.model, source.run_cfg.quantization)
        reference = PeftModel.from_pretrained(base, source.adapter_dir).eval()
    theirs = _side(reference, tokenizer, examples, source, compared)
    del reference, base
    gc.collect()

    n = len(examples)
    same = [a["text"] == b["text"] for a, b in zip(mine["generations"], theirs["generations"])]
    agreement = sum(same) / n
    references, eos = [e["reference"] for e in examples], source.meta["eos_token"]
    stat_ref = metric_statistic(compared, theirs, references, eos)
    stat_merged = metric_statistic(compared, mine, references, eos)
    boot = paired_bootstrap(stat_ref, stat_merged, n, seed=source.run_cfg.seed)
    reasons = []
    if agreement < MIN_AGREEMENT:
        reasons.append(f"greedy answers agree on {agreement:.1%} < {MIN_AGREEMENT:.0%}")
    # A small tolerance: identical answers must pass even when the interval collapses to one float.
    slack = 1e-9 * max(1.0, abs(boot.a))
    if not (boot.a_low - slack <= boot.b <= boot.a_high + slack):
        reasons.append(
            f"merged {compared} {boot.b:.4f} is outside the evaluated model's {LEVEL:.0%} bootstrap "
            f"interval [{boot.a_low:.4f}, {boot.a_high:.4f}]"
        )
    logged_same = [
        e["logged"] == g["answer"] for e, g in zip(examples, theirs["generations"]) if e["logged"] is not None
    ]
    if logged_same:
        log(f"adapter-on-base reproduces {sum(logged_same)}/{len(logged_same)} of the answers logged at evaluation")
    rows = [
        {"prompt": e["prompt"][-1]["content"], "merged": a["answer"], "adapter_on_base": b["answer"], "same": s}
        for e, a, b, s in zip(examples, mine["generations"], theirs["generations"], same)
    ]
    return Equivalence(
        n,
        agreement,
        compared,
        boot.b,
        boot.a,
        boot.delta,
        boot.a_low,
        boot.a_high,
        boot.delta_low,
        boot.delta_high,
        not reasons,
        reasons,
        rows,
    )


def _log_equivalence(client, source: Source, eq: Equivalence, out: Path) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    figures = {
        "export/agreement": eq.agreement,
        "export/primary_merged": eq.merged_score,
        "export/primary_evaluated": eq.reference_score,
        "export/primary_ci_low": eq.ci_low,
        "export/primary_ci_high": eq.ci_high,
        "export/primary_delta": eq.delta,
        "export/primary_delta_low": eq.delta_low,
        "export/primary_delta_high": eq.delta_high,
        "export/passed": float(eq.passed),
        "export/n_examples": float(eq.n_examples),
    }
    client.log_batch(source.run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in figures.items()])
    client.log_dict(
        source.run_id,
        {**asdict(eq), "source": source.spec, "to": str(out), "summary": eq.summary()},
        "export/equivalence.json",
    )
    client.set_tag(source.run_id, "export.equivalence", eq.summary()[:5000])


# --- the command ---------------------------------------------------------------------------------------------


def check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--to {out}: export directory is not empty")


def export_model(
    cfg: PipelineConfig,
    spec: str,
    out: str | Path,
    options: Optional[ExportOptions] = None,
    client=None,
) -> Equivalence:
    """Export `spec` (models:/name@alias, models:/name/N or a run id) to `out`; raises ExportError on any refusal."""
    from ftflow.tasks.registry.card import CardSubject, build_card, gather_facts
    from ftflow.tasks.tracking import client as tracking_client
    from ftflow.tasks.train.model import offline_env

    options = options or ExportOptions()
    fmt, log = options.fmt, options.log
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: supported formats are {', '.join(FORMATS)} (GGUF: see README, 'Export')")
    out = Path(out).expanduser().resolve()
    check_target(out)
    offline_env()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = client or tracking_client(cfg)
    source = resolve_source(client, spec)
    if source.method not in EXPORTERS:
        raise ExportError(
            f"{spec}: exporting method {source.method!r} is not supported yet (supported: {', '.join(EXPORTERS)})"
        )
    log(f"exporting {source.label} ({source.method}, {source.meta.get('stage', '?')}) from run {source.run_id}")
    examples = heldout_examples(client, source)
    path, tokenizer = _base_and_tokenizer(source)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if out.parent.exists() else None))
    try:
        EXPORTERS[source.method](source, path, tokenizer, staging, options.dtype, log)
        eq = check_equivalence(source, path, tokenizer, staging, examples, options)
        log(f"equivalence {eq.summary()}")
        _log_equivalence(client, source, eq, out)
        if not eq.passed:
            raise ExportError(
                f"export of {source.label} refused: the merged model is not equivalent to the adapter "
                f"as evaluated ({'; '.join(eq.reasons)}); details in run {source.run_id} "
                f"export/equivalence.json"
            )
        subject = CardSubject(source.name, source.version, method=source.method, stage=source.meta.get("stage"))
        facts = gather_facts(client, source.run_id, subject)
        (staging / "README.md").write_text(build_card(facts), encoding="utf-8")
        (staging / EXPORT_META).write_text(
            json.dumps(
                {
                    "source": spec,
                    "run_id": source.run_id,
                    "model_name": source.name,
                    "version": source.version,
                    "method": source.method,
                    "stage": source.meta.get("stage"),
                    "base_model": source.run_cfg.model.name_or_path,
                    "template_fingerprint": source.meta["template_fingerprint"],
                    "eos_token": source.meta["eos_token"],
                    "max_new_tokens": source.run_cfg.eval.max_new_tokens,
                    "equivalence": eq.summary(),
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        # mkdtemp made the folder owner-only; the export is ordinary files for whoever serves them.
        umask = os.umask(0)
        os.umask(umask)
        for item in [staging, *staging.rglob("*")]:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above; rename needs the name free
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"exported to {out}")
    return eq
