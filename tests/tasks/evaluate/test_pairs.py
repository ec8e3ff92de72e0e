"""Preference pairs scored with their shared prefix run once equal each side scored whole, on every pair shape."""

from __future__ import annotations

import pytest
import torch

from ftflow.configs.schema import EvalConfig, ModelConfig, QuantizationConfig
from ftflow.tasks.evaluate.evaluation import _pair_logps, active_variant, answer_logps
from ftflow.tasks.evaluate.pairs import shared_prefix_logps, shares_prefixes


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)]}


LONG = "Extract the order as JSON, and keep every field the customer gave, in the order given: " * 3
PAIRS = [
    # Answers that part early, late (a shared answer prefix is scored for both sides), or not at all.
    pair([msg("user", "Extract the city: Lima, Peru.")], '{"city": "Lima"}', "Lima"),
    pair(
        [msg("user", LONG + "Ana, 3 cups, Oslo.")],
        '{"name": "Ana", "qty": 3, "city": "Oslo"}',
        '{"name": "Ana", "qty": 2, "city": "Oslo"}',
    ),
    pair([msg("user", "Say hi.")], "Hello there, friend", "Hello there"),  # one side a prefix of the other
    pair([msg("user", "Same?")], "Yes.", "Yes."),
    # A system prompt, and a multi-turn conversation whose earlier answer is part of the prompt.
    pair([msg("system", "Answer in JSON."), msg("user", "City of Rome?")], '{"city": "Rome"}', '{"town": "Rome"}'),
    pair(
        [msg("user", "Name a colour."), msg("assistant", "Blue."), msg("user", "Another one, in Japanese.")],
        "緑です。",
        "Green.",
    ),
]


def whole(model, tokenizer, pairs, max_length=256):
    prompts, cfg = [p["prompt"] for p in pairs], EvalConfig(batch_size=16)
    chosen, _ = answer_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], cfg, max_length)
    rejected, _ = answer_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], cfg, max_length)
    return chosen, rejected


@pytest.mark.parametrize("variant", ["base", "sft"])
@pytest.mark.parametrize("per_batch", [1, 4])
def test_shared_prefix_logps_equal_each_side_scored_whole(peft_model, tokenizer, variant, per_batch):
    assert shares_prefixes(peft_model)
    with active_variant(peft_model, variant):
        shared = shared_prefix_logps(peft_model, tokenizer, PAIRS, 256, per_batch)
        expected = whole(peft_model, tokenizer, PAIRS)
    assert shared is not None
    for got, want in zip(shared, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert shared[0][3] == pytest.approx(shared[1][3], abs=1e-4)  # identical answers score identically


def test_pairs_cut_at_max_length_score_what_whole_rows_cut_at_it_score(peft_model, tokenizer):
    # 70 tokens ends inside the long prompt of pair 1 (nothing of its answer is left to score) and inside others'
    # answers: both paths see the same truncated tokens.
    with active_variant(peft_model, "sft"):
        shared = shared_prefix_logps(peft_model, tokenizer, PAIRS, 70, 4)
        expected = whole(peft_model, tokenizer, PAIRS, max_length=70)
    assert shared is not None and shared[0][1] == 0.0 and shared[1][1] == 0.0
    for got, want in zip(shared, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_4bit_base_dequantized_for_inference_scores_pairs_the_same_both_ways(tiny_model_dir, tokenizer):
    from ftflow.tasks.train.model import dequantized_4bit, load_base_model

    model = load_base_model(tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir), QuantizationConfig()).eval()
    with dequantized_4bit(model, log=pytest.fail):
        shared = shared_prefix_logps(model, tokenizer, PAIRS, 256, 3)
        expected = whole(model, tokenizer, PAIRS)
    for got, want in zip(shared, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_prompt_tuning_adapters_score_each_side_whole(tiny_model_dir, tokenizer):
    # Virtual tokens are prepended at every forward: a remainder run against the prefix's cache would get them twice.
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from ftflow.configs.schema import Quantization
    from ftflow.tasks.train.model import load_base_model

    base = load_base_model(
        tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir), QuantizationConfig(mode=Quantization.none)
    )
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    assert not shares_prefixes(model)
    with torch.no_grad():
        got = _pair_logps(model, tokenizer, PAIRS, EvalConfig(batch_size=16), 256)
        want = whole(model, tokenizer, PAIRS)
    assert got == want


def test_a_sliding_window_cache_is_not_shared(sliding_window_model, tokenizer):
    # A sliding-window layer drops what falls out of its window: a doubled prefix cache is not the plain case.
    model = sliding_window_model
    assert shared_prefix_logps(model, tokenizer, PAIRS, 256, 4) is None
    with torch.no_grad():
        got = _pair_logps(model, tokenizer, PAIRS, EvalConfig(batch_size=16), 256)
    assert got == whole(model, tokenizer, PAIRS)
