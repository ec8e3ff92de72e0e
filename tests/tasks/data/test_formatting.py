"""Chat-template formatting with SmolLM2's real tokenizer: prompt/completion split, system prompt, EOS, fingerprint.

The loss masks and the training window are tested in test_loss_mask.py."""

from __future__ import annotations

import copy

import pytest

from ftflow.tasks.data.formatting import (
    check_ends_with_eos,
    end_of_turn_token,
    format_data,
    length_stats,
    preference_example,
    render,
    sft_example,
    template_fingerprint,
    token_lengths,
    with_system_prompt,
)
from ftflow.tasks.data.rows import Record
from ftflow.tasks.errors import DataError

SYSTEM = "Reply with JSON only."


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


MULTI_TURN = {
    "messages": [
        msg("system", "You extract fields."),
        msg("user", "Name: Ann"),
        msg("assistant", '{"name": "Ann"}'),
        msg("user", "Name: Bob"),
        msg("assistant", '{"name": "Bob"}'),
    ]
}
SINGLE_TURN = {"messages": [msg("user", "What is 2 + 2?"), msg("assistant", "4")]}
PAIR = {"prompt": [msg("user", "Capital of France?")], "chosen": "Paris", "rejected": "Berlin"}


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


def without_end_of_turn(tokenizer):
    """A copy whose template closes user/system turns but forgets the end token after assistant turns."""
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
        "{% if message['role'] != 'assistant' %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return broken


# --- prompt / completion split ---------------------------------------------------------------


def test_sft_example_splits_at_final_assistant_turn():
    ex = sft_example(MULTI_TURN, None)
    assert ex["completion"] == [msg("assistant", '{"name": "Bob"}')]
    # Earlier assistant turns stay in the prompt as context.
    assert ex["prompt"] == MULTI_TURN["messages"][:-1]
    assert ex["prompt"][-1]["role"] == "user"


def test_sft_example_single_turn():
    ex = sft_example(SINGLE_TURN, None)
    assert ex == {"prompt": [msg("user", "What is 2 + 2?")], "completion": [msg("assistant", "4")]}


def test_sft_example_does_not_mutate_the_row():
    row = copy.deepcopy(SINGLE_TURN)
    sft_example(row, SYSTEM)
    assert row == SINGLE_TURN


# --- system prompt ---------------------------------------------------------------------------


def test_system_prompt_prepended_when_missing():
    ex = sft_example(SINGLE_TURN, SYSTEM)
    assert ex["prompt"][0] == msg("system", SYSTEM)
    assert ex["prompt"][1:] == [msg("user", "What is 2 + 2?")]


def test_system_prompt_not_prepended_when_present():
    ex = sft_example(MULTI_TURN, SYSTEM)
    assert [m["role"] for m in ex["prompt"]].count("system") == 1
    assert ex["prompt"][0] == msg("system", "You extract fields.")


def test_no_system_prompt_configured_leaves_messages_alone():
    assert with_system_prompt(SINGLE_TURN["messages"], None) == SINGLE_TURN["messages"]
    assert with_system_prompt(SINGLE_TURN["messages"], "") == SINGLE_TURN["messages"]
    assert with_system_prompt([], SYSTEM) == [msg("system", SYSTEM)]


def test_preference_example_shape():
    ex = preference_example(PAIR, SYSTEM)
    assert ex["prompt"] == [msg("system", SYSTEM), msg("user", "Capital of France?")]
    assert ex["chosen"] == [msg("assistant", "Paris")]
    assert ex["rejected"] == [msg("assistant", "Berlin")]


# --- end of turn -----------------------------------------------------------------------------


def test_end_of_turn_token_is_chatml_im_end(tokenizer):
    assert end_of_turn_token(tokenizer) == "<|im_end|>"


def test_every_rendered_example_ends_with_end_of_turn(tokenizer):
    examples = [
        sft_example(MULTI_TURN, SYSTEM),
        sft_example(SINGLE_TURN, SYSTEM),
        sft_example(SINGLE_TURN, None),
        preference_example(PAIR, None),
    ]
    for ex in examples:
        text = render(tokenizer, ex)
        assert text.rstrip().endswith("<|im_end|>")
        # The completion is the last thing before the end token.
        answer = (ex.get("completion") or ex["chosen"])[-1]["content"]
        assert text.rstrip().endswith(answer + "<|im_end|>")
    check_ends_with_eos(tokenizer, examples, "sft")


def test_template_dropping_the_end_token_is_refused(tokenizer):
    broken = without_end_of_turn(tokenizer)
    examples = [sft_example(SINGLE_TURN, None), sft_example(MULTI_TURN, None)]
    with pytest.raises(DataError, match="end-of-turn") as err:
        check_ends_with_eos(broken, examples, "sft (formatted)")
    assert err.value.path == "sft (formatted)"
    assert err.value.line == 1
    # The original tokenizer is untouched by the copy.
    check_ends_with_eos(tokenizer, examples, "sft (formatted)")


def test_format_data_refuses_a_template_without_end_token(tokenizer):
    records = [Record(SINGLE_TURN, "train.jsonl", 1)]
    with pytest.raises(DataError):
        format_data(without_end_of_turn(tokenizer), records, [], None)


# --- fingerprint -----------------------------------------------------------------------------


def test_template_fingerprint_stable_across_loads(tokenizer, smollm_path):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(smollm_path)
    assert (
        template_fingerprint(tokenizer) == template_fingerprint(again) == template_fingerprint(copy.deepcopy(tokenizer))
    )
    assert len(template_fingerprint(tokenizer)) == 16


def test_template_fingerprint_changes_with_template(tokenizer):
    edited = copy.deepcopy(tokenizer)
    edited.chat_template = tokenizer.chat_template.replace("helpful AI assistant", "terse assistant")
    assert template_fingerprint(edited) != template_fingerprint(tokenizer)
    assert template_fingerprint(without_end_of_turn(tokenizer)) != template_fingerprint(tokenizer)


def test_template_fingerprint_changes_with_special_tokens(tokenizer):
    edited = copy.deepcopy(tokenizer)
    edited.pad_token = "<|endoftext|>"
    assert template_fingerprint(edited) != template_fingerprint(tokenizer)


# --- token stats -----------------------------------------------------------------------------


def test_format_data_stats_and_examples(tokenizer):
    sft = [Record(SINGLE_TURN, "train.jsonl", 1), Record(MULTI_TURN, "train.jsonl", 2)]
    pref = [Record(PAIR, "pairs.jsonl", 1)]
    data = format_data(tokenizer, sft, pref, SYSTEM)
    # The conversation stays readable as prompt/completion (evaluation reads it) beside the trainer's tokens.
    assert [{k: ex[k] for k in ("prompt", "completion")} for ex in data.sft] == [
        sft_example(SINGLE_TURN, SYSTEM),
        sft_example(MULTI_TURN, SYSTEM),
    ]
    assert all(len(ex["input_ids"]) == len(ex["assistant_masks"]) for ex in data.sft)
    assert data.preference == [preference_example(PAIR, SYSTEM)]
    assert data.template_fingerprint == template_fingerprint(tokenizer)
    keys = {"tokens_mean", "tokens_median", "tokens_p95", "tokens_max", "tokens_total"}
    assert set(data.token_stats) == {f"sft_{k}" for k in keys} | {f"preference_{k}" for k in keys} | {
        "sft_loss_token_share"
    }
    lengths = token_lengths(tokenizer, data.sft)
    assert lengths == token_lengths(tokenizer, [sft_example(r.row, SYSTEM) for r in sft])
    assert data.token_stats["sft_tokens_total"] == sum(lengths)
    assert data.token_stats["sft_tokens_max"] == max(lengths)
    # The multi-turn row is the longer one.
    assert lengths[1] > lengths[0]


def test_format_data_without_preference_has_no_preference_stats(tokenizer):
    data = format_data(tokenizer, [Record(SINGLE_TURN, "train.jsonl", 1)], [], None)
    assert data.preference == []
    assert not any(k.startswith("preference_") for k in data.token_stats)
    assert data.token_stats["sft_tokens_mean"] > 0


def test_length_stats_math():
    stats = length_stats([10, 30, 20, 40])
    assert stats == {
        "tokens_mean": 25.0,
        "tokens_median": 25.0,
        "tokens_p95": 40.0,
        "tokens_max": 40.0,
        "tokens_total": 100.0,
    }
    assert length_stats([]) == {}
    assert token_lengths(None, []) == []
