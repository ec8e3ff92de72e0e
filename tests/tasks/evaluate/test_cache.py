"""The base variants' scores are reused by content: same model, rows and settings → no generation; any change
→ scored afresh. Real generation on the tiny model; the counter wraps the real `generate`, it replaces nothing."""

from __future__ import annotations

import pytest

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.evaluate import evaluation
from ftflow.tasks.evaluate.evaluation import EvalSets, evaluate_variants

EOS = "<|im_end|>"


def example(question: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": answer}]}


HELDOUT = [example("Extract the city: I live in Paris.", '{"city": "Paris"}'), example("Oslo?", '{"city": "Oslo"}')]
TRAIN = [example("Extract the city: Rome is old.", '{"city": "Rome"}')]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Extract the city: Lima, Peru."}],
        "chosen": [{"role": "assistant", "content": '{"city": "Lima"}'}],
        "rejected": [{"role": "assistant", "content": "Lima"}],
    }
]
VARIANTS = ["base", "base_fewshot", "sft"]


@pytest.fixture(scope="module")
def scorer(peft_model, tokenizer):
    return peft_model, tokenizer


@pytest.fixture
def generations(monkeypatch):
    """How many prompts each `generate` call scored, in call order (one call per variant here)."""
    calls: list[int] = []
    real = evaluation.generate

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "generate", counting)
    return calls


def run(tmp_path, tiny_model_dir, scorer, heldout=HELDOUT, logs=None, **eval_kw):
    from ftflow.tasks.stages import ModelInfo, StageContext

    cfg = PipelineConfig.model_validate(
        {
            "output_dir": str(tmp_path / "runs"),
            "model": {"name_or_path": tiny_model_dir},
            "quantization": {"mode": "none"},
            "eval": {"batch_size": 2, "max_new_tokens": 4, "few_shot_k": 1, **eval_kw},
        }
    )
    log = logs.append if logs is not None else (lambda line: None)
    ctx = StageContext(cfg, ModelInfo(tiny_model_dir, EOS, "tpl"), None, tmp_path, log)
    return evaluate_variants(ctx, *scorer, VARIANTS, EvalSets(TRAIN, heldout, PAIRS))


def test_a_rerun_reuses_the_base_scores_and_rescores_the_adapter(tmp_path, tiny_model_dir, scorer, generations):
    first = run(tmp_path, tiny_model_dir, scorer)
    assert len(generations) == 3 and not any(r.cached for r in first.values())
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / "eval-cache").iterdir()) == [
        "base",
        "base_fewshot",
    ]
    logs: list[str] = []
    second = run(tmp_path, tiny_model_dir, scorer, logs=logs)
    assert len(generations) == 4  # only the adapter generated again
    assert [v for v, r in second.items() if r.cached] == ["base", "base_fewshot"]
    assert logs[0].startswith("evaluated base (cached")
    for variant in VARIANTS:
        assert second[variant].metrics == pytest.approx(first[variant].metrics, nan_ok=True)
        assert second[variant].per_example == first[variant].per_example
        assert second[variant].predictions == first[variant].predictions
    # The adapter's preference scores are computed against the cached base log-probs, as against fresh ones.
    assert second["base"].pair_logps == first["base"].pair_logps
    assert second["sft"].metrics["reward_margin"] == pytest.approx(first["sft"].metrics["reward_margin"])


@pytest.mark.parametrize(
    "change",
    [
        {"heldout": [HELDOUT[0], example("Oslo, please", '{"city": "Oslo"}')]},
        {"max_new_tokens": 3},
        {"cache_baselines": False},
    ],
    ids=["a held-out row", "the generation budget", "caching off"],
)
def test_any_change_scores_the_base_again(tmp_path, tiny_model_dir, scorer, generations, change):
    run(tmp_path, tiny_model_dir, scorer)
    again = run(tmp_path, tiny_model_dir, scorer, **change)
    assert len(generations) == 6 and not any(r.cached for r in again.values())


def test_an_unreadable_cache_file_is_scored_again(tmp_path, tiny_model_dir, scorer, generations):
    run(tmp_path, tiny_model_dir, scorer)
    for path in (tmp_path / "runs" / "eval-cache").iterdir():
        path.write_text("{not json")
    again = run(tmp_path, tiny_model_dir, scorer)
    assert len(generations) == 6 and not any(r.cached for r in again.values())
