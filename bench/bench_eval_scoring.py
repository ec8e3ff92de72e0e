"""Evaluation's scoring and generation, before and after three levers: preference pairs scored whole against
their shared prefix run once, held-out answers batched in file order against batched by length, and greedy
generation from whole prompts against the batch's shared prompt opening run once.

    .venv/bin/python bench/bench_eval_scoring.py                 # the demo's 40 held-out pairs and rows, 3 rounds
    .venv/bin/python bench/bench_eval_scoring.py --recipe demo-chat --pairs 40 --rounds 5
    .venv/bin/python bench/bench_eval_scoring.py --parts generation   # only the generation arms
    .venv/bin/python bench/bench_eval_scoring.py --emulate-avx2       # torch, oneDNN and MKL capped to AVX2

The pairs are the recipe's seeded held-out preference rows (the free-text recipe's are multi-turn), formatted
as the pipeline formats them (`preference_example`, the recipe's system prompt). The model is the recipe's base,
quantized as configured, inside `dequantized_4bit` as evaluation runs it. Arms, alternated (ABBA):
- **whole**: each side its own row, the chosen sides then the rejected ones, batched in file order (as evaluation
  did before both levers);
- **shared**: `shared_prefix_logps` (what `_pair_logps` now does for models whose cache it can share).
Both use the rows per batch evaluation uses. Prints the tokens each arm runs, each round's seconds, the medians,
the shared/whole ratio, and the largest difference between the two arms' log-probs (float rounding only).
Then the held-out loss pass on the recipe's held-out rows: **file order** (`_completion_logps` on batches in the
order given, as `answer_logps` did before) against **by length** (`answer_logps`), with the padded tokens of each.
Then generation, as evaluation runs it (`generate`, the recipe's batch size and the budget sized from the
references), on the held-out prompts zero-shot and with the recipe's few-shot examples (the `base_fewshot`
baseline): **whole** (every prompt run whole, left-padded: `generate` with opening sharing switched off) against
**shared** (`generate` as it is, the rows' common opening run once). Prints the prompt tokens each arm runs,
the medians, the shared/whole ratios, and how many answers are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV, cpu_line  # noqa: E402

if "--emulate-avx2" in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

from ftflow.configs.loader import load_config  # noqa: E402
from ftflow.tasks.data.demo import generate_demo  # noqa: E402
from ftflow.tasks.data.formatting import end_of_turn_token, preference_example, sft_example  # noqa: E402
from ftflow.tasks.evaluate import evaluation  # noqa: E402
from ftflow.tasks.evaluate.evaluation import (  # noqa: E402
    LOGPS_MAX_BATCH,
    _common_opening,
    _completion_logps,
    answer_logps,
    few_shot_prompt,
    generate,
    generation_budget,
    reference_text,
)
from ftflow.tasks.evaluate.pairs import shared_prefix_logps  # noqa: E402
from ftflow.tasks.train.model import (  # noqa: E402
    dequantized_4bit,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)


def heldout(cfg, count: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(pairs, examples, shots): the recipe's seeded held-out preference pairs and SFT rows, and the few-shot
    examples (its first train SFT rows, as evaluation takes them), formatted."""
    with tempfile.TemporaryDirectory() as tmp:
        made = generate_demo(cfg.data.demo, Path(tmp))

        def read(key: str, n: int = count) -> list[dict]:
            return [json.loads(line) for line in Path(made[key]).read_text(encoding="utf-8").splitlines()][:n]

        pairs = [preference_example(row, cfg.data.system_prompt) for row in read("heldout_preference")]
        examples = [sft_example(row, cfg.data.system_prompt) for row in read("heldout")]
        shots = [sft_example(row, cfg.data.system_prompt) for row in read("sft", cfg.eval.few_shot_k)]
    return pairs, examples, shots


def ab(arms: dict, rounds: int) -> tuple[dict[str, float], dict[str, object]]:
    """Each arm once per round, the order flipped every round; (median seconds, last result) per arm."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    results: dict[str, object] = {}
    for r in range(rounds):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            start = time.perf_counter()
            results[name] = arms[name]()
            times[name].append(time.perf_counter() - start)
            print(f"round {r} {name:10s}: {times[name][-1]:.2f} s", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}, results


def padded_tokens(lengths: list[int], order: list[int], rows: int) -> int:
    return sum(
        max(lengths[i] for i in order[s : s + rows]) * len(order[s : s + rows]) for s in range(0, len(order), rows)
    )


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
    parser.add_argument("--emulate-avx2", action="store_true", help="cap torch, oneDNN and MKL to AVX2")
    parser.add_argument("--parts", default="pairs,loss,generation", help="comma-separated: pairs, loss, generation")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    cfg = load_config(args.recipe)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    pairs, examples, shots = heldout(cfg, args.pairs or cfg.eval.max_examples)
    max_length = cfg.sft.max_length
    model = load_base_model(path, cfg.model, cfg.quantization).eval()
    rows = min(cfg.eval.batch_size, LOGPS_MAX_BATCH)
    whole_tokens, shared_tokens = token_counts(tokenizer, pairs, max_length)
    print(cpu_line())
    print(
        f"model: {path}  quantization: {cfg.quantization.mode.value}  torch threads: {torch.get_num_threads()}  "
        f"capability: {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"pairs: {len(pairs)}  rows per batch: {rows}  tokens run: whole {whole_tokens}, shared {shared_tokens} "
        f"({shared_tokens / whole_tokens:.3f})"
    )
    prompts = [p["prompt"] for p in pairs]

    def file_order(asked: list, answers: list) -> list[float]:
        out: list[float] = []
        for s in range(0, len(asked), rows):
            out += _completion_logps(model, tokenizer, asked[s : s + rows], answers[s : s + rows], max_length)[0]
        return out

    def whole():
        return file_order(prompts, [p["chosen"] for p in pairs]), file_order(prompts, [p["rejected"] for p in pairs])

    def shared():
        out = shared_prefix_logps(model, tokenizer, pairs, max_length, max(1, rows // 2))
        if out is None:
            raise SystemExit("this model's attention cache cannot be shared: evaluation scores each side whole")
        return out

    asked, answers = [e["prompt"] for e in examples], [e["completion"] for e in examples]

    def by_length():
        return answer_logps(model, tokenizer, asked, answers, cfg.eval, max_length)[0]

    with dequantized_4bit(model, print):
        if "pairs" in parts:
            report_pairs(ab({"whole": whole, "shared": shared}, args.rounds), len(pairs))
        if "loss" in parts:
            loss = ab({"file order": lambda: file_order(asked, answers), "by length": by_length}, args.rounds)
            report_loss(loss, tokenizer, asked, answers, rows)
        if "generation" in parts:
            bench_generation(model, tokenizer, cfg, examples, shots, args.rounds)


def report_pairs(measured: tuple[dict[str, float], dict[str, object]], count: int) -> None:
    pair_times, pair_results = measured
    diff = max(abs(a - b) for x, y in zip(pair_results["whole"], pair_results["shared"]) for a, b in zip(x, y))
    agree = sum((c > r) == (c2 > r2) for c, r, c2, r2 in zip(*pair_results["whole"], *pair_results["shared"]))
    print(f"pairs  whole: median {pair_times['whole']:.2f} s   shared: median {pair_times['shared']:.2f} s")
    print(f"ratio_shared_vs_whole: {pair_times['shared'] / pair_times['whole']:.3f}")
    print(f"largest log-prob difference: {diff:.2e}; chosen-above-rejected agrees on {agree}/{count} pairs")


def report_loss(measured, tokenizer, asked: list, answers: list, rows: int) -> None:
    loss_times, loss_results = measured
    lengths = [
        len(ids)
        for ids in tokenizer(
            [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(asked, answers)],
            add_special_tokens=False,
        )["input_ids"]
    ]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    loss_diff = max(abs(a - b) for a, b in zip(loss_results["file order"], loss_results["by length"]))
    print(
        f"held-out loss on {len(asked)} rows: real tokens {sum(lengths)}, padded file order "
        f"{padded_tokens(lengths, list(range(len(lengths))), rows)}, by length {padded_tokens(lengths, order, rows)}"
    )
    print(
        f"loss  file order: median {loss_times['file order']:.2f} s   by length: median {loss_times['by length']:.2f} s"
    )
    print(f"ratio_by_length_vs_file_order: {loss_times['by length'] / loss_times['file order']:.3f}")
    print(f"largest log-prob difference: {loss_diff:.2e}")


def bench_generation(model, tokenizer, cfg, examples: list[dict], shots: list[dict], rounds: int) -> None:
    """Zero-shot and few-shot generation, whole prompts against the shared opening run once."""
    sized = cfg.eval.model_copy(
        update={"max_new_tokens": generation_budget(cfg.eval, tokenizer, [reference_text(e) for e in examples])}
    )
    eos = end_of_turn_token(tokenizer)
    zero = [e["prompt"] for e in examples]
    for name, prompts in (("zero-shot", zero), ("few-shot", [few_shot_prompt(p, shots) for p in zero])):
        rows = tokenizer(
            [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts],
            add_special_tokens=False,
        )["input_ids"]
        batches = [rows[s : s + sized.batch_size] for s in range(0, len(rows), sized.batch_size)]
        shared = sum(len(r) for r in rows) - sum((len(b) - 1) * _common_opening(b) for b in batches if len(b) > 1)

        def whole(asked=prompts):
            # The "before" arm: the same real model and `generate`, with only the choice to share an opening
            # answered no, so `prompt_inputs` runs every prompt whole and left-padded as generation did before.
            with mock.patch.object(evaluation, "shares_prefixes", lambda model: False):
                return generate(model, tokenizer, asked, sized, eos)

        times, results = ab(
            {"whole": whole, "shared": lambda asked=prompts: generate(model, tokenizer, asked, sized, eos)}, rounds
        )
        same = sum(a["text"] == b["text"] for a, b in zip(results["whole"], results["shared"]))
        print(
            f"generation {name}: {len(prompts)} prompts, batch {sized.batch_size}, max_new_tokens "
            f"{sized.max_new_tokens}; prompt tokens run: whole {sum(len(r) for r in rows)}, shared {shared}"
        )
        print(
            f"generation {name}  whole: median {times['whole']:.2f} s   shared: median {times['shared']:.2f} s   "
            f"ratio_shared_vs_whole: {times['shared'] / times['whole']:.3f}   identical answers {same}/{len(prompts)}"
        )


if __name__ == "__main__":
    main()
