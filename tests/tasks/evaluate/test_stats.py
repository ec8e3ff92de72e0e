"""Paired intervals: McNemar's exact interval and the bootstrap, oriented by the metric's direction."""

from __future__ import annotations

import random

import pytest

from ftflow.tasks.evaluate import registry, stats

EXACT = registry.get("heldout_exact")
LOSS = registry.get("heldout_loss")
CHRF = registry.get("heldout_chrf")


def test_clopper_pearson_known_values():
    assert stats.clopper_pearson(1, 1) == pytest.approx((0.025, 1.0))
    assert stats.clopper_pearson(0, 10)[0] == 0.0
    low, high = stats.clopper_pearson(5, 10)  # the textbook 95 % interval of 5/10
    assert low == pytest.approx(0.1871, abs=1e-4) and high == pytest.approx(0.8129, abs=1e-4)


def test_binom_cdf_sums_the_pmf():
    assert stats.binom_cdf(2, 4, 0.5) == pytest.approx(11 / 16)
    assert stats.binom_cdf(-1, 4, 0.5) == 0.0 and stats.binom_cdf(4, 4, 0.5) == 1.0


def test_mcnemar_reads_only_discordant_pairs():
    a = [1, 1, 1, 0, 0] * 8
    b = [1, 1, 0, 0, 1] * 8  # 8 examples where only a is right, 8 where only b is
    interval = stats.mcnemar(EXACT, a, b, "base")
    assert interval.discordant == (8, 8) and interval.improvement == 0.0
    assert interval.low < 0 < interval.high and interval.p_value == pytest.approx(1.0)
    same = stats.mcnemar(EXACT, a, a, "base")
    assert (same.low, same.high, same.p_value) == (0.0, 0.0, 1.0)


def test_mcnemar_exact_p_value():
    # 6 wins, 0 losses: two-sided exact p = 2 / 2**6.
    interval = stats.mcnemar(EXACT, [1] * 6 + [0] * 34, [0] * 40, "base")
    assert interval.p_value == pytest.approx(2 / 64) and interval.low > 0


def test_bootstrap_is_seeded_and_paired():
    rng = random.Random(1)
    base = [rng.random() for _ in range(40)]
    cand = [x + 0.05 for x in base]  # the same shift on every example: paired, the interval is tight
    one = stats.paired_bootstrap(CHRF, cand, base, "base")
    two = stats.paired_bootstrap(CHRF, cand, base, "base")
    assert one == two
    assert one.low == pytest.approx(0.05) and one.high == pytest.approx(0.05)
    assert one.method == "bootstrap" and one.n == 40


def test_bootstrap_orients_lower_is_better_and_weights_tokens():
    base = [2.0, 4.0, 3.0, 5.0] * 10
    cand = [x - 1.0 for x in base]
    weights = [1.0, 9.0, 3.0, 2.0] * 10
    interval = stats.paired_bootstrap(LOSS, stats.Scores(cand, weights), base, "base")
    assert interval.improvement == pytest.approx(1.0) and interval.low > 0  # a lower loss is an improvement
    assert interval.candidate == pytest.approx(registry.aggregate(LOSS, cand, weights))
    assert interval.direction == "lower"


def test_bootstrap_vs_recorded_value():
    interval = stats.bootstrap_vs_value(CHRF, [0.6, 0.7, 0.8, 0.7] * 10, 0.5, "champion")
    assert interval.method == "bootstrap-vs-recorded" and interval.low > 0 and interval.other == 0.5


def test_compare_picks_the_test_by_metric():
    assert stats.compare(EXACT, [1, 0], [0, 0], "base").method == "mcnemar"
    assert stats.compare(CHRF, [0.5, 0.2], [0.1, 0.1], "base").method == "bootstrap"
    with pytest.raises(ValueError, match="different lengths"):
        stats.compare(CHRF, [0.5], [0.1, 0.1], "base")
