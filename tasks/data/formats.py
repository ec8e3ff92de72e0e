"""Read training data files and normalise rows of common public formats to the canonical rows.

Sources: JSON Lines (.jsonl/.ndjson), JSON (.json: a list of objects, or {"data"|"rows"|"train": [...]}),
Parquet, CSV (list-valued columns may hold JSON strings) and a directory written by `datasets`'
`save_to_disk` (a DatasetDict gives its "train" split, or its only split).

Formats (`DataFormat`), detected from the keys of the first rows unless named:
  openai             {"messages": [{"role", "content"}]}
  alpaca             {"instruction", "input", "output"}
  sharegpt           {"conversations": [{"from", "value"}]}
  prompt_completion  {"prompt", "completion"} as strings or as message lists (TRL conversational)
  preference         {"prompt", "chosen", "rejected"} as strings or message lists (TRL), or the
                     implicit-prompt form {"chosen": [...], "rejected": [...]}
  hh                 Anthropic HH: {"chosen", "rejected"} transcripts of "\\n\\nHuman: ..\\n\\nAssistant: .." turns

Problems with the file as a whole are fatal (`DataError` naming file and line). Problems with one
row drop that row into the returned `Dropped` list (with the reason and where), so it can be written
to the quarantine file and nothing is lost silently.

`line` is the 1-based line for JSONL and CSV files, and the 1-based row number for JSON, Parquet and
saved datasets, whose rows have no line of their own.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from ftflow.configs.schema import DataFormat
from ftflow.tasks.errors import DataError
from ftflow.tasks.data.rows import Dropped, Kind, Record

try:  # orjson parses several times faster; the stdlib is the fallback and the source of error messages
    import orjson
except ImportError:  # pragma: no cover - orjson comes with prefect
    orjson = None  # type: ignore[assignment]

__all__ = [
    "RowError",
    "load_rows",
    "detect_format",
    "normalize_row",
    "write_jsonl",
    "write_quarantine",
]

SFT_FORMATS = (DataFormat.openai, DataFormat.alpaca, DataFormat.sharegpt, DataFormat.prompt_completion)
PAIR_FORMATS = (DataFormat.preference, DataFormat.hh)
FORMAT_KEYS = {
    DataFormat.openai: "messages",
    DataFormat.alpaca: "instruction/input/output",
    DataFormat.sharegpt: "conversations",
    DataFormat.prompt_completion: "prompt/completion",
    DataFormat.preference: "prompt/chosen/rejected",
    DataFormat.hh: "chosen/rejected Human/Assistant transcripts",
}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant"}
DETECT_ROWS = 20          # rows looked at when detecting the format
DROPPED_ROW_CHARS = 200   # how much of an oversized row the quarantine keeps
LIST_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
JSON_CONTAINER_KEYS = ("data", "rows", "train")


class RowError(ValueError):
    """One row cannot be normalised; `reason` is a short snake_case code, `detail` says what and where in the row."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


# --------------------------------------------------------------------------------------------- API


def load_rows(
    path: Union[str, Path],
    kind: Kind,
    fmt: Union[DataFormat, str] = "auto",
    max_row_bytes: int = 1_000_000,
) -> tuple[list[Record], list[Dropped]]:
    """Read `path` and return (canonical records, dropped rows).

    kind="sft" gives {"messages": [...]} rows; a preference file read as SFT becomes prompt + chosen.
    kind="preference" gives {"prompt": [...], "chosen": str, "rejected": str} pairs and only accepts
    the preference and hh formats.
    Raises DataError for whole-file problems, and when no row at all could be read.
    """
    if kind not in ("sft", "preference"):
        raise DataError(f"kind must be 'sft' or 'preference', got {kind!r}", str(path))
    source = str(path)
    p = Path(path)
    wanted = _as_format(fmt, source)
    if wanted is not DataFormat.auto:
        try:
            _check_kind(wanted, kind)
        except DataError as e:
            raise DataError(str(e), source) from None

    items = _iter_source(p, source, max_row_bytes)
    head: list[Union[tuple[int, Any], Dropped]] = []
    dict_rows = 0
    for item in items:
        head.append(item)
        if isinstance(item, tuple) and isinstance(item[1], dict):
            dict_rows += 1
            if dict_rows >= DETECT_ROWS:
                break
    if not head:
        raise DataError("empty file: no rows found", source)

    resolved = wanted if wanted is not DataFormat.auto else _detect_from_head(head, kind, source)

    records: list[Record] = []
    dropped: list[Dropped] = []
    first_problem: Optional[tuple[int, str]] = None
    for item in chain(head, items):
        if isinstance(item, Dropped):
            dropped.append(item)
            first_problem = first_problem or (item.line, _bare_detail(item))
            continue
        line, raw = item
        try:
            if not isinstance(raw, dict):
                raise RowError("schema", f"row is {_type_name(raw)}, expected a JSON object")
            records.append(Record(_normalize(raw, resolved, kind), source, line))
        except RowError as e:
            dropped.append(Dropped(source, line, e.reason, f"{source}:{line}: {e.detail}", raw))
            first_problem = first_problem or (line, e.detail)

    if not records:
        assert first_problem is not None  # head was not empty, so something was dropped
        line, detail = first_problem
        how = "named" if wanted is not DataFormat.auto else "detected"
        hint = ""
        if wanted is not DataFormat.auto:
            guess = _guess(head, kind)
            hint = f"; the rows look like the {guess.value} format" if guess and guess is not wanted else ""
        raise DataError(
            f"no row could be read as the {how} {resolved.value} format ({len(dropped)} rows dropped); "
            f"first problem: {detail}{hint}",
            source,
            line,
        )
    return records, dropped


def detect_format(row: dict, kind: Kind) -> DataFormat:
    """The format of one raw row, from its keys. Raises DataError (no path) for an unknown shape or
    for an SFT-only format when preference pairs are wanted."""
    if not isinstance(row, dict):
        raise DataError(f"row is {_type_name(row)}, expected a JSON object; {_expected(kind)}")
    found: Optional[DataFormat] = None
    has_pair = "chosen" in row and "rejected" in row
    if kind == "preference" and has_pair:
        found = _pair_format(row)
    elif "messages" in row:
        found = DataFormat.openai
    elif "conversations" in row:
        found = DataFormat.sharegpt
    elif has_pair:
        found = _pair_format(row)
    elif "instruction" in row and "output" in row:
        found = DataFormat.alpaca
    elif "prompt" in row and "completion" in row:
        found = DataFormat.prompt_completion
    if found is None:
        raise DataError(f"unknown row shape with keys {_keys(row)}; {_expected(kind)}")
    _check_kind(found, kind)
    return found


def normalize_row(raw: dict, fmt: Union[DataFormat, str], kind: Kind) -> dict:
    """One raw row in format `fmt` as a canonical row of `kind`. Raises RowError for row-level problems.

    A preference row (preference or hh format) with kind="sft" becomes the SFT conversation
    prompt + [assistant: chosen]; the rejected answer is not used.
    """
    try:
        fmt = _as_format(fmt, None)
        if fmt is DataFormat.auto:
            fmt = detect_format(raw, kind)
        _check_kind(fmt, kind)
    except DataError as e:
        raise RowError("schema", str(e)) from None
    if not isinstance(raw, dict):
        raise RowError("schema", f"row is {_type_name(raw)}, expected a JSON object")
    return _normalize(raw, fmt, kind)


def write_jsonl(rows: Iterable[Any], path: Union[str, Path]) -> int:
    """Write rows as UTF-8 JSON Lines (non-ASCII kept as is); returns the number of rows written."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("wb") as f:
        for row in rows:
            f.write(_dumps(row))
            f.write(b"\n")
            n += 1
    return n


def write_quarantine(dropped: list[Dropped], path: Union[str, Path]) -> int:
    """The dropped rows, one `Dropped.as_dict()` per line, so each can be traced to its file and line."""
    return write_jsonl((d.as_dict() for d in dropped), path)


# ------------------------------------------------------------------------------------ formats


def _normalize(raw: dict, fmt: DataFormat, kind: Kind) -> dict:
    if fmt in PAIR_FORMATS:
        prompt, chosen, rejected = _hh_pair(raw) if fmt is DataFormat.hh else _preference_pair(raw)
        if not prompt:
            raise RowError("schema", "prompt has no turns, expected turns ending with a user turn")
        if prompt[-1]["role"] != "user":
            raise RowError("schema", f"prompt ends with a {prompt[-1]['role']} turn, expected it to end with a user turn")
        if kind == "preference":
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {"messages": [*prompt, {"role": "assistant", "content": chosen}]}

    if fmt is DataFormat.openai:
        messages = _messages(_get(raw, "messages"), "messages", ("role",), ("content",))
        where = "messages"
    elif fmt is DataFormat.sharegpt:
        messages = _with_system(raw, _messages(_get(raw, "conversations"), "conversations", ("from", "role"), ("value", "content")))
        where = "conversations"
    elif fmt is DataFormat.alpaca:
        messages = _with_system(raw, _alpaca(raw))
        where = "row"
    elif fmt is DataFormat.prompt_completion:
        prompt = _prompt(_get(raw, "prompt"), "prompt")
        completion = _get(raw, "completion")
        if isinstance(completion, str):
            answer = [{"role": "assistant", "content": completion}]
        else:
            answer = _messages(completion, "completion", ("role",), ("content",))
        messages = _with_system(raw, [*prompt, *answer])
        where = "prompt + completion"
    else:  # pragma: no cover - every DataFormat is handled above
        raise RowError("schema", f"unsupported format {fmt.value}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("schema", f"{where} has no assistant turn, so there is nothing to learn from")
    return {"messages": messages}


def _alpaca(raw: dict) -> list[dict[str, str]]:
    instruction = _string(_get(raw, "instruction"), "instruction")
    extra = raw.get("input")
    if extra is not None:
        extra = _string(extra, "input")
    output = _string(_get(raw, "output"), "output")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _preference_pair(raw: dict) -> tuple[list[dict[str, str]], str, str]:
    prompt = _prompt(raw["prompt"], "prompt") if raw.get("prompt") is not None else None
    chosen_prefix, chosen = _answer(_get(raw, "chosen"), "chosen")
    rejected_prefix, rejected = _answer(_get(raw, "rejected"), "rejected")
    if prompt is None:
        # TRL's implicit-prompt form: chosen and rejected are whole conversations sharing the prompt
        if "prompt" in raw and not chosen_prefix:
            raise RowError("schema", "prompt is null, expected a string or a list of messages")
        if not chosen_prefix:
            raise RowError("schema", f"missing key 'prompt' (keys found: {_keys(raw)})")
        if chosen_prefix != rejected_prefix:
            raise RowError("schema", "chosen and rejected conversations do not share the same prompt turns")
        return chosen_prefix, chosen, rejected
    for name, prefix in (("chosen", chosen_prefix), ("rejected", rejected_prefix)):
        # UltraFeedback-style rows repeat the prompt inside chosen/rejected; anything else is ambiguous
        if prefix and prefix != prompt:
            raise RowError("schema", f"{name} holds turns before its answer that differ from prompt")
    return prompt, chosen, rejected


def _answer(value: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A chosen/rejected answer: a string, or messages whose last one is the assistant answer."""
    if isinstance(value, str):
        return [], value
    if not isinstance(value, list):
        raise RowError("schema", f"{where} is {_type_name(value)}, expected a string or a list of messages")
    messages = _messages(value, where, ("role",), ("content",))
    if messages[-1]["role"] != "assistant":
        raise RowError("schema", f"{where}[{len(messages) - 1}] is a {messages[-1]['role']} message, expected the assistant answer last")
    return messages[:-1], messages[-1]["content"]


def _hh_pair(raw: dict) -> tuple[list[dict[str, str]], str, str]:
    chosen = _hh_turns(_get(raw, "chosen"), "chosen")
    rejected = _hh_turns(_get(raw, "rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError("schema", f"{name} ends with a Human turn, expected a final Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("schema", "chosen and rejected transcripts differ before their final Assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _hh_turns(value: Any, where: str) -> list[dict[str, str]]:
    text = _string(value, where)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise RowError("schema", f"{where} holds no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError("schema", f"{where} has text before its first Human/Assistant turn: {_short(parts[0])}")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


# ------------------------------------------------------------------------------------ row parts


def _messages(value: Any, where: str, role_keys: tuple[str, ...], content_keys: tuple[str, ...]) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError("schema", f"{where} is {_type_name(value)}, expected a list of messages")
    if not value:
        raise RowError("schema", f"{where} is an empty list, expected messages")
    out = []
    for i, m in enumerate(value):
        # fast path for well-formed messages; the slow path finds alternative keys or says what is wrong
        if isinstance(m, dict):
            role, content = m.get(role_keys[0]), m.get(content_keys[0])
            if isinstance(role, str) and isinstance(content, str):
                canonical = ROLES.get(role) or ROLES.get(role.strip().lower())
                if canonical is not None:
                    out.append({"role": canonical, "content": content})
                    continue
        out.append(_message(m, f"{where}[{i}]", role_keys, content_keys))
    return out


def _message(m: Any, at: str, role_keys: tuple[str, ...], content_keys: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(m, dict):
        raise RowError("schema", f"{at} is {_type_name(m)}, expected an object with {role_keys[0]!r} and {content_keys[0]!r}")
    role_key = next((k for k in role_keys if k in m), role_keys[0])
    content_key = next((k for k in content_keys if k in m), content_keys[0])
    if role_key not in m:
        raise RowError("schema", f"{at} has no {role_key!r} (keys found: {_keys(m)})")
    role = m[role_key]
    if not isinstance(role, str):
        raise RowError("schema", f"{at}.{role_key} is {_type_name(role)}, expected a string")
    canonical = ROLES.get(role.strip().lower())
    if canonical is None:
        raise RowError(
            "unknown_role",
            f"{at}.{role_key} is {_short(role)}, expected one of system, user, assistant (or human, gpt, bot)",
        )
    if content_key not in m:
        raise RowError("schema", f"{at} has no {content_key!r} (keys found: {_keys(m)})")
    return {"role": canonical, "content": _string(m[content_key], f"{at}.{content_key}")}


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _messages(value, where, ("role",), ("content",))
    raise RowError("schema", f"{where} is {_type_name(value)}, expected a string or a list of messages")


def _with_system(raw: dict, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Some ShareGPT/alpaca exports keep the system prompt in a top-level "system" key."""
    system = raw.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    system = _string(system, "system")
    return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def _get(raw: dict, key: str) -> Any:
    if key not in raw:
        raise RowError("schema", f"missing key {key!r} (keys found: {_keys(raw)})")
    return raw[key]


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError("schema", f"{where} is {_type_name(value)}, expected a string")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _keys(row: dict, limit: int = 12) -> str:
    keys = [_short(k, 40) if isinstance(k, str) else repr(k) for k in list(row)[:limit]]
    more = f", ... ({len(row) - limit} more)" if len(row) > limit else ""
    return (", ".join(keys) + more) if keys else "none"


def _short(text: str, limit: int = 60) -> str:
    # repr() escapes newlines and control characters, which keeps every message on one line
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ------------------------------------------------------------------------------------ detection


def _as_format(fmt: Union[DataFormat, str], source: Optional[str]) -> DataFormat:
    try:
        return DataFormat(fmt)
    except ValueError:
        names = ", ".join(f.value for f in DataFormat)
        raise DataError(f"unknown format {fmt!r}; expected one of {names}", source) from None


def _check_kind(fmt: DataFormat, kind: Kind) -> None:
    if kind == "preference" and fmt in SFT_FORMATS:
        raise DataError(
            f"rows in the {fmt.value} format ({FORMAT_KEYS[fmt]}) are SFT conversations, not preference pairs; "
            f"{_expected(kind)}"
        )


def _expected(kind: Kind) -> str:
    formats = PAIR_FORMATS if kind == "preference" else (*SFT_FORMATS, *PAIR_FORMATS)
    return "expected one of: " + ", ".join(f"{f.value} ({FORMAT_KEYS[f]})" for f in formats)


def _pair_format(row: dict) -> DataFormat:
    if "prompt" in row or not isinstance(row.get("chosen"), str):
        return DataFormat.preference
    return DataFormat.hh


def _detect_from_head(head: list, kind: Kind, source: str) -> DataFormat:
    """Majority format over the first rows, so one odd row does not decide for the file."""
    votes: Counter[DataFormat] = Counter()
    first_error: Optional[tuple[int, str]] = None
    for item in head:
        if isinstance(item, Dropped):
            continue
        line, raw = item
        try:
            votes[detect_format(raw, kind)] += 1
        except DataError as e:
            first_error = first_error or (line, str(e))
    if votes:
        return votes.most_common(1)[0][0]
    if first_error is None:  # every row in the head was too large to look at
        first = head[0]
        raise DataError(f"could not detect the format: {_bare_detail(first)}", source, first.line)
    line, message = first_error
    raise DataError(f"could not detect the format: {message}", source, line)


def _bare_detail(dropped: Dropped) -> str:
    """A Dropped detail without its "path:line: " prefix, for messages that already carry it."""
    prefix = f"{dropped.source}:{dropped.line}: "
    return dropped.detail[len(prefix):] if dropped.detail.startswith(prefix) else dropped.detail


def _guess(head: list, kind: Kind) -> Optional[DataFormat]:
    for item in head:
        if isinstance(item, tuple):
            try:
                return detect_format(item[1], kind)
            except DataError:
                return None
    return None


# ------------------------------------------------------------------------------------ sources


def _iter_source(p: Path, source: str, max_row_bytes: int) -> Iterator[Union[tuple[int, Any], Dropped]]:
    if p.is_dir():
        return _iter_rows(_hf_rows(p, source), source, max_row_bytes, decode_lists=True)
    if not p.exists():
        raise DataError("file not found", source)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(p, source, max_row_bytes)
    if suffix == ".json":
        rows = _json_rows(p, source)
        if rows is None:  # a JSON Lines file saved under a .json name
            return _iter_jsonl(p, source, max_row_bytes)
        return _iter_rows(enumerate(rows, 1), source, max_row_bytes, decode_lists=False)
    if suffix == ".parquet":
        return _iter_rows(_parquet_rows(p, source), source, max_row_bytes, decode_lists=True)
    if suffix == ".csv":
        return _iter_rows(_csv_rows(p, source), source, max_row_bytes, decode_lists=True)
    raise DataError(
        f"unsupported file type {suffix or '(no suffix)'!r}; expected .jsonl, .json, .parquet, .csv "
        "or a directory written by datasets' save_to_disk",
        source,
    )


def _iter_jsonl(p: Path, source: str, max_row_bytes: int) -> Iterator[Union[tuple[int, Any], Dropped]]:
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = _strip_bom(raw)
            if len(raw) > max_row_bytes:
                text = _decode(raw, source, line_no)
                yield Dropped(
                    source, line_no, "row_too_large",
                    f"{source}:{line_no}: row is {len(raw)} bytes, more than max_row_bytes={max_row_bytes}",
                    text[:DROPPED_ROW_CHARS],
                )
                continue
            if not raw.strip():
                continue
            yield line_no, _parse_line(raw, source, line_no)


def _parse_line(raw: bytes, source: str, line_no: int) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # decide below, with the stdlib's messages and its wider tolerance (NaN, lone surrogates)
    text = _decode(raw, source, line_no)
    try:
        return _clean_surrogates(json.loads(text))
    except json.JSONDecodeError as e:
        truncated = " (the file ends mid-row: truncated last line)" if not raw.endswith(b"\n") else ""
        hint = " (is this really a JSON Lines file?)" if line_no == 1 and not truncated else ""
        raise DataError(f"not valid JSON{truncated}: {e.msg} (column {e.colno}){hint}", source, line_no) from None
    except RecursionError:
        raise DataError("not valid JSON: nested too deeply", source, line_no) from None


def _decode(raw: bytes, source: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8", "replace")) + 1
        raise DataError(
            f"not UTF-8: byte 0x{raw[e.start]:02x} at column {column} cannot be decoded; re-encode the file as UTF-8",
            source,
            line_no,
        ) from None


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _decode_file(data: bytes, source: str) -> str:
    """The whole file as text; on a bad byte, the error names its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        _decode(data[line_start : len(data) if line_end < 0 else line_end], source, line_no)
        raise  # pragma: no cover - _decode raised for that line


def _clean_surrogates(value: Any) -> Any:
    """The stdlib accepts lone surrogate escapes ("\\ud800"); they cannot be written as UTF-8, so replace them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_clean_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_clean_surrogates(k): _clean_surrogates(v) for k, v in value.items()}
    return value


def _json_rows(p: Path, source: str) -> Optional[list]:
    data = _strip_bom(p.read_bytes())
    text = _decode_file(data, source)
    if not text.strip():
        raise DataError("empty file: no rows found", source)
    try:
        obj = _clean_surrogates(json.loads(text)) if orjson is None else orjson.loads(data)
    except (json.JSONDecodeError, RecursionError):
        try:
            obj = _clean_surrogates(json.loads(text))
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                return None
            raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", source, e.lineno) from None
        except RecursionError:
            raise DataError("not valid JSON: nested too deeply", source) from None
    if isinstance(obj, dict):
        for key in JSON_CONTAINER_KEYS:
            if isinstance(obj.get(key), list):
                return obj[key]
        raise DataError(
            f"expected a list of row objects or an object holding one under 'data', 'rows' or 'train'; "
            f"found an object with keys {_keys(obj)}",
            source,
        )
    if not isinstance(obj, list):
        raise DataError(f"expected a list of row objects, found {_type_name(obj)}", source)
    return obj


def _parquet_rows(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for unreadable files
        raise DataError(f"cannot read as Parquet: {_one_line(e)}", source) from None
    return enumerate(rows, 1)


def _hf_rows(p: Path, source: str) -> Iterator[tuple[int, Any]]:
    if not ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        raise DataError(
            "directory is not a saved Hugging Face dataset (expected dataset_dict.json or state.json from save_to_disk)",
            source,
        )
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors for broken dirs
        raise DataError(f"cannot load the saved dataset: {_one_line(e)}", source) from None
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"dataset has splits {', '.join(splits)} and no 'train' split; save the one to use alone", source)
    return enumerate(ds.to_list(), 1)


def _csv_rows(p: Path, source: str) -> Iterator[Union[tuple[int, Any], Dropped]]:
    text = _decode_file(_strip_bom(p.read_bytes()), source)
    if not text.strip():
        raise DataError("empty file: no rows found", source)
    # Long conversations exceed csv's default 128 KiB field limit; max_row_bytes is the real limit here.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        start = reader.line_num + 1
        for values in reader:
            line_no, start = start, reader.line_num + 1
            if not values:
                continue
            if len(values) != len(header):
                detail = f"row has {len(values)} fields, the header has {len(header)}"
                yield Dropped(source, line_no, "schema", f"{source}:{line_no}: {detail}", values)
                continue
            yield line_no, dict(zip(header, values))
    except csv.Error as e:
        raise DataError(f"cannot read as CSV: {_one_line(e)}", source, reader.line_num) from None


def _iter_rows(
    rows: Iterable[Union[tuple[int, Any], Dropped]], source: str, max_row_bytes: int, decode_lists: bool
) -> Iterator[Union[tuple[int, Any], Dropped]]:
    """Rows that did not come from JSON lines: check their size and decode JSON-string list columns."""
    for item in rows:
        if isinstance(item, Dropped):
            yield item
            continue
        line_no, row = item
        encoded = _dumps(row)
        if len(encoded) > max_row_bytes:
            yield Dropped(
                source, line_no, "row_too_large",
                f"{source}:{line_no}: row is {len(encoded)} bytes, more than max_row_bytes={max_row_bytes}",
                encoded.decode("utf-8", "replace")[:DROPPED_ROW_CHARS],
            )
            continue
        if decode_lists and isinstance(row, dict):
            row = _decode_list_columns(row)
        yield line_no, row


def _decode_list_columns(row: dict) -> dict:
    """CSV cells (and some Parquet exports) hold message lists as JSON text; turn those back into lists."""
    out = row
    for key in LIST_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                decoded = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
                out = dict(out) if out is row else out
                out[key] = _clean_surrogates(decoded)
    return out


def _dumps(value: Any) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            pass  # e.g. integers beyond 64 bits, lone surrogates: let the stdlib try
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = json.dumps(str(value)[:DROPPED_ROW_CHARS], ensure_ascii=False)
    # backslashreplace turns a lone surrogate into its JSON escape, so the line stays valid JSON
    return text.encode("utf-8", "backslashreplace")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
