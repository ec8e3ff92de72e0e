"""DPO through `trainer.train` on the tiny Llama after a short SFT: reward metrics streamed, the adapter moves,
the SFT copy stays as reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftflow.configs.loader import load_config
from ftflow.tasks.stages import StageContext, resolve_model
from ftflow.tasks.train.trainer import train, trainable_model

SFT_EXAMPLES = [
    {
        "prompt": [{"role": "user", "content": "Extract the city: I live in Paris."}],
        "completion": [{"role": "assistant", "content": '{"city": "Paris"}'}],
    },
    {
        "prompt": [{"role": "user", "content": "Extract the city: Tokyo is home."}],
        "completion": [{"role": "assistant", "content": '{"city": "Tokyo"}'}],
    },
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Extract the city: I live in Paris."}],
        "chosen": [{"role": "assistant", "content": '{"city": "Paris"}'}],
        "rejected": [{"role": "assistant", "content": "Paris is nice."}],
    },
    {
        "prompt": [{"role": "user", "content": "Extract the city: Tokyo is home."}],
        "chosen": [{"role": "assistant", "content": '{"city": "Tokyo"}'}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    },
]


def dpo_config(model_dir: str, out: Path, *overrides: str):
    # A high learning rate and no warmup: in a few steps the recipe's 5e-6 barely moves a weight.
    return load_config(
        "tiny",
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "lora.r=4",
            "sft.learning_rate=5e-3",
            "sft.max_steps=2",
            "sft.per_device_batch_size=2",
            "sft.warmup_ratio=0.0",
            "sft.save_steps=1000",
            "dpo.learning_rate=5e-3",
            "dpo.per_device_batch_size=2",
            "dpo.warmup_ratio=0.0",
            "dpo.logging_steps=1",
            "dpo.save_steps=1000",
            *overrides,
        ],
    )


def context(cfg, out: Path, logged: list | None = None) -> StageContext:
    """A context whose progress hook keeps every (step, metrics) the trainer reports in `logged`."""
    sink = [] if logged is None else logged

    def progress(label: str, total: int):
        return lambda step, metrics: sink.append((step, metrics))

    return StageContext(cfg, resolve_model(cfg), None, out, lambda line: None, progress)


def adapter_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(Path(adapter_dir, "adapter_model.safetensors"))).items()}


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir) -> str:
    out = tmp_path_factory.mktemp("sft")
    result = train(context(dpo_config(tiny_model_dir, out), out), "sft", SFT_EXAMPLES)
    weights = adapter_weights(result.adapter_dir)
    # A trained SFT adapter (lora_B away from its zero init), so "reference == SFT" is not the same as "== base".
    assert any(torch.count_nonzero(v) for k, v in weights.items() if "lora_B" in k)
    return result.adapter_dir


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, sft_adapter):
    """A 2-step sigmoid DPO run; a DPOTrainer subclass records the trainer so the reference adapter can be inspected."""
    import trl

    seen: list = []

    class RecordingDPOTrainer(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    out = tmp_path_factory.mktemp("dpo")
    cfg = dpo_config(tiny_model_dir, out, "dpo.max_steps=2", "dpo.loss_type=sigmoid")
    logged: list[tuple[int, dict[str, float]]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "DPOTrainer", RecordingDPOTrainer)
        result = train(context(cfg, out, logged), "dpo", PAIRS, start_adapter=sft_adapter)
    assert len(seen) == 1
    return {"cfg": cfg, "result": result, "logged": logged, "trainer": seen[0]}


def per_step(logged, key):
    return {step: m[key] for step, m in logged if key in m}


# --- metrics ----------------------------------------------------------------------------------


def test_reward_metrics_logged_every_step(dpo_run):
    logged = dpo_run["logged"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert sorted(per_step(logged, key)) == [1, 2], key
    accuracies = per_step(logged, "rewards/accuracies").values()
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    # Step 1 scores the untouched policy, which equals the reference: zero margin, loss log(2).
    assert per_step(logged, "rewards/margins")[1] == pytest.approx(0.0, abs=1e-4)
    assert per_step(logged, "loss")[1] == pytest.approx(math.log(2), abs=1e-3)
    # After one update the policy has moved away from the reference.
    assert per_step(logged, "rewards/margins")[2] != pytest.approx(0.0, abs=1e-6)


def test_train_result_fields(dpo_run):
    result = dpo_run["result"]
    assert result.global_step == 2
    assert result.resumed_from_step == 0
    assert 0 < result.trainable_params < result.total_params


# --- adapters ----------------------------------------------------------------------------------


def test_dpo_adapter_differs_from_sft_adapter(dpo_run, sft_adapter):
    sft = adapter_weights(sft_adapter)
    dpo = adapter_weights(dpo_run["result"].adapter_dir)
    assert sft.keys() == dpo.keys()
    changed = [k for k in sft if not torch.equal(sft[k], dpo[k])]
    assert changed, "DPO left every adapter weight as SFT made it"
    config = json.loads(Path(dpo_run["result"].adapter_dir, "adapter_config.json").read_text())
    assert config["r"] == 4
    assert json.loads(Path(dpo_run["result"].adapter_dir, "ftflow_meta.json").read_text())["stage"] == "dpo"


def test_only_the_policy_adapter_is_saved(dpo_run):
    adapter = Path(dpo_run["result"].adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "ref").exists()
    assert all(".ref." not in k for k in adapter_weights(str(adapter)))


def test_reference_adapter_is_the_frozen_sft_adapter(dpo_run, sft_adapter):
    model = dpo_run["trainer"].model
    assert set(model.peft_config) == {"default", "ref"}
    sft = adapter_weights(sft_adapter)
    params = dict(model.named_parameters())
    ref = {n: p for n, p in params.items() if ".ref." in n}
    assert len(ref) == len(sft)
    for name, param in ref.items():
        assert not param.requires_grad, name
        assert torch.equal(param.detach().float(), sft[name.replace(".ref.", ".")]), name
    # The trained "default" adapter started from the same weights and moved away from them.
    moved = [
        n
        for n in ref
        if not torch.equal(params[n.replace(".ref.", ".default.")].detach().float(), ref[n].detach().float())
    ]
    assert moved


def test_trainable_model_loads_sft_adapter_trainable(tiny_model_dir, sft_adapter, tmp_path):
    model = trainable_model(dpo_config(tiny_model_dir, tmp_path), tiny_model_dir, sft_adapter)
    sft = adapter_weights(sft_adapter)
    params = dict(model.named_parameters())
    assert set(model.peft_config) == {"default"}
    for key, tensor in sft.items():
        live = params[key.replace(".weight", ".default.weight")]
        assert live.requires_grad
        assert torch.equal(live.detach().float(), tensor), key
    assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n)


# --- loss types -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type, first_loss", [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_loss_types_run_and_apply(tmp_path, tiny_model_dir, sft_adapter, loss_type, first_loss):
    # At step 1 policy == reference, so each loss sits at its own value for a zero margin (beta = 0.1):
    # sigmoid log 2 (checked above), hinge relu(1 - 0) = 1, ipo (0 - 1/(2 beta))^2 = 25.
    cfg = dpo_config(tiny_model_dir, tmp_path, "dpo.max_steps=1", f"dpo.loss_type={loss_type}")
    logged: list[tuple[int, dict]] = []
    result = train(context(cfg, tmp_path, logged), "dpo", PAIRS, start_adapter=sft_adapter)
    assert result.global_step == 1
    assert per_step(logged, "loss")[1] == pytest.approx(first_loss, rel=1e-3)
    assert Path(result.adapter_dir, "adapter_model.safetensors").exists()
