"""How close do SFT, DPO and evaluation generation on the demo model come to what this CPU can compute?

    .venv/bin/python bench/bench_efficiency.py                        # 4bit + 8bit + none, levers on 4bit
    .venv/bin/python bench/bench_efficiency.py --quick                # smoke run: 1 timed step / repeat
    .venv/bin/python bench/bench_efficiency.py --modes 4bit --json out.json

Prints, in one process, on the machine it runs on:
  * the CPU model, its SIMD/AMX flags, torch's thread count and the physical core count;
  * the fp32 and bf16 matmul rate at that thread count (square matmuls, median of several);
  * per quantization mode: a bare forward+backward, the SFT trainer step, the DPO trainer step and batched
    greedy generation on SmolLM2-135M-Instruct with demo-sized batches, as tokens/s and as model FLOP/s over
    the fp32 matmul rate ("CPU MFU");
  * levers, each measured side by side (alternating arms, ABBA) on the first mode: LoRA dropout 0.05 vs 0,
    LoRA weights bf16 (TRL's QLoRA cast) vs fp32, torch threads = physical cores vs default, padding-free vs
    padded batches, length-grouped vs shuffled SFT batches, eval max_new_tokens sized from the longest reference
    vs fixed 64, eval generation with 4-bit weights dequantized once and in one batch, TRL's fused LM head over
    every position vs the labelled ones, all of them as the pipeline trains (SFT and DPO), and where a trainer
    step spends its time beyond a bare forward+backward (phase timers and a torch.profiler table).

FLOP accounting (stated once, used everywhere; attention score/value products are not counted, they are ~2 %
at 130 tokens). The model FLOPs are the work the result needs, so wasted work lowers the MFU:
  N      = weights that multiply every token: q/k/v/o/gate/up/down of all layers, from the config
  H      = the LM head (vocabulary x hidden): it multiplies only the positions a loss or a next token reads
  N_lora = LoRA A and B weights
  SFT    = (4 N + 6 N_lora) T + 4 H L   the base is frozen, so the backward computes input gradients (2 N T) but
                                        no weight gradients; L = labelled positions; full fine-tuning is 6 N T + ...
  DPO    = (6 N + 8 N_lora) T + 6 H L   policy forward+backward plus the reference forward, T = chosen + rejected
                                        tokens, L = their completion positions
  decode = 2 (N + N_lora) T + 2 H R     T = prompt tokens + generated positions (finished rows still compute),
                                        R = generated tokens (the prefill's last position gives the first)
T counts real tokens (padding excluded), so padding, recomputation, de-quantization and a head projected over
unlabelled positions all lower the MFU. Before `1f7a6c8` this bench counted H in N, for every token.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV  # noqa: E402

if "--emulate-avx2" in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

import torch  # noqa: E402

MODES = ("4bit", "8bit", "none")
# The levers start from the first version's SFT step: TRL's defaults (bf16 LoRA weights under QLoRA, padded
# batches) and LoRA dropout 0.05. The last lever is all of them as tasks/train/trainer.py now trains, with the
# demo recipe's dropout.
FIRST_VERSION = ("lora.dropout=0.05", "eval.batch_size=20", "sft.group_by_length=false")


# --- machine --------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(found.group(1).split()) if found else set()
    except OSError:
        pass
    wanted = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx", "avx_vnni")))
    from ftflow.tasks.train.model import cpu_cores

    # The count the pipeline sets torch to (affinity, one per physical core, the cgroup quota), so the threads
    # lever compares torch's default with what a run actually uses.
    physical = cpu_cores()
    return {
        "cpu": model,
        "flags": wanted,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "physical_cores": physical,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_start": list(os.getloadavg()),
        "isa_caps": {k: os.environ[k] for k in AVX2_ENV if k in os.environ},
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, sizes: tuple[int, ...], reps: int, device: str = "cpu") -> dict[str, Any]:
    """Median FLOP/s of n x n @ n x n per size; the best size is what a GEMM-bound step could reach."""
    from gpu_check import matmul_rate as one_size  # bench/, this script's folder, is on sys.path

    per_size = {n: one_size(device, n, reps, dtype) for n in sizes}
    return {"per_size": per_size, "best": max(per_size.values())}


# --- demo-shaped data -------------------------------------------------------------------------------


def demo_data(n_sft: int, n_pairs: int, n_prompts: int, n_refs: int):
    """Clean demo rows (no injected defects), formatted exactly as the pipeline hands them to TRL."""
    from ftflow.tasks.data.demo import make_example, preference_pair, render_answer, sft_row
    from ftflow.tasks.data.formatting import preference_example, sft_example

    rng = random.Random("bench-efficiency")
    examples = [
        make_example(rng, "en" if i % 2 == 0 else "ja") for i in range(n_sft + n_pairs + max(n_prompts, n_refs))
    ]
    sft = [sft_example(sft_row(ex), None) for ex in examples[:n_sft]]
    pairs = [preference_example(preference_pair(ex, rng)[0], None) for ex in examples[n_sft : n_sft + n_pairs]]
    held = examples[n_sft + n_pairs :]
    prompts = [sft_example(sft_row(ex), None)["prompt"] for ex in held[:n_prompts]]
    references = [render_answer(ex.answer) for ex in held[:n_refs]]
    return sft, pairs, prompts, references


# --- model -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flops:
    """The module docstring's FLOP accounting for one model: N, H and N_lora."""

    body: int
    head: int
    lora: int

    def sft(self, tokens: int, labelled: int) -> float:
        return (4 * self.body + 6 * self.lora) * tokens + 4 * self.head * labelled

    def dpo(self, tokens: int, labelled: int) -> float:
        return (6 * self.body + 8 * self.lora) * tokens + 6 * self.head * labelled

    def forward(self, tokens: int, heads: int) -> float:
        return 2 * (self.body + self.lora) * tokens + 2 * self.head * heads


def flop_params(config, lora_r: int, targets: list[str]) -> Flops:
    """N, H and N_lora from the architecture, since 4/8-bit weights are packed and numel() would undercount them."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (h, q_out),
        "k_proj": (h, kv_out),
        "v_proj": (h, kv_out),
        "o_proj": (q_out, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    body = layers * sum(i * o for i, o in shapes.values())
    lora = layers * sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    return Flops(body, vocab * h, lora)


def labelled_positions(batch: dict) -> int:
    """Positions whose next token a loss reads, counted as TRL's fused head counts them (labels shifted by one)."""
    if "completion_mask" in batch:  # DPO: labels are the completion tokens
        return int(batch["completion_mask"][..., 1:].sum())
    return int((batch["labels"][..., 1:] != -100).sum())


def lm_head_labelled_only(on: bool) -> None:
    """TRL's fused LM head over labelled positions only (as tasks/train/trainer.py trains) or over every position
    (TRL's own choice off Triton devices)."""
    import trl.trainer.utils as fused_head

    from ftflow.tasks.train.trainer import score_labelled_positions_only

    score_labelled_positions_only()
    if not on:  # a TRL without the switch leaves nothing to undo
        fused_head._use_triton = getattr(fused_head._use_triton, "original", fused_head._use_triton)


def load_peft(cfg, path: str):
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ftflow.configs.schema import Quantization
    from ftflow.tasks.train.model import build_lora_config, load_base_model

    base = load_base_model(path, cfg.model, cfg.quantization)
    if cfg.quantization.mode != Quantization.none:
        # As the pipeline does: fp32 norms and input grads so gradients pass the frozen quantized layers.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return get_peft_model(base, build_lora_config(cfg.lora))


def common_args(section, out: Path, seed: int, device: str, steps: int) -> dict[str, Any]:
    """The pipeline's trainer arguments (tasks/train common_args), minus checkpoints: saves are not steps."""
    from ftflow.tasks.train.trainer import common_args as pipeline_args

    args = pipeline_args(section, out, seed, device)
    for key in ("save_steps", "save_total_limit"):
        del args[key]
    return {**args, "max_steps": steps, "save_strategy": "no"}


class StepTimer:
    """Timestamps inside the trainer's own loop: each step's start, compute_loss, backward, the optimizer step.

    A step is the time between successive step starts, so data fetch, collation, logging and callbacks are in it;
    `breakdown` splits it into compute_loss, backward, clip (between backward and the optimizer), optimizer and the
    rest of the loop."""

    def __init__(self):
        from transformers import TrainerCallback

        events = self.events = []

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                events.append(("step", time.perf_counter()))

            def on_pre_optimizer_step(self, args, state, control, **kw):
                events.append(("pre_opt", time.perf_counter()))

            def on_optimizer_step(self, args, state, control, **kw):
                events.append(("opt_done", time.perf_counter()))

            def on_train_end(self, args, state, control, **kw):
                events.append(("step", time.perf_counter()))

        self.callback = _CB()

    def attach(self, trainer) -> None:
        events = self.events

        def timed_call(tag, fn):
            def wrapper(*args, **kwargs):
                events.append((tag + "_start", time.perf_counter()))
                try:
                    return fn(*args, **kwargs)
                finally:
                    events.append((tag + "_end", time.perf_counter()))

            return wrapper

        trainer.compute_loss = timed_call("loss", trainer.compute_loss)
        trainer.accelerator.backward = timed_call("bwd", trainer.accelerator.backward)

    def _steps(self) -> list[dict[str, float]]:
        out, current = [], None
        for tag, t in self.events:
            if tag == "step":
                if current is not None:
                    current["total"] = t - current["begin"]
                    out.append(current)
                current = {"begin": t}
            elif current is not None:
                current.setdefault(tag, t)  # the first forward of a step (DPO's reference pass comes later)
                current[tag + "_last"] = t
        return out

    def steps(self) -> list[float]:
        return [s["total"] for s in self._steps()]

    def breakdown(self, skip: int = 1) -> dict[str, float]:
        parts: dict[str, list[float]] = {}
        for s in self._steps()[skip:]:
            try:
                row = {
                    "compute_loss (forward, loss, metrics)": s["loss_end_last"] - s["loss_start"],
                    "backward": s["bwd_end_last"] - s["bwd_start"],
                    "clip grad norm": s["pre_opt"] - s["bwd_end_last"],
                    "optimizer step": s["opt_done"] - s["pre_opt"],
                }
            except KeyError:
                continue
            row["rest of loop (data, zero_grad, scheduler, callbacks, logging)"] = s["total"] - sum(row.values())
            row["whole step"] = s["total"]
            for k, v in row.items():
                parts.setdefault(k, []).append(v)
        return {k: med(v) for k, v in parts.items()}


def quiet(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def fixed_batch(trainer, device: str) -> dict:
    return to_device(next(iter(trainer.get_train_dataloader())), device)


def real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


# --- timing ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: str, cpu: Optional[list] = None) -> float:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


class Timings(dict):
    """arm -> wall seconds, and `.cpu`: arm -> this process's CPU seconds (all its threads) for the same runs.

    On a CPU shared with other jobs, wall time also counts the time this process waited for a core; CPU time
    counts only its own work (plus short spin-waits), so its ratios move less with the other jobs' load."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu: dict[str, list[float]] = {}


def side_by_side(
    arms: dict[str, tuple[Callable, Callable, Callable]], reps: int, device: str, warm: bool = False
) -> dict[str, list[float]]:
    """arms: name -> (enter, run, leave). ABBA order, so a drift in the load from other jobs falls on every arm."""
    names = list(arms)
    out = Timings({n: [] for n in names})
    out.cpu = {n: [] for n in names}
    if warm:
        for n in names:
            enter, run, leave = arms[n]
            enter()
            run()
            leave()
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            enter, run, leave = arms[n]
            enter()
            out[n].append(timed(run, device, out.cpu[n]))
            leave()
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- the rows ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measure:
    """One timed piece of work: its wall times (one per repeat), the real tokens it processed, its model FLOPs."""

    seconds: list[float]
    tokens: int
    flops: float


@dataclasses.dataclass
class Row:
    section: str
    mode: str
    what: str
    seconds: list[float]
    tokens: int
    flops: float
    peak_fp32: float
    note: str = ""
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def s(self) -> float:
        return med(self.seconds)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.s if self.seconds else float("nan")

    @property
    def flop_s(self) -> float:
        return self.flops / self.s if self.seconds else float("nan")

    @property
    def mfu(self) -> float:
        return self.flop_s / self.peak_fp32

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "median_s": self.s,
            "tokens_per_s": self.tok_s,
            "flop_per_s": self.flop_s,
            "cpu_mfu": self.mfu,
        }


class Bench:
    def __init__(self, args, info):
        from ftflow.configs.loader import load_config
        from ftflow.tasks.data.formatting import end_of_turn_token
        from ftflow.tasks.train.model import load_tokenizer, pick_device, resolve_model_path

        self.args = args
        self.info = info
        self.model_overrides = [f"model.cache_dir={ROOT / '.cache' / 'models'}"]
        if args.model:
            self.model_overrides.append(f"model.name_or_path={args.model}")
        self.recipe = load_config("demo", self.model_overrides)
        self.cfg = load_config("demo", [*self.model_overrides, *FIRST_VERSION])
        self.device = pick_device(self.cfg.model)
        self.path = resolve_model_path(self.cfg.model)
        self.tokenizer = load_tokenizer(self.path, self.cfg.model)
        self.eos = end_of_turn_token(self.tokenizer)
        self.sft_rows, self.pairs, self.all_prompts, self.references = demo_data(
            self.cfg.sft.per_device_batch_size,
            self.cfg.dpo.per_device_batch_size,
            self.cfg.eval.max_examples,
            self.cfg.eval.max_examples,
        )
        self.prompts = self.all_prompts[: self.cfg.eval.batch_size]
        self.rows: list[Row] = []
        self.levers: list[dict[str, Any]] = []
        self.phases: dict[str, Any] = {}
        self.loop: dict[str, dict[str, float]] = {}
        self.profile: dict[str, Any] = {}
        self.checks: dict[str, Any] = {}
        self.loads: dict[str, float] = {}
        self.work = Path(tempfile.mkdtemp(prefix="bench-efficiency-"))

    # -- helpers
    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def mode_cfg(self, mode: str, overrides: tuple[str, ...] = ()):
        from ftflow.configs.loader import load_config

        return load_config("demo", [*self.model_overrides, *FIRST_VERSION, f"quantization.mode={mode}", *overrides])

    def add(self, section: str, mode: str, what: str, measure: Measure, note: str = "", cpu=None) -> Row:
        row = Row(
            section, mode, what, list(measure.seconds), measure.tokens, measure.flops, self.peak, note, list(cpu or [])
        )
        self.rows.append(row)
        self.log(f"{mode:5s} {section:6s} {what}: {row.s:.2f} s, {row.tok_s:.0f} tok/s, MFU {row.mfu:.1%}")
        return row

    def lever(
        self, name: str, mode: str, arms: dict[str, list[float]], tokens: dict[str, int], baseline: str, note: str = ""
    ) -> None:
        entry = {"lever": name, "mode": mode, "baseline": baseline, "note": note, "arms": {}}
        for arm, secs in arms.items():
            entry["arms"][arm] = {
                "seconds": secs,
                "median_s": med(secs),
                "tokens": tokens[arm],
                "tokens_per_s": tokens[arm] / med(secs),
            }
        cpu = getattr(arms, "cpu", None)
        if cpu:
            for arm, secs in cpu.items():
                entry["arms"][arm].update(cpu_seconds=secs, cpu_median_s=med(secs))
        base = entry["arms"][baseline]["tokens_per_s"]
        for arm in entry["arms"].values():
            arm["tok_s_ratio_vs_baseline"] = arm["tokens_per_s"] / base
            arm["time_ratio_vs_baseline"] = arm["median_s"] / entry["arms"][baseline]["median_s"]
            if "cpu_median_s" in arm:
                arm["cpu_time_ratio_vs_baseline"] = arm["cpu_median_s"] / entry["arms"][baseline]["cpu_median_s"]
        self.levers.append(entry)
        self.log(f"lever {name}: " + ", ".join(f"{a}={v['median_s']:.2f}s" for a, v in entry["arms"].items()))

    # -- one mode
    def run_mode(self, mode: str, with_levers: bool) -> None:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

        quick = self.args.quick
        # An 8-bit CPU step costs several 4-bit steps (int8 matmul through fp16 casts): unless asked for, 8-bit gets
        # one bare step and one generation, enough to show the de-quantization cost without dominating the run.
        light = mode == "8bit" and not self.args.full_8bit and not with_levers
        steps = 1 if (quick or light) else self.args.steps
        reps = 1 if (quick or light) else self.args.reps
        cfg = self.mode_cfg(mode)
        t0 = time.perf_counter()
        model = load_peft(cfg, self.path)
        self.loads[mode] = time.perf_counter() - t0
        flops = self.flops = flop_params(model.config, cfg.lora.r, list(cfg.lora.target_modules))
        self.log(
            f"{mode}: loaded in {self.loads[mode]:.1f} s; N={flops.body / 1e6:.1f}M, H={flops.head / 1e6:.1f}M, "
            f"N_lora={flops.lora / 1e6:.2f}M"
        )

        # ---- SFT: the real trainer loop on one fixed batch (dataset = one batch, so every step is the same work)
        timer = StepTimer()
        sft_args = SFTConfig(
            **common_args(cfg.sft, self.work / f"sft-{mode}", cfg.seed, self.device, 1 + steps),
            completion_only_loss=cfg.sft.assistant_only_loss,
            packing=False,
        )
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=Dataset.from_list(self.sft_rows),
            processing_class=self.tokenizer,
            callbacks=[timer.callback],
        )
        quiet(trainer)
        timer.attach(trainer)
        batch = fixed_batch(trainer, self.device)
        tokens = real_tokens(batch)
        padded = int(batch["input_ids"].numel())
        sft_flops = flops.sft(tokens, labelled_positions(batch))
        model.train()
        if light:

            def bare_light():
                out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            bare_light()  # the first step allocates and builds the int8 state
            light_s = side_by_side({"b": (noop, bare_light, noop)}, 1, self.device)
            self.add(
                "sft",
                mode,
                "bare fwd+bwd (HF loss)",
                Measure(light_s["b"], tokens, sft_flops),
                f"{batch['input_ids'].shape[0]} rows, {tokens} real / {padded} padded tokens; light mode: "
                "no trainer/DPO rows (--full-8bit adds them)",
                cpu=light_s.cpu["b"],
            )
            self.gen_rows(mode, model, cfg, with_levers=False, reps=1, light=True)
            return
        trainer.train()
        train_steps = timer.steps()[1:]  # the first step builds kernels and optimizer state
        self.loop[f"{mode} SFTTrainer"] = timer.breakdown()
        pad_note = f"{batch['input_ids'].shape[0]} rows, {tokens} real / {padded} padded tokens"
        lora_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)

        def bare():
            out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        model.train()
        self.add(
            "sft",
            mode,
            "SFTTrainer step (train loop)",
            Measure(train_steps, tokens, sft_flops),
            pad_note + f", LoRA {dtype_name(lora_dtype)}",
        )
        if with_levers:
            # The lever mode's bare step is timed alternating with the trainer path (sft_levers), not alone.
            self.sft_levers(mode, model, trainer, batch, reps, steps)
        else:
            bare_s = side_by_side({"bare": (noop, bare, noop)}, max(steps, 1), self.device)
            self.add(
                "sft",
                mode,
                "bare fwd+bwd (HF loss)",
                Measure(bare_s["bare"], tokens, sft_flops),
                pad_note,
                cpu=bare_s.cpu["bare"],
            )

        # ---- DPO: TRL's DPOTrainer on the same PeftModel (it adds a frozen "ref" copy of the adapter, as in the demo)
        timer = StepTimer()
        dpo_args = DPOConfig(
            **common_args(cfg.dpo, self.work / f"dpo-{mode}", cfg.seed, self.device, 1 + steps),
            beta=cfg.dpo.beta,
            loss_type=[cfg.dpo.loss_type.value],
        )
        dpo = DPOTrainer(
            model=model,
            ref_model=None,
            args=dpo_args,
            train_dataset=Dataset.from_list(self.pairs),
            processing_class=self.tokenizer,
            callbacks=[timer.callback],
        )
        quiet(dpo)
        timer.attach(dpo)
        dbatch = fixed_batch(dpo, self.device)
        dtokens = real_tokens(dbatch)
        dpo.train()
        self.loop[f"{mode} DPOTrainer"] = timer.breakdown()
        self.add(
            "dpo",
            mode,
            "DPOTrainer step (train loop)",
            Measure(timer.steps()[1:], dtokens, flops.dpo(dtokens, labelled_positions(dbatch))),
            f"{len(self.pairs)} pairs = {dbatch['input_ids'].shape[0]} sequences, {dtokens} real tokens",
        )
        if with_levers:
            self.dpo_levers(mode, model, dpo, dbatch, reps)

        self.gen_rows(mode, model, cfg, with_levers, reps)

    def gen_rows(self, mode, model, cfg, with_levers, reps, light=False) -> None:
        """Evaluation generation: greedy, left padding, batch = eval.batch_size, as tasks/evaluate does.

        Each run records the time after every decode step, so one run gives the prefill, the per-step decode time
        and the time any shorter max_new_tokens would have taken: greedy decoding's first k steps are the same
        work whatever the limit, and both limits then come from the same run under the same load."""
        flops = self.flops
        model.eval()
        if "default" in getattr(model, "peft_config", {}):
            model.set_adapter("default")
        sized = self.sized_new_tokens()
        limit = 64 if with_levers else (16 if light else cfg.eval.max_new_tokens)
        runs = [self.generate(model, limit) for _ in range(reps if with_levers else 1)]
        r = runs[0]
        self.add(
            "gen",
            mode,
            f"prefill, {r['rows']} prompts",
            Measure([x["prefill_s"] for x in runs], r["prompt_tokens"], flops.forward(r["prompt_tokens"], r["rows"])),
            f"{r['prompt_tokens']} real prompt tokens (left-padded to {r['rows']} x {r['prompt_len']})",
        )
        decode = [statistics.median(x["step_s"]) for x in runs]
        self.add(
            "gen",
            mode,
            f"decode step, batch {r['rows']} (median of {len(r['step_s'])} steps)",
            Measure(decode, r["rows"], flops.forward(r["rows"], r["rows"])),
            f"{r['stopped']}/{r['rows']} rows emitted EOS within {limit} tokens; "
            "finished rows keep computing until the batch ends",
        )
        total = [x["marks"][-1] for x in runs]
        self.add(
            "gen",
            mode,
            f"generate {r['steps']} new tokens, end to end",
            Measure(
                total,
                r["rows"] * r["steps"],
                flops.forward(r["prompt_tokens"] + r["rows"] * r["steps"], r["rows"] * r["steps"]),
            ),
            "prefill + decode + sampling bookkeeping",
        )
        if with_levers:

            def upto(x, k):  # a batch whose rows all stopped earlier ends there, whatever the limit
                return x["marks"][min(k, len(x["marks"])) - 1]

            arms = {
                "fixed 64": [upto(x, 64) for x in runs],
                f"sized {sized} (longest reference + EOS)": [upto(x, sized) for x in runs],
                f"max_new_tokens={cfg.eval.max_new_tokens} (config)": [upto(x, cfg.eval.max_new_tokens) for x in runs],
            }
            self.lever(
                "eval max_new_tokens",
                mode,
                arms,
                {k: 1 for k in arms},
                "fixed 64",
                note=f"time to the k-th token of the same runs; binds only while a row has not emitted EOS "
                f"(here {r['stopped']}/{r['rows']} did within 64): base and few-shot variants, "
                "and any row of a tuned model that rambles",
            )
            self.eval_levers(mode, model, cfg, reps)

    def eval_levers(self, mode, model, cfg, reps) -> None:
        """Generation as evaluation now runs it vs before: 4-bit weights dequantized once per evaluation instead of
        at every forward (bit-identical outputs, checked here), and every held-out prompt in one batch."""
        from ftflow.tasks.train.model import dequantized_4bit

        limit = cfg.eval.max_new_tokens
        prompts, per = self.all_prompts, self.cfg.eval.batch_size
        chunks = [prompts[i : i + per] for i in range(0, len(prompts), per)]
        outputs: dict[str, list] = {}
        weights = contextlib.ExitStack()

        def batches(name: str, groups: list):
            def run():
                outputs[name] = [self.generate(model, limit, g) for g in groups]

            return run

        def dequantize():
            weights.enter_context(dequantized_4bit(model, self.log))

        packed = f"packed 4-bit, {len(chunks)} x {per} prompts"
        once = f"dequantized once, {len(chunks)} x {per} prompts"
        one = f"dequantized once, 1 x {len(prompts)} prompts"
        arms = side_by_side(
            {
                packed: (noop, batches(packed, chunks), noop),
                once: (dequantize, batches(once, chunks), weights.close),
                one: (dequantize, batches(one, [prompts]), weights.close),
            },
            reps,
            self.device,
        )
        new_tokens = {k: sum(x["rows"] * x["steps"] for x in outputs[k]) for k in arms}
        answers = {k: [row for x in outputs[k] for row in x["tokens"]] for k in arms}
        self.checks["dequantized_generation"] = {
            "identical_to_packed": answers[once] == answers[packed],
            "one_batch_rows_identical": sum(a == b for a, b in zip(answers[one], answers[once])),
            "rows": len(prompts),
        }
        self.lever(
            "eval generation",
            mode,
            arms,
            new_tokens,
            packed,
            note=f"greedy, max_new_tokens={limit}, the {len(prompts)} held-out prompts; tok/s counts generated "
            "positions. tasks/evaluate/evaluation.py: dequantized_4bit around scoring, eval.batch_size = every prompt",
        )

    def sized_new_tokens(self) -> int:
        # Exactly what a model reproducing the longest reference needs: its tokens and the end-of-turn token.
        return max(len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in self.references) + 1

    @torch.no_grad()
    def generate(self, model, max_new_tokens: int, prompts: Optional[list] = None) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        tok.padding_side = "left"
        eos_id = tok.convert_tokens_to_ids(self.eos)
        texts = [
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in (prompts or self.prompts)
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        marks: list[float] = []
        device = self.device

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                sync(device)
                marks.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([Clock()]),
        )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        rel = [m - t0 for m in marks]
        return {
            "rows": len(new),
            "steps": len(new[0]),
            "stopped": sum(eos_id in r for r in new),
            "prompt_tokens": int(enc["attention_mask"].sum()),
            "prompt_len": int(enc["input_ids"].shape[1]),
            "tokens": new,
            "prefill_s": rel[0],
            "step_s": [b - a for a, b in zip(rel, rel[1:])],
            "marks": rel,
        }

    # -- levers on the SFT step
    def sft_levers(self, mode, model, trainer, batch, reps, steps) -> None:
        """What costs the SFT step beyond a bare forward+backward, on the batch and model trainer.train() left."""
        from torch import nn

        tokens = real_tokens(batch)
        sft_flops = self.flops.sft(tokens, labelled_positions(batch))
        lora_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)

        model.train()
        keys = ("input_ids", "attention_mask", "labels")

        def bare_on(b):
            def run():
                out = model(**{k: v for k, v in b.items() if k in keys + ("position_ids",)})
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            return run

        bare = bare_on(batch)

        # 1. where a trainer step goes beyond a bare forward+backward: phase timers, same batch, alternating
        phase_s: dict[str, list[float]] = {}

        def phased(tag: str, trainer_path: bool):
            def run():
                marks = [time.perf_counter()]
                if trainer_path:
                    loss = trainer.compute_loss(model, dict(batch))
                else:
                    loss = model(**{k: v for k, v in batch.items() if k in keys}).loss
                marks.append(time.perf_counter())
                loss.backward()
                marks.append(time.perf_counter())
                if trainer_path:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
                    trainer.optimizer.step()
                    trainer.lr_scheduler.step()
                model.zero_grad(set_to_none=True)
                marks.append(time.perf_counter())
                for name, a, b in (("forward+loss", 0, 1), ("backward", 1, 2), ("clip+optimizer+zero_grad", 2, 3)):
                    phase_s.setdefault(f"{tag}/{name}", []).append(marks[b] - marks[a])

            return run

        step = side_by_side(
            {
                "bare fwd+bwd (HF loss, full logits)": (noop, phased("bare", False), noop),
                "trainer path (TRL compute_loss + backward + clip + AdamW)": (noop, phased("trainer", True), noop),
            },
            max(reps, steps),
            self.device,
        )
        for name, secs in step.items():
            self.add(
                "sft", mode, name, Measure(secs, tokens, sft_flops), "phase-timed, same batch, ABBA", cpu=step.cpu[name]
            )
        self.phases = {k: med(v) for k, v in phase_s.items()}

        # 2. torch.profiler: which ops take the time, bare vs trainer path
        if not self.args.quick or self.args.profile:
            self.profile = {
                "bare": profile_ops(phased("bare-prof", False)),
                "trainer": profile_ops(phased("trainer-prof", True)),
            }

        # 3. LoRA dropout 0.05 vs 0 (the bernoulli masks)
        dropouts = [m for m in model.modules() if hasattr(m, "lora_dropout")]
        saved: list[dict] = []

        def no_dropout():
            # Snapshot now: DPOTrainer later adds a "ref" adapter, whose dropout must come back as it was too.
            saved[:] = [dict(m.lora_dropout) for m in dropouts]
            for m in dropouts:
                for k in m.lora_dropout:
                    m.lora_dropout[k] = nn.Identity()

        def restore_dropout():
            for m, s in zip(dropouts, saved):
                for k, v in s.items():
                    m.lora_dropout[k] = v

        p = self.cfg.lora.dropout
        arms = side_by_side(
            {f"lora_dropout={p}": (noop, bare, noop), "lora_dropout=0": (no_dropout, bare, restore_dropout)},
            reps,
            self.device,
        )
        self.lever(
            "lora dropout",
            mode,
            arms,
            {k: tokens for k in arms},
            f"lora_dropout={p}",
            note="bare fwd+bwd on the trainer's model; dropout=0 replaces the mask with nn.Identity",
        )

        # 4. LoRA weights bf16 (TRL casts them under QLoRA) vs fp32
        trainable = [q for q in model.parameters() if q.requires_grad]
        if lora_dtype != torch.float32:

            def cast(dtype):
                def go():
                    for q in trainable:
                        q.data = q.data.to(dtype)

                return go

            arms = side_by_side(
                {
                    f"LoRA {dtype_name(lora_dtype)} (TRL QLoRA cast)": (noop, bare, noop),
                    "LoRA fp32": (cast(torch.float32), bare, cast(lora_dtype)),
                },
                reps,
                self.device,
            )
            self.lever(
                "lora weight dtype",
                mode,
                arms,
                {k: tokens for k in arms},
                f"LoRA {dtype_name(lora_dtype)} (TRL QLoRA cast)",
                note="SFTTrainer/DPOTrainer cast trainable params to bf16 when the base is 4/8-bit; "
                "bf16 GEMMs are native with avx512_bf16/AMX, converted on AVX2-only CPUs",
            )

        # 5. torch threads = physical cores vs default
        default, physical = self.info["torch_threads"], self.info["physical_cores"]
        if physical and physical != default:

            def threads(k):
                return lambda: torch.set_num_threads(k)

            arms = side_by_side(
                {
                    f"threads={default} (default)": (noop, bare, noop),
                    f"threads={physical} (physical cores)": (threads(physical), bare, threads(default)),
                },
                reps,
                self.device,
            )
            self.lever("torch threads", mode, arms, {k: tokens for k in arms}, f"threads={default} (default)")
        else:
            self.levers.append(
                {
                    "lever": "torch threads",
                    "mode": mode,
                    "arms": {},
                    "note": f"not measured: default threads ({default}) == physical cores ({physical})",
                }
            )

        # 6. padding-free (TRL's collator flattens the batch, position_ids restart per row) vs padded
        examples = [
            {
                k: trainer.train_dataset[i][k]
                for k in ("input_ids", "labels", "seq_lengths")
                if k in trainer.train_dataset.column_names
            }
            for i in range(len(trainer.train_dataset))
        ]
        pf_batch = to_device(dataclasses.replace(trainer.data_collator, padding_free=True)(examples), self.device)
        pf_tokens = int(pf_batch["input_ids"].numel())
        self.checks["padding_free"] = self.padding_free_check(model, trainer, batch, pf_batch)

        def trainer_step(b):
            def run():
                loss = trainer.compute_loss(model, dict(b))
                loss.backward()
                model.zero_grad(set_to_none=True)

            return run

        arms = side_by_side(
            {"padded": (noop, trainer_step(batch), noop), "padding-free": (noop, trainer_step(pf_batch), noop)},
            reps,
            self.device,
        )
        self.lever(
            "padding-free batch",
            mode,
            arms,
            {"padded": tokens, "padding-free": pf_tokens},
            "padded",
            note=f"TRL compute_loss+backward; padded {tuple(batch['input_ids'].shape)} vs flat "
            f"{tuple(pf_batch['input_ids'].shape)} with a block-diagonal mask from position_ids (sdpa)",
        )

        # 7. TRL's fused LM head over every position (its choice off Triton devices) vs the labelled ones only
        every = "every position (TRL on a CPU)"
        arms = side_by_side(
            {
                every: (noop, trainer_step(batch), noop),
                "labelled positions only": (
                    lambda: lm_head_labelled_only(True),
                    trainer_step(batch),
                    lambda: lm_head_labelled_only(False),
                ),
            },
            reps,
            self.device,
        )
        positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        self.lever(
            "LM head positions",
            mode,
            arms,
            {k: tokens for k in arms},
            every,
            note=f"TRL compute_loss+backward, same batch: {labelled_positions(batch)} labelled of {positions} "
            "positions projected onto the vocabulary",
        )

        # 8. all together, as tasks/train/trainer.py trains now: fp32 LoRA weights on CPU, padding-free batches,
        # the demo recipe's dropout, the LM head over labelled positions only
        from ftflow.tasks.train.trainer import padding_free_fits

        recipe_p = self.recipe.lora.dropout
        pipeline_pf = padding_free_fits(self.recipe, examples)

        def as_pipeline():
            for q in trainable:
                q.data = q.data.to(torch.float32 if self.device == "cpu" else lora_dtype)
            if recipe_p == 0:
                no_dropout()
            lm_head_labelled_only(True)

        def as_before():
            for q in trainable:
                q.data = q.data.to(lora_dtype)
            restore_dropout()
            lm_head_labelled_only(False)

        self.as_pipeline = (as_pipeline, as_before)

        pipeline = f"pipeline ({'fp32' if self.device == 'cpu' else dtype_name(lora_dtype)} LoRA, "
        pipeline += f"{'padding-free' if pipeline_pf else 'padded'}, dropout {recipe_p}, labelled-only head)"
        before = f"first version ({dtype_name(lora_dtype)} LoRA, padded, dropout {p})"
        arms = side_by_side(
            {
                before: (noop, trainer_step(batch), noop),
                pipeline: (as_pipeline, trainer_step(pf_batch if pipeline_pf else batch), as_before),
            },
            reps,
            self.device,
        )
        self.lever(
            "all SFT levers",
            mode,
            arms,
            {before: tokens, pipeline: pf_tokens if pipeline_pf else tokens},
            before,
            note="TRL compute_loss+backward on the same rows; the pipeline arm is what `ftflow run demo` trains",
        )
        # The headline SFT rows above run the first version's recipe; this is the step the pipeline takes now.
        self.add(
            "sft",
            mode,
            "pipeline step (TRL loss+backward)",
            Measure(arms[pipeline], tokens, sft_flops),
            pipeline + ", same rows; from the 'all SFT levers' arm",
            cpu=arms.cpu[pipeline],
        )
        self.length_grouping(mode, model, trainer, trainer_step, reps)
        model.zero_grad(set_to_none=True)

    def dpo_levers(self, mode, model, dpo, batch, reps) -> None:
        """The DPO step as the first version took it vs as tasks/train/trainer.py takes it now (sft_levers' switch:
        fp32 LoRA weights on a CPU, the recipe's dropout, the LM head over completion positions only)."""
        as_pipeline, as_before = self.as_pipeline
        tokens = real_tokens(batch)

        def step():
            loss = dpo.compute_loss(model, dict(batch))
            loss.backward()
            model.zero_grad(set_to_none=True)

        model.train()
        before, pipeline = "first version (TRL's DPO step)", "pipeline (as the SFT lever's pipeline arm)"
        arms = side_by_side(
            {before: (noop, step, noop), pipeline: (as_pipeline, step, as_before)}, reps, self.device, warm=True
        )
        self.lever(
            "all DPO levers",
            mode,
            arms,
            {k: tokens for k in arms},
            before,
            note="TRL DPO compute_loss (policy and reference forward) + backward on the same pairs",
        )
        self.add(
            "dpo",
            mode,
            "pipeline step (TRL loss+backward)",
            Measure(arms[pipeline], tokens, self.flops.dpo(tokens, labelled_positions(batch))),
            f"{pipeline}, same pairs; from the 'all DPO levers' arm",
            cpu=arms.cpu[pipeline],
        )
        model.zero_grad(set_to_none=True)

    def length_grouping(self, mode, model, trainer, trainer_step, reps) -> None:
        """sft.group_by_length: the demo recipe's SFT batches (its row count, batch size and steps) drawn shuffled
        vs length-grouped (transformers' LengthGroupedSampler order); padding over all the steps, and the time of
        the same three steps of each order (first, middle, two thirds), ABBA."""
        from transformers.trainer_pt_utils import get_length_grouped_indices

        from ftflow.tasks.data.formatting import Window, tokenized_example

        r = self.recipe
        bs, steps = r.sft.per_device_batch_size, r.sft.max_steps
        sft, _, _, _ = demo_data(r.data.demo.n_sft, 0, 0, 0)
        window = Window(max_length=r.sft.max_length)
        rows = [tokenized_example(self.tokenizer, ex["prompt"] + ex["completion"], window)[0] for ex in sft]
        lengths = [len(row["input_ids"]) for row in rows]
        orders = {
            "shuffled": torch.randperm(len(rows), generator=torch.Generator().manual_seed(r.seed)).tolist(),
            "length-grouped": get_length_grouped_indices(lengths, bs, generator=torch.Generator().manual_seed(r.seed)),
        }
        picks = (0, steps // 3, 2 * steps // 3)
        padding, tokens, runs = {}, {}, {}
        for name, order in orders.items():
            batches = [order[i * bs : (i + 1) * bs] for i in range(steps)]
            real = sum(lengths[i] for b in batches for i in b)
            padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
            padding[name] = {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded}
            chosen = [to_device(trainer.data_collator([dict(rows[i]) for i in batches[k]]), self.device) for k in picks]
            tokens[name] = sum(real_tokens(b) for b in chosen)
            step_fns = [trainer_step(b) for b in chosen]
            runs[name] = (noop, lambda fns=step_fns: [f() for f in fns], noop)
        arms = side_by_side(runs, reps, self.device)
        self.checks["length_grouping"] = padding
        self.lever(
            "length-grouped batches",
            mode,
            arms,
            tokens,
            "shuffled",
            note=f"{len(rows)} demo rows, batch {bs}, {steps} steps: padding "
            + ", ".join(f"{k} {v['padding_share']:.0%}" for k, v in padding.items())
            + f"; timed: steps {', '.join(map(str, picks))} of each order (TRL compute_loss+backward)",
        )

    @torch.no_grad()
    def padding_free_check(self, model, trainer, batch, pf_batch) -> dict[str, Any]:
        """Same rows, same labels: the padded and the padding-free loss must agree, under sdpa and eager."""
        out = {}
        was = model.training
        model.eval()
        out["loss_padded_sdpa"] = float(trainer.compute_loss(model, dict(batch)))
        out["loss_padding_free_sdpa"] = float(trainer.compute_loss(model, dict(pf_batch)))
        if not self.args.quick:
            base = model.get_base_model()
            current = base.config._attn_implementation
            try:
                base.set_attn_implementation("eager")
                out["loss_padding_free_eager"] = float(trainer.compute_loss(model, dict(pf_batch)))
            except Exception as err:  # an attention backend that refuses packed positions is the finding itself
                out["eager_error"] = f"{type(err).__name__}: {err}"
            finally:
                with contextlib.suppress(Exception):
                    base.set_attn_implementation(current)
        model.train(was)
        return out

    # -- output
    def table(self) -> str:
        info, lines = self.info, []
        lines.append(f"CPU: {info['cpu']}")
        lines.append(
            f"flags: {' '.join(info['flags']) or '(none of avx2/avx512*/amx*)'}; torch capability "
            f"{info['torch_cpu_capability']}; torch threads {info['torch_threads']}; physical cores "
            f"{info['physical_cores']} (logical {info['logical_cpus']}); torch {info['torch']}"
        )
        if info.get("isa_caps"):
            lines.append(
                "EMULATED AVX2-only: "
                + " ".join(f"{k}={v}" for k, v in info["isa_caps"].items())
                + " (the flags above are the host's; bitsandbytes' CPU kernels are not capped)"
            )
        lines.append(
            f"load average at start {fmt_load(info['loadavg_start'])}, at end {fmt_load(info['loadavg_end'])} "
            f"(other jobs share these cores: compare rows of this run with each other)"
        )
        lines.append("")
        for key, label in (("fp32", "fp32"), ("bf16", "bf16")):
            m = self.matmul[key]
            sizes = ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in m["per_size"].items())
            lines.append(f"matmul {label}: {m['best'] / 1e9:.0f} GFLOP/s best (per size, GFLOP/s: {sizes})")
        after = self.matmul.get("fp32_after") or {}
        if after:
            lines.append(
                "matmul fp32 re-measured after each mode: "
                + ", ".join(f"{m} {v['best'] / 1e9:.0f}" for m, v in after.items())
                + f" GFLOP/s; MFU below is against the best seen, {self.peak / 1e9:.0f} GFLOP/s"
            )
        f = self.flops
        lines.append(
            f"model: N = {f.body / 1e6:.1f}M matmul weights/token, H = {f.head / 1e6:.1f}M LM head, "
            f"N_lora = {f.lora / 1e6:.2f}M; SFT (4N+6N_lora)T+4HL, DPO (6N+8N_lora)T+6HL, decode 2(N+N_lora)T+2HR "
            "(L labelled positions, R generated tokens); MFU = model FLOP/s / fp32 matmul best"
        )
        lines.append("load s: " + ", ".join(f"{m} {s:.1f}" for m, s in self.loads.items()))
        lines.append("")
        header = f"{'mode':5} {'stage':5} {'what':62} {'s (median)':>10} {'n':>2} {'tokens':>6} {'tok/s':>7} {'GFLOP/s':>8} {'MFU':>6} {'cpu s':>7}"
        lines.append(header)
        lines.append("-" * len(header))
        for r in self.rows:
            lines.append(
                f"{r.mode:5} {r.section:5} {r.what[:62]:62} {r.s:10.2f} {len(r.seconds):2d} {r.tokens:6d} "
                f"{r.tok_s:7.1f} {r.flop_s / 1e9:8.1f} {r.mfu:6.1%} "
                + (f"{med(r.cpu_seconds):7.2f}" if r.cpu_seconds else f"{'-':>7}")
            )
        for r in self.rows:
            if r.note:
                lines.append(f"  {r.mode} {r.section} {r.what}: {r.note}")
        if self.levers:
            lines.append("")
            lines.append(
                "levers (side by side, ABBA; tok/s and time ratios from wall medians vs the baseline arm; cpu = this "
                "process's CPU seconds for the same runs, less sensitive to other jobs' load)"
            )
            for lv in self.levers:
                if not lv["arms"]:
                    lines.append(f"  {lv['lever']:22} {lv['note']}")
                    continue
                for arm, v in lv["arms"].items():
                    lines.append(
                        f"  {lv['lever']:22} {arm:42} {v['median_s']:8.2f} s  n={len(v['seconds'])}  "
                        f"tok/s x{v['tok_s_ratio_vs_baseline']:.3f}  time x{v['time_ratio_vs_baseline']:.3f}"
                        + (
                            f"  cpu {v['cpu_median_s']:.2f} s x{v['cpu_time_ratio_vs_baseline']:.3f}"
                            if "cpu_median_s" in v
                            else ""
                        )
                        + f"  (wall s: {', '.join(f'{x:.1f}' for x in v['seconds'])})"
                    )
                if lv.get("note"):
                    lines.append(f"  {'':22} ({lv['note']})")
        if self.checks:
            lines.append("")
            lines.append("checks: " + json.dumps(self.checks))
        if self.phases:
            lines.append("")
            lines.append("SFT step phases (median s, same batch, alternating bare / trainer path)")
            for k, v in self.phases.items():
                lines.append(f"  {k:62} {v:8.2f}")
        for name, parts in self.loop.items():
            lines.append("")
            lines.append(f"{name} loop, median per step over the timed steps (s; share of the whole step)")
            whole = parts.get("whole step", float("nan"))
            for k, v in parts.items():
                lines.append(f"  {k:62} {v:8.2f}  {v / whole:6.1%}")
        for tag, prof in self.profile.items():
            lines.append("")
            lines.append(
                f"torch.profiler, one {tag} step: {prof['total_s']:.2f} s wall; self CPU time by category "
                f"(% of summed self time)"
            )
            for cat, s in prof["categories"].items():
                lines.append(f"  {cat:40} {s:8.2f} s  {s / prof['self_total_s']:6.1%}")
            lines.append("  top ops by self CPU time:")
            for op in prof["top"]:
                lines.append(f"    {op['op'][:60]:60} {op['self_s']:8.2f} s  {op['share']:6.1%}  calls {op['calls']}")
        return "\n".join(lines)


def noop() -> None:
    pass


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


CATEGORIES = (  # (category, exact aten op names, substrings for everything else)
    (
        "matmul (mm/addmm/bmm/linear)",
        {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_addmm_activation"},
        ("mkldnn", "onednn"),
    ),
    ("bitsandbytes (de-quantize / int8)", set(), ("bitsandbytes", "dequant", "int8", "gemv_4bit", "gemm_4bit")),
    ("dropout masks (bernoulli)", {"aten::bernoulli_", "aten::native_dropout", "aten::dropout"}, ("bernoulli",)),
    ("dtype casts / copies", {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"}, ()),
    ("attention (sdpa / softmax)", {"aten::_softmax", "aten::softmax"}, ("scaled_dot_product", "flash_attention")),
    ("optimizer (AdamW foreach)", set(), ("_foreach", "addcdiv", "addcmul", "aten::lerp")),
    (
        "log-softmax / logprob tiles",
        {
            "aten::_log_softmax",
            "aten::log_softmax",
            "aten::logsumexp",
            "aten::exp",
            "aten::amax",
            "aten::max",
            "aten::gather",
            "aten::_log_softmax_backward_data",
        },
        (),
    ),
)


def category(key: str) -> str:
    for name, exact, parts in CATEGORIES:
        if key in exact or any(p in key.lower() for p in parts):
            return name
    return "everything else"


def profile_ops(run: Callable[[], None], top: int = 12) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    total = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    cats: dict[str, float] = {name: 0.0 for name, _, _ in CATEGORIES}
    cats["everything else"] = 0.0
    for e in events:
        cats[category(e.key)] += e.self_cpu_time_total / 1e6
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "total_s": total,
        "self_total_s": self_total,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [
            {
                "op": e.key,
                "self_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / 1e6 / self_total,
                "calls": e.count,
            }
            for e in ranked
        ],
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 timed step / repeat, no profiler")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of 4bit, 8bit, none; levers run on the first")
    ap.add_argument("--steps", type=int, default=2, help="timed trainer steps per mode, after one warm-up step")
    ap.add_argument("--full-8bit", action="store_true", help="8bit gets the trainer and DPO rows too (slow on CPU)")
    ap.add_argument("--reps", type=int, default=2, help="repeats per lever arm (ABBA order)")
    ap.add_argument("--no-levers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="run the profiler even with --quick")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="re-run with torch/oneDNN/MKL capped at AVX2 (bitsandbytes' own CPU kernels are not capped)",
    )
    ap.add_argument("--model", help="another model directory (a tiny one makes a seconds-long check of this script)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")

    sys.path.insert(0, str(ROOT))
    from ftflow.tasks.train.model import offline_env

    offline_env()
    import transformers

    transformers.logging.set_verbosity_error()
    info = cpu_info()
    t_start = time.perf_counter()
    bench = Bench(args, info)
    sizes = (1024, 2048)
    reps = 3 if args.quick else 5
    bench.matmul = {"fp32": matmul_rate(torch.float32, sizes, reps), "bf16": matmul_rate(torch.bfloat16, sizes, reps)}
    bench.peak = bench.matmul["fp32"]["best"]
    bench.log(f"matmul fp32 {bench.peak / 1e9:.0f} GFLOP/s, bf16 {bench.matmul['bf16']['best'] / 1e9:.0f} GFLOP/s")
    bench.matmul["fp32_after"] = {}
    for i, mode in enumerate(modes):
        bench.run_mode(mode, with_levers=(i == 0 and not args.no_levers))
        gc.collect()  # the mode's model, trainers and optimizer states go with run_mode's frame
        # Other jobs' load drifts over a long run: the rate is re-measured after each mode, and MFU is taken
        # against the best rate seen, the one the cores reached when they were least shared.
        bench.matmul["fp32_after"][mode] = matmul_rate(torch.float32, sizes, reps)
    seen = [bench.matmul["fp32"], *bench.matmul["fp32_after"].values()]
    bench.peak = max(m["best"] for m in seen)
    for row in bench.rows:
        row.peak_fp32 = bench.peak
    info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = time.perf_counter() - t_start
    text = bench.table()
    print(text)
    print(f"\ntotal wall {info['wall_s']:.0f} s")
    if args.json:
        payload = {
            "machine": info,
            "matmul": bench.matmul,
            "flop_params": dataclasses.asdict(bench.flops),
            "loads_s": bench.loads,
            "rows": [r.as_dict() for r in bench.rows],
            "levers": bench.levers,
            "phases_s": bench.phases,
            "profile": bench.profile,
            "checks": bench.checks,
            "trainer_loop_s": bench.loop,
            "argv": sys.argv[1:],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
