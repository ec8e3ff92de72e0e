"""Files people really send: other encodings, Windows line ends, newer OpenAI message shapes, binary data.

Each is read or refused with one line naming the file, the line and what to do; these pin the lines
docs/bad-inputs.md shows (tests/gen_bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.errors import DataError

CHAT = {
    "messages": [{"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": "On its way."}]
}


def _error(path: Path, kind: str = "sft") -> str:
    with pytest.raises(DataError) as err:
        load_rows(str(path), kind)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.bad_input(
    "data",
    "UTF-16 file (Windows 'Unicode' export, with its BOM)",
    "ftflow: error: <file>:1: not UTF-8: byte 0xff at column 1 cannot be decoded; re-encode the file as UTF-8",
)
def test_utf16_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((json.dumps(CHAT) + "\n").encode("utf-16"))
    message = _error(path)
    assert message.startswith(f"{path}:1: not UTF-8") and "re-encode the file as UTF-8" in message


@pytest.mark.bad_input("data", "CRLF (Windows) line ends", "(no error: read like LF; line numbers unchanged)")
def test_crlf_line_ends_read_like_lf(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes((json.dumps(CHAT) + "\r\n").encode() * 3)
    records, dropped = load_rows(str(path), "sft")
    assert [r.line for r in records] == [1, 2, 3] and dropped == []
    assert records[0].row["messages"][1]["content"] == "On its way."


@pytest.mark.bad_input(
    "data",
    "OpenAI content-part lists ([{type: text, text: ...}]) in every row",
    "ftflow: error: <file>:1: no row could be read as the detected openai format (1 rows dropped); "
    "first problem: messages[0].content is a list, expected a string",
)
def test_openai_content_part_lists_are_named(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "yo"},
        ]
    }
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert "messages[0].content is a list, expected a string" in _error(path)


@pytest.mark.bad_input(
    "data",
    "tool-call messages (assistant tool_calls with null content, role 'tool')",
    "ftflow: error: <file>:1: no row could be read as the detected openai format (1 rows dropped); "
    "first problem: messages[1].content is null, expected a string",
)
def test_tool_call_messages_are_named(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Osaka?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert "messages[1].content is null, expected a string" in _error(path)


@pytest.mark.bad_input(
    "data",
    "a binary file under a .jsonl name",
    "ftflow: error: <file>:1: not valid JSON: Expecting value (column 1) (is this really a JSON Lines file?)",
)
def test_binary_file_is_not_taken_for_json_lines(tmp_path):
    path = tmp_path / "blob.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    message = _error(path)
    assert message.startswith(f"{path}:1:") and "is this really a JSON Lines file?" in message
