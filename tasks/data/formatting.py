"""Chat-template formatting with the model's own template.

SFT rows become TRL prompt/completion pairs (conversational): the prompt is every turn before the
final assistant turn and the completion is that turn, so the loss falls on the answer only with any
chat template, including ones without `{% generation %}` markers (SmolLM2's has none).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

from ftflow.tasks.errors import DataError
from ftflow.tasks.data.rows import Record


@dataclass
class FormattedData:
    sft: list[dict[str, Any]]
    preference: list[dict[str, Any]]
    token_stats: dict[str, float] = field(default_factory=dict)
    template_fingerprint: str = ""


def with_system_prompt(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def end_of_turn_token(tokenizer) -> str:
    """The token the template closes an assistant turn with (ChatML: <|im_end|>; Llama 3: <|eot_id|>)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}], tokenize=False
    )
    tail = probe.split("PROBE", 1)[1]
    for token in [tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])]:
        if token and tail.lstrip().startswith(token):
            return token
    return tokenizer.eos_token


def template_fingerprint(tokenizer) -> str:
    """Hash of the chat template and special tokens: an adapter trained under one template must not be served under another."""
    payload = json.dumps(
        {
            "chat_template": tokenizer.chat_template,
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def sft_example(row: dict, system_prompt: Optional[str]) -> dict[str, list[dict]]:
    messages = with_system_prompt(row["messages"], system_prompt)
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def preference_example(row: dict, system_prompt: Optional[str]) -> dict[str, list[dict]]:
    return {
        "prompt": with_system_prompt(row["prompt"], system_prompt),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def render(tokenizer, example: dict) -> str:
    """Full text of one formatted example as the trainer will see it (prompt + completion/chosen)."""
    answer = example.get("completion") or example["chosen"]
    return tokenizer.apply_chat_template(example["prompt"] + answer, tokenize=False)


def check_ends_with_eos(tokenizer, examples: list[dict], source: str) -> None:
    eot = end_of_turn_token(tokenizer)
    for i, ex in enumerate(examples, start=1):
        if not render(tokenizer, ex).rstrip().endswith(eot):
            raise DataError(f"formatted row does not end with the end-of-turn token {eot!r}; the model would not learn to stop",
                            source, i)


def token_lengths(tokenizer, examples: list[dict]) -> list[int]:
    texts = [render(tokenizer, ex) for ex in examples]
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "tokens_mean": float(statistics.fmean(ordered)),
        "tokens_median": float(statistics.median(ordered)),
        "tokens_p95": float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]),
        "tokens_max": float(ordered[-1]),
        "tokens_total": float(sum(ordered)),
    }


def format_data(tokenizer, sft: list[Record], preference: list[Record], system_prompt: Optional[str]) -> FormattedData:
    sft_examples = [sft_example(r.row, system_prompt) for r in sft]
    pref_examples = [preference_example(r.row, system_prompt) for r in preference]
    check_ends_with_eos(tokenizer, sft_examples, "sft (formatted)")
    check_ends_with_eos(tokenizer, pref_examples, "preference (formatted)")
    stats = {f"sft_{k}": v for k, v in length_stats(token_lengths(tokenizer, sft_examples)).items()}
    stats.update({f"preference_{k}": v for k, v in length_stats(token_lengths(tokenizer, pref_examples)).items()})
    return FormattedData(sft_examples, pref_examples, stats, template_fingerprint(tokenizer))
