"""Degeneration in answers: repeated lines, text inside repeated n-grams, one unit looping back to back.

The first two follow Gopher's repetition filter (Rae et al. 2021, table A1: `dup_line_frac`, the duplicated
n-gram character fraction). datatrove ships that filter, but as a 17 MB wheel pulling huggingface-hub,
loguru, dill and multiprocess, with spaCy/SudachiPy word splitting for Japanese; these ~40 lines do the same
measures on a CJK-aware split (each CJK character is a word, since Japanese has no spaces). Gopher's
thresholds are tuned on web pages; answers are short, so the defaults are looser and a short answer has
too few lines or n-grams to judge (see MIN_*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

NGRAM = 5  # Gopher's smallest duplicated n-gram size
MAX_UNIT_WORDS = 8  # a looping unit is up to this many words ("I am sorry." is 4 with the period)
MIN_LINES = 3  # with fewer lines, one repeat is already a third of them
MIN_WORDS = 2 * NGRAM  # fewer words hold at most one pair of 5-grams

_TANDEM = re.compile(r"(.{1,%d})\1" % MAX_UNIT_WORDS, re.DOTALL)
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]|[^\W_]+|[^\w\s]", re.UNICODE)
# The same split on ASCII text once lowered, with explicit ranges instead of Unicode classes (`\s` also
# matches \x1c-\x1f, so those stay out of the punctuation set).
_ASCII_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9_\s\x1c-\x1f]")


def words(text: str) -> list[str]:
    """Words for repetition: letter/digit runs, each CJK character, each punctuation mark."""
    if text.isascii():  # 60 % of bench_validation's answers; the split takes x0.75 the time on them
        return _ASCII_WORD.findall(text.lower())
    return _WORD.findall(text.casefold())


def dup_line_frac(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (whitespace-stripped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < MIN_LINES:
        return 0.0
    seen: set[str] = set()
    dups = 0
    for line in lines:
        dups += line in seen
        seen.add(line)
    return dups / len(lines)


def dup_ngram_char_frac(tokens: list[str], n: int = NGRAM) -> float:
    """Share of word characters inside n-grams seen before (Gopher's `find_all_duplicate`: a repeat is skipped
    over whole, so overlapping repeats are not counted twice)."""
    total = sum(map(len, tokens))
    if len(tokens) < MIN_WORDS or not total:
        return 0.0
    grams = list(zip(*(tokens[k:] for k in range(n))))
    # Most answers repeat no n-gram at all; the set says so at C speed and the walk below would count 0.
    if len(set(grams)) == len(grams):
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated, i = 0, 0
    while i < len(grams):
        gram = grams[i]
        if gram in seen:
            repeated += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / total


class _WordCodes(dict):
    """One character per distinct word, kept across calls so that a known word maps at C speed.

    Threads may share it: setdefault never gives one word two codes, and two words that race for one code
    only make `_has_tandem_repeat` say yes where `longest_run`'s exact walk then finds no run."""

    def __missing__(self, word: str) -> str:
        return self.setdefault(word, chr(len(self) % 0x110000))


MAX_CODES = 500_000  # then a fresh table, so that a long run of unique words cannot grow memory without end
_codes = _WordCodes()


def _has_tandem_repeat(tokens: list[str]) -> bool:
    """Whether some unit of 1..MAX_UNIT_WORDS words may be immediately followed by a copy of itself.

    Without one, no unit has two copies in a row and `longest_run` is 1. Most answers have none, and a
    backreference regex over the words (one character per distinct word) says so at C speed, where the
    loop in `longest_run` costs 8 Python steps per word (bench/bench_validation.py)."""
    global _codes
    codes = _codes  # one table for the whole text, even if another thread replaces it meanwhile
    if len(codes) > MAX_CODES:
        codes = _codes = _WordCodes()
    return _TANDEM.search("".join(map(codes.__getitem__, tokens))) is not None


def longest_run(tokens: list[str]) -> int:
    """Most back-to-back copies of one unit of 1..MAX_UNIT_WORDS words that holds a letter or digit
    ("no no no", "thanks! thanks! thanks!"); runs of punctuation alone ("!!!", "...") do not count."""
    best = 1
    if len(set(tokens)) == len(tokens) or not _has_tandem_repeat(tokens):
        return best
    wordy = [w[0].isalnum() for w in tokens]
    for size in range(1, MAX_UNIT_WORDS + 1):
        # k copies of a `size`-word unit are (k - 1) * size positions in a row where a word equals the one `size` later
        streak = 0
        for i in range(len(tokens) - size):
            if tokens[i] != tokens[i + size]:
                streak = 0
                continue
            streak += 1
            copies = 1 + streak // size
            if copies > best:
                start = i + 1 - streak
                if any(wordy[start : start + size]):
                    best = copies
    return best


@dataclass(frozen=True)
class Repetition:
    dup_line_frac: float
    dup_ngram_char_frac: float
    longest_run: int


def measure(text: str) -> Repetition:
    tokens = words(text)
    return Repetition(dup_line_frac(text), dup_ngram_char_frac(tokens), longest_run(tokens))


def repetition_problem(
    text: str, max_dup_line_frac: float, max_dup_ngram_char_frac: float, max_repeat_run: int
) -> Optional[str]:
    """None for a healthy answer, else which measure is over its threshold and by how much."""
    m = measure(text)
    if m.dup_line_frac > max_dup_line_frac:
        return (
            f"{m.dup_line_frac:.0%} of lines repeat an earlier line (> quality.max_dup_line_frac {max_dup_line_frac})"
        )
    if m.dup_ngram_char_frac > max_dup_ngram_char_frac:
        return (
            f"{m.dup_ngram_char_frac:.0%} of characters are in repeated {NGRAM}-grams "
            f"(> quality.max_dup_ngram_char_frac {max_dup_ngram_char_frac})"
        )
    if m.longest_run > max_repeat_run:
        return f"one phrase repeats {m.longest_run} times in a row (> quality.max_repeat_run {max_repeat_run})"
    return None
