"""Scores of the base variants (base, base_fewshot), kept by content so a rerun re-scores only what changed.

A scheduled retraining run, or the second `make demo` of the day, scores the same base model on the same
held-out rows with the same settings as the run before: on a 2-core CPU that is minutes of generation and
teacher-forced scoring that can only give the same numbers. The key is a digest of everything those numbers
depend on: the base weights, the chat template and end-of-turn token, the scored rows, pairs and few-shot
examples, the evaluation, model and quantization settings, the device and the CPU's instruction set, the
library versions, and this package's code. Change any of them and the variant is scored afresh. Adapters are
never cached: each run trains new ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ftflow.tasks.evaluate.evaluation import Scoring, VariantResult
    from ftflow.tasks.stages import StageContext

CACHED_VARIANTS = ("base", "base_fewshot")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "evaluate")


def cache_dir(ctx: StageContext) -> Path:
    return Path(ctx.cfg.output_dir) / "eval-cache"


def model_digest(ctx: StageContext) -> Optional[str]:
    """The converted checkpoint's sha256 when known, else the model folder's file names, sizes and mtimes (hashing
    an 8B model's 16 GB on every run would cost more than it saves); None when there is no folder to describe."""
    if ctx.model.source_sha256:
        return ctx.model.source_sha256
    folder = Path(ctx.model.path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def variant_key(ctx: StageContext, variant: str, scoring: Scoring) -> Optional[str]:
    """The digest a base variant's scores are filed under, or None when caching is off or the model has no digest."""
    import torch

    from ftflow.tasks.stages import code_digest
    from ftflow.tasks.train.model import pick_device

    cfg = ctx.cfg
    digest = model_digest(ctx) if cfg.eval.cache_baselines and variant in CACHED_VARIANTS else None
    if digest is None:
        return None
    content = {
        "variant": variant,
        "model": digest,
        "template": ctx.model.template_fingerprint,
        "eos": ctx.model.eos_token,
        "examples": list(scoring.examples),
        "pairs": list(scoring.pairs),
        "few_shots": list(scoring.few_shots) if variant == "base_fewshot" else [],
        "sources": sorted(scoring.sources),
        # The judge scores after this cache, on every run; the rest of eval shapes generation and scoring.
        "eval": cfg.eval.model_dump(mode="json", exclude={"judge", "cache_baselines"}),
        "max_length": cfg.sft.max_length,
        "model_cfg": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "quantization": cfg.quantization.model_dump(mode="json"),
        "device": pick_device(cfg.model),
        # Kernels differ by instruction set (AVX2 vs AVX-512): greedy answers can flip on a rounding difference.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seed": cfg.seed,
        "libraries": _versions(),
        "code": code_digest(),
    }
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(ctx: StageContext, variant: str, key: Optional[str]) -> Optional[VariantResult]:
    """The cached result, or None (no key, no file, or a file this code cannot read: it is then re-scored)."""
    from ftflow.tasks.evaluate.evaluation import VariantResult

    if key is None:
        return None
    path = cache_dir(ctx) / f"{variant}-{key}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("pair_logps") is not None:
            data["pair_logps"] = tuple(data["pair_logps"])
        return VariantResult(**data)
    except (OSError, ValueError, TypeError):
        return None


def save(ctx: StageContext, key: Optional[str], result: VariantResult) -> None:
    """Write atomically: sweep arms score in threads, and a half-written file must never be read as a hit."""
    if key is None:
        return
    folder = cache_dir(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = dataclasses.asdict(result)
    data.pop("cached", None)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, folder / f"{result.variant}-{key}.json")
