"""Chat-template formatting with the model's own template, into examples the trainer needs no template knowledge for.

An SFT example keeps its conversation as TRL prompt/completion messages (evaluation and few-shot prompts
read those) and carries the training input pre-tokenized: `input_ids` and `assistant_masks` (1 on the
tokens that carry the loss). TRL's SFTTrainer treats a dataset with an `input_ids` column as processed:
it skips its own tokenization, builds `labels` from `assistant_masks` (whatever `completion_only_loss`
says) and drops the other columns; so the masks made here are exactly what the model is trained on.

Which tokens carry the loss (`sft.loss_on`): every assistant turn's content plus its end-of-turn token
(default), or the final turn's only. They are found with the template's own turn boundaries:
  - a template with `{% generation %}` markers: transformers' `return_assistant_tokens_mask`, the path TRL's
    `assistant_only_loss=True` takes;
  - any other template (SmolLM2's ChatML has no markers): the conversation is rendered up to each assistant
    turn with `add_generation_prompt=True`; the answer starts where that prefix ends and runs to the
    template's end-of-turn token, and the tokens starting inside that span are marked.

The training window (`max_length`, `truncation`): a conversation longer than the window is never cut
through its answer. `drop` moves it to the quarantine (reason `truncated_answer`); `truncate_left` drops
its earliest user/assistant exchanges until it fits, keeping the system prompt (it states the task the
model is asked to do at inference, so training without it would teach a different task). A row whose
final exchange alone does not fit is dropped either way. Preference pairs get the same treatment with the
longer of prompt + chosen and prompt + rejected.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ftflow.configs.schema import LossOn, Truncation
from ftflow.tasks.data.lengths import nearest_rank
from ftflow.tasks.data.rows import Dropped, Record
from ftflow.tasks.errors import DataError

MASK_SOURCE_MARKERS = "generation_markers"
MASK_SOURCE_BOUNDARIES = "template_boundaries"


@dataclass(frozen=True)
class Window:
    """How training sees a formatted row: the token budget, what happens to longer rows, which turns carry the loss."""

    max_length: Optional[int] = None
    truncation: Truncation = Truncation.drop
    loss_on: LossOn = LossOn.all_assistant_turns
    assistant_only_loss: bool = True

    @classmethod
    def of(cls, section: Any) -> "Window":
        """From an `sft`/`dpo` config section (DPO has no loss_on: its loss is on the answers by construction)."""
        return cls(
            section.max_length,
            Truncation(section.truncation),
            LossOn(getattr(section, "loss_on", LossOn.all_assistant_turns)),
            getattr(section, "assistant_only_loss", True),
        )


@dataclass
class FormattedData:
    sft: list[dict[str, Any]]
    preference: list[dict[str, Any]]
    token_stats: dict[str, float] = field(default_factory=dict)
    template_fingerprint: str = ""
    # Per kind ("sft", "preference"): rows the training window could not hold whole (reason truncated_answer),
    # for the quarantine; and the tally: rows in, kept, truncated_left, dropped by reason, the window's settings.
    dropped: dict[str, list[Dropped]] = field(default_factory=dict)
    window: dict[str, dict[str, Any]] = field(default_factory=dict)
    mask_source: str = ""


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
            raise DataError(
                f"formatted row does not end with the end-of-turn token {eot!r}; the model would not learn to stop",
                source,
                i,
            )


# ----------------------------------------------------------------------------------- loss masks


def has_generation_markers(tokenizer) -> bool:
    from trl.chat_template_utils import has_generation_markers as markers

    template = tokenizer.chat_template
    return bool(template) and markers(template)


def assistant_spans(
    tokenizer, messages: list[dict], eot: Optional[str] = None, last_only: bool = False
) -> tuple[list[int], list[tuple[int, int]], str]:
    """Token ids of the whole conversation and each assistant turn's [start, end) token span (its content and
    end-of-turn token), in turn order, or the final turn's alone; and which method found them (`mask_source`)."""
    eot = eot or end_of_turn_token(tokenizer)
    if has_generation_markers(tokenizer):
        ids, spans = _spans_from_markers(tokenizer, messages, eot)
        return ids, spans[-1:] if last_only else spans, MASK_SOURCE_MARKERS
    return (*_spans_from_boundaries(tokenizer, messages, eot, last_only), MASK_SOURCE_BOUNDARIES)


def _spans_from_markers(tokenizer, messages: list[dict], eot: str) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            # Some marked templates leave the end-of-turn token outside {% generation %}; the model must still learn to stop.
            end = i + 1 if i < len(ids) and ids[i] == eot_id else i
            if ids[end - 1] != eot_id:
                raise DataError(
                    f"assistant turn {len(spans) + 1} is not closed by the end-of-turn token {eot!r}; "
                    "the model would not learn to stop"
                )
            spans.append((start, end))
            start = None
    _check_span_count(spans, messages, "the {% generation %} markers")
    return ids, spans


def _spans_from_boundaries(
    tokenizer, messages: list[dict], eot: str, last_only: bool = False
) -> tuple[list[int], list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    char_spans = []
    for turn, k in enumerate(turns, start=1):
        if last_only and turn < len(turns):
            continue
        message = messages[k]
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        if not full.startswith(before):
            raise DataError(
                f"the chat template renders the conversation before assistant turn {turn} differently when later "
                "turns follow (it is not prefix-preserving), so its turn boundaries cannot be found; use a template "
                "with {% generation %} markers or sft.loss_on=last_turn"
            )
        end = full.find(eot, len(before))
        # The answer must run straight into the end-of-turn token: a template that leaves assistant turns
        # open would otherwise stretch the span over the next user turn, up to *its* end token.
        if end < 0 or full[len(before) : end].strip() != message["content"].strip():
            raise DataError(
                f"the chat template does not render assistant turn {turn} as its content closed by the "
                f"end-of-turn token {eot!r} (a turn left open would not teach the model to stop; content "
                "rewritten once later turns follow cannot be located); use a template with "
                "{% generation %} markers or sft.loss_on=last_turn"
            )
        char_spans.append((len(before), end + len(eot)))
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("turn boundaries need a fast tokenizer (character offsets); this one is not")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = []
    for lo, hi in char_spans:
        # A token belongs to the answer when it starts inside it: one straddling the boundary was prompt text.
        inside = [i for i, (start, _) in enumerate(offsets) if lo <= start < hi]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    _check_span_count(spans, messages, "the template's turn boundaries", last_only)
    return ids, spans


def _check_span_count(spans: list, messages: list[dict], how: str, last_only: bool = False) -> None:
    expected = 1 if last_only else sum(m["role"] == "assistant" for m in messages)
    if len(spans) != expected:
        raise DataError(f"{how} give {len(spans)} assistant span(s) for {expected} assistant turn(s)")


def tokenized_example(
    tokenizer, messages: list[dict], window: Window, eot: Optional[str] = None
) -> tuple[dict[str, Any], str]:
    """`input_ids` and `assistant_masks` of one conversation under `window`'s loss settings, and the mask source."""
    last_only = window.loss_on == LossOn.last_turn or not window.assistant_only_loss
    ids, spans, source = assistant_spans(tokenizer, messages, eot, last_only)
    if not window.assistant_only_loss:
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}, source
    mask = [0] * len(ids)
    for lo, hi in spans:
        mask[lo:hi] = [1] * (hi - lo)
    return {"input_ids": ids, "assistant_masks": mask}, source


# ----------------------------------------------------------------------------------- the window


def _exchanges(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(leading system turns, the rest)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    return messages[:n], messages[n:]


def _shorter(messages: list[dict], keep_tail: int) -> Optional[list[dict]]:
    """`messages` without its earliest user/assistant exchange; None when only the last `keep_tail` turns are left."""
    system, rest = _exchanges(messages)
    if len(rest) <= keep_tail:
        return None
    return system + rest[2:]


def _count(tokenizer, conversations: list[list[dict]]) -> int:
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _fit_sft(
    tokenizer, messages: list[dict], window: Window, eot: str
) -> tuple[Optional[list[dict]], Optional[dict[str, Any]], int, int]:
    """(the messages that fit and their tokens, or None, None; the original token count; exchanges removed)."""
    tokens, _ = tokenized_example(tokenizer, messages, window, eot)
    n = len(tokens["input_ids"])
    if window.max_length is None or n <= window.max_length:
        return messages, tokens, n, 0
    if window.truncation == Truncation.drop:
        return None, None, n, 0
    removed, current = 0, messages
    while True:
        current = _shorter(current, keep_tail=2)
        if current is None:
            return None, None, n, removed
        removed += 1
        if _count(tokenizer, [current]) <= window.max_length:
            return current, tokenized_example(tokenizer, current, window, eot)[0], n, removed


def _fit_pair(tokenizer, example: dict, window: Window) -> tuple[Optional[dict], int, int]:
    def longest(prompt):
        return _count(tokenizer, [prompt + example["chosen"], prompt + example["rejected"]])

    n = longest(example["prompt"])
    if window.max_length is None or n <= window.max_length:
        return example, n, 0
    if window.truncation == Truncation.drop:
        return None, n, 0
    removed, prompt = 0, example["prompt"]
    while True:
        prompt = _shorter(prompt, keep_tail=1)
        if prompt is None:
            return None, n, removed
        removed += 1
        if longest(prompt) <= window.max_length:
            return {**example, "prompt": prompt}, n, removed


def _window_drop(record: Record, n: int, window: Window, section: str) -> Dropped:
    why = (
        "even its final exchange does not fit after dropping the earlier ones"
        if window.truncation == Truncation.truncate_left
        else "truncation=drop"
    )
    return Dropped(
        record.source,
        record.line,
        "truncated_answer",
        f"{record.source}:{record.line}: {n} tokens after the chat template > {section}.max_length "
        f"{window.max_length}; training would cut the answer ({why})",
        record.row,
    )


def _tally(kind_in: int, kept: int, truncated_left: int, dropped: int, window: Window) -> dict[str, Any]:
    return {
        "in": kind_in,
        "kept": kept,
        "truncated_left": truncated_left,
        "dropped": {"truncated_answer": dropped} if dropped else {},
        "max_length": window.max_length,
        "truncation": window.truncation.value,
    }


def format_sft(
    tokenizer, records: list[Record], system_prompt: Optional[str], window: Window = Window(), eot: Optional[str] = None
) -> tuple[list[dict[str, Any]], list[Dropped], dict[str, Any], str]:
    """SFT rows → self-sufficient training examples (see the module doc); returns (examples, dropped, tally, mask source)."""
    eot = eot or end_of_turn_token(tokenizer)
    source = MASK_SOURCE_MARKERS if has_generation_markers(tokenizer) else MASK_SOURCE_BOUNDARIES
    examples, dropped, truncated = [], [], 0
    for i, record in enumerate(records, start=1):
        messages = with_system_prompt(record.row["messages"], system_prompt)
        try:
            fitted, tokens, n, removed = _fit_sft(tokenizer, messages, window, eot)
        except DataError as e:
            raise DataError(f"formatted row: {e}", "sft (formatted)", i) from None
        if fitted is None:
            dropped.append(_window_drop(record, n, window, "sft"))
            continue
        truncated += removed > 0
        examples.append({"prompt": fitted[:-1], "completion": [fitted[-1]], **tokens})
    return examples, dropped, _tally(len(records), len(examples), truncated, len(dropped), window), source


def format_preference(
    tokenizer, records: list[Record], system_prompt: Optional[str], window: Window = Window()
) -> tuple[list[dict[str, Any]], list[Dropped], dict[str, Any]]:
    examples, dropped, truncated = [], [], 0
    for record in records:
        fitted, n, removed = _fit_pair(tokenizer, preference_example(record.row, system_prompt), window)
        if fitted is None:
            dropped.append(_window_drop(record, n, window, "dpo"))
            continue
        truncated += removed > 0
        examples.append(fitted)
    return examples, dropped, _tally(len(records), len(examples), truncated, len(dropped), window)


# ----------------------------------------------------------------------------------- stats


def token_lengths(tokenizer, examples: list[dict]) -> list[int]:
    if not examples:
        return []
    if all("input_ids" in ex for ex in examples):
        return [len(ex["input_ids"]) for ex in examples]
    texts = [render(tokenizer, ex) for ex in examples]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "tokens_mean": float(statistics.fmean(ordered)),
        "tokens_median": float(statistics.median(ordered)),
        "tokens_p95": float(nearest_rank(ordered, 0.95)),
        "tokens_max": float(ordered[-1]),
        "tokens_total": float(sum(ordered)),
    }


def format_data(
    tokenizer,
    sft: list[Record],
    preference: list[Record],
    system_prompt: Optional[str],
    sft_window: Union[Window, Any, None] = None,
    dpo_window: Union[Window, Any, None] = None,
) -> FormattedData:
    """Both kinds through the template and the window. `sft_window`/`dpo_window` take a Window or the config's
    `sft`/`dpo` section; left out, nothing is length-limited and every assistant turn carries the loss."""
    sft_window = _as_window(sft_window)
    dpo_window = _as_window(dpo_window)
    eot = end_of_turn_token(tokenizer)
    sft_examples, sft_dropped, sft_tally, source = format_sft(tokenizer, sft, system_prompt, sft_window, eot)
    pref_examples, pref_dropped, pref_tally = format_preference(tokenizer, preference, system_prompt, dpo_window)
    # SFT rows were checked turn by turn while their spans were found; pairs are rendered here.
    check_ends_with_eos(tokenizer, pref_examples, "preference (formatted)")
    stats = {f"sft_{k}": v for k, v in length_stats(token_lengths(tokenizer, sft_examples)).items()}
    stats.update({f"preference_{k}": v for k, v in length_stats(token_lengths(tokenizer, pref_examples)).items()})
    if sft_examples:
        trained = sum(sum(ex["assistant_masks"]) for ex in sft_examples)
        stats["sft_loss_token_share"] = trained / sum(len(ex["input_ids"]) for ex in sft_examples)
    return FormattedData(
        sft_examples,
        pref_examples,
        stats,
        template_fingerprint(tokenizer),
        {"sft": sft_dropped, "preference": pref_dropped},
        {"sft": sft_tally, "preference": pref_tally},
        source,
    )


def _as_window(value: Union[Window, Any, None]) -> Window:
    if value is None:
        return Window()
    return value if isinstance(value, Window) else Window.of(value)
