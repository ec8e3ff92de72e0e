"""Declarative mapping (`data.mapping`) for row shapes no built-in format reads, and a suggested mapping
for an unknown shape.

Paths are dotted keys with list indexes (`meta.system`, `turns[0].text`, `dialog.messages`). With
`explode`, each object of that list becomes one row: its keys are laid over the row's (the list itself
removed), so `{"instruction": i, "instances": [{"input": x, "output": y}, ...]}` gives one row per
instance, each with the shared instruction, and `input`/`response` name the instance's keys directly.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional

from ftflow.configs.schema import DataMapping
from ftflow.tasks.data.sources import describe_keys, type_name

FIELDS = ("system", "prompt", "input", "response", "chosen", "rejected", "messages")
OPTIONAL_FIELDS = ("system", "input")  # a row without them just has none
ROLE_KEYS = ("role", "from", "speaker", "author")
CONTENT_KEYS = ("content", "value", "text", "message")
KNOWN_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class PathError(ValueError):
    """A mapped path does not resolve in a row; the message names the path and the keys found where it stopped."""


def split_path(path: str) -> list[Any]:
    """'a.b[0].c' → ['a', 'b', 0, 'c']; a bare number between dots indexes a list too ('a.0.c')."""
    parts: list[Any] = []
    pos = 0
    for match in _SEGMENT.finditer(path):
        gap = path[pos : match.start()]
        if gap not in ("", "."):
            raise PathError(f"path {path!r} is not dotted keys with [n] indexes")
        key, index = match.groups()
        parts.append(int(index) if index is not None else key)
        pos = match.end()
    if not parts or path[pos:]:
        raise PathError(f"path {path!r} is not dotted keys with [n] indexes")
    return parts


def resolve(row: Any, path: str) -> Any:
    node, walked = row, ""
    for part in split_path(path):
        here = walked or "the row"
        if isinstance(node, dict):
            if part not in node and str(part) not in node:
                raise PathError(f"path {path!r}: no key {str(part)!r} in {here} (keys found: {describe_keys(node)})")
            node = node[part] if part in node else node[str(part)]
        elif isinstance(node, list):
            index = part if isinstance(part, int) else int(part) if str(part).isdigit() else None
            if index is None:
                raise PathError(f"path {path!r}: {here} is a list, so {part!r} must be an index")
            if index >= len(node):
                raise PathError(f"path {path!r}: {here} has {len(node)} item(s), no index {index}")
            node = node[index]
        else:
            raise PathError(f"path {path!r}: {here} is {type_name(node)}, so it has no {part!r}")
        walked = f"{walked}[{part}]" if isinstance(part, int) else (f"{walked}.{part}" if walked else str(part))
    return node


def explode(row: dict, mapping: DataMapping) -> Iterator[tuple[Optional[int], dict]]:
    """(instance number from 1, or None without explode; the row to map)."""
    if not mapping.explode:
        yield None, row
        return
    instances = resolve(row, mapping.explode)
    if not isinstance(instances, list):
        raise PathError(
            f"path {mapping.explode!r} (data.mapping.explode) is {type_name(instances)}, expected a list of objects"
        )
    top = split_path(mapping.explode)[0]
    shared = {k: v for k, v in row.items() if k != top}
    for n, instance in enumerate(instances, 1):
        if not isinstance(instance, dict):
            raise PathError(f"path {mapping.explode!r}[{n - 1}] is {type_name(instance)}, expected an object")
        yield n, {**shared, **instance}


def check_paths(row: Any, mapping: DataMapping) -> None:
    """Fail on the first row, once, for a path that is wrong for the whole file (a typo, a wrong level)."""
    if not isinstance(row, dict):
        raise PathError(f"the first row is {type_name(row)}, expected an object")
    try:
        first = next(explode(row, mapping), None)
    except PathError as e:
        raise PathError(f"data.mapping.explode: {e}") from None
    if first is None:
        return  # an empty instance list: no mapped row to check here
    for name in FIELDS:
        path = getattr(mapping, name)
        if path:
            try:
                resolve(first[1], path)
            except PathError as e:
                raise PathError(f"data.mapping.{name}: {e}") from None


def role_of(raw_role: Any, mapping: DataMapping, at: str) -> str:
    if not isinstance(raw_role, str):
        raise PathError(f"{at} is {type_name(raw_role)}, expected a role name")
    role = mapping.roles.get(raw_role) or KNOWN_ROLES.get(raw_role.strip().lower())
    if role is None:
        raise PathError(
            f"{at} is {raw_role!r}, an unknown role; map it in data.mapping.roles (e.g. {{{raw_role}: assistant}})"
        )
    return role


def message_list(value: Any, path: str, mapping: DataMapping) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise PathError(
            f"path {path!r} is {type_name(value) if value != [] else 'an empty list'}, expected a list of messages"
        )
    out = []
    for i, m in enumerate(value):
        at = f"{path}[{i}]"
        if not isinstance(m, dict):
            raise PathError(f"{at} is {type_name(m)}, expected a message object")
        role_key = mapping.role_key or next((k for k in ROLE_KEYS if k in m), None)
        content_key = mapping.content_key or next((k for k in CONTENT_KEYS if k in m), None)
        if role_key not in m:
            raise PathError(
                f"{at} has no role key {role_key or ' / '.join(ROLE_KEYS)!r} (keys found: {describe_keys(m)}); "
                "set data.mapping.role_key"
            )
        if content_key not in m:
            raise PathError(
                f"{at} has no text key {content_key or ' / '.join(CONTENT_KEYS)!r} (keys found: "
                f"{describe_keys(m)}); set data.mapping.content_key"
            )
        content = m[content_key]
        if not isinstance(content, str):
            raise PathError(f"{at}.{content_key} is {type_name(content)}, expected a string")
        out.append({"role": role_of(m[role_key], mapping, f"{at}.{role_key}"), "content": content})
    return out


def _text(row: dict, name: str, mapping: DataMapping) -> Optional[str]:
    path = getattr(mapping, name)
    if not path:
        return None
    try:
        value = resolve(row, path)
    except PathError:
        if name in OPTIONAL_FIELDS:
            return None
        raise
    if value is None and name in OPTIONAL_FIELDS:
        return None
    if not isinstance(value, str):
        raise PathError(f"path {path!r} (data.mapping.{name}) is {type_name(value)}, expected a string")
    return value


def _turns(row: dict, name: str, mapping: DataMapping, default_role: str) -> list[dict[str, str]]:
    path = getattr(mapping, name)
    value = resolve(row, path)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return message_list(value, path, mapping)


def map_row(row: dict, mapping: DataMapping, kind: str) -> dict:
    """One (exploded) row as a canonical SFT row or preference pair. Raises PathError for what is missing or wrong."""
    system = _text(row, "system", mapping)
    if mapping.messages:
        turns = message_list(resolve(row, mapping.messages), mapping.messages, mapping)
    else:
        turns = _turns(row, "prompt", mapping, "user")
        extra = _text(row, "input", mapping)
        if extra and extra.strip():
            last = turns[-1]
            turns[-1] = {**last, "content": f"{last['content']}\n\n{extra}"}
    if system and system.strip() and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}, *turns]
    if mapping.chosen:
        chosen, rejected = (_answer(row, name, mapping) for name in ("chosen", "rejected"))
        if kind == "preference":
            return {"prompt": turns, "chosen": chosen, "rejected": rejected}
        return {"messages": [*turns, {"role": "assistant", "content": chosen}]}
    if kind == "preference":
        raise PathError("preference pairs need data.mapping.chosen and data.mapping.rejected")
    if mapping.response:
        turns = [*turns, {"role": "assistant", "content": _answer(row, "response", mapping)}]
    if not any(t["role"] == "assistant" for t in turns):
        raise PathError(f"the mapped conversation has no assistant turn (roles: {[t['role'] for t in turns]})")
    return {"messages": turns}


def _answer(row: dict, name: str, mapping: DataMapping) -> str:
    """An answer: a string, or messages whose last one is the assistant's."""
    turns = _turns(row, name, mapping, "assistant")
    if turns[-1]["role"] != "assistant":
        raise PathError(f"path {getattr(mapping, name)!r} (data.mapping.{name}) ends with a {turns[-1]['role']} turn")
    return turns[-1]["content"]


# ------------------------------------------------------------------------------ suggestion

PROMPT_NAMES = ("instruction", "prompt", "question", "query", "problem", "input_text", "request", "human", "user")
INPUT_NAMES = ("input", "context", "passage", "document")
RESPONSE_NAMES = ("output", "response", "answer", "completion", "target", "reply", "solution", "assistant", "gpt")
CHOSEN_NAMES = ("chosen", "preferred", "better", "good", "accepted")
REJECTED_NAMES = ("rejected", "dispreferred", "worse", "bad")
SYSTEM_NAMES = ("system", "system_prompt", "persona")


def _leaves(row: dict, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    """(path, last key, value) of a row's fields, objects opened two levels deep."""
    for key, value in row.items():
        if not isinstance(key, str):
            continue
        path = f"{prefix}.{key}" if prefix else key
        yield path, key.lower(), value
        if isinstance(value, dict) and depth < 2:
            yield from _leaves(value, path, depth + 1)


def _pick(fields: list[tuple[str, str, Any]], names: tuple[str, ...], taken: set[str], want=str) -> Optional[str]:
    for name in names:
        for path, key, value in fields:
            if path not in taken and isinstance(value, want) and (key == name or key.endswith("_" + name)):
                return path
    return None


def _message_keys(value: Any) -> Optional[tuple[str, str, list[str]]]:
    """(role key, content key, role names) when `value` looks like a list of messages."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    role_key = next((k for k in ROLE_KEYS if all(k in m for m in value)), None)
    content_key = next((k for k in CONTENT_KEYS if all(k in m for m in value)), None)
    if not role_key or not content_key:
        return None
    return role_key, content_key, list(dict.fromkeys(str(m[role_key]) for m in value))


def suggest_mapping(row: Any, kind: str) -> dict[str, Any]:
    """A `data.mapping` guessed from one row's keys, placeholders in <...> where nothing fits."""
    lines: dict[str, Any] = {}
    fields = list(_leaves(row)) if isinstance(row, dict) else []
    for path, _, value in fields:
        found = _message_keys(value)
        if found:
            role_key, content_key, roles = found
            lines["messages"] = path
            if role_key != "role":
                lines["role_key"] = role_key
            if content_key != "content":
                lines["content_key"] = content_key
            unknown = [r for r in roles if r.strip().lower() not in KNOWN_ROLES]
            if unknown:
                lines["roles"] = {r: "<user|assistant>" for r in unknown}
            break
    if "messages" not in lines:
        for path, _, value in fields:
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                inner = {k.lower() for v in value for k in v if isinstance(k, str)}
                if inner & set(RESPONSE_NAMES):
                    lines["explode"] = path
                    # The instance's keys join the row's, so the field picks below see them.
                    fields += [(k, k.lower(), v) for k, v in value[0].items() if isinstance(k, str)]
                    break
        taken: set[str] = set()
        for name, names in (
            ("system", SYSTEM_NAMES),
            ("prompt", PROMPT_NAMES),
            ("input", INPUT_NAMES),
            ("chosen", CHOSEN_NAMES),
            ("rejected", REJECTED_NAMES),
            ("response", RESPONSE_NAMES),
        ):
            path = _pick(fields, names, taken)
            if path:
                lines[name] = path
                taken.add(path)
        if kind == "preference" or "chosen" in lines:
            lines.pop("response", None)
        elif "response" in lines:
            lines.pop("chosen", None)
            lines.pop("rejected", None)
        lines.setdefault("prompt", "<path to the user's question>")
        if kind == "preference":
            lines.setdefault("chosen", "<path to the preferred answer>")
            lines.setdefault("rejected", "<path to the worse answer>")
        elif "chosen" not in lines:
            lines.setdefault("response", "<path to the assistant's answer>")
    order = (
        "system",
        "prompt",
        "input",
        "response",
        "chosen",
        "rejected",
        "messages",
        "role_key",
        "content_key",
        "roles",
        "explode",
    )
    return {key: lines[key] for key in order if key in lines}


def mapping_snippet(mapping: dict[str, Any]) -> str:
    """One line of YAML (flow style, so error messages stay one line) to paste under `data:` in a recipe."""
    import yaml

    flow = yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, allow_unicode=True, width=10**9)
    return "mapping: " + flow.strip()
