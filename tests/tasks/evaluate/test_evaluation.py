"""Held-out evaluation: few-shot prompts, greedy generation, score math, guards, and all variants end to end."""

from __future__ import annotations

import math

import pytest
import torch

from ftflow.configs.schema import EvalConfig, PipelineConfig
from ftflow.tasks.data.formatting import template_fingerprint
from ftflow.tasks.errors import DataError
from ftflow.tasks.evaluate.evaluation import (
    EvalSets,
    VariantResult,
    _common_opening,
    active_variant,
    answer_logps,
    answer_losses,
    check_heldout,
    check_template,
    evaluate_variants,
    few_shot_prompt,
    generate,
    generation_budget,
    prompt_inputs,
    reward_margins,
)

EOS = "<|im_end|>"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def example(question: str, answer: str, system: str | None = None) -> dict:
    prompt = ([msg("system", system)] if system else []) + [msg("user", question)]
    return {"prompt": prompt, "completion": [msg("assistant", answer)]}


HELDOUT = [
    example("Extract the city: I live in Paris.", '{"city": "Paris"}'),
    example("Extract the city: Tokyo is my home town, and I love it.", '{"city": "Tokyo"}'),
]
TRAIN = [
    example("Extract the city: Rome is old.", '{"city": "Rome"}'),
    example("Extract the city: Oslo in winter.", '{"city": "Oslo"}'),
]
PAIRS = [
    {
        "prompt": [msg("user", "Extract the city: Lima, Peru.")],
        "chosen": [msg("assistant", '{"city": "Lima"}')],
        "rejected": [msg("assistant", "Lima")],
    }
]


def eval_cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"batch_size": 2, "max_new_tokens": 4, "max_examples": 8, "few_shot_k": 1, **kw})


def eval_ctx(tmp_path, log, **kw):
    """What evaluation reads from the run: eval settings, DPO beta (reward margins), max_length (log-probs), EOS."""
    from ftflow.tasks.stages import ModelInfo, StageContext

    cfg = PipelineConfig.model_validate(
        {"eval": eval_cfg(**kw).model_dump(), "dpo": {"beta": 0.1}, "sft": {"max_length": 256}}
    )
    return StageContext(cfg, ModelInfo("unused", EOS, ""), None, tmp_path, log)


# --- few-shot prompt ---------------------------------------------------------------------------


def test_few_shot_prompt_orders_system_shots_question():
    question = [msg("system", "Reply in JSON."), msg("user", "Q?")]
    shots = [example("S1?", "A1", system="ignored system"), example("S2?", "A2")]
    assert few_shot_prompt(question, shots) == [
        msg("system", "Reply in JSON."),
        msg("user", "S1?"),
        msg("assistant", "A1"),
        msg("user", "S2?"),
        msg("assistant", "A2"),
        msg("user", "Q?"),
    ]


def test_few_shot_prompt_without_shots_is_the_question():
    question = [msg("user", "Q?")]
    assert few_shot_prompt(question, []) == question
    # Shots' system prompts never leak in when the question has none.
    assert few_shot_prompt(question, [example("S?", "A", system="shot system")])[0] == msg("user", "S?")


# --- generation --------------------------------------------------------------------------------


def test_generate_hits_budget_without_stopping(peft_model, tokenizer):
    prompts = [ex["prompt"] for ex in HELDOUT] + [TRAIN[0]["prompt"]]
    cfg = eval_cfg(max_new_tokens=5)
    with active_variant(peft_model, "base"):
        out = generate(peft_model, tokenizer, prompts, cfg, EOS)
    assert len(out) == len(prompts)
    for gen in out:
        assert gen["stopped"] is False
        assert gen["new_tokens"] == 5
        assert gen["text"] == gen["answer"]
        assert EOS not in gen["text"] and tokenizer.pad_token not in gen["text"]
    # Left padding must not change a prompt's greedy answer: the padded batch matches single-prompt generation.
    with active_variant(peft_model, "base"):
        alone = generate(peft_model, tokenizer, [prompts[0]], cfg, EOS)
    assert alone[0]["answer"] == out[0]["answer"]


def test_generate_stops_at_end_token(peft_model, tokenizer):
    # Use the token the random model greedily emits first as the end-of-turn marker: generation must stop on it.
    prompt = HELDOUT[0]["prompt"]
    with active_variant(peft_model, "base"):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        first = int(peft_model(input_ids=ids).logits[0, -1].argmax())
        marker = tokenizer.convert_ids_to_tokens(first)
        out = generate(peft_model, tokenizer, [prompt], eval_cfg(max_new_tokens=6), marker)
    assert out[0]["stopped"] is True
    assert out[0]["new_tokens"] == 1
    assert out[0]["text"] == marker
    assert out[0]["answer"] == ""


def positions(mask: torch.Tensor) -> torch.Tensor:
    """What `generate` gives a left-padded row: real tokens count from 0, padding sits at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def whole_prompt_logits(model, tokenizer, prompts):
    """Last-position logits of each prompt run whole, left-padded (how generation ran before openings were shared)."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model(**enc, position_ids=positions(enc["attention_mask"])).logits[:, -1]


def shared_prompt_logits(model, tokenizer, prompts):
    """`prompt_inputs` and the last-position logits of its first forward: what `generate` runs after the opening."""
    from ftflow.tasks.evaluate.pairs import CACHE_KWARG

    rows = tokenizer(
        [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts],
        add_special_tokens=False,
    )["input_ids"]
    inputs = prompt_inputs(model, tokenizer, rows)
    cache, mask = inputs[CACHE_KWARG], inputs["attention_mask"]
    opening = cache.get_seq_length()
    out = model(
        input_ids=inputs["input_ids"][:, opening:],
        attention_mask=mask,
        position_ids=positions(mask)[:, opening:],
        **{CACHE_KWARG: cache},
    )
    return opening, out.logits[:, -1]


FEW_SHOT = [few_shot_prompt(ex["prompt"], TRAIN) for ex in HELDOUT + [example("Extract the city: Lima.", "x")]]


@pytest.mark.parametrize("variant", ["base", "sft"])
def test_a_shared_opening_runs_once_and_the_next_token_is_the_whole_prompts(peft_model, tokenizer, variant):
    with torch.no_grad(), active_variant(peft_model, variant):
        opening, got = shared_prompt_logits(peft_model, tokenizer, FEW_SHOT)
        want = whole_prompt_logits(peft_model, tokenizer, FEW_SHOT)
    # The shots are the opening every prompt shares (up to the question's first tokens); only the rest runs per row.
    shots = tokenizer(tokenizer.apply_chat_template(FEW_SHOT[0][:-1], tokenize=False), add_special_tokens=False)
    assert opening >= len(shots["input_ids"]) > 50
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("variant", ["base", "sft"])
@pytest.mark.parametrize("mixed", [False, True], ids=["shots-shared", "template-opening-shared"])
def test_batched_generation_with_a_shared_opening_answers_as_each_prompt_alone(peft_model, tokenizer, variant, mixed):
    # Few-shot prompts alone share the shots; with zero-shot prompts beside them only the template's opening.
    prompts = FEW_SHOT + ([ex["prompt"] for ex in HELDOUT] if mixed else [])
    cfg = eval_cfg(max_new_tokens=6, batch_size=8)
    with active_variant(peft_model, variant):
        batched = generate(peft_model, tokenizer, prompts, cfg, EOS)
        alone = [generate(peft_model, tokenizer, [p], cfg, EOS)[0] for p in prompts]
    assert [g["answer"] for g in batched] == [g["answer"] for g in alone]


def test_common_opening_leaves_every_row_a_token_to_run():
    assert _common_opening([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert _common_opening([[1, 2, 3], [1, 2, 3]]) == 2
    assert _common_opening([[1, 2], [1, 2, 3, 4]]) == 1
    assert _common_opening([[7, 1], [8, 1]]) == 0


def test_prompts_without_a_shared_cache_run_whole_left_padded(tiny_model_dir, tokenizer):
    # Prompt tuning prepends virtual tokens at every forward, and a lone prompt shares with nobody: no cache.
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from ftflow.configs.schema import ModelConfig, Quantization, QuantizationConfig
    from ftflow.tasks.evaluate.pairs import CACHE_KWARG
    from ftflow.tasks.train.model import load_base_model

    base = load_base_model(
        tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir), QuantizationConfig(mode=Quantization.none)
    )
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    rows = [[5, 6, 7], [5, 6, 8, 9]]
    for m, batch in ((model, rows), (base, rows[:1])):
        inputs = prompt_inputs(m, tokenizer, batch)
        assert CACHE_KWARG not in inputs
    inputs = prompt_inputs(model, tokenizer, rows)
    assert inputs["input_ids"].tolist() == [[tokenizer.pad_token_id, 5, 6, 7], [5, 6, 8, 9]]
    assert inputs["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


def test_a_sliding_window_model_generates_from_whole_prompts(sliding_window_model, tokenizer):
    from ftflow.tasks.evaluate.pairs import CACHE_KWARG

    with torch.no_grad():
        inputs = prompt_inputs(sliding_window_model, tokenizer, [[5, 6, 7], [5, 6, 8, 9]])
    assert CACHE_KWARG not in inputs and inputs["input_ids"].shape == (2, 4)


# --- score math ---------------------------------------------------------------------------------


def test_reward_margins_math():
    policy = ([-1.0, -2.0], [-3.0, -1.0])  # log p(chosen), log p(rejected)
    reference = ([-2.0, -2.0], [-2.0, -2.0])
    # margins: 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0 and 0.5 * ((-2 + 2) - (-1 + 2)) = -0.5
    assert reward_margins(policy, reference, beta=0.5) == pytest.approx([1.0, -0.5])
    result = VariantResult.of("dpo", {"preference_accuracy": [1.0, 0.0], "reward_margin": [1.0, -0.5]})
    assert result.metrics == {"preference_accuracy": 0.5, "reward_margin": pytest.approx(0.25)}
    same = ([-1.0, -2.0], [-3.0, -1.0])
    assert reward_margins(same, same, beta=0.1) == [0.0, 0.0]


def test_heldout_loss_is_token_weighted_over_per_example_losses():
    losses = answer_losses([-4.0, -2.0], [2, 2])
    assert losses == [2.0, 1.0]
    result = VariantResult.of(
        "sft",
        {"heldout_loss": losses, "heldout_logprob": [-x for x in losses]},
        {"heldout_loss": [2, 2], "heldout_logprob": [2, 2]},
    )
    assert result.metrics["heldout_loss"] == pytest.approx(1.5)
    assert result.metrics["heldout_perplexity"] == pytest.approx(math.exp(1.5))
    # The same evidence, higher-is-better.
    assert result.metrics["heldout_logprob"] == pytest.approx(-1.5)
    unequal = VariantResult.of("sft", {"heldout_loss": answer_losses([-4.0, -1.0], [4, 1])}, {"heldout_loss": [4, 1]})
    assert unequal.metrics["heldout_loss"] == pytest.approx(1.0)  # (4 + 1) / 5 tokens, not the mean of 1 and 1


def test_heldout_loss_without_tokens_is_nan():
    assert math.isnan(answer_losses([0.0], [0])[0])


def test_answer_logps_match_a_manual_forward(peft_model, tokenizer):
    ex = HELDOUT[0]
    with active_variant(peft_model, "base"):
        logps, counts = answer_logps(peft_model, tokenizer, [ex["prompt"]], [ex["completion"]], eval_cfg(), 256)
        prompt_text = tokenizer.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = torch.tensor([tokenizer(full_text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = peft_model(input_ids=full_ids).logits[0, :-1].float()
    targets = full_ids[0, 1:]
    per_token = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    answer_part = per_token[len(prompt_ids) - 1 :]
    # The answer tokens, its end token and the trailing newline are scored; the prompt is not.
    assert counts == [len(full_ids[0]) - len(prompt_ids)]
    assert logps[0] == pytest.approx(answer_part.sum().item(), rel=1e-4)


def test_batched_answer_logps_equal_each_row_alone(peft_model, tokenizer):
    # Rows with prompts of different lengths: the LM head runs from the shortest prompt's end, so a longer prompt's
    # extra tokens must still be left out, and every answer token still scored.
    rows = [*HELDOUT, example("Extract the city, please, from this much longer line: Lima is in Peru.", "Lima")]
    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    with active_variant(peft_model, "base"):
        together = answer_logps(peft_model, tokenizer, prompts, answers, eval_cfg(batch_size=3), 256)
        alone = [answer_logps(peft_model, tokenizer, [p], [a], eval_cfg(), 256) for p, a in zip(prompts, answers)]

    def answer_tokens(p, a):
        full = tokenizer.apply_chat_template(p + a, tokenize=False)
        asked = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(full, add_special_tokens=False)["input_ids"]) - len(tokenizer(asked)["input_ids"])

    assert together[1] == [n[0] for _, n in alone] == [answer_tokens(p, a) for p, a in zip(prompts, answers)]
    assert together[0] == pytest.approx([lp[0] for lp, _ in alone], rel=1e-4)


def test_answer_logps_batch_rows_by_length_and_answer_in_the_callers_order(peft_model, tokenizer):
    # Longest first, batches of 2: sorted batching regroups the rows; each score must still land on its own row.
    rows = [
        example("Extract the city, please, from this much longer line: Lima is in Peru, far south.", "Lima"),
        example("Extract the city: Tokyo is my home town, and I love it.", '{"city": "Tokyo"}'),
        example("Extract the city: Rome.", '{"city": "Rome", "country": "Italy"}'),
        example("City: Oslo.", "Oslo"),
    ]
    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    with active_variant(peft_model, "sft"):
        together = answer_logps(peft_model, tokenizer, prompts, answers, eval_cfg(batch_size=2), 256)
        alone = [answer_logps(peft_model, tokenizer, [p], [a], eval_cfg(), 256) for p, a in zip(prompts, answers)]
    assert together[1] == [n[0] for _, n in alone]
    assert together[0] == pytest.approx([lp[0] for lp, _ in alone], rel=1e-4)


# --- guards --------------------------------------------------------------------------------------


def test_check_heldout_accepts_disjoint_sets():
    check_heldout(HELDOUT, TRAIN)


def test_check_heldout_refuses_empty():
    with pytest.raises(DataError, match="empty"):
        check_heldout([], TRAIN)


def test_check_heldout_refuses_overlap():
    with pytest.raises(DataError, match="1 held-out prompt"):
        check_heldout(HELDOUT, TRAIN + [HELDOUT[1]])


def test_check_template_accepts_matching_fingerprint(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    check_template(str(tmp_path), template_fingerprint(tokenizer), tokenizer)
    check_template(str(tmp_path), "", tokenizer)


def test_check_template_refuses_other_fingerprint(tmp_path, tokenizer):
    import copy

    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(DataError, match="fingerprint mismatch"):
        check_template(str(tmp_path), "0123456789abcdef", tokenizer)
    # The adapter was saved with one template and is about to be served under another.
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("helpful AI assistant", "terse assistant")
    with pytest.raises(DataError, match="fingerprint mismatch"):
        check_template(str(tmp_path), template_fingerprint(tokenizer), other)


# --- end to end -----------------------------------------------------------------------------------


def test_evaluate_variants_end_to_end(peft_model, tokenizer, tmp_path):
    logs: list[str] = []
    # few_shot_k=1: the first train example is the base model's one shot.
    results = evaluate_variants(
        eval_ctx(tmp_path, logs.append),
        peft_model,
        tokenizer,
        ["base", "base_fewshot", "sft"],
        EvalSets(TRAIN, HELDOUT, PAIRS),
    )
    assert list(results) == ["base", "base_fewshot", "sft"]
    assert len(logs) == 3 and logs[0].startswith("evaluated base:")
    generation_keys = {
        "heldout_exact",
        "heldout_field_accuracy",
        "heldout_json_valid",
        "heldout_rougeL",
        "heldout_bleu",
        "heldout_chrf",
        "eos_stop_rate",
        "mean_new_tokens",
    }
    loss_keys = {"heldout_loss", "heldout_perplexity", "heldout_logprob"}
    preference_keys = {"preference_accuracy", "reward_margin"}
    assert set(results["base_fewshot"].metrics) == generation_keys
    assert set(results["base"].metrics) == generation_keys | loss_keys
    # The tuned variant is also scored against the policy it started from (the base).
    assert set(results["sft"].metrics) == generation_keys | loss_keys | preference_keys
    for res in results.values():
        assert len(res.predictions) == len(HELDOUT)
        assert [p["reference"] for p in res.predictions] == ['{"city": "Paris"}', '{"city": "Tokyo"}']
        assert all(p["variant"] == res.variant for p in res.predictions)
        assert all(0.0 <= res.metrics[k] <= 1.0 for k in generation_keys - {"mean_new_tokens"})
    # The adapter is really switched on and off between variants.
    assert results["sft"].metrics["heldout_loss"] != pytest.approx(results["base"].metrics["heldout_loss"])
    # The random model never stops within 4 tokens.
    assert results["base"].metrics["eos_stop_rate"] == 0.0
    assert results["base"].metrics["mean_new_tokens"] == 4.0


def test_evaluate_variants_without_pairs_has_no_preference_scores(peft_model, tokenizer, tmp_path):
    results = evaluate_variants(
        eval_ctx(tmp_path, lambda line: None, max_new_tokens=2, few_shot_k=0),
        peft_model,
        tokenizer,
        ["base", "sft"],
        EvalSets([], HELDOUT[:1], []),
    )
    assert set(results["sft"].metrics) == set(results["base"].metrics)
    assert "preference_accuracy" not in results["sft"].metrics


def test_per_example_scores_average_to_the_logged_metrics(peft_model, tokenizer, tmp_path):
    from ftflow.tasks.evaluate import registry

    results = evaluate_variants(
        eval_ctx(tmp_path, lambda line: None), peft_model, tokenizer, ["base", "sft"], EvalSets(TRAIN, HELDOUT, PAIRS)
    )
    for res in results.values():
        for name, values in res.per_example.items():
            metric = registry.get(name)
            assert res.metrics[name] == pytest.approx(registry.aggregate(metric, values, res.weights.get(name)))
            assert len(values) == (len(PAIRS) if metric.source == "preference" else len(HELDOUT))
        # The predictions table carries the same per-example scores the gate reads.
        assert [row["exact_match"] for row in res.predictions] == res.per_example["heldout_exact"]
        assert [row["answer_loss"] for row in res.predictions] == res.per_example["heldout_loss"]


def test_decide_reads_real_evaluation_output_and_the_preference_guard_runs(two_adapters, tokenizer, tmp_path):
    """evaluate_variants' own output, champion included, goes straight into the gate: the champion gets pair
    log-probs like the trained adapters, so the preference-accuracy guard compares candidate and champion."""
    from ftflow.tasks.registry.gate import decide

    pairs = PAIRS + [
        {
            "prompt": [msg("user", "Extract the city: Kyiv, Ukraine.")],
            "chosen": [msg("assistant", '{"city": "Kyiv"}')],
            "rejected": [msg("assistant", "kyiv?")],
        }
    ]
    ctx = eval_ctx(tmp_path, lambda line: None, few_shot_k=1)
    results = evaluate_variants(
        ctx, two_adapters, tokenizer, ["base", "base_fewshot", "sft", "champion"], EvalSets(TRAIN, HELDOUT, pairs)
    )
    assert results["champion"].pair_logps is not None and results["base_fewshot"].pair_logps is None
    assert len(results["champion"].per_example["preference_accuracy"]) == len(pairs)
    assert "preference_accuracy" not in results["base"].metrics  # the base is the common reference
    decision = decide("sft", results, ctx.cfg)
    guards = {g.metric: g for g in decision.guards}
    assert set(guards) == {"eos_stop_rate", "preference_accuracy"}
    assert guards["preference_accuracy"].against == "champion" and guards["preference_accuracy"].n == len(pairs)
    assert {c.against for c in decision.comparisons} == {"base", "base_fewshot", "champion"}
    assert not decision.promote  # a random adapter has no exact answers: nothing clears the baselines
    assert decision.summary().startswith("REFUSE sft: heldout_exact +0.000 [0.000, 0.000] vs base")


def test_generation_budget_is_sized_from_the_longest_reference(tokenizer):
    references = ['{"city": "Paris"}', '{"city": "Tokyo", "country": "Japan"}']
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    sized = math.ceil(longest * 1.25) + 1  # room for a slightly longer answer, and the end-of-turn token
    assert generation_budget(eval_cfg(max_new_tokens=256), tokenizer, references) == sized
    assert generation_budget(eval_cfg(max_new_tokens=3), tokenizer, references) == 3  # the config's cap stands
    off = eval_cfg(max_new_tokens=256, budget_from_references=False)
    assert generation_budget(off, tokenizer, references) == 256
    assert generation_budget(eval_cfg(max_new_tokens=256), tokenizer, []) == 256


def test_evaluation_generates_within_the_budget_sized_from_the_references(peft_model, tokenizer, tmp_path):
    logs: list[str] = []
    ctx = eval_ctx(tmp_path, logs.append, max_new_tokens=200, few_shot_k=0, cache_baselines=False)
    results = evaluate_variants(ctx, peft_model, tokenizer, ["base", "sft"], EvalSets(TRAIN, HELDOUT, PAIRS))
    budget = generation_budget(ctx.cfg.eval, tokenizer, [ex["completion"][-1]["content"] for ex in HELDOUT])
    assert budget < 200 and any(f"generation budget {budget} new tokens" in line for line in logs)
    # Random adapters on a random model ramble: no answer may run past the sized budget, the config's 200 aside.
    assert max(p["new_tokens"] for r in results.values() for p in r.predictions) <= budget
