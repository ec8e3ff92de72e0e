"""QLoRA SFT through `trainer.train` on the tiny Llama: loss streamed and falling, only LoRA weights move,
answer-only loss, the adapter and its metadata on disk, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftflow.configs.loader import load_config
from ftflow.tasks.stages import StageContext, resolve_model
from ftflow.tasks.train.trainer import last_checkpoint, train

# Two short rows; with batch 2 every step sees exactly this batch, so the loss must fall step after step.
EXAMPLES = [
    {
        "prompt": [{"role": "user", "content": "Extract the city: I live in Paris."}],
        "completion": [{"role": "assistant", "content": '{"city": "Paris"}'}],
    },
    {
        "prompt": [{"role": "user", "content": "Extract the city: Tokyo is home."}],
        "completion": [{"role": "assistant", "content": '{"city": "Tokyo"}'}],
    },
]
STEPS = 8


def sft_config(model_dir: str, out: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "sft.learning_rate=5e-3",
            "sft.per_device_batch_size=2",
            "sft.warmup_ratio=0.0",
            "sft.logging_steps=1",
            "sft.save_steps=1000",
            "lora.r=4",
            *overrides,
        ],
    )


class Recorder:
    """A progress hook that keeps what the trainer reports: (label, total) per start, (step, metrics) per update."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.updates: list[tuple[int, dict[str, float]]] = []

    def __call__(self, label: str, total: int):
        self.started.append((label, total))
        return lambda step, metrics: self.updates.append((step, metrics))

    def steps_with(self, key: str) -> list[int]:
        return [step for step, metrics in self.updates if key in metrics]


def context(cfg, out: Path, progress=None) -> StageContext:
    return StageContext(cfg, resolve_model(cfg), None, out, lambda line: None, progress)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One real SFT run; a subclass of TRL's SFTTrainer records the trainer and its weights before training."""
    import trl

    seen: list[dict] = []

    class RecordingSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append({"trainer": self, "before": snapshot(self.model)})

    out = tmp_path_factory.mktemp("sft")
    cfg = sft_config(tiny_model_dir, out, f"sft.max_steps={STEPS}")
    progress = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", RecordingSFTTrainer)
        result = train(context(cfg, out, progress), "sft", EXAMPLES)
    assert len(seen) == 1
    return {"cfg": cfg, "result": result, "progress": progress, **seen[0]}


# --- metrics ----------------------------------------------------------------------------------


def test_loss_reported_every_step_through_callback(trained):
    progress = trained["progress"]
    assert progress.started == [("sft", STEPS)]
    assert progress.steps_with("loss") == list(range(1, STEPS + 1))
    # The last report is the trainer's summary at the final step.
    assert progress.updates[-1][0] == STEPS and "train_loss" in progress.updates[-1][1]


def test_loss_decreases_on_a_fixed_batch(trained):
    curve = [m["loss"] for _, m in trained["progress"].updates if "loss" in m]
    assert curve[-1] < curve[0] - 0.1
    # Same batch every step: no step may undo progress by more than noise.
    assert all(b <= a + 0.02 for a, b in zip(curve, curve[1:])), curve
    history = [(h["step"], h["loss"]) for h in trained["result"].history if "loss" in h]
    assert history == list(zip(range(1, STEPS + 1), curve))


def test_train_result_fields(trained):
    result = trained["result"]
    assert result.global_step == STEPS
    assert result.resumed_from_step == 0
    assert 0 < result.trainable_params < result.total_params
    assert result.wall_s > 0 and result.peak_memory_mb > 0
    assert "train_loss" in result.metrics


# --- what moved ---------------------------------------------------------------------------------


def test_lora_weights_changed_and_base_weights_did_not(trained):
    before = trained["before"]
    after = snapshot(trained["trainer"].model)
    assert before.keys() == after.keys()
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    unchanged_base = [n for n in base if torch.equal(before[n], after[n])]
    assert unchanged_base == base
    # lora_B starts at zero; every B must have moved away from it, and the A matrices must have moved too.
    b_names = [n for n in lora if "lora_B" in n]
    assert all(torch.count_nonzero(before[n]) == 0 for n in b_names)
    assert all(torch.count_nonzero(after[n]) > 0 for n in b_names)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_A" in n)


def test_base_layers_are_4bit_and_frozen(trained):
    import bitsandbytes as bnb

    model = trained["trainer"].model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    assert all(not m.weight.requires_grad for m in quantized)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


# --- adapter on disk ----------------------------------------------------------------------------


def test_adapter_dir_holds_config_weights_tokenizer_and_meta(trained):
    from safetensors.torch import load_file

    adapter = Path(trained["result"].adapter_dir)
    assert adapter.parent.name == "sft"
    meta = json.loads((adapter / "ftflow_meta.json").read_text())
    assert meta["stage"] == "sft" and (meta["lora_r"], meta["lora_alpha"]) == (4, 8)
    assert meta["eos_token"] == "<|im_end|>" and len(meta["template_fingerprint"]) == 16
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["lora_alpha"] == 8  # 2 * r, alpha left empty
    assert set(config["target_modules"]) == set(trained["cfg"].lora.target_modules)
    assert (adapter / "tokenizer_config.json").exists()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    params = dict(trained["trainer"].model.named_parameters())
    assert saved and all("lora_" in k for k in saved)
    for key, tensor in saved.items():
        live = params[key.replace(".weight", ".default.weight")]
        assert torch.equal(tensor.float(), live.detach().float()), key


def test_explicit_alpha_reaches_the_adapter(tmp_path, tiny_model_dir):
    cfg = sft_config(tiny_model_dir, tmp_path, "sft.max_steps=1", "lora.alpha=5")
    result = train(context(cfg, tmp_path), "sft", EXAMPLES)
    config = json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 5)


# --- loss on the answer only --------------------------------------------------------------------


def test_loss_only_on_completion_tokens(trained):
    tokenizer = trained["trainer"].processing_class
    dataset = trained["trainer"].train_dataset
    assert len(dataset) == len(EXAMPLES)
    for row, example in zip(dataset, EXAMPLES):
        labels = row["labels"]
        scored = [tok for tok in labels if tok != -100]
        prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
        # Every prompt token (system, user turn, the assistant header) is masked; the answer and its end token are not.
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert tokenizer.decode(scored).strip() == example["completion"][0]["content"] + "<|im_end|>"
        assert row["input_ids"][len(prompt_ids) :] == scored


# --- resume from checkpoint ---------------------------------------------------------------------


def test_resume_from_last_checkpoint(tmp_path, tiny_model_dir):
    first_cfg = sft_config(tiny_model_dir, tmp_path, "sft.max_steps=4", "sft.save_steps=2")
    first = train(context(first_cfg, tmp_path), "sft", EXAMPLES)
    assert first.resumed_from_step == 0
    assert first.global_step == 4
    ckpt_dir = tmp_path / "sft" / "checkpoints"
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in ckpt_dir.iterdir()}
    assert last_checkpoint(ckpt_dir) == str(ckpt_dir / "checkpoint-4")

    progress = Recorder()
    second_cfg = sft_config(tiny_model_dir, tmp_path, "sft.max_steps=6", "sft.save_steps=2")
    second = train(context(second_cfg, tmp_path, progress), "sft", EXAMPLES)
    assert second.resumed_from_step == 4
    assert second.global_step == 6
    # Only the new steps were trained and reported.
    assert progress.steps_with("loss") == [5, 6]
    assert last_checkpoint(ckpt_dir) == str(ckpt_dir / "checkpoint-6")


def test_last_checkpoint_ignores_incomplete_and_foreign_dirs(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    for name, complete in [
        ("checkpoint-3", True),
        ("checkpoint-10", True),
        ("checkpoint-12", False),
        ("checkpoint-best", True),
    ]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    # Numeric order (10 > 3), and a checkpoint killed before its state was written is skipped.
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
