"""Read training data files into raw rows, each with its line, or a `Dropped` when the reader refuses it.

Sources: JSON Lines (.jsonl/.ndjson), JSON (.json: a list of objects, or {"data"|"rows"|"train": [...]}),
Parquet, CSV (list-valued columns may hold JSON strings) and a directory written by `datasets`'
`save_to_disk` (a DatasetDict gives its "train" split, or its only split).

Problems with the file as a whole are fatal (`DataError` naming file and line); a row over
`max_row_bytes` is dropped, not fatal, so one huge row cannot sink a file.

`line` is the 1-based line for JSONL and CSV files, and the 1-based row number for JSON, Parquet and
saved datasets, whose rows have no line of their own.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from ftflow.tasks.data.rows import Dropped
from ftflow.tasks.errors import DataError

try:  # orjson parses several times faster; the stdlib is the fallback and the source of error messages
    import orjson
except ImportError:  # pragma: no cover - orjson comes with prefect
    orjson = None  # type: ignore[assignment]

__all__ = ["SourceItem", "iter_source", "write_jsonl", "write_quarantine", "type_name", "describe_keys", "short_repr"]

DROPPED_ROW_CHARS = 200  # how much of an oversized row the quarantine keeps
LIST_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")
JSON_CONTAINER_KEYS = ("data", "rows", "train")

# A raw row with its line, or a row the reader already dropped (too large, wrong field count).
SourceItem = Union[tuple[int, Any], Dropped]


def iter_source(path: Union[str, Path], max_row_bytes: int) -> Iterator[SourceItem]:
    """The rows of a file or saved dataset, in file order; JSON Lines are read lazily, line by line."""
    # Messages name the path as the caller spelled it, so they match what the user typed.
    p, source = Path(path), str(path)
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


def _iter_jsonl(p: Path, source: str, max_row_bytes: int) -> Iterator[SourceItem]:
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = _strip_bom(raw)
            if len(raw) > max_row_bytes:
                text = _decode(raw, source, line_no)
                yield Dropped(
                    source,
                    line_no,
                    "row_too_large",
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
            f"found an object with keys {describe_keys(obj)}",
            source,
        )
    if not isinstance(obj, list):
        raise DataError(f"expected a list of row objects, found {type_name(obj)}", source)
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
            raise DataError(
                f"dataset has splits {', '.join(splits)} and no 'train' split; save the one to use alone", source
            )
    return enumerate(ds.to_list(), 1)


def _csv_rows(p: Path, source: str) -> Iterator[SourceItem]:
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


def _iter_rows(rows: Iterable[SourceItem], source: str, max_row_bytes: int, decode_lists: bool) -> Iterator[SourceItem]:
    """Rows that did not come from JSON lines: check their size and decode JSON-string list columns."""
    for item in rows:
        if isinstance(item, Dropped):
            yield item
            continue
        line_no, row = item
        encoded = _dumps(row)
        if len(encoded) > max_row_bytes:
            yield Dropped(
                source,
                line_no,
                "row_too_large",
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


def type_name(value: Any) -> str:
    """How an error message names a parsed value's type: "null", "a number", "an object", ..."""
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


def describe_keys(row: dict, limit: int = 12) -> str:
    """The first `limit` keys of a row, quoted, for an error message."""
    keys = [short_repr(k, 40) if isinstance(k, str) else repr(k) for k in list(row)[:limit]]
    more = f", ... ({len(row) - limit} more)" if len(row) > limit else ""
    return (", ".join(keys) + more) if keys else "none"


def short_repr(text: str, limit: int = 60) -> str:
    # repr() escapes newlines and control characters, which keeps every message on one line
    return repr(text if len(text) <= limit else text[:limit] + "...")
