"""TRL's fused LM head on a CPU: every position projected onto the vocabulary (TRL's own choice off Triton devices)
against only the labelled ones (`score_labelled_positions_only`, what training now does), on one SFT and one DPO
batch of the recipe.

    .venv/bin/python bench/bench_lm_head.py                        # the demo's batches, 5 rounds
    .venv/bin/python bench/bench_lm_head.py --recipe demo-chat     # multi-turn free-text rows
    .venv/bin/python bench/bench_lm_head.py --emulate-avx2         # torch, oneDNN and MKL capped to AVX2

The batches are the recipe's first `per_device_batch_size` seeded held-out rows and pairs (clean rows of the
training distribution), formatted as the pipeline formats them, run through the pipeline's own model
(`trainable_model`: 4-bit base, LoRA) and TRL trainer arguments. One timed step is the trainer's `compute_loss`
plus the backward pass (the optimizer step does not depend on the arm). Arms alternate every round (ABBA).
Prints the positions each arm projects, each round's seconds, the medians and the labelled/every ratio, and the
loss of both arms (equal up to float rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV, cpu_line  # noqa: E402

if "--emulate-avx2" in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

import torch  # noqa: E402
import trl.trainer.utils as fused_head  # noqa: E402
from bench_eval_scoring import heldout  # noqa: E402
from datasets import Dataset  # noqa: E402

from ftflow.configs.loader import load_config  # noqa: E402
from ftflow.tasks.train.model import keep_trainable_fp32, load_tokenizer, resolve_model_path  # noqa: E402
from ftflow.tasks.train.trainer import (  # noqa: E402
    _kind_specific,
    common_args,
    score_labelled_positions_only,
    trainable_model,
)


def trainer_for(kind: str, cfg, model, tokenizer, rows: list[dict], out: Path):
    config_class, trainer_class, own = _kind_specific(kind, cfg, rows)
    section = getattr(cfg, kind)
    args = config_class(**{**common_args(section, out / kind, cfg.seed, "cpu"), **own, "save_strategy": "no"})
    with keep_trainable_fp32(model, "cpu"):  # as the pipeline builds it: LoRA weights stay float32 on a CPU
        return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def measure(kind: str, trainer, model, arms: dict, rounds: int) -> None:
    """One batch's compute_loss + backward under each arm's switch, alternated (ABBA); prints the medians."""
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["completion_mask"] if "completion_mask" in batch else batch["labels"] != -100
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    scored = int(mask[:, 1:].sum())
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    print(
        f"{kind}: {batch['input_ids'].shape[0]} sequences x {batch['input_ids'].shape[1]} tokens, "
        f"{real} real; positions projected: every {positions}, labelled {scored}"
    )

    def step() -> float:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    times: dict[str, list[float]] = {a: [] for a in arms}
    losses: dict[str, float] = {}
    for name, switch in arms.items():  # one untimed step each: kernels, allocations
        fused_head._use_triton = switch
        losses[name] = step()
    for r in range(rounds):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            fused_head._use_triton = arms[name]
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            print(f"  round {r} {name:9s}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{kind}: median every {med['every']:.3f} s, labelled {med['labelled']:.3f} s, "
        f"ratio labelled/every x{med['labelled'] / med['every']:.2f}; "
        f"loss every {losses['every']:.6f}, labelled {losses['labelled']:.6f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--emulate-avx2", action="store_true", help="cap torch, oneDNN and MKL to AVX2")
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    n = max(cfg.sft.per_device_batch_size, cfg.dpo.per_device_batch_size)
    pairs, examples, _ = heldout(cfg, n)
    print(cpu_line())
    print(
        f"recipe: {args.recipe}  model: {path}  quantization: {cfg.quantization.mode.value}  "
        f"torch threads: {torch.get_num_threads()}  capability: {torch.backends.cpu.get_cpu_capability()}"
    )
    score_labelled_positions_only()
    labelled_only = fused_head._use_triton
    every = labelled_only.original

    model = trainable_model(cfg, path)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, rows in (
            ("sft", examples[: cfg.sft.per_device_batch_size]),
            ("dpo", pairs[: cfg.dpo.per_device_batch_size]),
        ):
            trainer = trainer_for(kind, cfg, model, tokenizer, rows, Path(tmp))
            measure(kind, trainer, model, {"every": every, "labelled": labelled_only}, args.rounds)
    fused_head._use_triton = labelled_only


if __name__ == "__main__":
    main()
