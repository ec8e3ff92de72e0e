"""RLHF on the tiny Llama: a reward model (LoRA + a score head) on the pairs, then GRPO and RLOO from the SFT
adapter, rewarded by it and by the task metric; rewards, KL and completion lengths streamed per step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftflow.configs.loader import load_config
from ftflow.tasks.stages import StageContext, resolve_model
from ftflow.tasks.train.rlhf import train_rlhf
from ftflow.tasks.train.trainer import train

QUESTIONS = [("Paris", "I live in Paris."), ("Tokyo", "Tokyo is home."), ("Lima", "Born in Lima."), ("Oslo", "Oslo!")]
SFT = [
    {
        "prompt": [{"role": "user", "content": f"Extract the city: {text}"}],
        "completion": [{"role": "assistant", "content": f'{{"city": "{city}"}}'}],
    }
    for city, text in QUESTIONS
]
PAIRS = [
    {"prompt": ex["prompt"], "chosen": ex["completion"], "rejected": [{"role": "assistant", "content": "No idea."}]}
    for ex in SFT
] * 2


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def rlhf(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"rlhf-{request.param}")
    cfg = load_config(
        "tiny",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            "lora.r=4",
            "alignment=rlhf",
            "sft.max_steps=2",
            "sft.per_device_batch_size=2",
            f"rlhf.trainer={request.param}",
            "rlhf.max_steps=2",
            "rlhf.learning_rate=5e-2",
            "rlhf.warmup_ratio=0.0",
            "rlhf.per_device_batch_size=4",
            "rlhf.num_generations=2",
            "rlhf.max_completion_length=8",
            "rlhf.logging_steps=1",
            "rlhf.save_steps=100",
            "rlhf.reward.max_steps=2",
            "rlhf.reward.per_device_batch_size=2",
        ],
    )
    ctx = StageContext(cfg, resolve_model(cfg), None, out, lambda line: None)
    sft = train(ctx, "sft", SFT)
    return sft, train_rlhf(ctx, SFT, PAIRS, sft.adapter_dir)


def test_reward_model_is_trained_and_scored_on_pairs_it_did_not_see(rlhf):
    _, result = rlhf
    assert 0.0 <= result.metrics["reward_pair_accuracy"] <= 1.0
    assert result.metrics["models_held"] == 2.0
    assert Path(result.adapter_dir).parent.parent.joinpath("reward", "adapter", "adapter_config.json").exists()


def test_policy_streams_rewards_kl_and_lengths_per_step(rlhf):
    _, result = rlhf
    logged = [h for h in result.history if "reward" in h]
    assert [h["step"] for h in logged] == [1, 2]
    keys = set().union(*logged)
    assert {"reward", "kl"} <= keys and any("completions/mean_length" in k for k in keys)
    assert any(k.startswith("rewards/reward_model_score") for k in keys)
    assert any(k.startswith("rewards/task_metric") for k in keys)
    assert result.global_step == 2 and not math.isnan(logged[-1]["reward"])


def test_policy_moved_from_the_sft_adapter(rlhf):
    sft, result = rlhf
    before = load_file(str(Path(sft.adapter_dir) / "adapter_model.safetensors"))
    after = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
