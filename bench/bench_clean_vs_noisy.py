"""Quality over quantity: the same SFT step budget on clean rows vs the same rows with 30 % label noise.

    .venv/bin/python bench/bench_clean_vs_noisy.py                   # 40 steps x batch 8, 96 held-out prompts
    .venv/bin/python bench/bench_clean_vs_noisy.py --steps 2 --batch 2 --heldout 4 --max-new-tokens 8   # smoke

Data: the extraction demo task (tasks/data/demo.py), seeded, no injected defects. Both arms train on the
same steps * batch rows, one pass, in the same order; in the noisy arm `--noise` of them (30 %) are
replaced by a defective copy of the same row that still passes the schema checks, i.e. label noise:

  wrong_answer     the answer is one of the demo's realistic mistakes (wrong quantity, swapped fields, ...)
  truncated        the answer is cut off halfway (an export that lost its tail)
  repeated_lines   the answer is repeated on three lines (a degenerate generation kept as data)
  swapped_roles    the user turn holds the answer and the assistant turn the order sentence

Training is the pipeline's: the demo model (SmolLM2-135M-Instruct, 4-bit NF4 QLoRA, the default LoRA),
rows formatted by tasks/data/formatting.py (loss on the answers), TRL's SFTTrainer, the same seed and
hyperparameters in both arms. Both adapters answer the same held-out prompts greedily; each answer gets
the JSON field accuracy (the headline) and exact match against its reference, whether it holds a JSON
object at all, and whether it stopped at the end-of-turn token within --max-new-tokens (what cut and
repeated answers teach). The scores are printed with 95 % intervals
from a paired bootstrap over the held-out examples (both arms resampled with the same indices, 2000
resamples), and so is the clean - noisy difference: an interval above 0 means the clean arm is better.
It also says how many of the injected rows the quality checks would have caught before training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOISE_KINDS = ("wrong_answer", "truncated", "repeated_lines", "swapped_roles")
# field_accuracy is the headline; the others say which defect did the damage.
METRICS = ("field_accuracy", "exact_match", "json_valid", "eos_stop")


def cpu_line() -> str:
    """The CPU, the flags the matmul speed depends on, and the load: a shared box's timings need them beside."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()) if "flags" in text else set()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"cpu: {name.group(1).strip() if name else 'unknown'}, {os.cpu_count()} logical CPUs, "
        f"flags {' '.join(wanted) or '(none of avx2/avx512f/avx512_bf16/amx_tile)'}; load average {load}"
    )


# --- data ----------------------------------------------------------------------------------------


def demo_rows(work: Path, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    from ftflow.configs.schema import DemoDataConfig
    from ftflow.tasks.data.demo import generate_demo

    made = generate_demo(
        DemoDataConfig(seed=seed, n_sft=n_train, n_preference=1, n_heldout=n_heldout, defect_rate=0.0), work / "demo"
    )

    def read(path: str) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]

    return read(made["sft"]), read(made["heldout"])


def noisy_copy(row: dict, kind: str, rng: random.Random) -> dict:
    """The row with one defect that keeps it well-formed: roles still alternate user/assistant, nothing empty."""
    from ftflow.tasks.data.demo import MISTAKES, Example

    user, assistant = (dict(m) for m in row["messages"])
    answer = assistant["content"]
    if kind == "wrong_answer":
        fields = json.loads(answer)
        # The sentence itself is not needed by these mistakes beyond the decoy numbers it holds.
        ex = Example(
            fields["lang"],
            fields["name"],
            fields["item"],
            fields["qty"],
            fields["city"],
            0,
            user["content"].split("\n", 1)[-1],
        )
        mistake = rng.choice(sorted(k for k in MISTAKES if k != "prose"))
        assistant["content"] = MISTAKES[mistake](ex, rng)
    elif kind == "truncated":
        assistant["content"] = answer[: max(1, len(answer) // 2)]
    elif kind == "repeated_lines":
        assistant["content"] = "\n".join([answer] * 3)
    elif kind == "swapped_roles":
        user["content"], assistant["content"] = answer, user["content"]
    else:  # pragma: no cover - NOISE_KINDS is the list
        raise ValueError(kind)
    return {"messages": [user, assistant]}


def arms(rows: list[dict], noise: float, seed: int) -> tuple[list[dict], list[dict], dict[int, str]]:
    """(clean rows, noisy rows, which positions got which defect); the kinds in equal shares."""
    rng = random.Random(f"bench-clean-vs-noisy-{seed}")
    picked = sorted(rng.sample(range(len(rows)), round(noise * len(rows))))
    kinds = {i: NOISE_KINDS[j % len(NOISE_KINDS)] for j, i in enumerate(picked)}
    noisy = [noisy_copy(r, kinds[i], rng) if i in kinds else r for i, r in enumerate(rows)]
    return rows, noisy, kinds


def caught_by_validation(noisy: list[dict], kinds: dict[int, str], tokenizer) -> dict[str, str]:
    """Per defect kind, how many injected rows the pipeline's quality checks drop (they do not run in either arm)."""
    from ftflow.configs.schema import QualityConfig
    from ftflow.tasks.data.quality import chat_token_lengths, run_quality
    from ftflow.tasks.data.rows import Record

    result = run_quality(
        [Record(r, "noisy", i) for i, r in enumerate(noisy)],
        "sft",
        QualityConfig(languages=[]),
        chat_token_lengths(tokenizer),
    )
    dropped = {d.line: d.reason for d in result.dropped}
    out = {}
    for kind in NOISE_KINDS:
        lines = [i for i, k in kinds.items() if k == kind]
        reasons = sorted({dropped[i] for i in lines if i in dropped})
        out[kind] = f"{sum(i in dropped for i in lines)}/{len(lines)}" + (f" ({', '.join(reasons)})" if reasons else "")
    return out


# --- training and scoring ----------------------------------------------------------------------


def train_and_score(name: str, rows: list[dict], heldout: list[dict], args, model_path: str, work: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from ftflow.configs.schema import EvalConfig, PipelineConfig
    from ftflow.tasks.data.formatting import Window, end_of_turn_token, format_sft, sft_example
    from ftflow.tasks.data.rows import Record
    from ftflow.tasks.evaluate.evaluation import generate
    from ftflow.tasks.evaluate.metrics.json_match import score_example
    from ftflow.tasks.train.model import build_lora_config, load_base_model, load_tokenizer, pick_device

    cfg = PipelineConfig.model_validate(
        {
            "seed": args.seed,
            "model": {"name_or_path": model_path},
            "sft": {"max_steps": args.steps, "per_device_batch_size": args.batch},
        }
    )
    device = pick_device(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    eot = end_of_turn_token(tokenizer)
    examples, dropped, _, _ = format_sft(
        tokenizer, [Record(r, name, i) for i, r in enumerate(rows, 1)], None, Window.of(cfg.sft), eot
    )
    if dropped:
        raise SystemExit(f"{name}: {len(dropped)} rows do not fit sft.max_length {cfg.sft.max_length}")
    torch.manual_seed(args.seed)
    model = load_base_model(model_path, cfg.model, cfg.quantization)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, build_lora_config(cfg.lora))
    sft = cfg.sft
    trainer = SFTTrainer(
        model=model,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        args=SFTConfig(
            output_dir=str(work / name),
            max_steps=sft.max_steps,
            learning_rate=sft.learning_rate,
            per_device_train_batch_size=sft.per_device_batch_size,
            warmup_steps=math.ceil(sft.warmup_ratio * sft.max_steps),
            lr_scheduler_type="cosine",
            logging_steps=max(1, sft.max_steps // 4),
            save_strategy="no",
            seed=args.seed,
            data_seed=args.seed,
            max_length=sft.max_length,
            packing=False,
            bf16=device == "cuda",
            use_cpu=device == "cpu",
            report_to="none",
            disable_tqdm=True,
            shuffle_dataset=False,
        ),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train()
    print(
        f"{name}: {output.global_step} steps in {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU (all threads), train loss {output.metrics['train_loss']:.4f}",
        flush=True,
    )

    model.eval()
    prompts = [sft_example(r, None)["prompt"] for r in heldout]
    references = [r["messages"][-1]["content"] for r in heldout]
    generations = generate(
        model, tokenizer, prompts, EvalConfig(batch_size=args.eval_batch, max_new_tokens=args.max_new_tokens), eot
    )
    scores = [score_example(g["text"], ref, eot) for g, ref in zip(generations, references)]
    del trainer, model
    # json_valid and eos_stop show what the noise taught: cut answers break the JSON, repeated ones the stop.
    return [
        {**{k: float(s[k]) for k in METRICS[:3]}, "eos_stop": float(eot in g["text"])}
        for s, g in zip(scores, generations)
    ]


def paired_bootstrap(
    a: list[float], b: list[float], resamples: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """Mean and 95 % percentile interval of a, of b and of a - b, resampling example indices jointly."""
    rng = random.Random(seed)
    n = len(a)
    means = {"clean": [], "noisy": [], "difference": []}
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ma, mb = sum(a[i] for i in idx) / n, sum(b[i] for i in idx) / n
        means["clean"].append(ma)
        means["noisy"].append(mb)
        means["difference"].append(ma - mb)
    point = {"clean": sum(a) / n, "noisy": sum(b) / n, "difference": (sum(a) - sum(b)) / n}
    out = {}
    for key, values in means.items():
        values.sort()
        out[key] = (point[key], values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm (the same budget for both)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.3, help="share of training rows replaced by a defective copy")
    p.add_argument("--heldout", type=int, default=96, help="held-out prompts scored per arm (generation is cheap)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args()

    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import load_tokenizer, offline_env, resolve_model_path

    offline_env()
    model_path = resolve_model_path(ModelConfig())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        work = Path(tmp)
        rows, heldout = demo_rows(work, args.steps * args.batch, args.heldout, args.data_seed)
        clean, noisy, kinds = arms(rows, args.noise, args.seed)
        print(cpu_line())
        print(f"model: {model_path}")
        print(
            f"rows per arm: {len(rows)} ({args.steps} steps x batch {args.batch}, one pass); "
            f"noisy arm: {len(kinds)} rows ({len(kinds) / len(rows):.0%}) with a defect"
        )
        print(f"held-out prompts: {len(heldout)}")
        print(
            "injected rows the quality checks would drop: "
            + ", ".join(
                f"{k} {v}"
                for k, v in caught_by_validation(noisy, kinds, load_tokenizer(model_path, ModelConfig())).items()
            )
        )
        per_arm = {
            name: train_and_score(name, data, heldout, args, model_path, work)
            for name, data in (("clean", clean), ("noisy", noisy))
        }
    for metric in METRICS:
        result = paired_bootstrap(
            [s[metric] for s in per_arm["clean"]], [s[metric] for s in per_arm["noisy"]], args.resamples, args.seed
        )
        print(f"held-out {metric} (mean, 95% paired-bootstrap interval, {args.resamples} resamples):")
        for key in ("clean", "noisy", "difference"):
            mean, lo, hi = result[key]
            label = "clean - noisy" if key == "difference" else key
            print(f"  {label:<13} {mean:.3f}  [{lo:.3f}, {hi:.3f}]")
    print(f"wall: {time.perf_counter() - started:.0f} s, CPU {time.process_time():.0f} s (all threads)")
    print(cpu_line().split("; ")[-1] + " (at the end)")


if __name__ == "__main__":
    main()
