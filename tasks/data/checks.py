"""Row-level checks that need no other row: structure, empty turns, role order, chosen == rejected, PII.

Each structural check returns None for a good row, or a one-line detail saying what is wrong, and
sees only rows that passed the checks before it (so `role_order` may assume well-formed messages).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Optional

from ftflow.tasks.data.rows import Kind, conversation
from ftflow.tasks.text import normalize_text

Check = Callable[[Any, Kind], Optional[str]]

_EMAIL = re.compile(r"[a-z0-9][a-z0-9._%+\-]*@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}", re.IGNORECASE)
_DASH = r"[\-‐‑‒–—−]"
_PHONES = (
    # Japanese landline / mobile / free dial: 03-1234-5678, 090-1234-5678, 0120-123-456, (03)1234-5678
    re.compile(rf"(?<![\d\-])\(?0\d{{1,4}}\)?(?:{_DASH}|\)|\s)\d{{1,4}}{_DASH}\d{{3,4}}(?![\d\-])"),
    # Japanese mobile without separators: 09012345678
    re.compile(r"(?<!\d)0[5789]0\d{8}(?!\d)"),
    # International: +81 90-1234-5678, +1 (415) 555-0100, +44 20 7946 0958
    re.compile(rf"(?<![\w+])\+\d{{1,3}}(?:[\s.]|{_DASH})?\(?\d{{1,4}}\)?(?:(?:[\s.]|{_DASH})?\d{{2,4}}){{2,4}}(?!\d)"),
    # North American: (415) 555-0100, 415-555-0100, 415.555.0100
    re.compile(r"(?<![\d\-])(?:\(\d{3}\)\s?|\d{3}[.\-])\d{3}[.\-]\d{4}(?![\d\-])"),
)
_DIGIT = re.compile(r"\d")
_CARD = re.compile(r"(?<!\d)(?:\d[ \-]?){12,18}\d(?!\d)")


def luhn_valid(digits: str) -> bool:
    """Luhn checksum of a digit string (the check every payment card number passes)."""
    if not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if position % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def pii_kinds(text: str) -> list[str]:
    """Kinds of personal data found in `text`: "email", "phone", "card" (Luhn-checked 13-19 digits)."""
    text = unicodedata.normalize("NFKC", text)  # full-width digits and ＠ become ASCII
    found = []
    if "@" in text and _EMAIL.search(text):
        found.append("email")
    if not _DIGIT.search(text):
        return found
    cards = [m for m in _CARD.finditer(text) if luhn_valid(re.sub(r"[ \-]", "", m.group()))]
    if cards:
        found.append("card")
    for pattern in _PHONES:
        # A card number's digit groups must not also count as a phone number.
        if any(not any(c.start() <= m.start() < c.end() for c in cards) for m in pattern.finditer(text)):
            found.append("phone")
            break
    return found


def _malformed(row: Any, kind: Kind) -> Optional[str]:
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    key = "messages" if kind == "sft" else "prompt"
    msgs = row.get(key)
    if not isinstance(msgs, list):
        return f"missing {key!r} list"
    for j, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} lacks a string 'role' and 'content'"
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                return f"missing string {key!r}"
    return None


def _empty_content(row: dict[str, Any], kind: Kind) -> Optional[str]:
    msgs = conversation(row)
    if not msgs:
        return "no messages" if kind == "sft" else "empty prompt"
    for j, m in enumerate(msgs, 1):
        content = m["content"]
        if not content or content.isspace():
            return f"message {j} ({m['role']}) is empty"
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if not row[key] or row[key].isspace():
                return f"{key} is empty"
    return None


def _role_order(row: dict[str, Any], kind: Kind) -> Optional[str]:
    roles = [m["role"] for m in conversation(row)]
    start = 1 if roles[0] == "system" else 0
    expected = "user"
    for j in range(start, len(roles)):
        if roles[j] != expected:
            return f"message {j + 1}: expected {expected!r}, got {roles[j]!r}"
        expected = "assistant" if expected == "user" else "user"
    if kind == "sft" and roles[-1] != "assistant":
        return "conversation must end with an assistant turn"
    if kind == "preference" and roles[-1] != "user":
        return "prompt must end with a user turn"
    return None


def _chosen_equals_rejected(row: dict[str, Any], kind: Kind) -> Optional[str]:
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical"
    if normalize_text(row["chosen"], casefold=True) == normalize_text(row["rejected"], casefold=True):
        return "chosen and rejected are identical after normalization"
    return None


def structural_checks(kind: Kind) -> list[tuple[str, Check]]:
    """(reason, check) in the order they run; the cheap shape checks first, so later ones can trust the shape."""
    checks: list[tuple[str, Check]] = [
        ("malformed", _malformed),
        ("empty_content", _empty_content),
        ("role_order", _role_order),
    ]
    if kind == "preference":
        checks.append(("chosen_equals_rejected", _chosen_equals_rejected))
    return checks
