"""The one text normalizer, shared by data checks and metric scoring (stdlib only, so metrics can load it)."""

from __future__ import annotations

import unicodedata


def normalize_text(text: str, *, casefold: bool) -> str:
    """NFKC (full-width and half-width forms compare equal), whitespace runs collapsed, ends stripped.

    `casefold` has no default because the callers disagree for good reasons: duplicate detection
    wants "Hello" and "HELLO" to be one text, while exact-match scoring must tell them apart.
    """
    text = unicodedata.normalize("NFKC", text)
    if casefold:
        text = text.casefold()
    return " ".join(text.split())
