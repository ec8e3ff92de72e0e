"""Token lengths: the chat-template count, batching that refuses lost rows, and the one percentile."""

from __future__ import annotations

import pytest

from ftflow.tasks.data.lengths import chat_token_lengths, estimate_token_lengths, measure_token_lengths, nearest_rank


def sft(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}


def test_chat_token_lengths_counts_the_templated_conversation():
    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import load_tokenizer, offline_env, resolve_model_path

    offline_env()
    tokenizer = load_tokenizer(resolve_model_path(ModelConfig()), ModelConfig())
    lengths = chat_token_lengths(tokenizer)
    row = sft(
        "How do I reset the password of my office laptop?",
        "Open the settings page, choose security, then follow the reset wizard.",
        system="Be brief.",
    )
    p = pair("Which city is the capital of Japan?", "Tokyo is the capital of Japan, and has been since 1868.", "Osaka.")
    expected_sft = len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
    longer = p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]
    expected_pair = len(tokenizer.apply_chat_template(longer, tokenize=True, return_dict=True)["input_ids"])
    assert lengths([row, p]) == [expected_sft, expected_pair]


def test_batch_encoding_runs_parallel_and_puts_the_setting_back(monkeypatch):
    import os

    from ftflow.tasks.data.lengths import rust_parallelism

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with rust_parallelism():
        # Unset, not "true": the tokenizers library then protects a child forked meanwhile by itself.
        assert "TOKENIZERS_PARALLELISM" not in os.environ
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with rust_parallelism():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_estimate_counts_a_quarter_token_per_ascii_char_one_per_other_char_and_the_longer_answer():
    assert estimate_token_lengths([sft("abcdefgh", "日本")]) == [4 * 3 + 2 + 2]
    assert estimate_token_lengths([pair("abcd", "x" * 40, "y")]) == [4 * 3 + 1 + 10]


def test_measure_token_lengths_batches_and_refuses_a_wrong_count():
    rows = [sft("q", "a")] * 5000
    batches: list[int] = []

    def count(batch: list[dict]) -> list[int]:
        batches.append(len(batch))
        return [7] * len(batch)

    assert measure_token_lengths(rows, count) == [7] * 5000 and batches == [2048, 2048, 904]
    with pytest.raises(ValueError, match="returned 1 lengths for 10 rows"):
        measure_token_lengths(rows[:10], lambda batch: [1])


def test_nearest_rank_is_always_an_observed_value():
    assert nearest_rank([10, 30, 20, 40], 0.95) == 40
    assert nearest_rank(list(range(20, 30)), 0.95) == 29 and nearest_rank(list(range(20, 30)), 0.5) == 24
    assert nearest_rank(list(range(1, 21)), 0.95) == 19  # 95% of 20 values lie at or below the 19th
    assert nearest_rank([5], 0.5) == 5
