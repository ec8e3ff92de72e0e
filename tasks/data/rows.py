"""Canonical row shapes shared by readers, quality checks, formatting and training.

SFT row:          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Preference pair:  {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}
Every loaded row keeps where it came from (`source`, 1-based `line`), so a dropped row can be traced
back to its file and line in the quarantine file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["sft", "preference"]


@dataclass
class Record:
    row: dict[str, Any]
    source: str
    line: int
    flags: list[str] = field(default_factory=list)


@dataclass
class Dropped:
    source: str
    line: int
    reason: str
    detail: str
    row: Any

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail, "row": self.row}


def record_text(row: dict[str, Any]) -> str:
    """All text of a canonical row (the rejected answer included), for the contract's text columns."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"])
    return "\n".join([*(m["content"] for m in row["prompt"]), row["chosen"], row["rejected"]])


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of an SFT row, or the prompt turns of a preference pair."""
    return row["messages"] if "messages" in row else row["prompt"]
