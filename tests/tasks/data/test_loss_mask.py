"""Loss on every assistant turn, token by token, under four chat templates; what TRL trains on; the training window.

SmolLM2's own template is ChatML. The others are real templates of other model families (fixtures/templates/)
put on SmolLM2's tokenizer with their special tokens added, so no other model has to be downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ftflow.configs.loader import ConfigError, apply_overrides, config_from_dict
from ftflow.configs.schema import LossOn, PipelineConfig, Truncation
from ftflow.tasks.data.formatting import (
    MASK_SOURCE_BOUNDARIES,
    MASK_SOURCE_MARKERS,
    Window,
    assistant_spans,
    end_of_turn_token,
    format_data,
    tokenized_example,
)
from ftflow.tasks.data.rows import Record

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


THREE_TURNS = [
    msg("user", "Rewrite politely: Send the invoice by Friday."),
    msg("assistant", "Could you please send the invoice by Friday? Thank you."),
    msg("user", "一文で要約:佐藤さんは大阪のパン屋勤務。火曜日に倉庫を掃除しました。皆喜びました。"),
    msg("assistant", "要するに、佐藤さんは火曜日に倉庫を掃除しました。"),
    msg("user", "Rewrite politely: Print the slides by noon."),
    msg("assistant", "Could you please print the slides by noon? Thank you."),
]
ANSWERS = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]

# template file (None = the model's own) → (special tokens the family adds, its end-of-turn token)
FAMILIES = {
    "chatml (SmolLM2)": (None, [], "<|im_end|>"),
    "llama-3": ("llama3.jinja", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gemma": ("gemma.jinja", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi-3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
}


@pytest.fixture(scope="module")
def smollm(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


def family(smollm, name: str):
    template, specials, _ = FAMILIES[name]
    if template is None:
        return smollm
    tok = copy.deepcopy(smollm)
    tok.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def runs(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """(start, token ids) of every maximal stretch of masked-in tokens."""
    out: list[tuple[int, list[int]]] = []
    for i, (token, bit) in enumerate(zip(ids, mask)):
        if bit and (not out or out[-1][0] + len(out[-1][1]) != i):
            out.append((i, []))
        if bit:
            out[-1][1].append(token)
    return out


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- every assistant turn, token by token ------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_three_turns_carry_the_loss_on_exactly_their_answers_and_end_of_turn_tokens(smollm, name):
    tok = family(smollm, name)
    eot = FAMILIES[name][2]
    assert end_of_turn_token(tok) == eot
    example, source = tokenized_example(tok, THREE_TURNS, Window())
    ids, mask = example["input_ids"], example["assistant_masks"]
    assert source == MASK_SOURCE_BOUNDARIES  # none of these templates has {% generation %} markers
    # The trainer sees the template's own rendering, nothing added or lost.
    assert ids == encode(tok, tok.apply_chat_template(THREE_TURNS, tokenize=False))
    found = runs(ids, mask)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert [tokens for _, tokens in found] == [encode(tok, answer) + [eot_id] for answer in ANSWERS]
    # Each span starts right where the template's generation prompt for that turn ends: no prompt text is trained.
    # (Text, not tokens: alone, the prompt's closing "\n\n" is one token; before the answer, byte-level BPE splits it.)
    for (start, _), k in zip(found, (1, 3, 5)):
        assert tok.decode(ids[:start], clean_up_tokenization_spaces=False) == tok.apply_chat_template(
            THREE_TURNS[:k], tokenize=False, add_generation_prompt=True
        )
    assert sum(mask) == sum(len(encode(tok, a)) + 1 for a in ANSWERS)


def test_last_turn_only_masks_the_final_answer(smollm):
    example, _ = tokenized_example(smollm, THREE_TURNS, Window(loss_on=LossOn.last_turn))
    eot_id = smollm.convert_tokens_to_ids("<|im_end|>")
    assert [t for _, t in runs(example["input_ids"], example["assistant_masks"])] == [
        encode(smollm, ANSWERS[-1]) + [eot_id]
    ]


def test_without_assistant_only_loss_every_token_is_trained(smollm):
    example, _ = tokenized_example(smollm, THREE_TURNS, Window(assistant_only_loss=False))
    assert example["assistant_masks"] == [1] * len(example["input_ids"])


def test_a_template_with_generation_markers_takes_trls_path_and_agrees_with_the_boundaries(smollm):
    plain = family(smollm, "llama-3")
    marked = copy.deepcopy(plain)
    marked.chat_template = (TEMPLATES / "llama3_generation_markers.jinja").read_text(encoding="utf-8")
    ids, spans, source = assistant_spans(marked, THREE_TURNS)
    assert source == MASK_SOURCE_MARKERS
    assert (ids, spans) == assistant_spans(plain, THREE_TURNS)[:2]


def test_a_template_that_renders_earlier_turns_differently_is_refused_with_the_way_out(smollm):
    from ftflow.tasks.errors import DataError

    tok = copy.deepcopy(smollm)
    # Renders only the latest exchange unless a generation prompt is asked for: not prefix-preserving.
    tok.chat_template = (
        "{% for m in messages %}{% if add_generation_prompt or loop.index > messages|length - 2 %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-preserving.*loss_on=last_turn"):
        tokenized_example(tok, THREE_TURNS, Window())


def test_a_template_that_rewrites_earlier_answers_still_trains_the_last_turn(smollm):
    from ftflow.tasks.errors import DataError

    tok = copy.deepcopy(smollm)
    # Like reasoning templates that strip earlier answers: an assistant turn renders differently once others follow.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}[earlier answer]{% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(
        DataError, match="assistant turn 1 .* use a template with \\{% generation %\\} markers or sft.loss_on=last_turn"
    ):
        tokenized_example(tok, THREE_TURNS, Window())
    example, _ = tokenized_example(tok, THREE_TURNS, Window(loss_on=LossOn.last_turn))
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for _, t in runs(example["input_ids"], example["assistant_masks"])] == [
        encode(tok, ANSWERS[-1]) + [eot_id]
    ]


# --- what TRL makes of it ----------------------------------------------------------------------


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_trl_trains_on_exactly_the_masked_tokens_and_tokenizes_nothing_itself(
    tiny_model_dir, tmp_path, completion_only_loss
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [
        Record({"messages": THREE_TURNS}, "t.jsonl", 1),
        Record({"messages": [msg("user", "What is 2 + 2?"), msg("assistant", "4")]}, "t.jsonl", 2),
    ]
    formatted = format_data(tok, records, [], "Answer briefly.", Window(max_length=256))
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_length=256,
        completion_only_loss=completion_only_loss,
        packing=False,
        report_to="none",
        use_cpu=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(formatted.sft),
        processing_class=tok,
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(formatted.sft)
    for example, row in zip(formatted.sft, prepared):
        assert row["input_ids"] == example["input_ids"]
        assert row["labels"] == [t if bit else -100 for t, bit in zip(example["input_ids"], example["assistant_masks"])]
    batch = trainer.data_collator([prepared[0]])
    assert batch["labels"][0].tolist() == prepared[0]["labels"]


# --- the training window -----------------------------------------------------------------------

LONG_FIRST = [
    msg("system", "You rewrite and summarize."),
    msg("user", "Rewrite politely: " + "please note the following background. " * 30 + "Send the file."),
    msg("assistant", "Could you please send the file? Thank you."),
    *THREE_TURNS[2:],
]


def length(tok, messages) -> int:
    return len(encode(tok, tok.apply_chat_template(messages, tokenize=False)))


def test_drop_quarantines_a_row_the_window_would_cut_and_counts_it(smollm):
    n = length(smollm, LONG_FIRST)
    short = Record({"messages": THREE_TURNS}, "t.jsonl", 1)
    data = format_data(
        smollm,
        [short, Record({"messages": LONG_FIRST}, "t.jsonl", 2)],
        [],
        None,
        Window(max_length=n - 1, truncation=Truncation.drop),
    )
    assert len(data.sft) == 1 and data.sft[0]["completion"][0]["content"] == ANSWERS[-1]
    [dropped] = data.dropped["sft"]
    assert (dropped.line, dropped.reason) == (2, "truncated_answer")
    assert f"{n} tokens" in dropped.detail and f"sft.max_length {n - 1}" in dropped.detail
    assert data.window["sft"] == {
        "in": 2,
        "kept": 1,
        "truncated_left": 0,
        "dropped": {"truncated_answer": 1},
        "max_length": n - 1,
        "truncation": "drop",
    }


def test_truncate_left_drops_the_earliest_exchange_keeps_the_system_prompt_and_every_later_answer_trained(smollm):
    limit = length(smollm, [LONG_FIRST[0], *LONG_FIRST[3:]])
    assert length(smollm, LONG_FIRST) > limit
    data = format_data(
        smollm,
        [Record({"messages": LONG_FIRST}, "t.jsonl", 1)],
        [],
        None,
        Window(max_length=limit, truncation=Truncation.truncate_left),
    )
    [example] = data.sft
    assert example["prompt"][0] == LONG_FIRST[0]  # the system prompt stays
    assert example["prompt"][1:] + example["completion"] == LONG_FIRST[3:]
    assert len(example["input_ids"]) <= limit
    eot_id = smollm.convert_tokens_to_ids("<|im_end|>")
    # Both answers left in the window still carry the loss, whole, with their end-of-turn tokens.
    assert [t for _, t in runs(example["input_ids"], example["assistant_masks"])] == [
        encode(smollm, a) + [eot_id] for a in ANSWERS[1:]
    ]
    assert data.window["sft"]["truncated_left"] == 1 and data.dropped["sft"] == []


def test_truncate_left_never_cuts_the_final_exchange(smollm):
    final_alone = length(smollm, [LONG_FIRST[0], *LONG_FIRST[-2:]])
    data = format_data(
        smollm,
        [Record({"messages": LONG_FIRST}, "t.jsonl", 7)],
        [],
        None,
        Window(max_length=final_alone - 1, truncation=Truncation.truncate_left),
    )
    assert data.sft == []
    [dropped] = data.dropped["sft"]
    assert dropped.reason == "truncated_answer" and "final exchange does not fit" in dropped.detail


def test_preference_pairs_get_the_window_too(smollm):
    pair = {"prompt": LONG_FIRST[:-1], "chosen": ANSWERS[-1], "rejected": "Print the slides."}
    n = max(length(smollm, [*pair["prompt"], msg("assistant", a)]) for a in (pair["chosen"], pair["rejected"]))
    dropped = format_data(smollm, [], [Record(pair, "p.jsonl", 3)], None, dpo_window=Window(max_length=n - 1))
    assert dropped.preference == [] and dropped.dropped["preference"][0].reason == "truncated_answer"
    kept = format_data(
        smollm,
        [],
        [Record(pair, "p.jsonl", 3)],
        None,
        dpo_window=Window(max_length=n - 1, truncation=Truncation.truncate_left),
    )
    [example] = kept.preference
    assert example["prompt"] == [LONG_FIRST[0], *LONG_FIRST[3:-1]]
    assert kept.window["preference"]["truncated_left"] == 1


def test_window_comes_from_the_config_sections():
    cfg = PipelineConfig()
    window = Window.of(cfg.sft)
    assert (window.max_length, window.truncation, window.loss_on) == (256, Truncation.drop, LossOn.all_assistant_turns)
    assert Window.of(cfg.dpo).loss_on == LossOn.all_assistant_turns


# --- token limits must agree at load -----------------------------------------------------------


def load(overrides: list[str]) -> PipelineConfig:
    return config_from_dict(apply_overrides(PipelineConfig().model_dump(mode="json"), overrides), "test")


def test_quality_max_tokens_above_the_training_window_fails_at_load_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        load(["quality.max_tokens=384", "sft.max_length=256", "dpo.max_length=512"])
    assert "quality.max_tokens (384)" in str(err.value) and "sft.max_length (256)" in str(err.value)
    with pytest.raises(ConfigError, match=r"dpo.max_length \(256\)"):
        load(["quality.max_tokens=384", "sft.max_length=512"])


def test_agreeing_limits_truncate_left_or_no_dpo_load():
    assert load(["quality.max_tokens=256"]).quality.max_tokens == 256
    cfg = load(["quality.max_tokens=384", "sft.truncation=truncate_left", "dpo.truncation=truncate_left"])
    assert cfg.sft.truncation == Truncation.truncate_left
    assert load(["quality.max_tokens=384", "sft.max_length=384", "dpo.enabled=false"]).dpo.max_length == 256


def test_a_template_that_leaves_assistant_turns_open_is_refused_not_mis_masked(smollm):
    from ftflow.tasks.errors import DataError

    tok = copy.deepcopy(smollm)
    # Closes user turns only: a naive search for <|im_end|> would run the first answer into the next user turn.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if m.role != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="does not render assistant turn 1 as its content closed by the end-of-turn"):
        tokenized_example(tok, THREE_TURNS, Window())
    with pytest.raises(DataError) as err:
        format_data(tok, [Record({"messages": THREE_TURNS}, "t.jsonl", 1)], [], None)
    assert (err.value.path, err.value.line) == ("sft (formatted)", 1)
