"""How well does the untuned base model do on the demo task? (It must leave room for tuning.)

Generates the demo data with the default seed, then greedy-decodes held-out prompts with the base
model zero-shot and 3-shot (three training rows of the same language as prior turns) and prints
exact match and field accuracy (the pipeline's own json_match scorer, so the figures compare with
eval/heldout_exact), overall and per language, one figure per line.

    .venv/bin/python bench/demo_task_baseline.py [--n 40] [--shots 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ftflow.configs.schema import DemoDataConfig, ModelConfig, Quantization, QuantizationConfig  # noqa: E402
from ftflow.tasks.data.demo import generate_demo  # noqa: E402
from ftflow.tasks.evaluate.metrics.json_match import score_example  # noqa: E402
from ftflow.tasks.train.model import load_base_model, load_tokenizer, offline_env, resolve_model_path  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def shots_by_language(sft_rows: list[dict], manifest: dict, k: int) -> dict[str, list[dict]]:
    """The first k clean, well-formed training rows per language."""
    bad = {line for kind in manifest["defects"]["sft"].values() for line in kind["lines"]}
    shots: dict[str, list[dict]] = {"en": [], "ja": []}
    for line, row in enumerate(sft_rows, start=1):
        if line in bad:
            continue
        lang = json.loads(row["messages"][1]["content"])["lang"]
        if len(shots[lang]) < 2 * k:
            shots[lang].extend(row["messages"])
    return shots


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict]], batch: int, max_new_tokens: int) -> list[str]:
    tok.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(conversations), batch):
        texts = [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations[start : start + batch]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40, help="held-out prompts to score")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=4, help="print this many wrong predictions per mode")
    args = parser.parse_args()

    offline_env()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="demo_task_") as tmp:
        demo = generate_demo(DemoDataConfig(seed=args.seed, n_heldout=max(args.n, 60)), Path(tmp))
        heldout = read_jsonl(demo["heldout"])[: args.n]
        shots = shots_by_language(read_jsonl(demo["sft"]), demo["manifest_content"], args.shots)

    model_cfg = ModelConfig()
    path = resolve_model_path(model_cfg)
    tok = load_tokenizer(path, model_cfg)
    model = load_base_model(path, model_cfg, QuantizationConfig(mode=Quantization.none)).eval()

    for mode in ("zero_shot", f"{args.shots}_shot"):
        conversations, references, langs = [], [], []
        for row in heldout:
            user, reference = row["messages"]
            lang = json.loads(reference["content"])["lang"]
            prior = shots[lang] if mode != "zero_shot" else []
            conversations.append([*prior, user])
            references.append(reference["content"])
            langs.append(lang)
        started = time.perf_counter()
        predictions = generate(model, tok, conversations, args.batch, args.max_new_tokens)
        elapsed = time.perf_counter() - started
        scores = [score_example(p, r) for p, r in zip(predictions, references)]
        for group in ("all", "en", "ja"):
            picked = [s for s, lang in zip(scores, langs) if group in ("all", lang)]
            if not picked:
                continue
            for metric in ("exact_match", "field_accuracy"):
                print(
                    f"base/{mode}/{group}/{metric}: {sum(s[metric] for s in picked) / len(picked):.3f} (n={len(picked)})"
                )
        print(f"base/{mode}/generate_seconds: {elapsed:.1f}")
        wrong = [(p, r) for p, r, s in zip(predictions, references, scores) if not s["exact_match"]]
        for p, r in wrong[: args.show]:
            print(f"  ref:  {r}\n  pred: {p.strip()[:160]!r}")


if __name__ == "__main__":
    main()
