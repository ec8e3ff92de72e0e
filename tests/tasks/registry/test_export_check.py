"""The export's pieces that need no model: URI parsing, the target check, the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from ftflow.tasks.registry.export import ExportError, check_target, metric_statistic, paired_bootstrap, parse_model_uri


def test_parse_model_uri():
    assert parse_model_uri("models:/ftflow-demo-adapter@champion") == ("ftflow-demo-adapter", "champion", None)
    assert parse_model_uri("models:/ftflow-demo-adapter/3") == ("ftflow-demo-adapter", None, "3")
    assert parse_model_uri("0123456789abcdef0123456789abcdef") is None
    with pytest.raises(ExportError, match="expected models:/"):
        parse_model_uri("models:/justaname")


def test_check_target(tmp_path):
    check_target(tmp_path / "absent")
    check_target(tmp_path)  # empty
    (tmp_path / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        check_target(tmp_path)


def test_paired_bootstrap_identical_sides():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    stat = lambda idx: float(values[idx].mean())  # noqa: E731
    boot = paired_bootstrap(stat, stat, 5)
    assert boot.a == boot.b == 0.6 and boot.delta == 0.0
    assert (boot.delta_low, boot.delta_high) == (0.0, 0.0)
    assert boot.a_low <= boot.b <= boot.a_high


def test_paired_bootstrap_noise_versus_a_real_gap():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    # b differs from a on 4 of 200 examples, two each way: inside a's interval, difference interval spans 0.
    b = a.copy()
    flip = np.concatenate([np.flatnonzero(a == 0)[:2], np.flatnonzero(a == 1)[:2]])
    b[flip] = 1 - b[flip]
    boot = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), 200, seed=0)
    assert boot.delta == 0.0 and boot.a_low <= boot.b <= boot.a_high and boot.delta_low <= 0.0 <= boot.delta_high
    # c is right on 40 more examples than a: outside a's interval, and the difference interval is above zero.
    c = a.copy()
    c[np.flatnonzero(a == 0)[:40]] = 1.0
    boot = paired_bootstrap(lambda i: a[i].mean(), lambda i: c[i].mean(), 200, seed=0)
    assert boot.delta == pytest.approx(0.2) and boot.b > boot.a_high and boot.delta_low > 0.0


def test_a_tiny_consistent_shift_is_inside_the_noise():
    # What merging a 4-bit-trained LoRA into fp32 does to held-out log-likelihood: the same tiny shift
    # everywhere. The paired difference is "significant"; the metric stays well inside its own interval.
    rng = np.random.default_rng(2)
    a = rng.normal(-10.5, 0.3, 40)
    b = a + 0.0004
    boot = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), 40, seed=0)
    assert boot.delta_low > 0.0
    assert boot.a_low < boot.b < boot.a_high


def test_metric_statistic_shapes():
    side = {
        "generations": [{"text": "a"}, {"text": "b"}],
        "scores": [{"exact_match": 1.0}, {"exact_match": 0.0}],
        "logps": [-2.0, -6.0],
        "counts": [1, 3],
    }
    idx = np.arange(2)
    assert metric_statistic("heldout_exact", side, ["a", "c"], "<eos>")(idx) == 0.5
    # Token-weighted, as heldout_loss is computed at evaluation: -(−8)/4.
    assert metric_statistic("heldout_loss", side, ["a", "c"], "<eos>")(idx) == pytest.approx(2.0)
    assert metric_statistic("heldout_logprob", side, ["a", "c"], "<eos>")(np.array([0, 0])) == pytest.approx(-2.0)
    assert 0.0 <= metric_statistic("heldout_chrf", side, ["a", "c"], "<eos>")(idx) <= 1.0
