"""Preference-pair scoring in evaluation: each side scored whole against the shared prefix run once.

    .venv/bin/python bench/bench_pair_scoring.py                 # the demo's 40 held-out pairs, 3 rounds
    .venv/bin/python bench/bench_pair_scoring.py --recipe demo-chat --pairs 40 --rounds 5

The pairs are the recipe's seeded held-out preference rows (the free-text recipe's are multi-turn), formatted
as the pipeline formats them (`preference_example`, the recipe's system prompt). The model is the recipe's base,
quantized as configured, inside `dequantized_4bit` as evaluation runs it. Arms, alternated (ABBA):
- **whole**: `answer_logps` on the chosen sides, then on the rejected ones (what evaluation did before);
- **shared**: `shared_prefix_logps` (what `_pair_logps` now does for models whose cache it can share).
Both use the rows per batch evaluation uses. Prints the tokens each arm runs, each round's seconds, the medians,
the shared/whole ratio, and the largest difference between the two arms' log-probs (float rounding only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402

from ftflow.configs.loader import load_config  # noqa: E402
from ftflow.tasks.data.demo import generate_demo  # noqa: E402
from ftflow.tasks.data.formatting import preference_example  # noqa: E402
from ftflow.tasks.evaluate.evaluation import LOGPS_MAX_BATCH, answer_logps  # noqa: E402
from ftflow.tasks.evaluate.pairs import shared_prefix_logps  # noqa: E402
from ftflow.tasks.train.model import (  # noqa: E402
    dequantized_4bit,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)


def heldout_pairs(cfg, count: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        made = generate_demo(cfg.data.demo, Path(tmp))
        rows = [json.loads(line) for line in Path(made["heldout_preference"]).read_text(encoding="utf-8").splitlines()]
    return [preference_example(row, cfg.data.system_prompt) for row in rows[:count]]


def token_counts(tokenizer, pairs: list[dict], max_length: int) -> tuple[int, int]:
    """(tokens run scoring each side whole, tokens run with the common prefix once)."""
    whole = shared = 0
    for p in pairs:
        sides = [
            tokenizer(
                tokenizer.apply_chat_template(p["prompt"] + p[k], tokenize=False),
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            )["input_ids"]
            for k in ("chosen", "rejected")
        ]
        common = 0
        for a, b in zip(*sides):
            if a != b:
                break
            common += 1
        common = min(common, len(sides[0]) - 1, len(sides[1]) - 1)
        whole += len(sides[0]) + len(sides[1])
        shared += len(sides[0]) + len(sides[1]) - common
    return whole, shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--pairs", type=int, default=None, help="pairs scored (default: the recipe's eval.max_examples)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    pairs = heldout_pairs(cfg, args.pairs or cfg.eval.max_examples)
    max_length = cfg.sft.max_length
    model = load_base_model(path, cfg.model, cfg.quantization).eval()
    rows = min(cfg.eval.batch_size, LOGPS_MAX_BATCH)
    whole_tokens, shared_tokens = token_counts(tokenizer, pairs, max_length)
    print(cpu_line())
    print(f"model: {path}  quantization: {cfg.quantization.mode.value}  torch threads: {torch.get_num_threads()}")
    print(
        f"pairs: {len(pairs)}  rows per batch: {rows}  tokens run: whole {whole_tokens}, shared {shared_tokens} "
        f"({shared_tokens / whole_tokens:.3f})"
    )

    def whole():
        prompts = [p["prompt"] for p in pairs]
        chosen, _ = answer_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], cfg.eval, max_length)
        rejected, _ = answer_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], cfg.eval, max_length)
        return chosen, rejected

    def shared():
        out = shared_prefix_logps(model, tokenizer, pairs, max_length, max(1, rows // 2))
        if out is None:
            raise SystemExit("this model's attention cache cannot be shared: evaluation scores each side whole")
        return out

    times: dict[str, list[float]] = {"whole": [], "shared": []}
    results: dict[str, tuple] = {}
    with dequantized_4bit(model, print):
        for r in range(args.rounds):
            for name in ("whole", "shared") if r % 2 == 0 else ("shared", "whole"):
                start = time.perf_counter()
                results[name] = (whole if name == "whole" else shared)()
                times[name].append(time.perf_counter() - start)
                print(f"round {r} {name:6s}: {times[name][-1]:.2f} s", flush=True)
    diff = max(abs(a - b) for x, y in zip(results["whole"], results["shared"]) for a, b in zip(x, y))
    agree = sum((c > r) == (c2 > r2) for c, r, c2, r2 in zip(*results["whole"], *results["shared"]))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"whole: median {medians['whole']:.2f} s   shared: median {medians['shared']:.2f} s")
    print(f"ratio_shared_vs_whole: {medians['shared'] / medians['whole']:.3f}")
    print(f"largest log-prob difference: {diff:.2e}; chosen-above-rejected agrees on {agree}/{len(pairs)} pairs")


if __name__ == "__main__":
    main()
