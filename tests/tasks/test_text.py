"""The one text normalizer: NFKC and whitespace always, case folding only when the caller asks."""

from __future__ import annotations

import pytest

from ftflow.tasks.text import normalize_text


def test_normalize_text():
    assert normalize_text("  Ｈｅｌｌｏ\u3000 WORLD\n\tＳtraße ", casefold=True) == "hello world strasse"
    assert normalize_text("ｶﾀｶﾅ　です", casefold=True) == "カタカナ です"


def test_without_casefold_case_is_kept_but_width_and_spacing_are_not():
    assert normalize_text("  Ｔｏｋｙｏ\u3000\n CITY ", casefold=False) == "Tokyo CITY"
    assert normalize_text("Tokyo", casefold=False) != normalize_text("tokyo", casefold=False)


def test_casefold_must_be_chosen():
    with pytest.raises(TypeError):
        normalize_text("Tokyo")  # type: ignore[call-arg]
