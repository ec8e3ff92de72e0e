"""Pieces SFT and DPO share: trainer arguments from the config, metric streaming, checkpoint resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from transformers import TrainerCallback

from ftflow.configs.schema import TrainCommon

ProgressFn = Callable[[int, int, dict[str, float]], None]


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
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    # ru_maxrss is the process high-water mark in KiB on Linux: an upper bound for the step on CPU.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit(trainer, model, tokenizer, logger: "MlflowStepLogger", ckpt_dir: Path, out_dir: Path, device: str,
        trainable: int, total: int) -> TrainResult:
    """Train (from the last checkpoint if there is one), save the trained adapter only, and report."""
    quiet(trainer)
    resume = last_checkpoint(ckpt_dir)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    adapter_dir = out_dir / "adapter"
    # "default" is the adapter being trained; DPO's frozen "ref" copy stays behind.
    model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
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


def common_args(section: TrainCommon, output_dir: Path, seed: int, device: str) -> dict[str, Any]:
    """Keyword arguments both SFTConfig and DPOConfig accept; `section.extra` wins over everything."""
    args: dict[str, Any] = dict(
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
        # Metrics go to MLflow through MlflowStepLogger with an explicit run id, not the global active run.
        report_to="none",
        disable_tqdm=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    args.update(section.extra)
    return args


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """Newest complete `checkpoint-N` in output_dir, so a retried task resumes instead of starting over."""
    if not output_dir.exists():
        return None
    complete = [
        p for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and (p / "trainer_state.json").exists() and p.name.split("-")[-1].isdigit()
    ]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))


def checkpoint_step(path: Optional[str]) -> int:
    return int(Path(path).name.split("-")[-1]) if path else 0


class MlflowStepLogger(TrainerCallback):
    """Streams trainer logs to one MLflow run by id (Prefect runs tasks in threads; MLflow's active run is per thread)."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], prefix: str,
                 progress: Optional[ProgressFn] = None):
        self.log_metrics = log_metrics
        self.prefix = prefix
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric:
            return
        numeric["elapsed_s"] = time.perf_counter() - self._t0
        self.history.append({"step": state.global_step, **numeric})
        self.log_metrics({f"{self.prefix}{k}": v for k, v in numeric.items()}, state.global_step)
        if self.progress is not None:
            self.progress(state.global_step, state.max_steps, numeric)


def quiet(trainer) -> None:
    """Drop the trainer's raw dict printer: progress goes to the Prefect log and MLflow instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def losses(history: list[dict[str, float]]) -> list[tuple[int, float]]:
    return [(int(h["step"]), h["loss"]) for h in history if "loss" in h]
