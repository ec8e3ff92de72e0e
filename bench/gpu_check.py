"""Peak memory, tokens/s and MFU of QLoRA, LoRA and full fine-tuning on a Llama-3.1-8B-shaped model, on one GPU.

    python bench/gpu_check.py                  # CUDA: 8B shapes, seq 512, batch 1, 20 steps per row
    python bench/gpu_check.py --dry-run        # CPU: the same code path on a 2-layer, hidden-64 model, 3 steps
    options: --rows qlora,lora,full --steps N --seq N --json out.json

The model is built from a LlamaConfig with the 8B sizes (vocab 128256) and random weights: no hub, no
download, and the memory and speed of a step do not depend on the weights' values. Each row trains with a
plain torch loop (peft LoRA r=16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down, gradient checkpointing,
bf16 autocast), the way the seed chapter's chart compares them (QLoRA ~8 GB, LoRA ~20 GB, full ~60 GB):

  qlora  the linear layers of every block replaced by bitsandbytes NF4 (double quantization, bf16 compute),
         peft's prepare_model_for_kbit_training, paged 8-bit AdamW on the adapter
  lora   the same adapter on a bf16 base, torch AdamW
  full   every weight trained in bf16, torch AdamW (its states take the parameters' dtype, bf16); an out-of-memory
         error prints OOM instead of numbers

Per row: peak allocated and reserved memory during training (the build, which holds a bf16 copy before
quantizing, is excluded), memory held by the weights, tokens/s over the timed steps, and MFU = model FLOP/s
over the bf16 matmul rate measured here. Model FLOPs per token: 6 N full, 4 N + 6 N_lora with a frozen base
(no weight gradients); recomputation under gradient checkpointing is not counted (it is what MFU excludes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ("qlora", "lora", "full")
SEED_CHART_GB = {"qlora": 8, "lora": 20, "full": 60}

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# A 2-layer, hidden-64 Llama: the dry run's blocks, and the test suite's tiny model (tests/conftest.py).
TINY_BLOCKS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
# The dry run keeps the 8B vocabulary (the LM head is a large share of a small model's work) and shrinks the rest.
TINY = dict(LLAMA_8B, **TINY_BLOCKS)


@dataclass(frozen=True)
class Plan:
    """How every row runs: the device, the model's LlamaConfig sizes, the batch shape, the steps, the matmul peak."""

    device: str
    sizes: dict
    seq: int
    batch: int
    steps: int
    warmup: int
    peak_flops: float


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, n: int, reps: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Median FLOP/s of an n x n @ n x n product, after three untimed ones (they build the BLAS/cuBLAS plan)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times)


def flop_params(cfg) -> tuple[int, int]:
    """(N, N_lora): weights multiplying each token (all projections + LM head) and the r=16 adapter's weights."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    n = layers * sum(a * b for a, b in shapes) + cfg.vocab_size * h
    return n, layers * sum(16 * (a + b) for a, b in shapes)


def random_llama(sizes: dict, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """A LlamaForCausalLM of the given LlamaConfig fields with seeded random weights, built on `device` in `dtype`
    (torch's default when None). The one builder of random Llamas: this script and the tests import it, and this
    script must run where neither ftflow nor its tracking stack is installed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def save_random_llama(out, tokenizer, sizes: dict) -> str:
    """A random Llama of `sizes` with `tokenizer`'s vocabulary and special tokens (tied embeddings), saved with the
    tokenizer to the folder `out`, which from_pretrained then loads like any checkpoint."""
    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    random_llama({**sizes, **tokens}).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def build(kind: str, sizes: dict, device: str):
    model = random_llama(sizes, device, torch.bfloat16)
    model.config.use_cache = False
    if kind == "qlora":
        quantize_blocks_nf4(model, device)
    return model, model.config


def quantize_blocks_nf4(model, device: str) -> None:
    """Every nn.Linear inside the decoder blocks becomes a bitsandbytes NF4 Linear4bit, as load_in_4bit does.

    Built by hand because from_pretrained(quantization_config=...) needs weights on disk: 16 GB to write for 8B."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
                )
                q.weight = weight._quantize(device)
                setattr(parent, name, q)
                del child
    # prepare_model_for_kbit_training and peft's layer dispatch read these flags.
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    if device == "cuda":
        torch.cuda.empty_cache()


def with_lora(model, kind: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if kind == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if kind == "qlora":
        # As the pipeline does: norms and LM head in fp32, input grads on, gradient checkpointing on.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def optimizer_for(kind: str, params, device: str) -> tuple[Any, str]:
    if kind == "qlora":
        import bitsandbytes as bnb

        try:
            return bnb.optim.PagedAdamW8bit(params, lr=2e-4), "paged AdamW 8-bit"
        except Exception as err:  # paging needs CUDA unified memory; the CPU dry run falls back and says so
            if device == "cuda":
                raise
            return bnb.optim.AdamW8bit(
                params, lr=2e-4
            ), f"AdamW 8-bit (paged unavailable on {device}: {type(err).__name__})"
    fused = device == "cuda"
    return torch.optim.AdamW(
        params, lr=2e-4 if kind == "lora" else 1e-5, fused=fused
    ), "AdamW (bf16 states)" if kind == "full" else "AdamW (fp32 adapter)"


def run_row(kind: str, plan: Plan) -> dict[str, Any]:
    device, seq, batch, steps, warmup = plan.device, plan.seq, plan.batch, plan.steps, plan.warmup
    row: dict[str, Any] = {"row": kind, "seq": seq, "batch": batch, "steps": steps}
    model = opt = None
    try:
        t0 = time.perf_counter()
        model, config = build(kind, plan.sizes, device)
        model = with_lora(model, kind)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, row["optimizer"] = optimizer_for(kind, params, device)
        row["build_s"] = time.perf_counter() - t0
        row["trainable_params"] = sum(p.numel() for p in params)
        n, n_lora = flop_params(config)
        flops_per_token = 6 * n if kind == "full" else 4 * n + 6 * n_lora
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            row["weights_gb"] = torch.cuda.memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator(device="cpu").manual_seed(1)
        model.train()
        times = []
        for step in range(warmup + steps):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - t)
            row["loss"] = float(loss.detach())
        step_s = statistics.median(times)
        row.update(step_s=step_s, tokens_per_s=batch * seq / step_s, flop_per_s=flops_per_token * batch * seq / step_s)
        row["mfu"] = row["flop_per_s"] / plan.peak_flops
        if device == "cuda":
            row["peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        else:
            import resource

            row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    except torch.OutOfMemoryError as err:
        row["oom"] = str(err).splitlines()[0][:200]
    except ImportError as err:
        row["skipped"] = f"{err}"
    finally:
        del model, opt
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict], device_name: str, peak: float, dry: bool) -> str:
    lines = [
        f"device: {device_name}; bf16 matmul {peak / 1e12:.1f} TFLOP/s (median); torch {torch.__version__}"
        + ("; DRY RUN (CPU, tiny model: numbers test the code path only)" if dry else "")
    ]
    mem = "peak RSS GB" if dry else "peak GB (alloc/reserved)"
    head = f"{'row':6} {'weights GB':>10} {mem:>24} {'seed chart':>10} {'s/step':>8} {'tok/s':>9} {'MFU':>7}  optimizer"
    lines += [head, "-" * len(head)]
    for r in rows:
        if "oom" in r or "skipped" in r:
            what = "OOM" if "oom" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['row']:6} {what}")
            continue
        peak_mem = f"{r['peak_rss_gb']:.2f}" if dry else f"{r['peak_alloc_gb']:.1f} / {r['peak_reserved_gb']:.1f}"
        weights = f"{r['weights_gb']:.1f}" if "weights_gb" in r else "-"
        lines.append(
            f"{r['row']:6} {weights:>10} {peak_mem:>24} {'~' + str(SEED_CHART_GB[r['row']]) + ' GB':>10} "
            f"{r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['mfu']:7.1%}  {r['optimizer']}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, 2 layers, hidden 64, 3 steps: tests the code path")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, sizes = "cpu", TINY
        steps, seq, warmup, mm = args.steps or 3, args.seq or 64, 1, (512, 3)
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device; use --dry-run to test the code path on CPU")
        device, sizes = "cuda", LLAMA_8B
        steps, seq, warmup, mm = args.steps or 20, args.seq or 512, 2, (8192, 20)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = matmul_rate(device, *mm)
    print(f"bf16 matmul {mm[0]}^2: {peak / 1e12:.2f} TFLOP/s", flush=True)
    plan = Plan(device, sizes, seq, args.batch, steps, warmup, peak)
    rows = []
    for kind in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if kind not in ROWS:
            ap.error(f"unknown row {kind!r}; choose from {ROWS}")
        t0 = time.perf_counter()
        rows.append(run_row(kind, plan))
        print(f"{kind}: done in {time.perf_counter() - t0:.1f} s: {json.dumps(rows[-1])}", flush=True)
    print(table(rows, device_name, peak, args.dry_run))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": device_name, "bf16_matmul_flop_s": peak, "rows": rows, "dry_run": args.dry_run}, fh, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
