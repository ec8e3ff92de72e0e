"""The gate's decision from per-example scores: noise-aware, direction-aware, guards, exclusions, the record."""

from __future__ import annotations

import re

import pytest

from ftflow.configs.loader import load_config
from ftflow.tasks.evaluate.evaluation import VariantResult, choose
from ftflow.tasks.registry.gate import decide, recorded

N = 40


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def right(k: int, n: int = N, offset: int = 0) -> list[float]:
    """k right answers out of n (the first k after `offset`, wrapping)."""
    return [1.0 if (i - offset) % n < k else 0.0 for i in range(n)]


def result(variant: str, **per_example: list[float]) -> VariantResult:
    return VariantResult.of(variant, per_example)


def baselines(exact_base: int = 10, exact_fewshot: int = 12) -> dict[str, VariantResult]:
    return {
        "base": result("base", heldout_exact=right(exact_base), eos_stop_rate=[1.0] * N),
        "base_fewshot": result("base_fewshot", heldout_exact=right(exact_fewshot), eos_stop_rate=[1.0] * N),
    }


def test_candidate_better_by_one_lucky_example_is_refused():
    # Same answers as few-shot plus one more right: 2.5 points on 40 prompts, which McNemar cannot tell from luck.
    results = {**baselines(10, 12), "sft": result("sft", heldout_exact=right(13), eos_stop_rate=[1.0] * N)}
    d = decide("sft", results, cfg())
    assert not d.promote
    fewshot = next(c for c in d.comparisons if c.against == "base_fewshot")
    assert fewshot.method == "mcnemar" and fewshot.discordant == (1, 0)
    assert fewshot.improvement == pytest.approx(1 / N) and fewshot.low < 0 < fewshot.high
    assert any("does not clear 0.0 vs base_fewshot" in f for f in d.failures)
    assert d.summary().startswith("REFUSE sft: heldout_exact +0.075 [")


def test_clearly_better_candidate_is_promoted_and_the_line_says_why():
    results = {**baselines(10, 12), "sft": result("sft", heldout_exact=right(30), eos_stop_rate=[1.0] * N)}
    d = decide("sft", results, cfg())
    assert d.promote, d.failures
    assert [c.against for c in d.comparisons] == ["base", "base_fewshot"]
    assert all(c.low > 0 for c in d.comparisons)
    assert (d.metric, d.direction, d.n) == ("heldout_exact", "higher", N)
    assert re.fullmatch(
        r"PROMOTE sft: heldout_exact \+0\.500 \[0\.\d{3}, 0\.\d{3}\] vs base, "
        r"\+0\.450 \[0\.\d{3}, 0\.\d{3}\] vs base_fewshot \(n=40, higher is better\)",
        d.summary(),
    )
    record = d.as_dict()
    assert record["comparisons"][0]["n"] == N and record["comparisons"][0]["direction"] == "higher"
    assert record["scores"]["sft"]["heldout_exact"] == pytest.approx(0.75)


def test_min_improvement_applies_to_the_lower_bound():
    results = {**baselines(10, 10), "sft": result("sft", heldout_exact=right(20), eos_stop_rate=[1.0] * N)}
    assert decide("sft", results, cfg()).promote
    # +25 points on average, but the interval's lower bound is well under 20 points.
    d = decide("sft", results, cfg("registry.min_improvement=0.2"))
    assert not d.promote and all("does not clear 0.2" in f for f in d.failures)


def test_dpo_worse_than_sft_on_validation_promotes_sft():
    # The demo's case: SFT 0.375 vs DPO 0.350. The candidate is chosen on validation, then gated on held-out.
    validation = {"sft": result("sft", heldout_exact=right(9, 16)), "dpo": result("dpo", heldout_exact=right(8, 16))}
    candidate = choose(validation, "heldout_exact")
    assert candidate == "sft"
    heldout = {
        **baselines(0, 0),
        "sft": result("sft", heldout_exact=right(15), eos_stop_rate=[1.0] * N),
        "dpo": result("dpo", heldout_exact=right(14), eos_stop_rate=[1.0] * N),
    }
    selection = {
        "chosen": candidate,
        "split": "validation",
        "scores": {k: v.metrics["heldout_exact"] for k, v in validation.items()},
    }
    d = decide(candidate, heldout, cfg(), selection=selection)
    assert d.promote and d.candidate == "sft" and d.summary().startswith("PROMOTE sft:")
    assert d.as_dict()["selection"]["scores"] == {"sft": 9 / 16, "dpo": 0.5}


def test_choose_follows_direction_and_ties_go_to_the_later_variant():
    lower = {"sft": _loss("sft", [1.0, 1.0]), "dpo": _loss("dpo", [2.0, 2.0])}
    assert choose(lower, "heldout_loss") == "sft" and choose(lower, "heldout_logprob") == "sft"
    tie = {"sft": result("sft", heldout_exact=[1.0, 0.0]), "dpo": result("dpo", heldout_exact=[0.0, 1.0])}
    assert choose(tie, "heldout_exact") == "dpo"


def _loss(variant: str, losses: list[float]) -> VariantResult:
    r = VariantResult(variant, {})
    r.add("heldout_loss", losses, [10.0] * len(losses))
    r.add("heldout_logprob", [-x for x in losses], [10.0] * len(losses))
    r.refresh()
    return r


def test_heldout_loss_ranks_lower_is_better():
    base = [10.8 + 0.01 * i for i in range(N)]
    config = cfg("eval.primary_metric=heldout_loss")
    # The reported bug: loss 10.966 > base 10.803 was promoted. A higher loss is worse and must be refused.
    worse = decide("sft", {"base": _loss("base", base), "sft": _loss("sft", [x + 0.16 for x in base])}, config)
    assert not worse.promote
    assert worse.comparisons[0].improvement == pytest.approx(-0.16) and worse.comparisons[0].high < 0
    assert "(n=40, lower is better)" in worse.summary()
    better = decide("sft", {"base": _loss("base", base), "sft": _loss("sft", [x - 0.5 for x in base])}, config)
    assert better.promote and better.comparisons[0].low > 0
    assert better.comparisons[0].method == "bootstrap"


def test_baseline_without_the_metric_is_named_not_compared():
    base = [2.0] * N
    results = {
        "base": _loss("base", base),
        "base_fewshot": result("base_fewshot", heldout_exact=right(1)),
        "sft": _loss("sft", [1.0] * N),
    }
    d = decide("sft", results, cfg("eval.primary_metric=heldout_loss"))
    assert d.promote and [c.against for c in d.comparisons] == ["base"]
    assert "base_fewshot has no heldout_loss: not compared" in d.reasons


def test_champion_is_compared_paired_and_guards_run_against_it():
    champion = result("champion", heldout_exact=right(30), eos_stop_rate=[1.0] * N, preference_accuracy=right(16, 20))
    # Better than the base variants, no better than the champion.
    same = result("sft", heldout_exact=right(30), eos_stop_rate=[1.0] * N, preference_accuracy=right(16, 20))
    d = decide("sft", {**baselines(), "sft": same, "champion": champion}, cfg())
    assert not d.promote and any("vs champion" in f for f in d.failures)
    assert {g.metric for g in d.guards} == {"eos_stop_rate", "preference_accuracy"}
    assert all(g.against == "champion" for g in d.guards)


def test_guard_refuses_only_a_regression_wholly_beyond_tolerance():
    champion = result("champion", heldout_exact=right(10), eos_stop_rate=[1.0] * N, preference_accuracy=[1.0] * 20)
    stops_less = result("sft", heldout_exact=right(35), eos_stop_rate=right(20), preference_accuracy=[1.0] * 20)
    d = decide("sft", {**baselines(), "sft": stops_less, "champion": champion}, cfg())
    assert not d.promote and any(f.startswith("guard eos_stop_rate regressed") for f in d.failures)
    # Two fewer stops in 40: inside the noise, so the guard holds.
    slight = result("sft", heldout_exact=right(35), eos_stop_rate=right(38), preference_accuracy=[1.0] * 20)
    assert decide("sft", {**baselines(), "sft": slight, "champion": champion}, cfg()).promote
    worse_pairs = result("sft", heldout_exact=right(35), eos_stop_rate=[1.0] * N, preference_accuracy=right(5, 20))
    d = decide("sft", {**baselines(), "sft": worse_pairs, "champion": champion}, cfg())
    assert any(f.startswith("guard preference_accuracy regressed") for f in d.failures)
    assert next(g for g in d.guards if g.metric == "preference_accuracy").n == 20


def test_first_run_guards_hold_against_the_base():
    base = {"base": result("base", heldout_exact=right(0), eos_stop_rate=[1.0] * N)}
    never_stops = result("sft", heldout_exact=right(30), eos_stop_rate=[0.0] * N, preference_accuracy=[1.0] * 10)
    d = decide("sft", {**base, "sft": never_stops}, cfg())
    assert not d.promote and any("eos_stop_rate regressed" in f for f in d.failures)
    # The base has no preference accuracy (it is every tuned variant's reference): that guard is not compared.
    assert any(r.startswith("guard preference_accuracy: not compared") for r in d.reasons)


def test_champion_known_only_by_recorded_metrics():
    results = {**baselines(), "sft": result("sft", heldout_exact=right(30), eos_stop_rate=[1.0] * N)}
    d = decide("sft", results, cfg(), champion=recorded("champion", {"heldout_exact": 0.5, "eos_stop_rate": 1.0}))
    champ = next(c for c in d.comparisons if c.against == "champion")
    assert champ.method == "bootstrap-vs-recorded" and champ.other == 0.5 and champ.low > 0
    assert d.promote


def test_heldout_exclusions_are_named():
    results = {**baselines(), "sft": result("sft", heldout_exact=right(30), eos_stop_rate=[1.0] * N)}
    accounting = {
        "source": "heldout file",
        "in": 42,
        "kept": 40,
        "truncated_left": 0,
        "dropped": {"exact_duplicate": 1, "too_long": 1},
    }
    d = decide("sft", results, cfg(), exclusions=accounting)
    assert d.summary().endswith("; held-out: 40 of 42 scored (dropped: exact_duplicate 1, too_long 1)")
    assert d.as_dict()["heldout_exclusions"] == accounting
    nothing = dict(accounting, **{"in": 40, "dropped": {}})
    assert "held-out:" not in decide("sft", results, cfg(), exclusions=nothing).summary()
