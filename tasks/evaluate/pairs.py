"""Log-probs of a preference pair's two answers, with the tokens the two sides share run through the model once
(and the cache checks that generation's shared prompt openings use too, evaluation.prompt_inputs).

A pair's chosen and rejected rows are the same conversation up to where the answers part: the whole prompt (on
the demo about two thirds of a row, with the template's system prompt), and often the answers' first tokens too.
Scoring each side as its own row runs that prefix twice. Here the prefix runs once, its attention cache is
doubled, and only the two remainders run. The tokens are those of scoring each side whole (each side is
tokenized whole, then split where its tokens part), and the positions are the same, so the log-probs are those
of the whole rows up to float rounding."""

from __future__ import annotations

from typing import Optional

import torch


def _cache_name() -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; the old name goes in 5.40."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


CACHE_KWARG = _cache_name()


def shares_prefixes(model) -> bool:
    """Prompt-learning adapters (prompt tuning and kin) prepend virtual tokens at every forward, so a remainder run
    against a cache would get them twice; those models score each side whole."""
    configs = getattr(model, "peft_config", None) or {}
    return not any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    # Each side keeps at least its last token to run after the prefix: the prefix's last logits predict the first.
    return min(n, len(a) - 1, len(b) - 1)


def _tokens(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def shared_prefix_logps(
    model, tokenizer, pairs: list[dict], max_length: int, pairs_per_batch: int
) -> Optional[tuple[list[float], list[float]]]:
    """(chosen, rejected) summed answer log-probs per pair, or None where the model's attention cache cannot be
    shared (anything but plain full-attention layers: sliding windows, linear attention)."""
    render = tokenizer.apply_chat_template
    prompt_lens = [
        len(ids)
        for ids in _tokens(
            tokenizer, [render(p["prompt"], tokenize=False, add_generation_prompt=True) for p in pairs], max_length
        )
    ]
    chosen = _tokens(tokenizer, [render(p["prompt"] + p["chosen"], tokenize=False) for p in pairs], max_length)
    rejected = _tokens(tokenizer, [render(p["prompt"] + p["rejected"], tokenize=False) for p in pairs], max_length)
    shared = [_common_prefix(c, r) for c, r in zip(chosen, rejected)]
    if min(shared, default=1) < 1:
        return None
    out_c, out_r = [0.0] * len(pairs), [0.0] * len(pairs)
    # Pairs of similar prefix and remainder lengths batch together, so padding stays small.
    order = sorted(range(len(pairs)), key=lambda i: (shared[i], len(chosen[i]) + len(rejected[i])))
    for start in range(0, len(order), pairs_per_batch):
        idx = order[start : start + pairs_per_batch]
        scored = _score_batch(model, [(chosen[i], rejected[i], shared[i], prompt_lens[i]) for i in idx])
        if scored is None:
            return None
        for i, (c, r) in zip(idx, scored):
            out_c[i], out_r[i] = c, r
    return out_c, out_r


def full_attention_cache(out):
    """The attention cache a forward returned, or None unless every layer keeps every earlier position (a sliding
    window or linear attention keeps something else, so a copied prefix cache would not be the plain case)."""
    from transformers.cache_utils import DynamicLayer

    cache = getattr(out, CACHE_KWARG, None)
    if cache is None or any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    return cache


def _score_batch(model, rows: list[tuple[list[int], list[int], int, int]]) -> Optional[list[tuple[float, float]]]:
    device = next(model.parameters()).device
    width = max(s for _, _, s, _ in rows)
    # Prefixes left-padded, so every row's last prefix token sits in the last column; positions count real tokens.
    prefix = torch.zeros(len(rows), width, dtype=torch.long)
    prefix_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (c, _, s, _) in enumerate(rows):
        prefix[b, width - s :] = torch.tensor(c[:s])
        prefix_mask[b, width - s :] = 1
    # Logits from the first answer position of any row's prefix: answer tokens inside a shared prefix score too.
    keep = max(max(s - p + 1, 1) for _, _, s, p in rows)
    out = model(
        input_ids=prefix.to(device),
        attention_mask=prefix_mask.to(device),
        position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        use_cache=True,
        logits_to_keep=keep,
    )
    cache = full_attention_cache(out)
    if cache is None:
        return None
    prefix_logits = _log_probs(out.logits)
    # Remainders, interleaved chosen/rejected to match the cache doubled in place, right-padded.
    tails = [seq[s:] for c, r, s, _ in rows for seq in (c, r)]
    longest = max(len(t) for t in tails)
    tail = torch.zeros(len(tails), longest, dtype=torch.long)
    tail_mask = torch.zeros(len(tails), longest, dtype=torch.long)
    for b, t in enumerate(tails):
        tail[b, : len(t)] = torch.tensor(t)
        tail_mask[b, : len(t)] = 1
    starts = torch.tensor([s for _, _, s, _ in rows for _ in range(2)])
    cache.batch_repeat_interleave(2)
    tail_logits = _log_probs(
        model(
            input_ids=tail.to(device),
            attention_mask=torch.cat([prefix_mask.repeat_interleave(2, dim=0), tail_mask], dim=-1).to(device),
            position_ids=(starts[:, None] + torch.arange(longest)[None, :]).to(device),
            use_cache=False,
            **{CACHE_KWARG: cache},
        ).logits
    )
    scores = []
    for b, (c, r, s, p) in enumerate(rows):
        sides = []
        for side, seq in enumerate((c, r)):
            total = 0.0
            for t in range(max(p, 1), len(seq)):
                # Token t is predicted at position t-1: in the prefix's kept logits, or in the remainder's.
                if t - 1 < s:
                    total += prefix_logits(b, keep - (s - (t - 1)), seq[t])
                else:
                    total += tail_logits(2 * b + side, t - 1 - s, seq[t])
            sides.append(total)
        scores.append((sides[0], sides[1]))
    return scores


def _log_probs(logits: torch.Tensor):
    """log p(token) at (row, position) without a vocabulary-wide log-softmax tensor: the logit less the row's
    log-sum-exp (a second vocabulary-sized tensor per token would double the memory the logits take)."""
    logits = logits.float().cpu()
    norm = torch.logsumexp(logits, dim=-1)
    return lambda row, pos, token: (logits[row, pos, token] - norm[row, pos]).item()
