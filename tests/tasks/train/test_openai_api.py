"""The OpenAI backend's offline half: export shapes, the API's format checks, epochs and cost estimate, events."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftflow.configs.schema import OpenAIConfig, OpenAIMethod
from ftflow.tasks.data.rows import Record
from ftflow.tasks.train import openai_api


def words(messages: list[dict]) -> int:
    """A stand-in token count: words, so expected totals are easy to state."""
    return sum(len(m["content"].split()) for m in messages)


def sft(n: int) -> list[Record]:
    return [
        Record({"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a b c"}]}, "f", i)
        for i in range(1, n + 1)
    ]


def write(tmp_path, rows: list) -> object:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_sft_export_is_the_api_chat_format_with_the_system_prompt(tmp_path):
    records = openai_api.sft_records(sft(2), "Be brief.")
    assert records[0] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "q 1"},
            {"role": "assistant", "content": "a b c"},
        ]
    }
    path = openai_api.write_jsonl(records, tmp_path / "x.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_dpo_export_is_the_api_preference_format():
    pair = Record({"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}, "f", 1)
    assert openai_api.dpo_records([pair]) == [
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        }
    ]


def test_a_clean_file_passes_and_is_costed_tokens_times_epochs_times_price(tmp_path):
    path = openai_api.write_jsonl(openai_api.sft_records(sft(20)), tmp_path / "t.jsonl")
    cfg = OpenAIConfig(n_epochs=2, prices={"gpt-4o-mini-2024-07-18": 3.0})
    report = openai_api.check_file(path, cfg, words, "words")
    assert report.ok and report.examples == 20
    assert sum(report.tokens) == 20 * 5  # "q N" + "a b c"
    assert report.billed_tokens == 200
    assert report.usd == pytest.approx(200 / 1e6 * 3.0)


def test_auto_epochs_follow_the_api_rule():
    assert openai_api.default_epochs(10) == 10  # 100 examples seen at least
    assert openai_api.default_epochs(50) == 3
    assert openai_api.default_epochs(20_000) == 1  # 25,000 at most
    assert openai_api.default_epochs(1) == 25


def test_a_model_without_a_price_is_estimated_in_tokens_only(tmp_path):
    path = openai_api.write_jsonl(openai_api.sft_records(sft(10)), tmp_path / "t.jsonl")
    report = openai_api.check_file(path, OpenAIConfig(model="gpt-unknown", n_epochs=1), words, "words")
    assert report.ok and report.usd is None and report.billed_tokens == 50


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "invalid_json"),
        ({"messages": []}, "missing_messages_list"),
        ({"messages": [{"role": "user"}]}, "message_missing_key"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unrecognized_role"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "role_order"),
        ({"messages": [{"role": "user", "content": "q"}]}, "example_missing_assistant_message"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "missing_content"),
        (
            {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
            "bad_weight",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "x": 1}]},
            "message_unrecognized_key",
        ),
    ],
)
def test_each_api_format_problem_is_named_with_its_line(tmp_path, bad, problem):
    good = openai_api.sft_records(sft(12))
    path = write(tmp_path, [*good[:3], bad, *good[3:]])
    report = openai_api.check_file(path, OpenAIConfig(), words, "words")
    assert not report.ok
    assert report.errors[problem] == [4]
    assert f"{problem} (line 4)" in report.error_line() and str(path) in report.error_line()


def test_too_long_examples_and_too_few_examples_are_refused(tmp_path):
    path = openai_api.write_jsonl(openai_api.sft_records(sft(3)), tmp_path / "t.jsonl")
    report = openai_api.check_file(path, OpenAIConfig(max_tokens_per_example=4), words, "words")
    assert report.errors["over_4_tokens"] == [1, 2, 3]
    assert any(k.startswith("fewer_than_10_examples") for k in report.errors)


def test_dpo_file_checks_the_prompt_and_both_answers(tmp_path):
    pair = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": ""}],
    }
    ends_with_answer = {
        **pair,
        "input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    }
    path = write(tmp_path, [pair, ends_with_answer])
    report = openai_api.check_file(path, OpenAIConfig(method=OpenAIMethod.dpo, min_examples=1), words, "words")
    assert report.errors["bad_non_preferred_output"] == [1, 2]
    assert report.errors["input_not_ending_with_user"] == [2]


def test_metrics_events_become_step_metrics_and_messages_do_not():
    metrics = SimpleNamespace(type="metrics", data={"step": 3, "train_loss": 0.5, "note": "x"})
    message = SimpleNamespace(type="message", data=None, message="Validating")
    assert openai_api.event_metrics(metrics) == (3, {"train_loss": 0.5})
    assert openai_api.event_metrics(message) is None


def test_a_missing_key_names_where_it_was_looked_for(monkeypatch):
    monkeypatch.delenv("FTFLOW_TEST_NO_KEY", raising=False)
    with pytest.raises(openai_api.PipelineError, match="FTFLOW_TEST_NO_KEY.*nothing was uploaded"):
        openai_api.api_key(OpenAIConfig(key_env="FTFLOW_TEST_NO_KEY"))
