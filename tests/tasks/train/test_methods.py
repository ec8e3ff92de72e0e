"""Each `method` trains what it says and nothing else, in a real trainer step on the tiny Llama, for SFT and for
DPO continuing from the SFT result: qlora and lora move only LoRA weights (on a 4-bit / 32-bit base), prompt
tuning only the virtual tokens, full every weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from ftflow.configs.loader import load_config
from ftflow.tasks.registry.packaging import adapter_method
from ftflow.tasks.stages import StageContext, resolve_model
from ftflow.tasks.train.trainer import train

SFT = [
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
    {"prompt": ex["prompt"], "chosen": ex["completion"], "rejected": [{"role": "assistant", "content": "No idea."}]}
    for ex in SFT
]
METHODS = {
    "qlora": ["method=qlora", "quantization.mode=4bit"],
    "lora": ["method=lora", "quantization.mode=none"],
    "prompt_tuning": ["method=prompt_tuning", "quantization.mode=none", "prompt_tuning.num_virtual_tokens=4"],
    "full": ["method=full", "quantization.mode=none"],
}


class ParamDiff(TrainerCallback):
    """Which parameters the trainer's steps changed, and which were trainable."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), self.before[n])}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.all = set(self.before)


def run(method: str, tiny_model_dir: str, out: Path, kind: str, start: str | None = None):
    cfg = load_config(
        "tiny",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            "lora.r=4",
            *(f"{k}.{v}" for k in ("sft", "dpo") for v in ("learning_rate=5e-2", "max_steps=2", "warmup_ratio=0.0")),
            "sft.per_device_batch_size=2",
            "dpo.per_device_batch_size=2",
            *METHODS[method],
        ],
    )
    diff = ParamDiff()
    ctx = StageContext(cfg, resolve_model(cfg), None, out, lambda line: None, None, callbacks=(diff,))
    result = train(ctx, kind, SFT if kind == "sft" else PAIRS, start)
    return result, diff


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    sft, sft_diff = run(request.param, tiny_model_dir, out, "sft")
    dpo, dpo_diff = run(request.param, tiny_model_dir, out, "dpo", sft.adapter_dir)
    return request.param, (sft, sft_diff), (dpo, dpo_diff)


def test_each_method_changes_exactly_what_it_trains(trained):
    method, (sft, diff), (_, dpo_diff) = trained
    assert diff.changed, f"{method}: a real step changed nothing"
    assert diff.changed <= diff.trainable
    if method in ("qlora", "lora"):
        assert all("lora_" in n for n in diff.trainable)
        assert any("lora_B" in n for n in diff.changed)  # B starts at zero: it moved
    elif method == "prompt_tuning":
        assert diff.trainable == diff.changed == {"prompt_encoder.default.embedding.weight"}
    else:
        assert diff.trainable == diff.all
        assert "model.layers.0.self_attn.q_proj.weight" in diff.changed
        assert not any("lora" in n for n in diff.all)
    # DPO continues the SFT result and keeps its frozen reference copy frozen.
    assert dpo_diff.changed and not any(".ref." in n for n in dpo_diff.changed)


def test_each_method_saves_what_the_registry_packages(trained):
    method, (sft, _), (dpo, _) = trained
    for result in (sft, dpo):
        folder = Path(result.adapter_dir)
        assert adapter_method(folder) == ("lora" if method == "qlora" else method)
        assert json.loads((folder / "ftflow_meta.json").read_text())["method"] == method
        if method == "full":
            assert (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()


def test_trainable_share_orders_the_methods(trained):
    method, (sft, _), _ = trained
    share = sft.trainable_params / sft.total_params
    bounds = {"qlora": (0, 0.5), "lora": (0, 0.5), "prompt_tuning": (0, 0.05), "full": (1.0, 1.0)}[method]
    assert bounds[0] <= share <= bounds[1], share


def test_full_fine_tuning_of_an_8b_model_is_refused_where_memory_is_clearly_short(tmp_path):
    """The seed's ~60 GB for full fine-tuning 7B: an 8B-shaped config (no weights) on this machine is refused."""
    import sys

    from transformers import LlamaConfig

    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.errors import ModelLoadError
    from ftflow.tasks.train import model as model_module

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from gpu_check import LLAMA_8B

    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path)
    assert 7.9e9 < model_module.parameter_count(str(tmp_path), ModelConfig()) < 8.1e9
    have = model_module.available_memory("cpu")
    if have > 69e9:
        pytest.skip(f"this machine has {have / 1e9:.0f} GB: enough for the 8B full fine-tune estimate")
    with pytest.raises(ModelLoadError, match=rf"method=full: .* needs about 69 GB .* has {have / 1e9:.0f} GB; use"):
        model_module.check_full_fits(str(tmp_path), ModelConfig(device="cpu"))


def test_alignment_none_stops_after_sft(tiny_model_dir, tmp_path):
    from ftflow.tasks.stages import Trained
    from ftflow.tasks.train.trainer import align

    cfg = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "alignment=none"])
    ctx = StageContext(cfg, resolve_model(cfg), None, tmp_path, lambda line: None)
    assert align(ctx, SFT, PAIRS, "unused: nothing is trained") is None
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "rlhf").exists()
    sft = train(ctx, "sft", SFT)
    assert list(Trained.of(sft, None).by_kind) == ["sft"]
