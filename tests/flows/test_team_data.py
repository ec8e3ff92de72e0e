"""A team's own data in the shapes it is published in: each file passes `ftflow validate` whole, and its
formatted rows carry the loss on exactly every assistant answer and its end-of-turn token.

Fixtures (tests/tasks/data/fixtures/published/), written in the public shapes: ShareGPT multi-turn (one with
a system turn, one in Japanese), Anthropic HH multi-turn transcripts, OpenAI chat fine-tuning rows with a
system prompt, Stanford Alpaca, and Self-Instruct's seed tasks (one instruction, nested instances), read
through data.mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.cli import main
from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.data.formatting import Window, format_data

PUBLISHED = Path(__file__).resolve().parents[1] / "tasks" / "data" / "fixtures" / "published"
SEED_TASKS_MAPPING = [
    "data.mapping.prompt=instruction",
    "data.mapping.input=input",
    "data.mapping.response=output",
    "data.mapping.explode=instances",
]
# file, kind, extra overrides, rows the file yields
CASES = [
    ("sharegpt_multiturn.json", "sft", [], 8),
    ("hh_multiturn.jsonl", "preference", [], 8),
    ("hh_multiturn.jsonl", "sft", [], 8),
    ("openai_chat_system.jsonl", "sft", [], 8),
    ("alpaca.json", "sft", [], 10),
    ("self_instruct_seed_tasks.jsonl", "sft", SEED_TASKS_MAPPING, 11),
]


def config(overrides: list[str], model_dir: str) -> PipelineConfig:
    return config_from_dict(
        apply_overrides(PipelineConfig().model_dump(mode="json"), [f"model.name_or_path={model_dir}", *overrides]),
        "test",
    )


@pytest.mark.parametrize("name, kind, overrides, rows", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_published_shape_validates_whole_and_trains_on_every_answer(
    name, kind, overrides, rows, tmp_path, capsys, tiny_model_dir
):
    from transformers import AutoTokenizer

    rc = main(
        [
            "validate",
            str(PUBLISHED / name),
            "--kind",
            kind,
            "--out",
            str(tmp_path),
            f"model.name_or_path={tiny_model_dir}",
            "quality.min_kept_rows=1",
            *overrides,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    # Clean files in their published shape lose nothing: every row is read, checked and kept.
    assert (report["counts_in"], report["counts_out"], report["reasons"]) == (rows, rows, {}), report["examples"]

    cfg = config(overrides, tiny_model_dir)
    records, dropped = load_rows(PUBLISHED / name, "sft", cfg.data.format, mapping=cfg.data.mapping)
    assert dropped == [] and len(records) == rows
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    formatted = format_data(tokenizer, records, [], cfg.data.system_prompt, Window.of(cfg.sft), Window.of(cfg.dpo))
    assert formatted.dropped["sft"] == [] and len(formatted.sft) == rows
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, example in zip(records, formatted.sft):
        answers = [m["content"] for m in record.row["messages"] if m["role"] == "assistant"]
        ids, mask = example["input_ids"], example["assistant_masks"]
        trained, run = [], []
        for token, bit in zip(ids, mask):
            if bit:
                run.append(token)
            elif run:
                trained, run = trained + [run], []
        trained += [run] if run else []
        assert trained == [tokenizer(a, add_special_tokens=False)["input_ids"] + [eot] for a in answers]


def test_multi_turn_shapes_really_are_multi_turn():
    cfg = PipelineConfig()
    for name in ("sharegpt_multiturn.json", "openai_chat_system.jsonl", "hh_multiturn.jsonl"):
        records, _ = load_rows(PUBLISHED / name, "sft", cfg.data.format)
        assert max(sum(m["role"] == "assistant" for m in r.row["messages"]) for r in records) >= 2, name
    openai, _ = load_rows(PUBLISHED / "openai_chat_system.jsonl", "sft")
    assert all(r.row["messages"][0]["role"] == "system" for r in openai)
    sharegpt, _ = load_rows(PUBLISHED / "sharegpt_multiturn.json", "sft")
    assert any(r.row["messages"][0]["role"] == "system" for r in sharegpt)


def test_the_nested_instances_file_without_a_mapping_fails_with_a_suggestion_that_works(
    tmp_path, capsys, tiny_model_dir
):
    rc = main(
        [
            "validate",
            str(PUBLISHED / "self_instruct_seed_tasks.jsonl"),
            "--kind",
            "sft",
            "--out",
            str(tmp_path),
            f"model.name_or_path={tiny_model_dir}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown row shape with keys 'id', 'name', 'instruction', 'instances', 'is_classification'" in err
    assert "mapping: {prompt: instruction, input: input, response: output, explode: instances}" in err
