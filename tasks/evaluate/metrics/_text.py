"""Text helpers shared by the metric modules.

The metric modules import this file relatively (`from ._text import ...`): `evaluate.load` copies a
local metric script into its modules cache and copies relative imports beside it, so the helpers
travel with the script. The text normalizer is not here: it is `ftflow.tasks.text.normalize_text`,
shared with the data checks, and json_match imports it absolutely (evaluate only checks that an
absolute import is installed, and ftflow is wherever its metrics run).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

EosMarker = Optional[Union[str, Sequence[str]]]

# Scripts written without spaces between words: scored one character per token. Covers kana, CJK
# ideographs (with extension A and compatibility forms), the iteration mark 々 and Hangul syllables.
CJK_CHARS = "\u3005\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CJK_RE = re.compile(f"[{CJK_CHARS}]")


def eos_markers(eos_token: EosMarker) -> list[str]:
    """One or several end-of-turn markers (a model may stop on `<|im_end|>` or `<|endoftext|>`)."""
    if eos_token is None:
        return []
    if isinstance(eos_token, str):
        return [eos_token] if eos_token else []
    return [m for m in eos_token if m]


def has_eos(text: str, eos_token: EosMarker) -> bool:
    return any(m in text for m in eos_markers(eos_token))


def cut_at_eos(text: str, eos_token: EosMarker) -> str:
    """The answer the model gave: everything before the first end-of-turn marker.

    Generations decoded with special tokens kept carry the marker and, in a batch, padding after it;
    neither is part of the answer.
    """
    cut = len(text)
    for marker in eos_markers(eos_token):
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def has_cjk(text: str) -> bool:
    return CJK_RE.search(text) is not None
