"""Row formats: every shape, detection, row-level errors, and fuzzing load_rows for unhandled exceptions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftflow.configs.schema import DataFormat
from ftflow.tasks.data.formats import RowError, detect_format, load_rows, normalize_row
from ftflow.tasks.data.rows import Dropped
from ftflow.tasks.data.sources import write_quarantine
from ftflow.tasks.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
ROLES = {"system", "user", "assistant"}
REASONS = {"schema", "row_too_large", "unknown_role"}

CHAT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


def assert_canonical(row: dict, kind: str) -> None:
    """Independent check of the shapes documented in tasks/rows.py."""

    def check_messages(messages):
        assert isinstance(messages, list) and messages
        for m in messages:
            assert set(m) == {"role", "content"}
            assert m["role"] in ROLES and isinstance(m["content"], str)
            m["content"].encode("utf-8")  # writable as UTF-8 (no lone surrogates)

    if kind == "sft":
        assert set(row) == {"messages"}
        check_messages(row["messages"])
        assert any(m["role"] == "assistant" for m in row["messages"])
    else:
        assert set(row) == {"prompt", "chosen", "rejected"}
        check_messages(row["prompt"])
        assert row["prompt"][-1]["role"] == "user"
        assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ formats


def test_openai_roles_are_normalised_and_extra_keys_dropped():
    raw = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "Human", "content": "hi"},
            {"role": "gpt", "content": "hello", "weight": 1},
            {"role": "user", "content": "and?"},
            {"role": "bot", "content": "bye"},
        ]
    }
    assert normalize_row(raw, "openai", "sft") == {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye"},
        ]
    }


def test_alpaca_joins_instruction_and_input_only_when_input_is_given():
    with_input = normalize_row({"instruction": "Translate.", "input": "こんにちは", "output": "Hello"}, "alpaca", "sft")
    assert with_input["messages"] == [
        {"role": "user", "content": "Translate.\n\nこんにちは"},
        {"role": "assistant", "content": "Hello"},
    ]
    for empty in ("", "   ", None):
        row = normalize_row({"instruction": "Say hi.", "input": empty, "output": "hi"}, "alpaca", "sft")
        assert row["messages"][0] == {"role": "user", "content": "Say hi."}
    assert (
        normalize_row({"instruction": "Say hi.", "output": "hi"}, "alpaca", "sft")["messages"][0]["content"]
        == "Say hi."
    )


def test_sharegpt_from_value_and_top_level_system():
    raw = {
        "system": "You are kind.",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    assert normalize_row(raw, "sharegpt", "sft")["messages"] == [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_prompt_completion_strings_and_conversational():
    assert normalize_row({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "sft") == {
        "messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    }
    conv = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    assert normalize_row(conv, "prompt_completion", "sft")["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_preference_strings_messages_and_implicit_prompt():
    expected = {"prompt": [{"role": "user", "content": "sky?"}], "chosen": "blue", "rejected": "green"}
    assert (
        normalize_row({"prompt": "sky?", "chosen": "blue", "rejected": "green"}, "preference", "preference") == expected
    )
    conv = {
        "prompt": [{"role": "user", "content": "sky?"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "green"}],
    }
    assert normalize_row(conv, "preference", "preference") == expected
    implicit = {
        "chosen": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "green"}],
    }
    assert normalize_row(implicit, "auto", "preference") == expected


def test_preference_row_read_as_sft_is_prompt_plus_chosen():
    row = normalize_row({"prompt": "sky?", "chosen": "blue", "rejected": "green"}, "preference", "sft")
    assert row == {"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}]}


def test_hh_shared_turns_become_the_prompt():
    raw = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No.",
    }
    assert normalize_row(raw, "hh", "preference") == {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "joke?"},
        ],
        "chosen": "A pun.",
        "rejected": "No.",
    }
    assert normalize_row(raw, "hh", "sft")["messages"][-1] == {"role": "assistant", "content": "A pun."}


@pytest.mark.parametrize(
    "raw, fmt, kind, reason, expected_detail",
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "openai",
            "sft",
            "schema",
            "messages[1].content is null, expected a string",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "openai",
            "sft",
            "schema",
            "messages[0].content is a number, expected a string",
        ),
        (
            {"messages": [{"role": "user", "content": ["a"]}]},
            "openai",
            "sft",
            "schema",
            "messages[0].content is a list, expected a string",
        ),
        ({"messages": "hi"}, "openai", "sft", "schema", "messages is a string, expected a list of messages"),
        ({"messages": [None]}, "openai", "sft", "schema", "messages[0] is null"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "openai",
            "sft",
            "unknown_role",
            "messages[0].role is 'tool'",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "openai", "sft", "schema", "no assistant turn"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", "sft", "schema", "conversations[0] has no 'value'"),
        ({"instruction": "x", "output": 5}, "alpaca", "sft", "schema", "output is a number, expected a string"),
        ({"instruction": "x"}, "alpaca", "sft", "schema", "missing key 'output' (keys found: 'instruction')"),
        (
            {"prompt": "q", "chosen": None, "rejected": "r"},
            "preference",
            "preference",
            "schema",
            "chosen is null, expected a string or a list of messages",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "preference",
            "preference",
            "schema",
            "expected the assistant answer last",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "c",
                "rejected": "r",
            },
            "preference",
            "preference",
            "schema",
            "expected it to end with a user turn",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
            "hh",
            "preference",
            "schema",
            "differ before their final Assistant turn",
        ),
        ({"chosen": "no turns here", "rejected": "none"}, "hh", "preference", "schema", "holds no"),
    ],
)
def test_row_errors_name_the_field_and_what_was_expected(raw, fmt, kind, reason, expected_detail):
    with pytest.raises(RowError) as err:
        normalize_row(raw, fmt, kind)
    assert err.value.reason == reason
    assert expected_detail in err.value.detail
    assert "\n" not in err.value.detail


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    "row, kind, fmt",
    [
        (CHAT, "sft", DataFormat.openai),
        ({"instruction": "i", "input": "", "output": "o"}, "sft", DataFormat.alpaca),
        ({"conversations": []}, "sft", DataFormat.sharegpt),
        ({"prompt": "p", "completion": "c"}, "sft", DataFormat.prompt_completion),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference", DataFormat.preference),
        ({"chosen": [], "rejected": []}, "preference", DataFormat.preference),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "preference", DataFormat.hh),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "sft", DataFormat.hh),
        # ultrafeedback_binarized has both: SFT reads its messages, DPO its pairs
        ({"prompt": "p", "chosen": [], "rejected": [], "messages": []}, "sft", DataFormat.openai),
        ({"prompt": "p", "chosen": [], "rejected": [], "messages": []}, "preference", DataFormat.preference),
    ],
)
def test_detect_format(row, kind, fmt):
    assert detect_format(row, kind) is fmt


def test_detect_unknown_shape_names_keys_and_formats():
    with pytest.raises(DataError) as err:
        detect_format({"question": "q", "answer": "a"}, "sft")
    message = str(err.value)
    assert "'question', 'answer'" in message
    for name in ("openai", "alpaca", "sharegpt", "prompt_completion", "preference", "hh"):
        assert name in message


def test_sft_format_cannot_give_preference_pairs():
    with pytest.raises(DataError, match="not preference pairs"):
        detect_format(CHAT, "preference")


# ------------------------------------------------------------------------------ public shapes


@pytest.mark.parametrize(
    "name, kind, n, first",
    [
        (
            "openai_finetune.jsonl",
            "sft",
            3,
            {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        ),
        ("alpaca_tatsu.json", "sft", 2, {"role": "user", "content": "Give three tips for staying healthy."}),
        (
            "sharegpt.json",
            "sft",
            2,
            {
                "role": "user",
                "content": "Summarize the main ideas of Jeff Walker's Product Launch Formula into bullet points.",
            },
        ),
        ("hh_rlhf.jsonl", "preference", 2, {"role": "user", "content": "What kind of noises did dinosaurs make?"}),
        ("hh_rlhf.jsonl", "sft", 2, {"role": "user", "content": "What kind of noises did dinosaurs make?"}),
        ("trl_preference.jsonl", "preference", 2, {"role": "user", "content": "What color is the sky?"}),
        (
            "ultrafeedback_binarized.jsonl",
            "preference",
            1,
            {"role": "user", "content": "how can i develop a habit of drawing daily"},
        ),
        (
            "ultrafeedback_binarized.jsonl",
            "sft",
            1,
            {"role": "user", "content": "how can i develop a habit of drawing daily"},
        ),
    ],
)
def test_public_dataset_shapes(name, kind, n, first):
    records, dropped = load_rows(FIXTURES / name, kind)
    assert dropped == [] and len(records) == n
    for r in records:
        assert_canonical(r.row, kind)
        assert r.source == str(FIXTURES / name)
    key = "messages" if kind == "sft" else "prompt"
    assert records[0].row[key][0] == first
    assert [r.line for r in records] == list(range(1, n + 1))


def test_hh_multi_turn_keeps_all_shared_turns():
    records, _ = load_rows(FIXTURES / "hh_rlhf.jsonl", "preference")
    pair = records[0].row
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert pair["prompt"][-1]["content"] == "you cant read"
    assert (pair["chosen"], pair["rejected"]) == ("You can read?", "there's a lot of stuff humans don't know")


def test_alpaca_input_is_appended_and_text_column_ignored():
    records, _ = load_rows(FIXTURES / "alpaca_tatsu.json", "sft")
    assert records[1].row["messages"] == [
        {"role": "user", "content": "Identify the odd one out.\n\nTwitter, Instagram, Telegram"},
        {"role": "assistant", "content": "Telegram"},
    ]


# ------------------------------------------------------------------------------ bad inputs


def data_error(path, kind="sft", **kw) -> str:
    with pytest.raises(DataError) as err:
        load_rows(path, kind, **kw)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_wrong_types_and_nulls_are_dropped_not_fatal(tmp_path):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            CHAT,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            {"messages": {"role": "user"}},
            {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
            {"text": "no messages here"},
            [1, 2],
            {"messages": [{"role": "function", "content": "{}"}]},
            CHAT,
        ],
    )
    records, dropped = load_rows(path, "sft")
    assert [r.line for r in records] == [1, 8]
    assert [(d.line, d.reason) for d in dropped] == [
        (2, "schema"),
        (3, "schema"),
        (4, "schema"),
        (5, "schema"),
        (6, "schema"),
        (7, "unknown_role"),
    ]
    assert dropped[0].detail == f"{path}:2: messages[1].content is null, expected a string"
    assert dropped[1].detail == f"{path}:3: messages is an object, expected a list of messages"
    assert dropped[2].detail == f"{path}:4: messages[0].content is a number, expected a string"
    assert dropped[3].detail == f"{path}:5: missing key 'messages' (keys found: 'text')"
    assert dropped[4].detail == f"{path}:6: row is a list, expected a JSON object"
    assert dropped[0].row == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}


def test_rows_not_in_the_named_format(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [CHAT, CHAT])
    message = data_error(path, fmt="alpaca")
    assert f"{path}:1:" in message and "alpaca" in message and "missing key 'instruction'" in message
    assert "look like the openai format" in message


def test_unknown_shape_names_keys_and_expected_formats(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    message = data_error(path)
    assert (
        f"{path}:1:" in message and "'question', 'answer'" in message and "alpaca (instruction/input/output)" in message
    )


def test_sft_file_read_as_preference(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [CHAT])
    assert "not preference pairs" in data_error(path, kind="preference")
    assert "not preference pairs" in data_error(path, kind="preference", fmt="openai")


def test_unsupported_format_name(tmp_path):
    chat = write_lines(tmp_path / "chat.jsonl", [CHAT])
    assert "unknown format 'chatml'" in data_error(chat, fmt="chatml")


# ------------------------------------------------------------------------------ fuzzing

KEYS = [
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "system",
]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly well-formed values with some wrong ones, so fuzzing reaches both the kept and the dropped paths
valid_role = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "Human"])
role = st.one_of(valid_role, valid_role, valid_role, st.sampled_from(["tool", ""]) | json_scalars)
text = st.text(max_size=8)
content = st.one_of(text, text, text, json_scalars)
message = st.fixed_dictionaries({"role": role, "content": content})
sharegpt_message = st.fixed_dictionaries({"from": role, "value": content})
hh_text = st.lists(
    st.tuples(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "Human:", "\n\n"]), text), max_size=4
).map(lambda turns: "".join(a + b for a, b in turns))
answer = st.one_of(text, st.lists(message, max_size=3), json_scalars)
families = [
    json_values,
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt_message, max_size=4)}, optional={"system": content}),
    st.fixed_dictionaries({"instruction": content, "output": content}, optional={"input": content}),
    st.fixed_dictionaries({"prompt": answer, "completion": answer}),
    st.fixed_dictionaries({"chosen": answer, "rejected": answer}, optional={"prompt": answer}),
    st.fixed_dictionaries({"chosen": hh_text, "rejected": hh_text}),
]
good_message = st.fixed_dictionaries({"role": valid_role, "content": text})
good_hh = st.tuples(st.lists(st.tuples(text, text), max_size=2), text, text, text).map(
    lambda t: {
        side: "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in t[0]) + f"\n\nHuman: {t[1]}\n\nAssistant: {last}"
        for side, last in (("chosen", t[2]), ("rejected", t[3]))
    }
)
families += [
    st.fixed_dictionaries({"messages": st.lists(good_message, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}),
    st.fixed_dictionaries({"instruction": text, "input": text, "output": text}),
    good_hh,
]
rows = st.one_of(*families)
# one family per file, like real data, with an odd row from anywhere now and then
row_lists = st.sampled_from(families).flatmap(
    lambda family: st.lists(st.one_of(family, family, family, rows), min_size=0, max_size=6)
)
line_damage = st.sampled_from(["none", "truncate", "garbage", "latin1", "blank"])


def check_result(path: Path, kind: str, tmp: Path) -> None:
    """load_rows either raises DataError (one line, naming the file) or returns canonical rows."""
    try:
        records, dropped = load_rows(path, kind, max_row_bytes=400)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert records
    for r in records:
        assert_canonical(r.row, kind)
        assert r.source == str(path) and r.line >= 1
    for d in dropped:
        assert isinstance(d, Dropped) and d.reason in REASONS
        assert d.detail.startswith(f"{path}:{d.line}: ") and "\n" not in d.detail
    write_quarantine(dropped, tmp / "q.jsonl")
    # split on "\n" only: str.splitlines() would also split on U+0085/U+2028 that JSON leaves unescaped
    lines = (tmp / "q.jsonl").read_bytes().split(b"\n")[:-1]
    assert [json.loads(x)["line"] for x in lines] == [d.line for d in dropped]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=row_lists, damage=line_damage, kind=st.sampled_from(["sft", "preference"]))
def test_fuzz_jsonl_rows(tmp_path, lines, damage, kind):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
    if damage == "truncate" and text:
        text = text[: len(text) // 2]
    elif damage == "garbage":
        text += b"{not json\n"
    elif damage == "latin1":
        text += b'{"messages": "caf\xe9"}\n'
    elif damage == "blank":
        text = b"\n\n" + text + b"   \n"
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(text)
    check_result(path, kind, tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=300),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
    kind=st.sampled_from(["sft", "preference"]),
)
def test_fuzz_random_bytes(tmp_path, data, suffix, kind):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    check_result(path, kind, tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows_=st.lists(
        st.dictionaries(
            st.sampled_from(KEYS), st.text(max_size=12) | st.just('[{"role": "user", "content": "q"}]'), max_size=5
        ),
        max_size=5,
    ),
    kind=st.sampled_from(["sft", "preference"]),
)
def test_fuzz_csv_and_json_lists(tmp_path, rows_, kind):
    import csv

    columns = sorted({k for r in rows_ for k in r}) or ["x"]
    with (tmp_path / "fuzz.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows_)
    check_result(tmp_path / "fuzz.csv", kind, tmp_path)
    (tmp_path / "fuzz.json").write_text(json.dumps({"data": rows_}), encoding="utf-8")
    check_result(tmp_path / "fuzz.json", kind, tmp_path)


@settings(max_examples=200, deadline=None)
@given(raw=rows, fmt=st.sampled_from(list(DataFormat)), kind=st.sampled_from(["sft", "preference"]))
def test_fuzz_normalize_row(raw, fmt, kind):
    try:
        row = normalize_row(raw, fmt, kind)
    except RowError as e:
        assert e.reason in REASONS and "\n" not in e.detail
        return
    assert_canonical(row, kind)
