"""DPO with TRL, continuing the SFT adapter; the reference shares the same (quantized) base weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.train.model import load_base_model, load_tokenizer, pick_device, trainable_parameters
from ftflow.tasks.train.sft import prepare_peft_model
from ftflow.tasks.train.training import MlflowStepLogger, ProgressFn, TrainResult, common_args, fit


def build_dpo_model(cfg: PipelineConfig, model_path: str, sft_adapter_dir: str):
    base = load_base_model(model_path, cfg.model, cfg.quantization)
    # Given a PeftModel that already holds the SFT adapter, TRL 1.x copies it into a frozen "ref" adapter on the
    # same base weights: the reference policy is the SFT model (DPO's KL anchor) and there is no second model copy.
    return prepare_peft_model(base, cfg, adapter_dir=sft_adapter_dir, trainable=True,
                              gradient_checkpointing=cfg.dpo.gradient_checkpointing)


def run_dpo(
    cfg: PipelineConfig,
    model_path: str,
    sft_adapter_dir: str,
    pairs: list[dict[str, Any]],
    out_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None],
    progress: Optional[ProgressFn] = None,
) -> TrainResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    device = pick_device(cfg.model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = build_dpo_model(cfg, model_path, sft_adapter_dir)
    trainable, total = trainable_parameters(model)

    ckpt_dir = out_dir / "checkpoints"
    args = DPOConfig(
        **common_args(cfg.dpo, ckpt_dir, cfg.seed, device),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type.value],
    )
    logger = MlflowStepLogger(log_metrics, "dpo/", progress)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[logger],
    )
    return fit(trainer, model, tokenizer, logger, ckpt_dir, out_dir, device, trainable, total)
