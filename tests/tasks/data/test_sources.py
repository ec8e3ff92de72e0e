"""Reading files: every source type, encodings, sizes, broken files, and the JSON Lines writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftflow.configs.schema import DataFormat
from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.data.sources import write_jsonl, write_quarantine
from ftflow.tasks.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
CHAT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def data_error(path, kind="sft", **kw) -> str:
    with pytest.raises(DataError) as err:
        load_rows(path, kind, **kw)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


# ------------------------------------------------------------------------------ sources


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + json.dumps(CHAT) + "\r\n", encoding="utf-8")
    records, dropped = load_rows(path, "sft")
    assert [r.line for r in records] == [1, 3] and dropped == []
    assert records[0].row == CHAT


def test_jsonl_with_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    assert len(load_rows(path, "sft")[0]) == 1


@pytest.mark.parametrize("container", [None, "data", "rows", "train"])
def test_json_list_or_container(tmp_path, container):
    rows = [CHAT, {"messages": [{"role": "user", "content": None}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows if container is None else {container: rows, "meta": {"v": 1}}), encoding="utf-8")
    records, dropped = load_rows(path, "sft")
    assert len(records) == 1 and [d.line for d in dropped] == [2]


def test_json_lines_saved_as_json(tmp_path):
    path = write_lines(tmp_path / "chat.json", [CHAT, CHAT])
    assert [r.line for r in load_rows(path, "sft")[0]] == [1, 2]


def test_parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "sky?", "chosen": "blue", "rejected": "green"},
                {"prompt": "sea?", "chosen": None, "rejected": "red"},
            ]
        ),
        path,
    )
    records, dropped = load_rows(path, "preference")
    assert [r.row for r in records] == [
        {"prompt": [{"role": "user", "content": "sky?"}], "chosen": "blue", "rejected": "green"}
    ]
    assert dropped[0].line == 2 and "chosen is null" in dropped[0].detail


def test_parquet_with_nested_messages(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), path)
    records, _ = load_rows(path, "sft", fmt=DataFormat.openai)
    assert [r.row for r in records] == [CHAT, CHAT]


def test_csv_alpaca_and_json_string_messages(tmp_path):
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text('instruction,input,output\n"Say hi,\nplease",,hi\nAdd.,1 2,3\n', encoding="utf-8")
    records, dropped = load_rows(alpaca, "sft")
    assert dropped == [] and [r.line for r in records] == [2, 4]  # the first record spans lines 2-3
    assert records[0].row["messages"][0]["content"] == "Say hi,\nplease"
    assert records[1].row["messages"][0]["content"] == "Add.\n\n1 2"

    chat = tmp_path / "chat.csv"
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    chat.write_text(f'id,messages\n1,"{cell}"\n2,not json\n3\n', encoding="utf-8")
    records, dropped = load_rows(chat, "sft")
    assert [r.row for r in records] == [CHAT]
    assert [(d.line, d.reason) for d in dropped] == [(3, "schema"), (4, "schema")]
    assert "messages is a string, expected a list of messages" in dropped[0].detail
    assert "row has 1 fields, the header has 2" in dropped[1].detail


def test_csv_preference_with_json_string_prompt(tmp_path):
    path = tmp_path / "pairs.csv"
    prompt = json.dumps([{"role": "user", "content": "sky?"}]).replace('"', '""')
    path.write_text(f'prompt,chosen,rejected\n"{prompt}",blue,green\n[INST] sea?,wet,dry\n', encoding="utf-8")
    records, _ = load_rows(path, "preference")
    assert records[0].row["prompt"] == [{"role": "user", "content": "sky?"}]
    assert records[1].row["prompt"] == [{"role": "user", "content": "[INST] sea?"}]  # not JSON: stays text


def test_hf_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [CHAT, CHAT, {"messages": [{"role": "user", "content": "only a question"}]}]
    ).save_to_disk(tmp_path / "ds")
    records, dropped = load_rows(tmp_path / "ds", "sft")
    assert [r.row for r in records] == [CHAT, CHAT]
    assert [(d.line, d.reason) for d in dropped] == [(3, "schema")]


def test_hf_dataset_dict_uses_train_or_the_only_split(tmp_path):
    import datasets

    pair = {"prompt": "sky?", "chosen": "blue", "rejected": "green"}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([pair] * 3),
            "test": datasets.Dataset.from_list([pair]),
        }
    ).save_to_disk(tmp_path / "dd")
    assert len(load_rows(tmp_path / "dd", "preference")[0]) == 3

    datasets.DatasetDict({"validation": datasets.Dataset.from_list([pair] * 2)}).save_to_disk(tmp_path / "one")
    assert len(load_rows(tmp_path / "one", "preference")[0]) == 2

    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list([pair]), "b": datasets.Dataset.from_list([pair])}
    ).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match="splits a, b and no 'train' split"):
        load_rows(tmp_path / "two", "preference")


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as err:
        load_rows(tmp_path / "plain", "sft")
    assert str(tmp_path / "plain") in str(err.value) and "save_to_disk" in str(err.value)


# ------------------------------------------------------------------------------ bad inputs


def test_missing_file(tmp_path):
    assert "file not found" in data_error(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "name, content",
    [
        ("e.jsonl", ""),
        ("blank.jsonl", "\n \n\n"),
        ("e.json", ""),
        ("e.csv", ""),
        ("header.csv", "instruction,input,output\n"),
        ("list.json", "[]"),
    ],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert "no rows" in data_error(path)


def test_non_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(CHAT).encode() + b"\n" + '{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin-1")
    )
    message = data_error(path)
    assert f"{path}:2:" in message and "not UTF-8" in message and "0xe9" in message
    for suffix in (".csv", ".json"):
        other = tmp_path / f"latin1{suffix}"
        other.write_bytes(b"instruction,input,output\nx,y,z\ncaf\xe9,,ok\n")
        assert f"{other}:3:" in data_error(other)


def test_truncated_last_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT)[:25], encoding="utf-8")
    message = data_error(path)
    assert f"{path}:2:" in message and "truncated" in message and "not valid JSON" in message and "column" in message


def test_malformed_line_in_the_middle(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{'messages': []}\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    message = data_error(path)
    assert f"{path}:2:" in message and "not valid JSON" in message and "truncated" not in message


def test_ten_megabyte_row(tmp_path):
    big = {"messages": [{"role": "user", "content": "x" * 10_000_000}, {"role": "assistant", "content": "y"}]}
    path = write_lines(tmp_path / "big.jsonl", [CHAT, big, CHAT])
    records, dropped = load_rows(path, "sft")
    assert [r.line for r in records] == [1, 3]
    (d,) = dropped
    assert (d.line, d.reason) == (2, "row_too_large")
    assert f"{path}:2:" in d.detail and "max_row_bytes=1000000" in d.detail
    assert isinstance(d.row, str) and len(d.row) == 200 and d.row.startswith('{"messages"')

    alone = write_lines(tmp_path / "alone.jsonl", [big])
    message = data_error(alone)
    assert f"{alone}:1:" in message and "more than max_row_bytes" in message


def test_max_row_bytes_applies_to_every_source(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [CHAT, {"messages": [{"role": "user", "content": "z" * 500}, {"role": "assistant", "content": "a"}]}]
        ),
        path,
    )
    records, dropped = load_rows(path, "sft", max_row_bytes=300)
    assert len(records) == 1 and [(d.line, d.reason) for d in dropped] == [(2, "row_too_large")]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_parquet_bytes_under_another_name(tmp_path, suffix):
    real = tmp_path / "real.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT]), real)
    fake = tmp_path / f"fake{suffix}"
    fake.write_bytes(real.read_bytes())
    data_error(fake)


def test_jsonl_under_a_parquet_name(tmp_path):
    path = write_lines(tmp_path / "fake.parquet", [CHAT])
    assert "cannot read as Parquet" in data_error(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"messages": []}', "found an object with keys 'messages'"),
        ("42", "found a number"),
        ('[{"messages": [}', "not valid JSON"),
    ],
)
def test_json_that_is_not_a_list_of_rows(tmp_path, content, expected):
    path = tmp_path / "odd.json"
    path.write_text(content, encoding="utf-8")
    assert expected in data_error(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert ".jsonl, .json, .parquet, .csv" in data_error(path)


def test_python_json_extras_are_accepted(tmp_path):
    # json.dumps writes NaN and lone-surrogate escapes; orjson rejects both, the stdlib fallback reads them
    path = tmp_path / "py.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "score": NaN}\n'
        '{"messages": [{"role": "user", "content": "\\ud800x"}, {"role": "assistant", "content": "a"}]}\n',
        encoding="utf-8",
    )
    records, dropped = load_rows(path, "sft")
    assert dropped == [] and records[1].row["messages"][0]["content"] == "?x"


@pytest.mark.parametrize("parser", ["orjson", "stdlib"])
def test_same_results_without_orjson(tmp_path, monkeypatch, parser):
    import ftflow.tasks.data.sources as sources

    if parser == "stdlib":
        monkeypatch.setattr(sources, "orjson", None)
    records, _ = load_rows(FIXTURES / "openai_finetune.jsonl", "sft")
    assert records[2].row["messages"][2] == {"role": "assistant", "content": "Paris"}
    assert len(load_rows(FIXTURES / "sharegpt.json", "sft")[0]) == 2
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT)[:10], encoding="utf-8")
    assert f"{cut}:2:" in data_error(cut) and "truncated" in data_error(cut)
    out = tmp_path / "rows.jsonl"
    write_jsonl([r.row for r in records], out)
    assert [r.row for r in load_rows(out, "sft")[0]] == [r.row for r in records]


# ------------------------------------------------------------------------------ writers


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "日本語"}, {"role": "assistant", "content": "はい"}]}]
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl(rows, path) == 1
    assert "日本語" in path.read_text(encoding="utf-8")
    assert [r.row for r in load_rows(path, "sft")[0]] == rows


def test_write_quarantine(tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl", [CHAT, {"messages": [{"role": "user", "content": None}], "note": "壊れた"}]
    )
    _, dropped = load_rows(src, "sft")
    out = tmp_path / "quarantine.jsonl"
    assert write_quarantine(dropped, out) == 1
    text = out.read_text(encoding="utf-8")
    assert "壊れた" in text  # ensure_ascii=False
    (entry,) = [json.loads(line) for line in text.splitlines()]
    assert entry == dropped[0].as_dict()
    assert entry["line"] == 2 and entry["reason"] == "schema" and entry["source"] == str(src)
