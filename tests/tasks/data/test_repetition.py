"""Degenerate answers: the three measures, the thresholds, and the `repetition` reason in the quality pass."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ftflow.configs.schema import DemoDataConfig, DemoTask, QualityConfig
from ftflow.tasks.data.demo import generate_demo
from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.data.quality import run_quality
from ftflow.tasks.data.repetition import (
    dup_line_frac,
    dup_ngram_char_frac,
    longest_run,
    measure,
    repetition_problem,
    words,
)
from ftflow.tasks.data.rows import Record

DEFAULT = QualityConfig()


def problem(text: str):
    return repetition_problem(text, DEFAULT.max_dup_line_frac, DEFAULT.max_dup_ngram_char_frac, DEFAULT.max_repeat_run)


def test_words_split_latin_runs_cjk_characters_and_punctuation():
    assert words("Could you, Ann?") == ["could", "you", ",", "ann", "?"]
    assert words("要するに、佐藤さん") == ["要", "す", "る", "に", "、", "佐", "藤", "さ", "ん"]


def test_ascii_text_splits_as_the_full_pattern_does():
    from ftflow.tasks.data.repetition import _WORD

    every_ascii = "".join(map(chr, range(128)))
    for text in ("Could you, Ann?", "snake_case x\x1cy 3.14 -- MiXeD!!", every_ascii, every_ascii[::-1] * 3):
        assert words(text) == _WORD.findall(text.casefold())


def test_dup_line_frac_counts_lines_repeating_an_earlier_one():
    assert dup_line_frac("a\nb\na\na") == pytest.approx(2 / 4)
    assert dup_line_frac("a\n\n  a  \nb\nc") == pytest.approx(1 / 4)  # blank lines skipped, whitespace stripped
    assert dup_line_frac("a\na") == 0.0  # too few lines to judge


def test_dup_ngram_char_frac_follows_gophers_non_overlapping_count():
    tokens = "one two three four five one two three four five six".split()
    # The second copy of the 5-gram is counted once, then skipped over whole.
    assert dup_ngram_char_frac(tokens) == pytest.approx(len("onetwothreefourfive") / len("".join(tokens)))
    assert dup_ngram_char_frac("a b c d e f g h i j k".split()) == 0.0


def test_longest_run_counts_back_to_back_copies_of_a_unit_and_ignores_punctuation_runs():
    assert longest_run(words("no no no no, fine")) == 4
    assert longest_run(words("I am sorry. I am sorry. I am sorry.")) == 3
    assert longest_run(words("Wait!!!!!!!! ... ok")) == 1
    assert longest_run(words("all different words here")) == 1


def _reference_dup_ngram_char_frac(tokens: list[str], n: int = 5) -> float:
    """Gopher's count as a plain walk over positions: the definition the fast version must equal."""
    total = sum(len(w) for w in tokens)
    if len(tokens) < 10 or not total:
        return 0.0
    seen, repeated, i = set(), 0, 0
    while i <= len(tokens) - n:
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / total


def _reference_longest_run(tokens: list[str]) -> int:
    """Back-to-back copies counted position by position for every unit size: the definition `longest_run`
    (which skips that walk for text without a repeated unit) must equal."""
    best = 1
    wordy = [w[0].isalnum() for w in tokens]
    for size in range(1, 9):
        streak = 0
        for i in range(len(tokens) - size):
            streak = streak + 1 if tokens[i] == tokens[i + size] else 0
            start = i + 1 - streak
            if streak and 1 + streak // size > best and any(wordy[start : start + size]):
                best = 1 + streak // size
    return best


def test_the_shortcuts_equal_the_reference_walks_on_random_token_streams():
    from ftflow.tasks.data.repetition import _has_tandem_repeat

    rng = random.Random(0)
    alphabet = ["a", "b", "c", "ok", "no", ".", "!", ",", "x1", "yes"] + [f"w{k}" for k in range(40)]
    shortcut_taken = 0
    for _ in range(4000):
        size = rng.randint(0, 60)
        tokens = [rng.choice(alphabet[: rng.randint(2, len(alphabet))]) for _ in range(size)]
        if tokens and rng.random() < 0.5:  # plant a looping unit somewhere
            unit = tokens[: rng.randint(1, 8)]
            at = rng.randint(0, len(tokens))
            tokens[at:at] = unit * rng.randint(2, 12)
        shortcut_taken += len(set(tokens)) < len(tokens) and not _has_tandem_repeat(tokens)
        assert dup_ngram_char_frac(tokens) == _reference_dup_ngram_char_frac(tokens), tokens
        assert longest_run(tokens) == _reference_longest_run(tokens), tokens
    assert shortcut_taken > 300  # streams with repeated words but no unit twice in a row


def test_a_small_shared_code_table_that_refills_and_collides_only_costs_the_exact_walk(monkeypatch):
    """The word codes outlive each call; with the table capped at 7 words it is replaced mid-stream and codes
    collide, and every answer still equals the reference walk (a collision can only add a false 'maybe')."""
    from ftflow.tasks.data import repetition

    monkeypatch.setattr(repetition, "MAX_CODES", 7)
    monkeypatch.setattr(repetition, "_codes", repetition._WordCodes())
    monkeypatch.setattr(repetition._WordCodes, "__missing__", lambda self, w: self.setdefault(w, chr(len(self) % 3)))
    rng = random.Random(1)
    alphabet = [f"w{k}" for k in range(30)]
    maybe = 0
    for _ in range(1000):
        tokens = rng.sample(alphabet, rng.randint(0, 20))  # no word twice, so no unit repeats
        if tokens and rng.random() < 0.5:
            at = rng.randint(0, len(tokens))
            tokens[at:at] = tokens[max(0, at - 3) : at] * 3
        maybe += repetition._has_tandem_repeat(tokens)
        assert longest_run(tokens) == _reference_longest_run(tokens), tokens
    assert maybe > 500  # with 3 codes nearly everything collides, and the walk still answers exactly


@pytest.mark.parametrize(
    "text, measure_name",
    [
        ("The order is ready.\nThe order is ready.\nThe order is ready.", "lines repeat"),
        ("ありがとうございます。" * 4, "repeated 5-grams"),
        ("yes " * 12 + "done", "repeated 5-grams"),
        ("ok " * 10, "repeated 5-grams"),
    ],
)
def test_degenerate_answers_are_caught_with_the_measure_that_fired(text, measure_name):
    assert measure_name in (problem(text) or "")


def test_the_run_threshold_fires_on_its_own():
    text = "the answer is " + "very " * 9 + "long"
    assert measure(text).longest_run == 9
    assert "repeats 9 times in a row" in repetition_problem(text, 1.0, 1.0, 8)
    assert repetition_problem(text, 1.0, 1.0, 9) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Ann Lee", "item": "pen", "qty": 2, "city": "Tokyo", "lang": "en"}',
        "Could you please send the invoice by Friday? Thank you.",
        "要するに、佐藤さんは火曜日に倉庫を掃除しました。",
        "1. Preheat the oven.\n2. Mix the flour.\n3. Bake for 20 minutes.\n4. Let it cool.",
    ],
)
def test_healthy_answers_pass(text):
    assert problem(text) is None


def test_quality_drops_a_looping_sft_answer_in_any_turn_and_either_side_of_a_pair():
    loop = "Sure.\nSure.\nSure.\nSure."
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi there friend"},
                {"role": "assistant", "content": loop},
                {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": "Nothing more."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "hello again"},
                {"role": "assistant", "content": "Hello, how can I help?"},
            ]
        },
    ]
    result = run_quality([Record(r, "t.jsonl", i) for i, r in enumerate(rows, 1)], "sft", DEFAULT)
    [dropped] = result.dropped
    assert (dropped.line, dropped.reason) == (1, "repetition") and dropped.detail.startswith("assistant turn 1:")
    pairs = [
        {"prompt": [{"role": "user", "content": f"question number {i}"}], "chosen": c, "rejected": r}
        for i, (c, r) in enumerate([("A fine answer.", loop), (loop, "A short answer."), ("Good.", "Bad.")])
    ]
    result = run_quality([Record(p, "p.jsonl", i) for i, p in enumerate(pairs, 1)], "preference", DEFAULT)
    assert [(d.line, d.reason, d.detail.split(":")[0]) for d in result.dropped] == [
        (1, "repetition", "rejected"),
        (2, "repetition", "chosen"),
    ]
    assert result.stats["repetition_by_answer"] == {"rejected": 1, "chosen": 1}


def test_thresholds_at_one_and_a_high_run_limit_turn_the_check_off():
    off = QualityConfig(max_dup_line_frac=1.0, max_dup_ngram_char_frac=1.0, max_repeat_run=1000)
    row = {
        "messages": [{"role": "user", "content": "hi there friend"}, {"role": "assistant", "content": "Sure.\n" * 5}]
    }
    assert run_quality([Record(row, "t.jsonl", 1)], "sft", off).dropped == []


@pytest.mark.parametrize("task", list(DemoTask))
def test_the_defaults_keep_every_clean_demo_row(task, tmp_path: Path):
    made = generate_demo(
        DemoDataConfig(task=task, n_sft=300, n_preference=150, n_heldout=40, defect_rate=0.0), tmp_path
    )
    for split, kind in (("sft", "sft"), ("preference", "preference"), ("heldout", "sft")):
        records, _ = load_rows(made[split], kind)
        result = run_quality(records, kind, QualityConfig(max_tokens=512))
        assert "repetition" not in result.reasons, (split, [d.detail for d in result.dropped][:3])
