"""Evaluation fixtures: the tiny model's tokenizer, and the tiny base with an adapter that changes its outputs."""

from __future__ import annotations

import pytest
import torch

from ftflow.configs.schema import LoraConfig, ModelConfig, Quantization, QuantizationConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ftflow.tasks.train.model import load_tokenizer

    return load_tokenizer(tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir))


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    """The tiny base with one adapter named `sft`, its lora_B randomised so the adapter really changes outputs."""
    from peft import get_peft_model

    from ftflow.tasks.train.model import build_lora_config, load_base_model

    base = load_base_model(
        tiny_model_dir, ModelConfig(name_or_path=tiny_model_dir), QuantizationConfig(mode=Quantization.none)
    )
    model = get_peft_model(base, build_lora_config(LoraConfig(r=4)), adapter_name="sft")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    return model
