"""The project's own SFT then DPO (`ftflow.tasks.train.trainer.train`) on CUDA: 4-bit NF4 base, bf16 compute,
paged 8-bit AdamW, on a small Llama built from a config with a tokenizer trained here (no hub, no GGUF package).

Skipped without CUDA. bench/gpu_check.sh runs it on the GPU machine; without pytest there it runs as a script:
    python tests/bench/test_gpu_path.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# bench/gpu_check.py holds the one random-Llama builder; it is a script, not part of the ftflow package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_check import TINY_BLOCKS, save_random_llama  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CITIES = ("Paris", "Tokyo", "Osaka", "Berlin", "Lima", "Cairo", "Oslo", "Quito")


def rows() -> tuple[list[dict], list[dict]]:
    sft, pairs = [], []
    for i, city in enumerate(CITIES):
        prompt = [{"role": "user", "content": f"Extract the city as JSON: order {i + 1} ships to {city}."}]
        answer = json.dumps({"city": city, "order": i + 1})
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]})
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": f"It goes to {city}, I think."}],
            }
        )
    return sft, pairs


def build_model_dir(out: Path) -> str:
    """A 4-layer Llama with random weights and a ByteLevel BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sft, pairs = rows()
    texts = [m["content"] for r in sft for m in r["prompt"] + r["completion"]] + [
        m["content"] for p in pairs for m in p["rejected"]
    ]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts * 4,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok.chat_template = CHATML
    sizes = dict(TINY_BLOCKS, hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=512)
    return save_random_llama(out, tok, sizes)


def gpu_config(model_dir: str, out: Path):
    from ftflow.configs.loader import load_config

    # Learning rates high enough to move bf16 adapters in a few steps; no checkpoints inside the short runs.
    return load_config(
        "tiny",
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "model.device=cuda",
            "quantization.mode=4bit",
            "quantization.double_quant=true",
            "quantization.compute_dtype=bfloat16",
            "lora.r=8",
            "sft.max_steps=6",
            "sft.per_device_batch_size=4",
            "sft.learning_rate=2e-3",
            "sft.warmup_ratio=0.0",
            "sft.logging_steps=1",
            "sft.save_steps=1000",
            "sft.extra.optim=paged_adamw_8bit",
            "dpo.max_steps=4",
            "dpo.per_device_batch_size=4",
            "dpo.learning_rate=2e-3",
            "dpo.warmup_ratio=0.0",
            "dpo.logging_steps=1",
            "dpo.save_steps=1000",
            "dpo.extra.optim=paged_adamw_8bit",
        ],
    )


def run_sft_then_dpo(work: Path) -> dict:
    pytest.importorskip("trl")
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("datasets")
    pytest.importorskip("pydantic")
    import trl

    from ftflow.tasks.stages import StageContext, resolve_model
    from ftflow.tasks.train.trainer import train

    cfg = gpu_config(build_model_dir(work / "model"), work / "runs")
    ctx = StageContext(cfg, resolve_model(cfg), None, work / "runs", lambda line: None, None)
    seen: dict[str, dict] = {}

    def recording(base, kind):
        class Recording(base):
            def create_optimizer(self, *args, **kwargs):
                opt = super().create_optimizer(*args, **kwargs)
                model = self.model
                seen[kind] = {
                    "optimizer": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
                    "paged": bool(getattr(self.optimizer, "is_paged", False)),
                    "optim_bits": getattr(getattr(self.optimizer, "args", None), "optim_bits", None),
                    "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
                    "devices": sorted({p.device.type for p in model.parameters()}),
                    "bf16": bool(self.args.bf16),
                }
                return opt

        return Recording

    sft_rows, pairs = rows()
    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", recording(trl.SFTTrainer, "sft"))
        mp.setattr(trl, "DPOTrainer", recording(trl.DPOTrainer, "dpo"))
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out["sft"] = train(ctx, "sft", sft_rows)
        out["sft_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out["dpo"] = train(ctx, "dpo", pairs, out["sft"].adapter_dir)
        out["dpo_s"] = time.perf_counter() - t0
    out["seen"] = seen
    return out


def check(out: dict) -> None:
    for kind, steps in (("sft", 6), ("dpo", 4)):
        result, seen = out[kind], out["seen"][kind]
        assert result.global_step == steps
        assert (Path(result.adapter_dir) / "adapter_config.json").exists()
        losses = [h["loss"] for h in result.history if "loss" in h]
        assert losses and all(math.isfinite(x) for x in losses), result.history
        assert result.peak_memory_mb > 0
        assert seen["linear4bit"] > 0, "the base is not 4-bit"
        assert seen["devices"] == ["cuda"], seen
        assert seen["bf16"]
        # TRL's optim="paged_adamw_8bit" is bitsandbytes' AdamW with is_paged=True and 8-bit states.
        assert seen["optimizer"].startswith("bitsandbytes") and seen["paged"] and seen["optim_bits"] == 8, seen
    assert any("rewards/margins" in h for h in out["dpo"].history)
    print(
        f"\nGPU path: SFT {out['sft'].global_step} steps in {out['sft_s']:.1f} s (train {out['sft'].wall_s:.1f} s, "
        f"peak {out['sft'].peak_memory_mb:.0f} MB, {out['seen']['sft']['optimizer']}); "
        f"DPO {out['dpo'].global_step} steps in {out['dpo_s']:.1f} s (train {out['dpo'].wall_s:.1f} s, "
        f"peak {out['dpo'].peak_memory_mb:.0f} MB)"
    )


def test_sft_then_dpo_on_cuda_4bit_paged_adamw(tmp_path):
    check(run_sft_then_dpo(tmp_path))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    check(run_sft_then_dpo(Path(tempfile.mkdtemp(prefix="gpu-path-"))))
    print("GPU path: passed")
