"""The LLM judge's parsing and position-swap scoring (the server wiring is tested in tests/flows/test_gate.py)."""

from __future__ import annotations

import pytest

from ftflow.configs.loader import ConfigError, load_config
from ftflow.configs.schema import JudgeConfig
from ftflow.tasks.evaluate.judge import api_key, pairwise_score, parse_grade, parse_verdict


def test_parse_verdict():
    assert parse_verdict("A") == "A" and parse_verdict(" b.") == "B"
    assert parse_verdict("Tie") == "T" and parse_verdict("T") == "T"
    assert parse_verdict("Answer A is better") == "A"
    assert parse_verdict("") is None and parse_verdict("both are fine") is None


def test_parse_grade():
    assert parse_grade("7") == 7 and parse_grade("Grade: 10/10") == 10 and parse_grade("none") is None


def test_a_win_needs_both_orders():
    # first: the variant is A; swapped: the variant is B.
    assert pairwise_score("A", "B") == 1.0
    assert pairwise_score("B", "A") == 0.0
    assert pairwise_score("A", "A") == 0.5  # the judge just likes position A: no evidence
    assert pairwise_score("A", None) == 0.5 and pairwise_score("T", "T") == 0.5


def test_api_key_from_the_named_env_var(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    assert api_key(JudgeConfig(key_env="MY_JUDGE_KEY")) == "sk-test"
    monkeypatch.delenv("MY_JUDGE_KEY")
    assert api_key(JudgeConfig(key_env="MY_JUDGE_KEY")) == "not-needed"  # local servers take any key


def test_judge_is_off_by_default_and_needs_an_endpoint_when_on():
    assert load_config("demo").eval.judge.enabled is False
    with pytest.raises(ConfigError, match="eval.judge.enabled needs eval.judge.base_url and eval.judge.model"):
        load_config("demo", ["eval.judge.enabled=true"])
