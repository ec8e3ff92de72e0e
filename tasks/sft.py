"""QLoRA SFT: a 4-bit (or 8-bit / full) base, a peft LoRA adapter, TRL's SFTTrainer, loss on the answer only."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from configs.schema import PipelineConfig, Quantization
from tasks.model import build_lora_config, load_base_model, load_tokenizer, pick_device, trainable_parameters
from tasks.training import MlflowStepLogger, ProgressFn, checkpoint_step, common_args, last_checkpoint


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


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    # ru_maxrss is the process high-water mark in KiB on Linux: an upper bound for the step on CPU.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_peft_model(model, cfg: PipelineConfig, adapter_dir: Optional[str] = None, trainable: bool = True,
                       gradient_checkpointing: bool = False):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.mode != Quantization.none:
        # Casts norms to fp32 and enables input grads so gradients flow through frozen 4/8-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapter_dir:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    return get_peft_model(model, build_lora_config(cfg.lora))


def run_sft(
    cfg: PipelineConfig,
    model_path: str,
    examples: list[dict[str, Any]],
    out_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None],
    progress: Optional[ProgressFn] = None,
) -> TrainResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    device = pick_device(cfg.model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(model_path, cfg.model)
    base = load_base_model(model_path, cfg.model, cfg.quantization)
    model = prepare_peft_model(base, cfg, gradient_checkpointing=cfg.sft.gradient_checkpointing)
    trainable, total = trainable_parameters(model)

    ckpt_dir = out_dir / "checkpoints"
    args = SFTConfig(
        **common_args(cfg.sft, ckpt_dir, cfg.seed, device),
        completion_only_loss=cfg.sft.assistant_only_loss,
        packing=False,
    )
    logger = MlflowStepLogger(log_metrics, "sft/", progress)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        callbacks=[logger],
    )
    resume = last_checkpoint(ckpt_dir)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0

    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    return TrainResult(
        adapter_dir=str(adapter_dir),
        history=logger.history,
        trainable_params=trainable,
        total_params=total,
        wall_s=wall,
        peak_memory_mb=peak_memory_mb(device),
        resumed_from_step=checkpoint_step(resume),
        global_step=output.global_step,
        metrics={k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))},
    )
