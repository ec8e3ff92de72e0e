"""QLoRA SFT: a 4-bit (or 8-bit / full) base, a peft LoRA adapter, TRL's SFTTrainer, loss on the answer only."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ftflow.configs.schema import PipelineConfig, Quantization
from ftflow.tasks.train.model import build_lora_config, load_base_model, load_tokenizer, pick_device, trainable_parameters
from ftflow.tasks.train.training import MlflowStepLogger, ProgressFn, TrainResult, common_args, fit, peak_memory_mb  # noqa: F401


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
    return fit(trainer, model, tokenizer, logger, ckpt_dir, out_dir, device, trainable, total)
