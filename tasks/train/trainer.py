"""SFT and DPO in one builder, `train`: a quantized base, a peft LoRA adapter and TRL's trainer for the kind.

SFT rows are TRL prompt/completion pairs, so the loss falls on the answer only. DPO continues the SFT
adapter; TRL copies it into a frozen `ref` adapter on the same base weights, so the reference policy is
the SFT model and there is no second model copy.

Nothing heavy (torch, transformers, TRL) is imported until `train` runs, and never Prefect or MLflow:
GPU scripts and the `accelerate launch` workers import this module on machines that may lack them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ftflow.configs.schema import Method, PipelineConfig, Quantization, TrainCommon
from ftflow.tasks.stages import StageContext, Update

Kind = Literal["sft", "dpo"]


@dataclass
class TrainResult:
    adapter_dir: str
    history: list[dict[str, float]]
    trainable_params: int
    total_params: int
    wall_s: float
    peak_memory_mb: float
    resumed_from_step: int = 0
    global_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    backend: Optional[str] = None  # the process group's backend when training ran in launched processes
    kind: str = ""  # sft, dpo or rlhf: the variant name evaluation gives this result


def train(
    ctx: StageContext, kind: Kind, examples: list[dict[str, Any]], start_adapter: Optional[str] = None
) -> TrainResult:
    """Train `kind` on `examples` into work_dir/<kind>/adapter, from the last checkpoint when there is one.

    `start_adapter` continues an existing adapter (DPO starts from the SFT one); otherwise a fresh LoRA
    adapter from `cfg.lora`. The adapter gets `ftflow_meta.json` (template, base, stage) and goes to ctx.run."""
    if ctx.cfg.distributed.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from ftflow.tasks.train.launch import launch

        # Not yet inside a process group: start one; each of its processes comes back here.
        return launch(ctx, kind, examples, start_adapter)
    section: TrainCommon = getattr(ctx.cfg, kind)  # each kind has its config section of the same name
    check_trainable(kind, examples, section)
    from datasets import Dataset

    from ftflow.tasks.train.model import keep_trainable_fp32, load_tokenizer, pick_device, trainable_parameters

    device = pick_device(ctx.cfg.model)
    reset_peak_memory(device)
    tokenizer = load_tokenizer(ctx.model.path, ctx.cfg.model)
    model = trainable_model(ctx.cfg, ctx.model.path, start_adapter, section.gradient_checkpointing)
    counted = trainable_parameters(model)
    out_dir = ctx.work_dir / kind
    config_class, trainer_class, own_args = _kind_specific(kind, ctx.cfg, examples)
    args = config_class(
        **{**common_args(section, out_dir / "checkpoints", ctx.cfg.seed, device), **own_args, **section.extra}
    )
    stream = step_stream(ctx, kind, args.max_steps)
    score_labelled_positions_only()
    with keep_trainable_fp32(model, device):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            callbacks=[stream, *ctx.callbacks],
        )
    result = _fit(trainer, model, stream.history, out_dir, counted)
    result.kind = kind
    if trainer.is_world_process_zero():
        _record(ctx, kind, result)
    return result


def align(ctx: StageContext, sft_examples: list[dict], pairs: list[dict], sft_adapter: str) -> Optional[TrainResult]:
    """The alignment stage after SFT, per `cfg.alignment`: DPO on the pairs, RLHF (a reward model, then online
    RL), or none. None also when there are no pairs (or DPO is switched off)."""
    from ftflow.configs.schema import Alignment

    alignment = ctx.cfg.alignment
    if alignment == Alignment.none or not pairs:
        return None
    if alignment == Alignment.rlhf:
        from ftflow.tasks.train.rlhf import train_rlhf

        return train_rlhf(ctx, sft_examples, pairs, sft_adapter)
    return train(ctx, "dpo", pairs, sft_adapter) if ctx.cfg.dpo.enabled else None


def check_trainable(kind: Kind, examples: list[dict[str, Any]], section: TrainCommon) -> None:
    """Bad input is a DataError before any model loads, not a sampler's ValueError retried as if transient.

    TRL drops a pre-tokenized row longer than max_length; when every row is, the trainer gets none."""
    from ftflow.tasks.errors import DataError

    if not examples:
        raise DataError(f"{kind}: no training rows left after validation and formatting")
    lengths = [len(ex["input_ids"]) for ex in examples if "input_ids" in ex]
    if lengths and min(lengths) > section.max_length:
        raise DataError(
            f"{kind}: all {len(lengths)} rows are longer than {kind}.max_length ({section.max_length} "
            f"tokens; the shortest has {min(lengths)}): raise {kind}.max_length, or shorten the rows "
            f"(quality.max_tokens drops longer ones at validation)"
        )


def trainable_model(
    cfg: PipelineConfig, model_path: str, start_adapter: Optional[str] = None, gradient_checkpointing: bool = False
):
    """What `cfg.resolved_method` trains: a LoRA adapter on the (quantized) base, virtual tokens (prompt tuning),
    or every weight (full). `start_adapter` continues earlier training: an adapter, or full weights for `full`."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from ftflow.tasks.train.model import build_peft_config, load_base_model

    # A new adapter's weights (LoRA's A, prompt tuning's tokens) come from the global generators: unseeded here,
    # they would follow whatever the process ran before (a sweep's earlier arms, a deployment's earlier runs),
    # and one config would train different adapters depending on the arm order.
    set_seed(cfg.seed)
    if cfg.resolved_method == Method.full:
        from ftflow.tasks.train.model import check_full_fits

        check_full_fits(model_path, cfg.model)
        # Full weights continue from full weights: DPO starts from the SFT checkpoint itself.
        model = load_base_model(start_adapter or model_path, cfg.model, cfg.quantization)
        model.requires_grad_(True)
        return model
    model = load_base_model(model_path, cfg.model, cfg.quantization)
    if cfg.quantization.mode != Quantization.none:
        # Casts norms to fp32 and enables input grads so gradients flow through frozen 4/8-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if start_adapter and cfg.resolved_method == Method.prompt_tuning:
        return _trainable_prompt(model, start_adapter)
    if start_adapter:
        return PeftModel.from_pretrained(model, start_adapter, is_trainable=True)
    return get_peft_model(model, build_peft_config(cfg, model_path))


def _trainable_prompt(model, adapter_dir: str):
    """Saved virtual tokens, trainable again: peft refuses `is_trainable` for prompt-learning adapters, so a new
    prompt encoder of the saved config gets the saved weights."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    set_peft_model_state_dict(peft_model, load_peft_weights(adapter_dir))
    return peft_model


def _kind_specific(kind: Kind, cfg: PipelineConfig, examples: list[dict[str, Any]]) -> tuple[Any, Any, dict[str, Any]]:
    """TRL's config and trainer classes for `kind`, and the config arguments only that kind takes."""
    import trl

    if kind == "sft":
        own = {"completion_only_loss": cfg.sft.assistant_only_loss, "packing": False}
        if cfg.sft.group_by_length:
            # Each step's cost is its batch padded to its longest row: a shuffled batch of the demo's rows is 20 %
            # padding, a length-grouped one 1.5 % (bench/bench_efficiency.py).
            own["train_sampling_strategy"] = "group_by_length"
        if padding_free_fits(cfg, examples):
            # TRL enforces no max_length without padding: the formatting stage already fitted every row into it.
            own.update(padding_free=True, max_length=None)
        return trl.SFTConfig, trl.SFTTrainer, own
    # With ref_model left out, TRL builds the reference from the PeftModel's current adapter (the SFT one).
    return trl.DPOConfig, trl.DPOTrainer, {"beta": cfg.dpo.beta, "loss_type": [cfg.dpo.loss_type.value]}


def score_labelled_positions_only() -> bool:
    """Make TRL's fused LM head project only the labelled positions on a CPU too, as it does on Triton devices.

    TRL 1.x's `add_fused_lm_head` (SFT, DPO, reward) scores every position, prompt and padding included, unless
    the device runs Triton: a graph compiler (Neuron) would recompile for every new count of labelled positions. A
    CPU compiles nothing, and there the projection onto the vocabulary and its log-softmax over unlabelled
    positions (70 % of a demo SFT batch) cost about a quarter of an SFT or DPO step (bench/bench_lm_head.py).
    The loss and gradients are the same: unlabelled positions are zeroed either way. Process-wide and idempotent;
    False where the installed TRL has no such switch (its fused head then scores every position, as before)."""
    import trl.trainer.utils as fused_head

    uses_triton = getattr(fused_head, "_use_triton", None)
    if not callable(uses_triton):
        return False
    if getattr(uses_triton, "ftflow_cpu", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or uses_triton(device)

    compact.ftflow_cpu = True  # type: ignore[attr-defined]
    compact.original = uses_triton  # type: ignore[attr-defined]
    fused_head._use_triton = compact
    return True


def padding_free_fits(cfg: PipelineConfig, examples: list[dict[str, Any]]) -> bool:
    """Whether SFT can run padding-free on `examples`: switched on, not prompt tuning, pre-tokenized, and every row
    within max_length.

    A padding-free batch is the rows one after another in a single sequence, positions restarting at each row;
    transformers turns the restarts into a block-diagonal causal mask (sdpa, eager) or varlen boundaries (flash),
    so no row attends to another. Flash attention's varlen kernels then skip the padding's work; sdpa on CPU
    computes the dense block-diagonal mask over the whole sequence instead, and on the demo's batch (8 rows,
    19 % padding) that cost what dropping the padding saved (bench/bench_efficiency.py), so it is opt-in
    (`sft.padding_free`). Rows of unknown length, or longer than the
    window, keep the padded path, where TRL truncates. Prompt tuning too: peft drops position ids for prompt
    learning and prepends its virtual tokens once per sequence, so a packed batch would mix its rows."""
    if not cfg.sft.padding_free or cfg.resolved_method == Method.prompt_tuning:
        return False
    lengths = [len(ex["input_ids"]) for ex in examples if "input_ids" in ex]
    return len(lengths) == len(examples) and max(lengths, default=0) <= cfg.sft.max_length


def common_args(section: TrainCommon, output_dir: Path, seed: int, device: str) -> dict[str, Any]:
    """Keyword arguments both SFTConfig and DPOConfig accept."""
    return dict(
        output_dir=str(output_dir),
        max_steps=section.max_steps,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.per_device_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        warmup_steps=math.ceil(section.warmup_ratio * section.max_steps),
        lr_scheduler_type="cosine",
        logging_steps=section.logging_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        max_length=section.max_length,
        activation_checkpointing=section.gradient_checkpointing,
        # Metrics go to MLflow through step_stream with an explicit run id, not the global active run.
        report_to="none",
        disable_tqdm=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def step_stream(ctx: StageContext, kind: Kind, total: int):
    """A trainer callback: every log to ctx.run under `<kind>/` and to ctx's progress, and into `.history`.

    MLflow is addressed by run id: Prefect runs tasks in threads and MLflow's active run is per thread."""
    from transformers import TrainerCallback

    update: Update = ctx.start_progress(kind, total)

    class StepStream(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {
                k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if not numeric:
                return
            numeric["elapsed_s"] = time.perf_counter() - self.started
            self.history.append({"step": state.global_step, **numeric})
            if not state.is_world_process_zero:
                return
            if ctx.run is not None:
                ctx.run.log_metrics({f"{kind}/{k}": v for k, v in numeric.items()}, state.global_step)
            update(state.global_step, numeric)

    return StepStream()


def _fit(trainer, model, history: list[dict[str, float]], out_dir: Path, counted: tuple[int, int]) -> TrainResult:
    """Train from the last checkpoint, if any, and save the trained adapter only."""
    from transformers.trainer_callback import PrinterCallback

    # Progress goes to the log and MLflow through step_stream; the trainer's raw dict printer would repeat it.
    trainer.remove_callback(PrinterCallback)
    resume = last_checkpoint(out_dir / "checkpoints")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - started
    adapter_dir = out_dir / "adapter"
    if hasattr(model, "peft_config"):
        # "default" is the adapter being trained; DPO's frozen "ref" copy stays behind.
        model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    else:
        model.save_pretrained(str(adapter_dir))  # a full fine-tune: the whole model
    trainer.processing_class.save_pretrained(str(adapter_dir))
    return TrainResult(
        adapter_dir=str(adapter_dir),
        history=history,
        trainable_params=counted[0],
        total_params=counted[1],
        wall_s=wall,
        peak_memory_mb=peak_memory_mb(trainer.args.device.type),
        resumed_from_step=checkpoint_step(resume),
        global_step=output.global_step,
        metrics={k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))},
    )


def _record(ctx: StageContext, kind: Kind, result: TrainResult) -> None:
    """What the adapter needs to be served and compared later, beside it and in the run."""
    Path(result.adapter_dir, "ftflow_meta.json").write_text(
        json.dumps(
            {
                "template_fingerprint": ctx.model.template_fingerprint,
                "eos_token": ctx.model.eos_token,
                "base_model": ctx.cfg.model.name_or_path,
                "base_sha256": ctx.model.source_sha256,
                "stage": kind,
                "method": ctx.cfg.resolved_method.value,
                "lora_r": ctx.cfg.lora.r,
                "lora_alpha": ctx.cfg.lora.resolved_alpha,
            },
            indent=2,
        )
    )
    if ctx.run is not None:
        ctx.run.log_metrics(
            {
                f"{kind}/trainable_params": result.trainable_params,
                f"{kind}/wall_s": result.wall_s,
                f"{kind}/peak_memory_mb": result.peak_memory_mb,
                f"{kind}/resumed_from_step": result.resumed_from_step,
            }
        )
        ctx.run.log_artifact(result.adapter_dir, f"adapters/{kind}")


def reset_peak_memory(device: str) -> None:
    """Start the high-water mark afresh, so each stage of one process (compare-methods' arms) reports its own peak."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        # Linux: "5" resets this process's peak resident set (VmHWM). Elsewhere the peak stays the process's own.
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: str) -> float:
    """Peak since reset_peak_memory: CUDA memory allocated, or on CPU the process's peak resident set."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    # Not Linux: ru_maxrss, the whole process's high-water mark (KiB on Linux, bytes on macOS), an upper bound.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """Newest complete `checkpoint-N` in output_dir, so a retried task resumes instead of starting over."""
    if not output_dir.exists():
        return None
    complete = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and (p / "trainer_state.json").exists() and p.name.split("-")[-1].isdigit()
    ]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))


def checkpoint_step(path: Optional[str]) -> int:
    return int(Path(path).name.split("-")[-1]) if path else 0
