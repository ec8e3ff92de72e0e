"""Normalise rows of common public formats to the canonical rows (see rows.py); `load_rows` reads a file.

Formats (`DataFormat`), detected from the keys of the first rows unless named:
  openai             {"messages": [{"role", "content"}]}
  alpaca             {"instruction", "input", "output"}
  sharegpt           {"conversations": [{"from", "value"}]}
  prompt_completion  {"prompt", "completion"} as strings or as message lists (TRL conversational)
  preference         {"prompt", "chosen", "rejected"} as strings or message lists (TRL), or the
                     implicit-prompt form {"chosen": [...], "rejected": [...]}
  hh                 Anthropic HH: {"chosen", "rejected"} transcripts of "\\n\\nHuman: ..\\n\\nAssistant: .." turns
Any other shape: `data.mapping` (mapping.py) names the fields; an unknown shape fails with the keys found
and a mapping snippet guessed from them.

Reading the file is sources.py's job. Problems with the file as a whole are fatal (`DataError` naming
file and line). Problems with one row drop that row into the returned `Dropped` list (with the
reason and where), so it can be written to the quarantine file and nothing is lost silently.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Union

from ftflow.configs.schema import DataFormat, DataMapping
from ftflow.tasks.data.mapping import PathError, check_paths, explode, map_row, mapping_snippet, suggest_mapping
from ftflow.tasks.data.rows import Dropped, Kind, Record
from ftflow.tasks.data.sources import (
    SourceItem,
    describe_keys,
    iter_source,
    short_repr,
    type_name,
    write_jsonl,
    write_quarantine,
)
from ftflow.tasks.errors import DataError

__all__ = [
    "RowError",
    "load_rows",
    "detect_format",
    "normalize_row",
    "write_jsonl",  # re-exported: the writers moved to sources.py
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
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
}
DETECT_ROWS = 20  # rows looked at when detecting the format
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


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
    mapping: Optional[DataMapping] = None,
) -> tuple[list[Record], list[Dropped]]:
    """Read `path` and return (canonical records, dropped rows).

    kind="sft" gives {"messages": [...]} rows; a preference file read as SFT becomes prompt + chosen.
    kind="preference" gives {"prompt": [...], "chosen": str, "rejected": str} pairs and only accepts
    the preference and hh formats.
    With `mapping` (data.mapping), rows are read through its field paths instead of a format; a path that
    does not resolve in the first row fails the file, naming the path and the keys found.
    Raises DataError for whole-file problems, and when no row at all could be read.
    """
    if kind not in ("sft", "preference"):
        raise DataError(f"kind must be 'sft' or 'preference', got {kind!r}", str(path))
    source = str(path)
    wanted = _as_format(fmt, source)
    if wanted is not DataFormat.auto:
        try:
            _check_kind(wanted, kind)
        except DataError as e:
            raise DataError(str(e), source) from None

    items = iter_source(path, max_row_bytes)
    head: list[SourceItem] = []
    dict_rows = 0
    for item in items:
        head.append(item)
        if isinstance(item, tuple) and isinstance(item[1], dict):
            dict_rows += 1
            if dict_rows >= DETECT_ROWS:
                break
    if not head:
        raise DataError("empty file: no rows found", source)

    if mapping is not None:
        return _load_mapped(chain(head, items), head, kind, mapping, source)
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
                raise RowError("schema", f"row is {type_name(raw)}, expected a JSON object")
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


def _load_mapped(
    items, head: list[SourceItem], kind: Kind, mapping: DataMapping, source: str
) -> tuple[list[Record], list[Dropped]]:
    first = next((item for item in head if isinstance(item, tuple)), None)
    if first is not None:
        try:
            check_paths(first[1], mapping)
        except PathError as e:
            raise DataError(str(e), source, first[0]) from None
    records: list[Record] = []
    dropped: list[Dropped] = []
    for item in items:
        if isinstance(item, Dropped):
            dropped.append(item)
            continue
        line, raw = item
        try:
            if not isinstance(raw, dict):
                raise PathError(f"row is {type_name(raw)}, expected a JSON object")
            mapped = 0
            for instance, row in explode(raw, mapping):
                mapped += 1
                try:
                    records.append(Record(map_row(row, mapping, kind), source, line))
                except PathError as e:
                    where = f"instance {instance}: " if instance else ""
                    dropped.append(Dropped(source, line, "schema", f"{source}:{line}: {where}{e}", row))
            if not mapped:
                raise PathError(
                    f"path {mapping.explode!r} (data.mapping.explode) is an empty list: the row has no instances"
                )
        except PathError as e:
            dropped.append(Dropped(source, line, "schema", f"{source}:{line}: {e}", raw))
    if not records:
        first_problem = dropped[0].detail if dropped else "no rows"
        raise DataError(
            f"no row could be read through data.mapping ({len(dropped)} rows dropped); first problem: {first_problem}",
            source,
        )
    return records, dropped


def detect_format(row: dict, kind: Kind) -> DataFormat:
    """The format of one raw row, from its keys. Raises DataError (no path) for an unknown shape or
    for an SFT-only format when preference pairs are wanted."""
    if not isinstance(row, dict):
        raise DataError(f"row is {type_name(row)}, expected a JSON object; {_expected(kind)}")
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
        raise DataError(
            f"unknown row shape with keys {describe_keys(row)}; {_expected(kind)}; or name its fields "
            f"with data.mapping, e.g. under `data:` in the recipe (guessed from this row; check it and "
            f"fill any <...>): {mapping_snippet(suggest_mapping(row, kind))}"
        )
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
        raise RowError("schema", f"row is {type_name(raw)}, expected a JSON object")
    return _normalize(raw, fmt, kind)


# ------------------------------------------------------------------------------------ formats


def _normalize(raw: dict, fmt: DataFormat, kind: Kind) -> dict:
    if fmt in PAIR_FORMATS:
        prompt, chosen, rejected = _hh_pair(raw) if fmt is DataFormat.hh else _preference_pair(raw)
        if not prompt:
            raise RowError("schema", "prompt has no turns, expected turns ending with a user turn")
        if prompt[-1]["role"] != "user":
            raise RowError(
                "schema", f"prompt ends with a {prompt[-1]['role']} turn, expected it to end with a user turn"
            )
        if kind == "preference":
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {"messages": [*prompt, {"role": "assistant", "content": chosen}]}

    if fmt is DataFormat.openai:
        messages = _messages(_get(raw, "messages"), "messages", ("role",), ("content",))
        where = "messages"
    elif fmt is DataFormat.sharegpt:
        messages = _with_system(
            raw, _messages(_get(raw, "conversations"), "conversations", ("from", "role"), ("value", "content"))
        )
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
            raise RowError("schema", f"missing key 'prompt' (keys found: {describe_keys(raw)})")
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
        raise RowError("schema", f"{where} is {type_name(value)}, expected a string or a list of messages")
    messages = _messages(value, where, ("role",), ("content",))
    if messages[-1]["role"] != "assistant":
        raise RowError(
            "schema",
            f"{where}[{len(messages) - 1}] is a {messages[-1]['role']} message, expected the assistant answer last",
        )
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
        raise RowError("schema", f"{where} has text before its first Human/Assistant turn: {short_repr(parts[0])}")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


# ------------------------------------------------------------------------------------ row parts


def _messages(
    value: Any, where: str, role_keys: tuple[str, ...], content_keys: tuple[str, ...]
) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError("schema", f"{where} is {type_name(value)}, expected a list of messages")
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
        raise RowError(
            "schema", f"{at} is {type_name(m)}, expected an object with {role_keys[0]!r} and {content_keys[0]!r}"
        )
    role_key = next((k for k in role_keys if k in m), role_keys[0])
    content_key = next((k for k in content_keys if k in m), content_keys[0])
    if role_key not in m:
        raise RowError("schema", f"{at} has no {role_key!r} (keys found: {describe_keys(m)})")
    role = m[role_key]
    if not isinstance(role, str):
        raise RowError("schema", f"{at}.{role_key} is {type_name(role)}, expected a string")
    canonical = ROLES.get(role.strip().lower())
    if canonical is None:
        raise RowError(
            "unknown_role",
            f"{at}.{role_key} is {short_repr(role)}, expected one of system, user, assistant (or human, gpt, bot)",
        )
    if content_key not in m:
        raise RowError("schema", f"{at} has no {content_key!r} (keys found: {describe_keys(m)})")
    return {"role": canonical, "content": _string(m[content_key], f"{at}.{content_key}")}


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _messages(value, where, ("role",), ("content",))
    raise RowError("schema", f"{where} is {type_name(value)}, expected a string or a list of messages")


def _with_system(raw: dict, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Some ShareGPT/alpaca exports keep the system prompt in a top-level "system" key."""
    system = raw.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    system = _string(system, "system")
    return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def _get(raw: dict, key: str) -> Any:
    if key not in raw:
        raise RowError("schema", f"missing key {key!r} (keys found: {describe_keys(raw)})")
    return raw[key]


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError("schema", f"{where} is {type_name(value)}, expected a string")
    return value


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
    return dropped.detail[len(prefix) :] if dropped.detail.startswith(prefix) else dropped.detail


def _guess(head: list, kind: Kind) -> Optional[DataFormat]:
    for item in head:
        if isinstance(item, tuple):
            try:
                return detect_format(item[1], kind)
            except DataError:
                return None
    return None
