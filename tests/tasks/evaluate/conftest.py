"""Evaluation fixtures: the tiny model's tokenizer, the tiny base with adapters that change its outputs, and a
sliding-window model."""

from __future__ import annotations

import pytest
import torch

from ftflow.configs.schema import LoraConfig, ModelConfig, Quantization, QuantizationConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ftflow.tasks.train.model import load_tokenizer

    return load_tokenizer(tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir))


def random_adapters(model_dir: str, names: list[str], seed: int):
    """The tiny float32 base with r=4 adapters named `names`, every lora_B randomised (seeded) so each adapter
    really changes the outputs."""
    from peft import get_peft_model

    from ftflow.tasks.train.model import build_lora_config, load_base_model

    base = load_base_model(model_dir, ModelConfig(name_or_path=model_dir), QuantizationConfig(mode=Quantization.none))
    model = get_peft_model(base, build_lora_config(LoraConfig(r=4)), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, build_lora_config(LoraConfig(r=4)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    """The tiny base with one adapter named `sft`."""
    return random_adapters(tiny_model_dir, ["sft"], seed=1)


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    """The tiny base with a candidate (`sft`) and a `champion` adapter, both randomised differently."""
    return random_adapters(tiny_model_dir, ["sft", "champion"], seed=2)


@pytest.fixture(scope="module")
def sliding_window_model(tokenizer):
    """A one-layer random Mistral whose attention keeps a sliding window: its cache is not plain full attention."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=8,
    )
    return MistralForCausalLM(config).eval()
