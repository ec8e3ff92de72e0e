"""Evaluation: base zero-shot, base few-shot and every adapter on the same prompts, greedy and batched.

One quantized base is loaded once; the adapters sit on it side by side and are switched, so evaluating
five variants costs one model's memory. Every metric is kept per example (registry.py says which, and
how they aggregate), so the comparison table, the candidate choice on validation, the sweep's ranking and
the gate's paired tests all read the same numbers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ftflow.configs.schema import EvalConfig
from ftflow.tasks.errors import DataError
from ftflow.tasks.evaluate import cache, registry
from ftflow.tasks.evaluate.pairs import CACHE_KWARG, full_attention_cache, shares_prefixes
from ftflow.tasks.train.model import dequantized_4bit

if TYPE_CHECKING:
    from ftflow.tasks.data.formatting import FormattedData
    from ftflow.tasks.stages import StageContext, Update

ALL_SOURCES = frozenset({"generation", "loss", "preference"})


@dataclass
class EvalSets:
    """The examples evaluation reads: train SFT rows (few-shot examples, overlap check), the held-out (test) sets,
    the validation rows (selection only), and what happened to the held-out rows before scoring."""

    train_sft: list[dict]
    heldout: list[dict]
    heldout_pairs: list[dict]
    validation: list[dict] = field(default_factory=list)
    # data.report.heldout_accounting: rows in, kept, dropped by reason; the gate names the exclusions.
    heldout_accounting: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        train_set: FormattedData,
        heldout_set: FormattedData,
        validation_set: Optional[FormattedData] = None,
        heldout_accounting: Optional[dict[str, Any]] = None,
    ) -> "EvalSets":
        return cls(
            train_set.sft,
            heldout_set.sft,
            heldout_set.preference,
            validation_set.sft if validation_set is not None else [],
            dict(heldout_accounting or {}),
        )


@dataclass
class VariantResult:
    variant: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    pair_logps: Optional[tuple[list[float], list[float]]] = None  # (chosen, rejected), the reference for the next stage
    # registry name -> one score per example (held-out prompts, or pairs for preference metrics)
    per_example: dict[str, list[float]] = field(default_factory=dict)
    # registry name -> per-example weights of a token-weighted metric (reference answer tokens)
    weights: dict[str, list[float]] = field(default_factory=dict)
    corpus: dict[str, float] = field(default_factory=dict)  # metrics with no per-example form (BLEU)
    cached: bool = False  # read from the evaluation cache (cache.py), not scored in this run
    # The LLM judge's rows for this variant: they travel with the result, so a sweep arm handed the champion
    # judged once logs the champion's verdicts beside its own candidate's.
    judged: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        variant: str,
        per_example: dict[str, list[float]],
        weights: Optional[dict[str, list[float]]] = None,
        corpus: Optional[dict[str, float]] = None,
        **fields: Any,
    ) -> "VariantResult":
        """A result whose corpus metrics are the registry's aggregates of its per-example scores."""
        result = cls(
            variant, {}, per_example=dict(per_example), weights=dict(weights or {}), corpus=dict(corpus or {}), **fields
        )
        result.refresh()
        return result

    def refresh(self) -> None:
        self.metrics.update(registry.aggregate_all(self.per_example, self.weights, self.corpus))

    def add(self, name: str, values: Sequence[float], weights: Optional[Sequence[float]] = None) -> None:
        self.per_example[name] = [float(v) for v in values]
        if weights is not None:
            self.weights[name] = [float(w) for w in weights]


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


# Room over the longest reference when sizing the generation budget from it: a slightly longer correct answer must
# still reach its end-of-turn token, or the EOS-stop rate would count it as a runaway.
REFERENCE_MARGIN = 1.25


def generation_budget(cfg: EvalConfig, tokenizer, references: Sequence[str]) -> int:
    """max_new_tokens, capped at what the longest reference answer needs when `budget_from_references`."""
    if not cfg.budget_from_references or not references:
        return cfg.max_new_tokens
    longest = max(len(ids) for ids in tokenizer(list(references), add_special_tokens=False)["input_ids"])
    return min(cfg.max_new_tokens, math.ceil(longest * REFERENCE_MARGIN) + 1)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[dict]], cfg: EvalConfig, eos_token: str, update: Optional[Update] = None
) -> list[dict[str, Any]]:
    """Greedy generations; `text` keeps the end-of-turn marker when the model emitted it (the EOS-stop metric reads it)."""
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    out: list[dict[str, Any]] = []
    for batch in _batches(prompts, cfg.batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        inputs = prompt_inputs(model, tokenizer, tokenizer(texts, add_special_tokens=False)["input_ids"])
        generated = model.generate(
            **inputs,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
            stopped = eos_id in row
            ids = row[: row.index(eos_id)] if stopped else row
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.append(
                {
                    "text": text + (eos_token if stopped else ""),
                    "answer": text,
                    "stopped": stopped,
                    "new_tokens": len(ids) + int(stopped),
                }
            )
        if update is not None:
            update(len(out), {})
    return out


def prompt_inputs(model, tokenizer, rows: list[list[int]]) -> dict[str, Any]:
    """`generate`'s inputs for one batch of tokenized prompts: left-padded, with the rows' common opening run once.

    A batch's prompts open alike: the system prompt, and for the few-shot baseline every solved example too (on
    the demo 277 of a few-shot prompt's 325 tokens, against 24 of 72 zero-shot). That opening runs once, its
    attention cache is copied to every row, and the remainders follow it left-padded: each token keeps its
    position and what it attends to, so the answers are those of whole prompts up to float rounding (40 of 40
    identical on the demo, in half the time for the few-shot baseline: bench/bench_eval_scoring.py)."""
    device = next(model.parameters()).device
    shared = _common_opening(rows) if len(rows) > 1 and shares_prefixes(model) else 0
    cache = None
    if shared:
        opening = torch.tensor([rows[0][:shared]], dtype=torch.long, device=device)
        cache = full_attention_cache(model(input_ids=opening, use_cache=True, logits_to_keep=1))
    shared = shared if cache is not None else 0
    width = shared + max(len(r) - shared for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        # The shared opening (none when nothing is shared), a gap of padding, then the rest against the right edge.
        rest = width - (len(row) - shared)
        ids[b, :shared], ids[b, rest:] = torch.tensor(row[:shared]), torch.tensor(row[shared:])
        mask[b, :shared], mask[b, rest:] = 1, 1
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if cache is not None:
        cache.batch_repeat_interleave(len(rows))
        inputs[CACHE_KWARG] = cache
    return inputs


def _common_opening(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token to run after them."""
    first, n = rows[0], 0
    limit = min(len(r) for r in rows) - 1
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _completion_logps(
    model,
    tokenizer,
    prompts: list[list[dict]],
    answers: list[list[dict]],
    max_length: int,
    full_texts: Optional[list[str]] = None,
):
    """Sum of log-probs and token counts of each answer given its prompt (teacher forcing). `full_texts`: each
    prompt + answer already rendered with the chat template, when the caller has them."""
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    prompt_texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    if full_texts is None:
        full_texts = [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(prompts, answers)]
    prompt_lens = [len(ids) for ids in tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]]
    enc = tokenizer(
        full_texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False
    ).to(device)
    # Only answer tokens are scored, and every row's answer starts after the shortest prompt: the LM head and the
    # vocabulary-wide log-softmax run from there on, not over the prompts (most of each row on the demo).
    start = max(min(prompt_lens) - 1, 0)
    length = enc["input_ids"].shape[1]
    logits = model(**enc, logits_to_keep=length - start).logits[:, :-1].float()
    targets = enc["input_ids"][:, start + 1 :]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = enc["attention_mask"][:, start + 1 :].clone()
    for i, n in enumerate(prompt_lens):
        mask[i, : max(n - 1 - start, 0)] = 0
    return (token_logps * mask).sum(-1).tolist(), mask.sum(-1).tolist()


# Teacher forcing holds vocabulary-sized logits for every token (49k floats each for SmolLM2), twice with the
# log-softmax: a batch of 16 long rows already takes ~1.5 GB. Wider batches gain nothing once rows are this long;
# generation, whose decode steps are short, takes the configured batch.
LOGPS_MAX_BATCH = 16


@torch.no_grad()
def answer_logps(model, tokenizer, prompts, answers, cfg: EvalConfig, max_length: int) -> tuple[list[float], list[int]]:
    # Rows batch with rows of similar length: a batch is padded to its longest row, and on the demo's held-out rows
    # in file order that padding was 29 % of the tokens run (7 % sorted; the pass took x0.80 the time).
    full = [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(prompts, answers)]
    lengths = [len(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]]
    logps: list[float] = [0.0] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    for idx in _batches(sorted(range(len(prompts)), key=lengths.__getitem__), min(cfg.batch_size, LOGPS_MAX_BATCH)):
        lp, n = _completion_logps(
            model, tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], max_length, [full[i] for i in idx]
        )
        for i, value, count in zip(idx, lp, n):
            logps[i], counts[i] = value, int(count)
    return logps, counts


def answer_losses(logps: list[float], counts: list[int]) -> list[float]:
    """Per-example mean token cross-entropy of the reference answer; weighted by `counts` it averages to heldout_loss."""
    return [-lp / n if n else float("nan") for lp, n in zip(logps, counts)]


def reward_margins(
    policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]], beta: float
) -> list[float]:
    """Per pair: DPO's implicit reward margin beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))."""
    (pc, pr), (rc, rr) = policy, reference
    return [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]


def check_heldout(heldout: list[dict], train: list[dict]) -> None:
    if not heldout:
        raise DataError("held-out set is empty after validation; nothing to evaluate on", "heldout")
    seen = {repr(ex["prompt"]) for ex in train}
    overlap = sum(repr(ex["prompt"]) in seen for ex in heldout)
    if overlap:
        raise DataError(
            f"{overlap} held-out prompt(s) also occur in train; held-out scores would be inflated", "heldout"
        )


def reference_text(example: dict) -> str:
    return example["completion"][-1]["content"]


def check_template(adapter_dir: str, expected_fingerprint: str, tokenizer) -> None:
    """An adapter is only valid under the chat template it was trained with."""
    from transformers import AutoTokenizer

    from ftflow.tasks.data.formatting import template_fingerprint

    saved = template_fingerprint(AutoTokenizer.from_pretrained(adapter_dir))
    current = template_fingerprint(tokenizer)
    if (expected_fingerprint and saved != expected_fingerprint) or saved != current:
        raise DataError(
            f"chat template fingerprint mismatch: adapter trained with {saved}, expected {expected_fingerprint or current}, "
            f"tokenizer in use has {current}",
            adapter_dir,
        )


def score_variant(
    variant: str, generations: list[dict], references: list[str], prompts: list[list[dict]], eos_token: str, suite
) -> VariantResult:
    """Per-example generation scores under registry names; corpus-only metrics (BLEU) from the metric suite."""
    from ftflow.tasks.evaluate.metrics import per_example_scores, score_generations

    texts = [g["text"] for g in generations]
    stopped = [g["stopped"] for g in generations]
    rows = per_example_scores(texts, references, eos_token, stopped=stopped)
    for row, g in zip(rows, generations):
        row["new_tokens"] = g["new_tokens"]
    corpus = score_generations(texts, references, eos_token, stopped=stopped, suite=suite)
    result = VariantResult(variant, {})
    for metric in (m for m in registry.METRICS if m.source == "generation"):
        if metric.per_example:
            result.add(metric.name, [float(row[metric.column]) for row in rows])
        elif metric.aggregate == "corpus":
            result.corpus[metric.name] = corpus[metric.column]
    result.refresh()
    result.predictions = [
        {"variant": variant, "prompt": p[-1]["content"], "reference": ref, "prediction": g["answer"], **row}
        for p, ref, g, row in zip(prompts, references, generations, rows)
    ]
    return result


def _score_loss(result: VariantResult, logps: list[float], counts: list[int]) -> None:
    losses = answer_losses(logps, counts)
    result.add("heldout_loss", losses, counts)
    result.add("heldout_logprob", [-x for x in losses], counts)
    for row, loss in zip(result.predictions, losses):
        row[registry.get("heldout_loss").column] = loss


def _pair_logps(model, tokenizer, pairs: list[dict], cfg: EvalConfig, max_length: int):
    from ftflow.tasks.evaluate.pairs import shared_prefix_logps, shares_prefixes

    if shares_prefixes(model):
        # Two rows per pair run after the shared prefix: as many rows per batch as scoring each side whole.
        per_batch = max(1, min(cfg.batch_size, LOGPS_MAX_BATCH) // 2)
        shared = shared_prefix_logps(model, tokenizer, pairs, max_length, per_batch)
        if shared is not None:
            return shared
    prompts = [p["prompt"] for p in pairs]
    chosen, _ = answer_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], cfg, max_length)
    rejected, _ = answer_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], cfg, max_length)
    return chosen, rejected


@dataclass(frozen=True)
class Scoring:
    """What `score_variants` scores: the examples, their preference pairs, the few-shot examples of `base_fewshot`,
    and the metric sources to compute (the validation choice needs only its primary metric's)."""

    examples: Sequence[dict]
    pairs: Sequence[dict] = ()
    few_shots: Sequence[dict] = ()
    sources: frozenset[str] = ALL_SOURCES


def score_variants(
    ctx: StageContext,
    model,
    tokenizer,
    variants: list[str],
    scoring: Scoring,
    precomputed: Optional[dict[str, VariantResult]] = None,
) -> dict[str, VariantResult]:
    """Score `variants` on `scoring.examples` (and its pairs), computing only what the metrics of its sources need.

    `model` is a PeftModel holding adapters named after the variants; base variants disable them."""
    results: dict[str, VariantResult] = dict(precomputed or {})
    with dequantized_4bit(model, ctx.log):
        _score_each(ctx, model, tokenizer, [v for v in variants if v not in results], scoring, results)
    _score_preferences(results, ctx.cfg.dpo.beta)
    return results


def _score_each(ctx: StageContext, model, tokenizer, variants: list[str], scoring: Scoring, results: dict) -> None:
    from ftflow.tasks.evaluate.metrics import load_suite

    cfg, eos_token, max_length = ctx.cfg.eval, ctx.model.eos_token, ctx.cfg.sft.max_length
    sources, pairs, few_shots = scoring.sources, scoring.pairs, scoring.few_shots
    suite = load_suite() if "generation" in sources else None
    prompts = [ex["prompt"] for ex in scoring.examples]
    references = [reference_text(ex) for ex in scoring.examples]
    answers = [ex["completion"] for ex in scoring.examples]
    budget = generation_budget(cfg, tokenizer, references)
    sized = cfg.model_copy(update={"max_new_tokens": budget})
    if "generation" in sources and budget < cfg.max_new_tokens:
        ctx.log(
            f"generation budget {budget} new tokens (eval.max_new_tokens {cfg.max_new_tokens}, sized from the references)"
        )
    for variant in variants:
        key = cache.variant_key(ctx, variant, scoring)
        hit = cache.load(ctx, variant, key)
        if hit is not None:
            hit.cached = True
            results[variant] = hit
            ctx.log(f"evaluated {variant} (cached, key {key[:12]}): " + _summary(hit))
            continue
        with active_variant(model, variant):
            if "generation" in sources:
                asked = [few_shot_prompt(p, list(few_shots)) for p in prompts] if variant == "base_fewshot" else prompts
                # Batches only on a progress display: without one the "evaluated <variant>" line below says enough.
                # Progress artifact keys allow lowercase letters, digits and dashes only.
                update = ctx.progress(f"eval-{variant.replace('_', '-')}", len(asked)) if ctx.progress else None
                result = score_variant(
                    variant,
                    generate(model, tokenizer, asked, sized, eos_token, update),
                    references,
                    prompts,
                    eos_token,
                    suite,
                )
            else:
                result = VariantResult(variant, {})
            zero_shot = registry.get("heldout_loss").for_variant(variant)
            if "loss" in sources and zero_shot:
                _score_loss(result, *answer_logps(model, tokenizer, prompts, answers, cfg, max_length))
            # Every zero-shot variant, the champion included: the base is the tuned variants' common reference.
            if "preference" in sources and pairs and zero_shot:
                result.pair_logps = _pair_logps(model, tokenizer, list(pairs), cfg, max_length)
        result.refresh()
        results[variant] = result
        cache.save(ctx, key, result)
        ctx.log(f"evaluated {variant}: " + _summary(result))


def _summary(result: VariantResult) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items())


def _score_preferences(results: dict[str, VariantResult], beta: float) -> None:
    """Implicit rewards of every tuned variant against one reference, the base model: SFT, DPO and the champion
    are then comparable pair by pair (the gate's preference-accuracy guard compares candidate and champion)."""
    reference = results.get("base")
    if reference is None or reference.pair_logps is None:
        return
    for variant, result in results.items():
        if not registry.get("preference_accuracy").for_variant(variant) or result.pair_logps is None:
            continue
        margins = reward_margins(result.pair_logps, reference.pair_logps, beta)
        result.add("preference_accuracy", [float(m > 0) for m in margins])
        result.add("reward_margin", margins)
        result.refresh()


def evaluate_variants(
    ctx: StageContext,
    model,
    tokenizer,
    variants: list[str],
    sets: EvalSets,
    precomputed: Optional[dict[str, VariantResult]] = None,
) -> dict[str, VariantResult]:
    """Every variant on the held-out (test) prompts and pairs, every metric source; `precomputed` results (the base
    variants a sweep scores once for all arms) are reused, not recomputed."""
    cfg = ctx.cfg.eval
    scoring = Scoring(
        sets.heldout[: cfg.max_examples],
        pairs=sets.heldout_pairs[: cfg.max_examples],
        few_shots=sets.train_sft[: cfg.few_shot_k],
    )
    return score_variants(ctx, model, tokenizer, variants, scoring, precomputed)


def validation_scores(
    ctx: StageContext, model, tokenizer, variants: list[str], sets: EvalSets
) -> dict[str, VariantResult]:
    """The variants on the validation rows, computing only what the primary metric needs (selection stays cheap)."""
    metric = registry.get(ctx.cfg.eval.resolved_primary_metric)
    examples = sets.validation[: ctx.cfg.eval.validation_max_examples]
    if not examples:
        raise DataError(
            "the validation split is empty; set data.validation_path or keep data.validation_fraction > 0", "validation"
        )
    return score_variants(ctx, model, tokenizer, variants, Scoring(examples, sources=frozenset({metric.source})))


def choose(results: dict[str, VariantResult], metric_name: str) -> str:
    """The variant best on the metric in its direction; a tie goes to the later variant (training order)."""
    metric = registry.get(metric_name)
    best = None
    for name, result in results.items():
        value = result.metrics.get(metric_name)
        if value is None or math.isnan(value):
            continue
        if best is None or not registry.better(metric, results[best].metrics[metric_name], value):
            best = name
    if best is None:
        raise DataError(f"no variant has a {metric_name} score to choose by", "validation")
    return best
