"""The pipeline's stages as plain functions: `(ctx, inputs...) -> outputs`, MLflow by explicit run id.

flows/ turns each stage into a Prefect task as it is (`task(...)(stages.validate_data)`); nothing here
knows about Prefect, so the same stages run in a flow, a sweep arm, a test and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

from ftflow.configs.loader import apply_overrides, config_from_dict, load_config
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.data.rows import Kind, Record
from ftflow.tasks.errors import ContractError, DataError
from ftflow.tasks.tracking import RunLogger, ui_command

if TYPE_CHECKING:
    from ftflow.tasks.data.formatting import FormattedData
    from ftflow.tasks.evaluate.evaluation import EvalSets, VariantResult
    from ftflow.tasks.train.trainer import TrainResult

Log = Callable[[str], None]
Update = Callable[[int, dict[str, float]], None]
Progress = Callable[[str, int], Update]
Lock = Callable[[str], ContextManager]
Results = dict[str, "VariantResult"]

SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")


@dataclass
class ModelInfo:
    path: str
    eos_token: str
    template_fingerprint: str
    source_sha256: Optional[str] = None


@dataclass
class StageContext:
    """What every stage shares: the config, the resolved base model, the MLflow run, the run's folder, the log."""

    cfg: PipelineConfig
    model: ModelInfo
    run: Optional[RunLogger]
    work_dir: Path
    log: Log = print
    # progress(label, total) -> update(step, metrics); None writes one log line per update.
    progress: Optional[Progress] = None
    # lock(name) -> a context manager held by one holder at a time across processes (in a flow: a Prefect
    # global concurrency limit); None locks nothing, for a single caller.
    lock: Optional[Lock] = None
    # Extra transformers TrainerCallbacks for SFT and DPO (a search's pruning callback); in-process training only.
    callbacks: tuple[Any, ...] = ()

    def start_progress(self, label: str, total: int) -> Update:
        return (self.progress or logged_progress(self.log))(label, total)

    def exclusive(self, name: str) -> ContextManager:
        return self.lock(name) if self.lock is not None else nullcontext()


def progress_line(label: str, step: int, total: int, metrics: dict[str, float]) -> str:
    shown = {k: metrics[k] for k in SHOWN_METRICS if k in metrics}
    return f"{label} step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items())


def logged_progress(log: Log) -> Progress:
    def start(label: str, total: int) -> Update:
        def update(step: int, metrics: dict[str, float]) -> None:
            log(progress_line(label, step, total, metrics))

        return update

    return start


@dataclass
class CleanData:
    sft: list[Record]
    preference: list[Record]
    heldout: list[Record]
    heldout_preference: list[Record]
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    out_dir: str = ""  # where the reports and quarantine files were written
    # Selection only (SFT vs DPO, the sweep's best arm): a validation file, else a seeded share of the SFT rows.
    validation: list[Record] = field(default_factory=list)


def resolve_config(config: Optional[PipelineConfig], recipe: Optional[str], overrides: list[str]) -> PipelineConfig:
    """A flow's parameters as one config: the recipe when given, else `config`; overrides last."""
    if recipe:
        return load_config(recipe, overrides)
    base = config or PipelineConfig()
    return (
        config_from_dict(apply_overrides(base.model_dump(mode="json"), overrides), "flow parameters")
        if overrides
        else base
    )


def writable_dir(path: Path, what: str) -> Path:
    """`path`, created, once a file could be made in it; else one PipelineError line naming `what`.

    Tried, not asked: os.access says yes to root even where a write fails (a read-only mount, chattr +i)."""
    import tempfile

    from ftflow.tasks.errors import PipelineError

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PipelineError(f"{what} {path} is not writable ({err.strerror or type(err).__name__})") from None
    return path


def run_dir(cfg: PipelineConfig, run: RunLogger) -> Path:
    """The run's own folder: checkpoints, adapters and plots; a resumed run finds its checkpoints here."""
    writable_dir(Path(cfg.output_dir), "output_dir")
    return writable_dir(Path(cfg.output_dir) / run.run_id, "output_dir")


def resolve_model(cfg: PipelineConfig) -> ModelInfo:
    from ftflow.tasks.data.formatting import end_of_turn_token, template_fingerprint
    from ftflow.tasks.train.model import load_tokenizer, model_fingerprint, offline_env, resolve_model_path

    offline_env()
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    return ModelInfo(path, end_of_turn_token(tokenizer), template_fingerprint(tokenizer), model_fingerprint(path))


def data_paths(ctx: StageContext) -> dict[str, Optional[str]]:
    cfg = ctx.cfg
    if cfg.data.demo.enabled:
        from ftflow.tasks.data.demo import generate_demo

        made = generate_demo(cfg.data.demo, ctx.work_dir / "demo_data")
        return {
            **{k: str(made[k]) for k in ("sft", "preference", "heldout", "heldout_preference")},
            "validation": cfg.data.validation_path,
        }
    return {
        "sft": cfg.data.sft_path,
        "preference": cfg.data.preference_path if cfg.dpo.enabled else None,
        "heldout": cfg.data.heldout_path,
        "heldout_preference": cfg.data.heldout_preference_path,
        "validation": cfg.data.validation_path,
    }


def validated_dir(ctx: StageContext, paths: dict[str, Optional[str]]) -> Path:
    """Where validation writes: named by the content of everything it reads, so a cache hit finds its files."""
    return Path(ctx.cfg.output_dir) / "validated" / data_cache_key(ctx.cfg, ctx.model, paths)


# A carved validation split smaller than this cannot tell two adapters apart at all.
MIN_VALIDATION_ROWS = 8


def _split(records: list[Record], share: float, seed: int, minimum: int = 1) -> tuple[list[Record], list[Record]]:
    import random

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = min(max(minimum, int(len(records) * share)), len(records) // 2)
    held = set(order[:cut])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def validate_split(
    path: str, kind: Kind, cfg: PipelineConfig, token_length, out_dir: Path, enforce_contract: bool = True
) -> tuple[list[Record], dict[str, Any], dict[str, Path]]:
    """Load → quality checks → GX contract → report files (quarantine included). Raises on a failed contract."""
    from ftflow.tasks.data.contracts import enforce, run_contracts
    from ftflow.tasks.data.formats import load_rows
    from ftflow.tasks.data.quality import run_quality
    from ftflow.tasks.data.report import build_report, write_report_files

    records, schema_dropped = load_rows(path, kind, cfg.data.format, mapping=cfg.data.mapping)
    result = run_quality(records, kind, cfg.quality, token_length)
    result.dropped = schema_dropped + result.dropped
    result.counts_in += len(schema_dropped)
    for d in schema_dropped:
        result.reasons[d.reason] = result.reasons.get(d.reason, 0) + 1
    if not result.kept:
        files = write_report_files(build_report(result, None), result, out_dir)
        raise DataError(
            f"no {kind} rows left after validation ({result.counts_in} in; reasons: {result.reasons}); "
            f"see {files['quarantine']}",
            path,
        )
    contract = run_contracts(result, cfg.quality, token_length=token_length)
    report = build_report(result, contract)
    files = write_report_files(report, result, out_dir)
    if enforce_contract:
        enforce(contract)
    return result.kept, report, files


def data_cache_key(cfg: PipelineConfig, model: ModelInfo, paths: dict[str, Optional[str]]) -> str:
    """Content address of validation: the bytes of every input, the checks' settings and code, the template."""
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
    h.update(code_digest().encode())
    for suite in sorted((Path(__file__).resolve().parents[1] / "data_contracts").glob("*.json")):
        h.update(suite.read_bytes())
    return h.hexdigest()[:20]


def code_digest() -> str:
    """The whole `ftflow.tasks` package, not a hand-kept list of modules: an edit anywhere a cached stage reaches
    (formatting, rows, the checks, generation, the metrics) must invalidate what it cached."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for module in sorted(here.rglob("*.py")):
        h.update(module.relative_to(here).as_posix().encode())
        h.update(module.read_bytes())
    return h.hexdigest()


def validate_data(ctx: StageContext, paths: dict[str, Optional[str]], out_dir: Path) -> CleanData:
    """Every split through the same checks; leakage between train and held-out fails the run.

    Writes reports and quarantine files under out_dir (content-addressed by the caller, so a cached
    result still points at files that exist)."""
    from ftflow.tasks.data.quality import chat_token_lengths, check_leakage
    from ftflow.tasks.train.model import load_tokenizer

    cfg = ctx.cfg
    token_length = chat_token_lengths(load_tokenizer(ctx.model.path, cfg.model))
    if not paths.get("sft"):
        raise DataError("data.sft_path is not set", "config")
    out: dict[str, list[Record]] = {}
    reports: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, str]] = {}
    for split, kind in (
        ("sft", "sft"),
        ("preference", "preference"),
        ("heldout", "sft"),
        ("heldout_preference", "preference"),
        ("validation", "sft"),
    ):
        if not paths.get(split):
            out[split] = []
            continue
        # Held-out sets are small by design; the training-size contracts apply to train splits only.
        kept, report, written = validate_split(
            paths[split], kind, cfg, token_length, out_dir / split, enforce_contract=split in ("sft", "preference")
        )
        out[split], reports[split] = kept, report
        files[split] = {k: str(v) for k, v in written.items()}
        ctx.log(
            f"validated {split}: {report['counts_in']} rows in, {len(kept)} kept, dropped by reason {report['reasons']}"
        )
    if not out["heldout"]:
        out["sft"], out["heldout"] = _split(out["sft"], 0.1, cfg.seed)
        ctx.log(f"no held-out file: held out {len(out['heldout'])} SFT rows (seeded split)")
    leak_pairs = [("sft", "heldout"), ("preference", "heldout_preference"), ("validation", "heldout")]
    if out["validation"]:
        leak_pairs.append(("sft", "validation"))
    else:
        # Carved after dedup within the SFT rows, so it cannot near-duplicate what stays in train.
        out["sft"], out["validation"] = _split(
            out["sft"], cfg.data.validation_fraction, cfg.seed + 1, MIN_VALIDATION_ROWS
        )
        ctx.log(f"no validation file: {len(out['validation'])} SFT rows set aside for selection (seeded split)")
    for train_split, held_split in leak_pairs:
        hits = check_leakage(out[train_split], out[held_split], cfg.quality.near_duplicate_threshold)
        if hits:
            leak_file = out_dir / f"leakage_{held_split}.json"
            leak_file.write_text(json.dumps(hits[:1000], ensure_ascii=False, indent=1, default=str), encoding="utf-8")
            first = hits[0]
            raise ContractError(
                f"train/held-out leakage: {len(hits)} {held_split} row(s) duplicate {train_split} rows "
                f"(first: {first.get('heldout_source')}:{first.get('heldout_line')} ~ "
                f"{first.get('train_source')}:{first.get('train_line')}, {first.get('kind')}); see {leak_file}"
            )
    return CleanData(
        out["sft"],
        out["preference"],
        out["heldout"],
        out["heldout_preference"],
        reports,
        {k: v for k, v in paths.items() if v},
        files,
        str(out_dir),
        validation=out["validation"],
    )


def format_chat(ctx: StageContext, data: CleanData) -> tuple[FormattedData, FormattedData, FormattedData]:
    """Train, held-out and validation rows in the model's own chat template: (train, held-out, validation)."""
    from ftflow.tasks.data.formatting import format_data
    from ftflow.tasks.train.model import load_tokenizer

    tokenizer = load_tokenizer(ctx.model.path, ctx.cfg.model)
    system, sft, dpo = ctx.cfg.data.system_prompt, ctx.cfg.sft, ctx.cfg.dpo
    # Every split sees the training window, so held-out and validation rows are scored as training saw them.
    return (
        format_data(tokenizer, data.sft, data.preference, system, sft, dpo),
        format_data(tokenizer, data.heldout, data.heldout_preference, system, sft, dpo),
        format_data(tokenizer, data.validation, [], system, sft, dpo),
    )


def add_window_drops(data: CleanData, formatted: dict[str, FormattedData]) -> None:
    """Rows the training window could not hold join each split's report and quarantine file (reason
    truncated_answer), so nothing is dropped without a word. Runs on every run, cached formatting or not."""
    from ftflow.tasks.data.report import add_window_drops as merge

    for split, (fmt, kind) in {
        "sft": (formatted["train"], "sft"),
        "preference": (formatted["train"], "preference"),
        "heldout": (formatted["heldout"], "sft"),
        "heldout_preference": (formatted["heldout"], "preference"),
        "validation": (formatted["validation"], "sft"),
    }.items():
        if split not in data.reports or kind not in fmt.window:
            continue
        quarantine = data.files.get(split, {}).get("quarantine")
        data.reports[split] = merge(data.reports[split], fmt.window[kind], fmt.dropped.get(kind, []), quarantine)


def check_trainable(ctx: StageContext, train_set: FormattedData, data: CleanData) -> None:
    """A training split the window emptied is one DataError line before any model loads (not TRL's
    `num_samples=0`, retried as if transient, nor a DPO stage skipped without a word)."""
    import re

    for kind, section in (("sft", "sft"), ("preference", "dpo")):
        tally = train_set.window.get(kind) or {}
        if (section == "dpo" and not ctx.cfg.dpo.enabled) or not tally.get("in") or tally.get("kept"):
            continue
        counts = [
            int(m.group(1)) for d in train_set.dropped.get(kind, []) if (m := re.search(r"(\d+) tokens", d.detail))
        ]
        shortest = f"; the shortest has {min(counts)}" if counts else ""
        quarantine = data.files.get(kind, {}).get("quarantine")
        raise DataError(
            f"{section}: all {tally['in']} rows are longer than {section}.max_length ({tally.get('max_length')} "
            f"tokens{shortest}): raise {section}.max_length, or shorten the rows"
            + (f"; see {quarantine} (reason truncated_answer)" if quarantine else "")
        )


def eval_sets(
    data: CleanData, train_set: FormattedData, heldout_set: FormattedData, validation_set: FormattedData
) -> EvalSets:
    """What evaluation reads, with the held-out rows' accounting (in, scored, dropped by reason) for the gate."""
    from ftflow.tasks.data.report import heldout_accounting
    from ftflow.tasks.evaluate.evaluation import EvalSets

    accounting = heldout_accounting(data.reports.get("heldout"), heldout_set.window.get("sft", {}))
    return EvalSets.of(train_set, heldout_set, validation_set, accounting)


def log_data(ctx: StageContext, data: CleanData, train_set: FormattedData) -> str:
    """Reports, quarantine files, datasets and the template fingerprint to the run; returns the reports as markdown."""
    from ftflow.tasks.data.report import report_markdown, report_metrics

    run = _require_run(ctx)
    for split, report in data.reports.items():
        run.log_metrics(report_metrics(report, prefix=f"data/{split}/"))
        for f in data.files.get(split, {}).values():
            if Path(f).exists():
                run.log_artifact(f, f"data/{split}")
    if "sft" in data.reports:
        run.log_metrics({"data/kept_ratio": data.reports["sft"]["kept_ratio"]})
    for split in ("sft", "preference", "validation", "heldout", "heldout_preference"):
        rows = getattr(data, split)
        if rows:
            context = "heldout" if split.startswith("heldout") else "validation" if split == "validation" else "train"
            run.log_dataset(
                [r.row for r in rows],
                name=split,
                context=context,
                source=data.paths.get(split, f"{split} split of sft"),
            )
    run.log_metrics({f"format/{k}": v for k, v in train_set.token_stats.items()})
    run.log_params(
        {
            "chat_template.fingerprint": train_set.template_fingerprint,
            "chat_template.eos": ctx.model.eos_token,
            "model.source_sha256": ctx.model.source_sha256 or "n/a",
        }
    )
    sections = [f"## {split}\n\n{report_markdown(report)}" for split, report in data.reports.items()]
    return "# Data validation\n\n" + "\n\n".join(sections)


@dataclass
class Trained:
    """What training produced, in training order (SFT, then DPO when it ran). The candidate is the one
    `select_candidate` chose on the validation split; before that, the last one trained."""

    by_kind: dict[str, TrainResult]
    chosen: Optional[str] = None
    # The primary metric of each adapter on the validation split, and the choice: {metric, direction, n, scores}.
    selection: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, sft: TrainResult, aligned: Optional[TrainResult] = None) -> "Trained":
        """`aligned`: the DPO or RLHF result, under its kind (a result made before kinds were recorded is DPO)."""
        return cls({"sft": sft, **({aligned.kind or "dpo": aligned} if aligned is not None else {})})

    @property
    def candidate(self) -> str:
        return self.chosen or list(self.by_kind)[-1]

    @property
    def adapters(self) -> dict[str, str]:
        return {kind: result.adapter_dir for kind, result in self.by_kind.items()}

    @property
    def wall_s(self) -> float:
        return sum(result.wall_s for result in self.by_kind.values())

    @property
    def peak_memory_mb(self) -> float:
        return max(result.peak_memory_mb for result in self.by_kind.values())

    @property
    def trainable_params(self) -> int:
        return self.by_kind["sft"].trainable_params

    def scored(self, champion: Optional[Champion]) -> dict[str, str]:
        """The adapters evaluation scores: every trained one, and the champion's when it can be re-scored."""
        return {**self.adapters, **rescorable(champion)}


def rescorable(champion: Optional[Champion]) -> dict[str, str]:
    """{"champion": its adapter} when the champion can be re-scored on this run's held-out rows, else {}."""
    return {"champion": champion.adapter_dir} if champion is not None and champion.adapter_dir else {}


def _scoring_model(ctx: StageContext, adapters: dict[str, str]):
    """(model, tokenizer): the base loaded once with every adapter beside it under its own name; or, when the
    folders are full fine-tunes or adapters of different kinds (one peft model cannot hold those), a ModelSet."""
    from peft import PeftModel

    from ftflow.tasks.evaluate.evaluation import check_template
    from ftflow.tasks.registry.packaging import adapter_method
    from ftflow.tasks.train.model import load_base_model, load_tokenizer

    cfg = ctx.cfg
    tokenizer = load_tokenizer(ctx.model.path, cfg.model)
    methods = {name: adapter_method(folder) for name, folder in adapters.items()}
    for name, folder in adapters.items():
        if not Path(folder, "adapter_config.json").exists() and not Path(folder, "config.json").exists():
            raise DataError(
                f"{name} adapter is missing (no adapter_config.json, nor a full fine-tune's config.json)", folder
            )
        check_template(folder, ctx.model.template_fingerprint, tokenizer)
    base = load_base_model(ctx.model.path, cfg.model, cfg.quantization)
    base.eval()
    names = list(adapters)
    if not names:
        return base, tokenizer
    if "full" in methods.values() or len(set(methods.values())) > 1:
        models = {
            name: (
                load_base_model(folder, cfg.model, cfg.quantization)
                if methods[name] == "full"
                else PeftModel.from_pretrained(load_base_model(ctx.model.path, cfg.model, cfg.quantization), folder)
            ).eval()
            for name, folder in adapters.items()
        }
        return ModelSet(base, models), tokenizer
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    return model, tokenizer


class ModelSet:
    """Separate models behind the adapter interface evaluation switches with (`set_adapter`, `disable_adapter`):
    a full fine-tune is a whole model, not an adapter on the base. Everything else goes to the active model."""

    def __init__(self, base, models: dict[str, Any]):
        self._base, self._models, self._active = base, models, base

    def set_adapter(self, name: str) -> None:
        self._active = self._models[name]

    @contextmanager
    def disable_adapter(self):
        previous, self._active = self._active, self._base
        try:
            yield
        finally:
            self._active = previous

    def __call__(self, *args, **kwargs):
        return self._active(*args, **kwargs)

    def modules(self):
        """Every module of every model held, each once (the base may be shared)."""
        seen: set[int] = set()
        for model in (self._base, *self._models.values()):
            for module in model.modules():
                if id(module) not in seen:
                    seen.add(id(module))
                    yield module

    def __getattr__(self, name: str):
        return getattr(self._active, name)


def select_candidate(ctx: StageContext, sets: EvalSets, trained: Trained) -> Trained:
    """The candidate is whichever trained adapter (SFT, DPO) is best on the validation split by the primary metric,
    in its direction; a tie keeps the later one. Held-out (test) rows are never read here: they stay unbiased for
    the report and the gate."""
    from dataclasses import replace

    from ftflow.tasks.evaluate import registry
    from ftflow.tasks.evaluate.evaluation import choose, validation_scores

    # Scored even when only SFT ran: the sweep ranks its arms by this validation score.
    kinds = list(trained.by_kind)
    metric = registry.get(ctx.cfg.eval.resolved_primary_metric)
    model, tokenizer = _scoring_model(ctx, trained.adapters)
    scored = validation_scores(ctx, model, tokenizer, kinds, sets)
    chosen = choose(scored, metric.name)
    scores = {kind: scored[kind].metrics[metric.name] for kind in kinds}
    selection = {
        "chosen": chosen,
        "split": "validation",
        "metric": metric.name,
        "direction": metric.direction,
        "n": len(scored[chosen].per_example[metric.name]),
        "scores": scores,
    }
    ctx.log(
        f"candidate on validation: {chosen} ("
        + ", ".join(f"{k} {metric.name}={v:.3f}" for k, v in scores.items())
        + f", n={selection['n']}, {metric.direction} is better)"
    )
    if ctx.run is not None:
        ctx.run.log_metrics({f"validation/{kind}/{metric.name}": v for kind, v in scores.items()})
        ctx.run.set_tags({"candidate": chosen})
    return replace(trained, chosen=chosen, selection=selection)


def evaluate(
    ctx: StageContext,
    sets: EvalSets,
    adapters: dict[str, str],
    candidate: Optional[str] = None,
    baselines: Optional[Results] = None,
) -> Results:
    """Score base, few-shot and every adapter on the held-out (test) split; `candidate` (default: the last adapter)
    gets the headline eval/ keys.

    With no adapters it scores the base variants alone; `baselines` (base variants already scored) are reused."""
    from ftflow.tasks.evaluate.evaluation import check_heldout, evaluate_variants

    cfg = ctx.cfg
    check_heldout(sets.heldout, sets.train_sft)
    model, tokenizer = _scoring_model(ctx, adapters)
    names = list(adapters)
    variants = ["base"] + (["base_fewshot"] if cfg.eval.few_shot_k else []) + names
    results = evaluate_variants(ctx, model, tokenizer, variants, sets, baselines)
    cached = [variant for variant, result in results.items() if result.cached]
    if ctx.run is not None and cached:
        # Said on the run: these scores were computed by an earlier run (same content key), not by this one.
        ctx.run.set_tags({"eval.cached_variants": ",".join(cached)})
    if cfg.eval.judge.enabled and names:
        from ftflow.tasks.evaluate.judge import judge_variants

        judge_variants(ctx, results)
    if ctx.run is not None and names:
        _log_results(ctx.run, results, candidate or names[-1])
    return results


def _log_results(run: RunLogger, results: Results, candidate: str) -> None:
    import pandas as pd

    for variant, res in results.items():
        run.log_metrics({f"eval/{variant}/{k}": v for k, v in res.metrics.items()})
    run.log_metrics({f"eval/{k}": v for k, v in results[candidate].metrics.items()})
    run.log_table(pd.DataFrame([p for res in results.values() for p in res.predictions]), "eval/predictions.json")
    verdicts = [row for res in results.values() for row in res.judged]
    if verdicts:
        run.log_table(pd.DataFrame(verdicts), "eval/judge.json")


def log_losses(ctx: StageContext, trained: Trained) -> None:
    histories = {kind: result.history for kind, result in trained.by_kind.items()}
    _require_run(ctx).log_artifact(plot_losses(histories, ctx.work_dir / "loss_curves.png"), "plots")


def comparison_rows(cfg: PipelineConfig, results: Results) -> list[dict[str, Any]]:
    """One row per variant; the columns are the registry's metrics for the task, the primary metric first."""
    from ftflow.tasks.evaluate import registry

    keys = registry.table_metrics(cfg.eval.task.value, cfg.eval.resolved_primary_metric)
    keys = [k for k in keys if any(k in res.metrics for res in results.values())]  # e.g. the judge's, when off
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


def find_champion(ctx: StageContext) -> Optional[Champion]:
    """The current champion, with its adapter when it can be re-scored on this run's held-out prompts."""
    from ftflow.tasks.registry import gate as registry

    cfg = ctx.cfg
    if not cfg.registry.enabled:
        return None
    client = registry.registry_client(cfg)
    registry.check_reachable(client, cfg)
    version = registry.champion_version(client, cfg.registry.model_name)
    if version is None:
        ctx.log("no champion yet: the candidate is compared with the base model only")
        return None
    adapter = registry.champion_adapter(client, version)
    if adapter is not None:
        meta_path = Path(adapter, "ftflow_meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if (
            meta.get("template_fingerprint") != ctx.model.template_fingerprint
            or meta.get("base_sha256") != ctx.model.source_sha256
        ):
            ctx.log(f"champion v{version.version} was trained on another base or template; using its recorded metrics")
            adapter = None
    return Champion(version.version, version.run_id, adapter, registry.champion_recorded_metrics(client, version))


def gate(
    ctx: StageContext,
    results: Results,
    trained: Trained,
    champion: Optional[Champion],
    heldout_accounting: Optional[dict[str, Any]] = None,
    sets: Optional[EvalSets] = None,
) -> dict[str, Any]:
    """Register the candidate (idempotently) and move `champion` only through the gate; else `challenger`.

    Reading the champion, deciding and moving the alias happen under `ctx.exclusive("registry:<model>")`,
    and the champion is read again there: another run (a retrain, a sweep, a CLI run) may have moved the
    alias since this one found its champion. A new champion is re-scored on `sets` (else its recorded
    metrics stand in). `heldout_accounting` (EvalSets.heldout_accounting): the held-out rows dropped
    before scoring, named in the decision."""
    from ftflow.tasks.registry import gate as registry
    from ftflow.tasks.registry.packaging import document_version, log_packaged_model, package_model

    cfg, run, candidate = ctx.cfg, _require_run(ctx), trained.candidate
    client = registry.registry_client(cfg)
    registry.check_reachable(client, cfg)
    meta = {"template_fingerprint": ctx.model.template_fingerprint, "eos_token": ctx.model.eos_token}
    adapter_dir = trained.adapters[candidate]
    packaged = package_model(cfg, adapter_dir, meta, Path(adapter_dir).parent.parent / "registry")
    run.log_artifact(packaged, "registry_model")
    trained_meta = json.loads(Path(adapter_dir, "ftflow_meta.json").read_text())
    logged = log_packaged_model(cfg, adapter_dir, {**trained_meta, **meta}, run.run_id, run.client)
    with ctx.exclusive(f"registry:{cfg.registry.model_name}"):
        results, recorded = _champion_now(ctx, client, results, champion, sets)
        decision = registry.decide(candidate, results, cfg, recorded, heldout_accounting, trained.selection)
        ctx.log(f"gate: {decision.summary()}")
        version = registry.register_candidate(
            client, cfg.registry.model_name, run.run_id, logged.model_uri, logged.model_id
        )
        alias = registry.apply_decision(client, cfg.registry.model_name, version, decision, run.run_id)
    run.log_metrics(
        {
            "gate/promoted": float(decision.promote),
            "gate/n": float(decision.n),
            **{
                f"gate/{c.against}/{k}": getattr(c, k)
                for c in decision.comparisons
                for k in ("improvement", "low", "high")
            },
        }
    )
    run.set_tags(
        {
            "gate.decision": decision.summary()[:5000],
            "gate.alias": alias,
            "gate.version": version,
            "gate.candidate": decision.candidate,
        }
    )
    run.log_dict({**decision.as_dict(), "version": version, "alias": alias}, "gate/decision.json")
    # After the decision is on the run: the description and the card quote it.
    document_version(client, cfg.registry.model_name, version, run.run_id, run.url(), stage=candidate)
    return {
        "promoted": decision.promote,
        "alias": alias,
        "version": version,
        "candidate": decision.candidate,
        "summary": decision.summary(),
        "reasons": decision.reasons,
    }


def _champion_now(
    ctx: StageContext, client, results: Results, champion: Optional[Champion], sets: Optional[EvalSets]
) -> tuple[Results, Optional[VariantResult]]:
    """(results, recorded champion) against the champion of this moment (called under the registry lock)."""
    from dataclasses import replace

    from ftflow.tasks.registry import gate as registry

    now = registry.champion_version(client, ctx.cfg.registry.model_name)
    seen, current = (champion.version if champion else None), (str(now.version) if now else None)
    if current == (str(seen) if seen is not None else None):
        if champion is not None and "champion" not in results:  # not re-scorable: its logged numbers
            return results, registry.recorded("champion", champion.recorded_metrics)
        return results, None
    ctx.log(
        f"gate: the champion moved while this run trained (v{seen or '-'} -> v{current or '-'}); "
        f"comparing with v{current or '-'}"
    )
    results = {k: v for k, v in results.items() if k != "champion"}
    fresh = find_champion(ctx)
    if fresh is None:
        return results, None
    if fresh.adapter_dir and sets is not None:
        baselines = {k: v for k, v in results.items() if k in ("base", "base_fewshot")}
        rescored = evaluate(replace(ctx, run=None), sets, {"champion": fresh.adapter_dir}, baselines=baselines)
        return {**results, "champion": rescored["champion"]}, None
    return results, registry.recorded("champion", fresh.recorded_metrics)


@dataclass
class Summary:
    rows: list[dict[str, Any]]  # one per scored variant, for a table artifact
    table: str  # the same as markdown, readable in a terminal
    markdown: str  # the whole run summary, with the MLflow link


def summarize(ctx: StageContext, results: Results, gate_outcome: Optional[dict[str, Any]]) -> Summary:
    run = _require_run(ctx)
    rows = comparison_rows(ctx.cfg, results)
    table = comparison_table(rows)
    if gate_outcome is not None:
        table += (
            f"\n\nRegistry: {ctx.cfg.registry.model_name} v{gate_outcome['version']} -> @{gate_outcome['alias']}"
            f"\nGate: {gate_outcome['summary']}"
        )
    markdown = (
        f"# Fine-tune run `{run.run_id}`\n\nMLflow run: [{run.run_id}]({run.url()})\n\n{table}\n\n"
        f"Open the MLflow UI: `{ui_command(ctx.cfg)}`\n"
    )
    return Summary(rows, table, markdown)


def finish(ctx: StageContext, summary: Summary) -> None:
    run = _require_run(ctx)
    run.log_text(summary.markdown, "summary.md")
    run.finish("FINISHED")
    # The terminal's last lines whatever the log level: the comparison and how to open the UI.
    print(f"\n{summary.table}\n\nMLflow run {run.run_id}: {run.url()}\nOpen the MLflow UI: {ui_command(ctx.cfg)}\n")


def record_failure(run: RunLogger, err: BaseException, keep: list[Path], label: str) -> str:
    """Mark the MLflow run FAILED with the reason and what explains it; returns the reason as markdown."""
    reason = f"{type(err).__name__}: {err}"
    for path in keep:
        if Path(path).exists():
            run.log_artifact(path, "data")  # the quarantine and reports explain most data failures
    run.set_tags({"failure_reason": reason[:5000]})
    run.log_text(traceback.format_exc(), "failure/traceback.txt")
    run.finish("FAILED")
    return f"# {label} failed\n\nMLflow run `{run.run_id}`\n\n**Reason:** {reason}\n"


def _require_run(ctx: StageContext) -> RunLogger:
    if ctx.run is None:
        raise ValueError("this stage records into an MLflow run; the StageContext has none")
    return ctx.run
