"""bench/bench_clean_vs_noisy.py: the two arms differ only in the injected defects, and the interval reads right.

The full bench trains the real model twice (minutes); these check its data and statistics on the real seeded
demo rows, so a run's comparison means what its README says."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_clean_vs_noisy as bench  # noqa: E402

pytestmark = pytest.mark.fast  # no server, no model weights (the tokenizer only)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    train, heldout = bench.demo_rows(tmp_path_factory.mktemp("cvn"), 80, 8, seed=0)
    assert len(heldout) == 8
    return train


def test_noisy_arm_replaces_30_percent_with_well_formed_defects_in_equal_shares(rows: list[dict]):
    clean, noisy, kinds = bench.arms(rows, 0.3, seed=42)
    assert clean == rows and len(noisy) == len(rows) == 80
    assert len(kinds) == 24 and Counter(kinds.values()) == {k: 6 for k in bench.NOISE_KINDS}
    for i, (before, after) in enumerate(zip(clean, noisy)):
        if i not in kinds:
            assert after == before
            continue
        assert [m["role"] for m in after["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in after["messages"])
        user, answer = before["messages"][0]["content"], before["messages"][1]["content"]
        got_user, got = after["messages"][0]["content"], after["messages"][1]["content"]
        if kinds[i] == "wrong_answer":
            assert got_user == user and got != answer and isinstance(json.loads(got), dict)
        elif kinds[i] == "truncated":
            assert got_user == user and answer.startswith(got) and len(got) < len(answer)
        elif kinds[i] == "repeated_lines":
            assert got == "\n".join([answer] * 3)
        else:
            assert (got_user, got) == (answer, user)
    # Same seed, same arms: both arms of a rerun see the same rows.
    assert bench.arms(rows, 0.3, seed=42)[1] == noisy


def test_only_the_repeated_answers_are_caught_by_the_row_checks(rows: list[dict], smollm_path):
    from transformers import AutoTokenizer

    _, noisy, kinds = bench.arms(rows, 0.3, seed=42)
    caught = bench.caught_by_validation(noisy, kinds, AutoTokenizer.from_pretrained(smollm_path))
    assert caught["repeated_lines"] == "6/6 (repetition)"
    # Wrong, truncated and role-swapped answers are label noise a row check cannot see: curation's job.
    assert {k: caught[k] for k in ("wrong_answer", "truncated", "swapped_roles")} == {
        "wrong_answer": "0/6",
        "truncated": "0/6",
        "swapped_roles": "0/6",
    }


def test_paired_bootstrap_interval_excludes_zero_only_for_a_real_difference():
    rng = random.Random(0)
    noisy = [float(rng.random() < 0.5) for _ in range(96)]
    better = [1.0 if i % 3 == 0 else s for i, s in enumerate(noisy)]  # a third of the examples fixed
    result = bench.paired_bootstrap(better, noisy, 2000, seed=1)
    mean, lo, hi = result["difference"]
    assert mean == pytest.approx((sum(better) - sum(noisy)) / 96) and 0 < lo <= mean <= hi
    for arm, values in (("clean", better), ("noisy", noisy)):
        point, lo, hi = result[arm]
        assert point == pytest.approx(sum(values) / 96) and lo <= point <= hi
    # The same scores in both arms: the paired difference is exactly 0 in every resample.
    assert bench.paired_bootstrap(noisy, noisy, 500, seed=1)["difference"] == (0.0, 0.0, 0.0)
