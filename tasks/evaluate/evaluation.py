"""Held-out evaluation: base zero-shot, base few-shot, SFT and DPO on the same prompts, greedy and batched.

One quantized base is loaded once; the SFT and DPO adapters sit on it side by side and are switched,
so evaluating four variants costs one model's memory.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ftflow.configs.schema import EvalConfig
from ftflow.tasks.errors import DataError

VARIANTS = ("base", "base_fewshot", "sft", "dpo")


@dataclass
class VariantResult:
    variant: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    pair_logps: Optional[tuple[list[float], list[float]]] = None  # (chosen, rejected), the reference for the next stage


def few_shot_prompt(prompt: list[dict], shots: list[dict]) -> list[dict]:
    """k solved train examples as earlier turns, then the question: the prompting baseline fine-tuning must beat."""
    system = [m for m in prompt if m["role"] == "system"]
    rest = [m for m in prompt if m["role"] != "system"]
    turns: list[dict] = []
    for shot in shots:
        turns += [m for m in shot["prompt"] if m["role"] != "system"] + shot["completion"]
    return system + turns + rest


@contextmanager
def active_variant(model, variant: str):
    """Select which weights answer: the plain base (adapters off) or one named adapter."""
    if variant in ("base", "base_fewshot"):
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with ctx:
            yield
    else:
        model.set_adapter(variant)
        yield


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], cfg: EvalConfig, eos_token: str) -> list[dict[str, Any]]:
    """Greedy generations; `text` keeps the end-of-turn marker when the model emitted it (the EOS-stop metric reads it)."""
    tokenizer.padding_side = "left"
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for batch in _batches(prompts, cfg.batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in generated[:, enc["input_ids"].shape[1]:].tolist():
            stopped = eos_id in row
            ids = row[: row.index(eos_id)] if stopped else row
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.append({"text": text + (eos_token if stopped else ""), "answer": text, "stopped": stopped,
                        "new_tokens": len(ids) + int(stopped)})
    return out


def _completion_logps(model, tokenizer, prompts: list[list[dict]], answers: list[list[dict]], max_length: int):
    """Sum of log-probs and token counts of each answer given its prompt (teacher forcing)."""
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    prompt_texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    full_texts = [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(prompts, answers)]
    prompt_lens = [len(ids) for ids in tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]]
    enc = tokenizer(full_texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False).to(device)
    logits = model(**enc).logits[:, :-1].float()
    targets = enc["input_ids"][:, 1:]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = enc["attention_mask"][:, 1:].clone()
    for i, n in enumerate(prompt_lens):
        mask[i, : max(n - 1, 0)] = 0
    return (token_logps * mask).sum(-1).tolist(), mask.sum(-1).tolist()


@torch.no_grad()
def answer_logps(model, tokenizer, prompts, answers, cfg: EvalConfig, max_length: int) -> tuple[list[float], list[int]]:
    logps: list[float] = []
    counts: list[int] = []
    for idx in _batches(list(range(len(prompts))), cfg.batch_size):
        lp, n = _completion_logps(model, tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], max_length)
        logps += lp
        counts += [int(c) for c in n]
    return logps, counts


def heldout_loss(logps: list[float], counts: list[int]) -> dict[str, float]:
    tokens = sum(counts)
    loss = -sum(logps) / tokens if tokens else float("nan")
    # heldout_logprob is the same evidence as the loss, oriented so that higher is better like every gate metric.
    return {"heldout_loss": loss, "heldout_perplexity": math.exp(min(loss, 50.0)), "heldout_logprob": -loss}


def preference_scores(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]],
                      beta: float) -> dict[str, float]:
    """DPO's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)); accuracy = share of pairs with r_chosen > r_rejected."""
    (pc, pr), (rc, rr) = policy, reference
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]
    if not margins:
        return {}
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
    }


def check_heldout(heldout: list[dict], train: list[dict]) -> None:
    if not heldout:
        raise DataError("held-out set is empty after validation; nothing to evaluate on", "heldout")
    seen = {repr(ex["prompt"]) for ex in train}
    overlap = sum(repr(ex["prompt"]) in seen for ex in heldout)
    if overlap:
        raise DataError(f"{overlap} held-out prompt(s) also occur in train; held-out scores would be inflated", "heldout")


def reference_text(example: dict) -> str:
    return example["completion"][-1]["content"]


def check_template(adapter_dir: str, expected_fingerprint: str, tokenizer) -> None:
    """An adapter is only valid under the chat template it was trained with."""
    from ftflow.tasks.data.formatting import template_fingerprint
    from transformers import AutoTokenizer

    saved = template_fingerprint(AutoTokenizer.from_pretrained(adapter_dir))
    current = template_fingerprint(tokenizer)
    if (expected_fingerprint and saved != expected_fingerprint) or saved != current:
        raise DataError(
            f"chat template fingerprint mismatch: adapter trained with {saved}, expected {expected_fingerprint or current}, "
            f"tokenizer in use has {current}", adapter_dir)


def score_variant(variant: str, generations: list[dict], references: list[str], prompts: list[list[dict]],
                  eos_token: str, suite) -> VariantResult:
    from ftflow.tasks.evaluate.metrics import per_example_scores, score_generations

    texts = [g["text"] for g in generations]
    stopped = [g["stopped"] for g in generations]
    scores = score_generations(texts, references, eos_token, stopped=stopped, suite=suite)
    metrics = {
        "heldout_exact": scores["exact_match"],
        "heldout_field_accuracy": scores["field_accuracy"],
        "heldout_json_valid": scores["json_valid"],
        "heldout_rougeL": scores["rougeL"],
        "heldout_bleu": scores["bleu"],
        "heldout_chrf": scores["chrf"],
        "eos_stop_rate": scores["eos_stop_rate"],
        "mean_new_tokens": sum(g["new_tokens"] for g in generations) / len(generations),
    }
    rows = per_example_scores(texts, references, eos_token, stopped=stopped)
    predictions = [
        {"variant": variant, "prompt": p[-1]["content"], "reference": ref, "prediction": g["answer"], **row}
        for p, ref, g, row in zip(prompts, references, generations, rows)
    ]
    return VariantResult(variant, metrics, predictions)


def evaluate_variants(
    model,
    tokenizer,
    variants: list[str],
    heldout: list[dict],
    heldout_pairs: list[dict],
    few_shots: list[dict],
    cfg: EvalConfig,
    eos_token: str,
    beta: float,
    max_length: int,
    log=print,
    precomputed: Optional[dict[str, VariantResult]] = None,
) -> dict[str, VariantResult]:
    """`model` is a PeftModel holding adapters named after the variants (`sft`, `dpo`); base variants disable them.

    `precomputed` results (the base variants a sweep scores once for all arms) are reused, not recomputed."""
    from ftflow.tasks.evaluate.metrics import load_suite

    suite = load_suite()
    examples = heldout[: cfg.max_examples]
    pairs = heldout_pairs[: cfg.max_examples]
    prompts = [ex["prompt"] for ex in examples]
    references = [reference_text(ex) for ex in examples]
    answers = [ex["completion"] for ex in examples]
    results: dict[str, VariantResult] = dict(precomputed or {})
    pair_logps = {k: r.pair_logps for k, r in results.items() if r.pair_logps is not None}
    for variant in [v for v in variants if v not in results]:
        with active_variant(model, variant):
            asked = [few_shot_prompt(p, few_shots) for p in prompts] if variant == "base_fewshot" else prompts
            generations = generate(model, tokenizer, asked, cfg, eos_token)
            result = score_variant(variant, generations, references, prompts, eos_token, suite)
            if variant != "base_fewshot":
                result.metrics.update(heldout_loss(*answer_logps(model, tokenizer, prompts, answers, cfg, max_length)))
                if pairs and variant in ("base", "sft", "dpo"):
                    chosen, _ = answer_logps(model, tokenizer, [p["prompt"] for p in pairs],
                                             [p["chosen"] for p in pairs], cfg, max_length)
                    rejected, _ = answer_logps(model, tokenizer, [p["prompt"] for p in pairs],
                                               [p["rejected"] for p in pairs], cfg, max_length)
                    pair_logps[variant] = result.pair_logps = (chosen, rejected)
        results[variant] = result
        log(f"evaluated {variant}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items()))
    # Each tuned policy is scored against the policy it started from, as in its DPO objective.
    for policy, reference in (("sft", "base"), ("dpo", "sft")):
        if policy in pair_logps and reference in pair_logps:
            results[policy].metrics.update(preference_scores(pair_logps[policy], pair_logps[reference], beta))
    return results
