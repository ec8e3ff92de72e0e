"""data.mapping: dotted paths with indexes, role names, exploding nested instances, clear errors, suggested snippets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ftflow.configs.schema import DataMapping, PipelineConfig
from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.data.mapping import PathError, mapping_snippet, resolve, split_path, suggest_mapping
from ftflow.tasks.errors import DataError


def write(tmp_path: Path, rows: list, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


NESTED = {"meta": {"system": "Be brief."}, "turns": [{"q": {"text": "2 + 2?"}}, {"a": "4"}]}


def test_paths_are_dotted_keys_with_list_indexes():
    assert split_path("turns[0].q.text") == ["turns", 0, "q", "text"]
    assert resolve(NESTED, "turns[0].q.text") == "2 + 2?"
    assert resolve(NESTED, "turns.1.a") == "4"
    assert resolve(NESTED, "meta.system") == "Be brief."
    for bad in ("", "a..b", "a[x]", "a]b"):
        with pytest.raises(PathError, match="not dotted keys"):
            split_path(bad)


@pytest.mark.parametrize(
    "path, message",
    [
        ("meta.sys", "no key 'sys' in meta (keys found: 'system')"),
        ("turns[5].q", "turns has 2 item(s), no index 5"),
        ("turns.q", "turns is a list, so 'q' must be an index"),
        ("meta.system.x", "meta.system is a string, so it has no 'x'"),
        ("nothing", "no key 'nothing' in the row (keys found: 'meta', 'turns')"),
    ],
)
def test_a_path_that_does_not_resolve_names_where_it_stopped_and_the_keys_found(path, message):
    with pytest.raises(PathError) as err:
        resolve(NESTED, path)
    assert message in str(err.value) and repr(path) in str(err.value)


def test_prompt_input_response_with_a_system_path(tmp_path):
    path = write(
        tmp_path, [{"meta": {"sys": "Be brief."}, "task": {"question": "Add:", "numbers": "2 2"}, "label": "4"}]
    )
    mapping = DataMapping(system="meta.sys", prompt="task.question", input="task.numbers", response="label")
    [record], dropped = load_rows(path, "sft", mapping=mapping)
    assert dropped == []
    assert record.row == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add:\n\n2 2"},
            {"role": "assistant", "content": "4"},
        ]
    }


def test_messages_with_custom_keys_and_role_names(tmp_path):
    rows = [
        {
            "dialog": [
                {"speaker": "customer", "says": "Hi"},
                {"speaker": "agent", "says": "Hello!"},
                {"speaker": "customer", "says": "Bye"},
                {"speaker": "agent", "says": "Goodbye!"},
            ]
        }
    ]
    mapping = DataMapping(
        messages="dialog", role_key="speaker", content_key="says", roles={"customer": "user", "agent": "assistant"}
    )
    [record], _ = load_rows(write(tmp_path, rows), "sft", mapping=mapping)
    assert [m["role"] for m in record.row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert record.row["messages"][-1]["content"] == "Goodbye!"


def test_an_unmapped_role_drops_the_row_and_says_how_to_map_it(tmp_path):
    rows = [
        {"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"dialog": [{"role": "customer", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    records, dropped = load_rows(write(tmp_path, rows), "sft", mapping=DataMapping(messages="dialog"))
    assert len(records) == 1
    assert dropped[0].line == 2 and dropped[0].reason == "schema"
    assert "'customer', an unknown role; map it in data.mapping.roles" in dropped[0].detail


def test_explode_gives_one_row_per_instance_with_the_shared_instruction(tmp_path):
    rows = [
        {
            "id": "t1",
            "instruction": "Give a synonym.",
            "instances": [{"input": "big", "output": "large"}, {"input": "small", "output": "tiny"}],
        },
        {"id": "t2", "instruction": "Greet.", "instances": [{"input": "", "output": "Hello!"}]},
        {"id": "t3", "instruction": "Nothing.", "instances": []},
        {"id": "t4", "instruction": "Broken.", "instances": [{"input": "x"}]},
    ]
    mapping = DataMapping(prompt="instruction", input="input", response="output", explode="instances")
    records, dropped = load_rows(write(tmp_path, rows), "sft", mapping=mapping)
    assert [(r.line, r.row["messages"][0]["content"], r.row["messages"][1]["content"]) for r in records] == [
        (1, "Give a synonym.\n\nbig", "large"),
        (1, "Give a synonym.\n\nsmall", "tiny"),
        (2, "Greet.", "Hello!"),
    ]
    # Nothing vanishes: an empty instance list and a broken instance are quarantined with where they were.
    assert [(d.line, d.reason) for d in dropped] == [(3, "schema"), (4, "schema")]
    assert "is an empty list" in dropped[0].detail
    assert "instance 1: path 'output'" in dropped[1].detail


def test_preference_pairs_through_a_mapping(tmp_path):
    rows = [{"q": "Capital of France?", "good": "Paris", "bad": "Berlin"}]
    mapping = DataMapping(prompt="q", chosen="good", rejected="bad")
    [pair], _ = load_rows(write(tmp_path, rows), "preference", mapping=mapping)
    assert pair.row == {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": "Paris",
        "rejected": "Berlin",
    }
    [sft], _ = load_rows(write(tmp_path, rows), "sft", mapping=mapping)
    assert sft.row["messages"][-1] == {"role": "assistant", "content": "Paris"}


def test_a_bad_path_fails_the_file_once_naming_the_field_the_path_and_the_keys_found(tmp_path):
    rows = [{"instruction": "Say hi.", "instances": [{"input": "", "output": "Hi"}]}]
    with pytest.raises(DataError) as err:
        load_rows(
            write(tmp_path, rows),
            "sft",
            mapping=DataMapping(prompt="instruction", response="outputs", explode="instances"),
        )
    message = str(err.value)
    assert message.count("\n") == 0
    assert "data.mapping.response: path 'outputs': no key 'outputs'" in message
    assert "keys found: 'instruction', 'input', 'output'" in message
    with pytest.raises(DataError, match="data.mapping.explode: path 'items'"):
        load_rows(
            write(tmp_path, rows), "sft", mapping=DataMapping(prompt="instruction", response="output", explode="items")
        )


def test_the_mapping_itself_is_validated_in_the_config():
    with pytest.raises(ValidationError, match="needs `messages`, or `prompt`"):
        DataMapping(response="output")
    with pytest.raises(ValidationError, match="both `chosen` and `rejected`"):
        DataMapping(prompt="q", chosen="good")
    with pytest.raises(ValidationError, match="targets must be system, user or assistant"):
        DataMapping(messages="dialog", roles={"agent": "bot"})
    cfg = PipelineConfig.model_validate({"data": {"mapping": {"prompt": "q", "response": "a"}}})
    assert cfg.data.mapping.prompt == "q"


@pytest.mark.parametrize(
    "row, kind, expected",
    [
        (
            {"id": 1, "instruction": "Synonym?", "instances": [{"input": "big", "output": "large"}]},
            "sft",
            {"prompt": "instruction", "input": "input", "response": "output", "explode": "instances"},
        ),
        ({"question": "2+2?", "meta": {"answer": "4"}}, "sft", {"prompt": "question", "response": "meta.answer"}),
        (
            {"query": "Capital?", "preferred": "Paris", "dispreferred": "Rome"},
            "preference",
            {"prompt": "query", "chosen": "preferred", "rejected": "dispreferred"},
        ),
        (
            {"dialog": {"turns": [{"speaker": "client", "text": "hi"}, {"speaker": "gpt", "text": "hello"}]}},
            "sft",
            {
                "messages": "dialog.turns",
                "role_key": "speaker",
                "content_key": "text",
                "roles": {"client": "<user|assistant>"},
            },
        ),
    ],
)
def test_an_unknown_shape_suggests_a_mapping_that_reads_back_as_yaml(row, kind, expected):
    suggested = suggest_mapping(row, kind)
    assert suggested == expected
    snippet = mapping_snippet(suggested)
    assert "\n" not in snippet and yaml.safe_load(snippet) == {"mapping": expected}


def test_an_unknown_shape_fails_with_the_keys_and_a_pasteable_snippet_that_then_works(tmp_path):
    rows = [{"task": "Give a synonym.", "examples": [{"input": "big", "output": "large"}]}]
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_rows(path, "sft")
    message = str(err.value)
    assert "\n" not in message and "unknown row shape with keys 'task', 'examples'" in message
    # The snippet is the message's tail, pasted under `data:` in a recipe.
    recipe = "data:\n  " + message[message.index("mapping: {") :]
    suggested = yaml.safe_load(recipe)["data"]["mapping"]
    assert suggested == {
        "input": "input",
        "response": "output",
        "explode": "examples",
        "prompt": "<path to the user's question>",
    }
    # The user fills the one placeholder and the file loads.
    suggested["prompt"] = "task"
    [record], _ = load_rows(path, "sft", mapping=DataMapping(**suggested))
    assert record.row["messages"][0]["content"] == "Give a synonym.\n\nbig"
