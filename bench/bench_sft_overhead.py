"""What does the pipeline's SFT step cost over a bare TRL script doing the same training?

    .venv/bin/python bench/bench_sft_overhead.py                     # 10 steps, batch 8, 3 repeats
    .venv/bin/python bench/bench_sft_overhead.py --steps 20 --repeats 1

Both arms train the real demo model (SmolLM2-135M, 4-bit NF4 double-quant, the default LoRA) on the
same seeded demo rows (the first steps * batch clean rows of sft.jsonl, as prompt/completion pairs),
with the same steps, batch, max_length, learning rate, schedule and seed:

  pipeline  ftflow.tasks.train.trainer.train (the `train` task's body) with a real MLflow RunLogger on a
            throwaway SQLite store, so the per-step metric logging, prepare_model_for_kbit_training, the
            adapter save and its upload to the run are counted;
  bare      a hand-written QLoRA script: from_pretrained + BitsAndBytesConfig, get_peft_model,
            SFTTrainer(SFTConfig(report_to="none")), train, save the adapter;
  bare-labelled-head
            the same script after `score_labelled_positions_only()`, the one line by which the pipeline's
            step computes less than TRL's default on a CPU (its fused LM head projects only the labelled
            positions): pipeline / this arm is the pipeline's own overhead, pipeline / bare what a user sees.

Each run is a fresh subprocess (cold model load every time), in ABBA order (the arm that goes first
alternates) so a drift in the load from other jobs falls on both arms. The timed span is the same in
both: tokenizer + model load through the adapter save; imports, data preparation and MLflow store
creation happen before the clock starts.

Prints one figure per line: per run, then medians per arm of the span, of the time outside train(),
of the trainer's own train_runtime per step, of the span's CPU time (all threads; less sensitive than
wall time to other jobs on a shared CPU box), of the subprocess wall time and of the final training
loss (a check that both arms did the same work), then the ratios pipeline / bare of those medians and
the median of the per-pair s/step ratios (each pair ran back to back under about the same load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("pipeline", "bare", "bare-labelled-head")
BARE = ARMS[1:]


# --- driver ------------------------------------------------------------------------------------


def clean_examples(work: Path, n: int) -> list[dict]:
    """The first n defect-free demo SFT rows, formatted exactly as the pipeline hands them to TRL."""
    from ftflow.configs.schema import DemoDataConfig
    from ftflow.tasks.data.demo import generate_demo
    from ftflow.tasks.data.formatting import sft_example

    info = generate_demo(DemoDataConfig(), work / "demo")
    bad = {line for kind in info["manifest_content"]["defects"]["sft"].values() for line in kind["lines"]}
    examples = []
    with open(info["sft"], encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if line not in bad:
                examples.append(sft_example(json.loads(text), None))
            if len(examples) == n:
                break
    return examples


def run_arm(arm: str, spec_path: Path, work: Path, index: int) -> dict:
    result_path = work / f"result-{index}-{arm}.json"
    log_path = work / f"log-{index}-{arm}.txt"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        arm,
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
        "--out",
        str(work / f"out-{index}-{arm}"),
    ]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        # cwd = the scratch dir: MLflow puts its default artifact root under the working directory.
        proc = subprocess.run(
            cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"{arm} run {index} failed with exit code {proc.returncode} (log: {log_path})")
    return {**json.loads(result_path.read_text()), "repeat": index, "process_s": process_s}


def median_of(runs: list[dict], arm: str, key: str) -> float:
    return statistics.median(r[key] for r in runs if r["arm"] == arm)


def hyperparameters(args: argparse.Namespace) -> dict:
    """The pipeline's config with the bench's overrides, as plain values both workers read."""
    from ftflow.configs.schema import PipelineConfig

    cfg = PipelineConfig.model_validate(
        {
            "seed": args.seed,
            "sft": {"max_steps": args.steps, "per_device_batch_size": args.batch, "max_length": args.max_length},
        }
    )
    q = cfg.quantization
    if q.mode.value != "4bit" or q.quant_type != "nf4" or not q.double_quant or q.compute_dtype != "auto":
        raise SystemExit(f"the bare arm hard-codes 4-bit NF4 double-quant with auto compute dtype; config has {q}")
    return {
        "seed": cfg.seed,
        "sft": cfg.sft.model_dump(),
        "lora": {
            "r": cfg.lora.r,
            "lora_alpha": cfg.lora.resolved_alpha,
            "lora_dropout": cfg.lora.dropout,
            "target_modules": list(cfg.lora.target_modules),
        },
    }


def drive(args: argparse.Namespace) -> None:
    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import offline_env, resolve_model_path

    offline_env()
    model_path = str(Path(resolve_model_path(ModelConfig())).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        examples = clean_examples(work, args.steps * args.batch)  # one pass, no row seen twice
        spec = {"model_path": model_path, "examples": examples, **hyperparameters(args)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, ensure_ascii=False))
        print(f"model: {model_path}")
        print(f"examples: {len(examples)}")
        print(f"steps: {args.steps}")
        print(f"batch: {args.batch}")
        print(f"max_length: {args.max_length}")
        print(f"repeats: {args.repeats}")
        runs = []
        for i in range(args.repeats):
            # ABBA...: alternating which arm goes first cancels a steady drift in machine load.
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                r = run_arm(arm, spec_path, work, i)
                runs.append(r)
                print(
                    f"run {i + 1} {arm}: span {r['span_s']:.2f} s, outside train() {r['outside_train_s']:.2f} s, "
                    f"train_runtime {r['train_runtime']:.2f} s ({r['train_runtime'] / r['global_step']:.3f} s/step), "
                    f"span cpu {r['cpu_s']:.2f} s, process {r['process_s']:.2f} s, loss {r['train_loss']:.4f}, device {r['device']}, "
                    f"load avg {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        for arm in ARMS:
            steps = [r["global_step"] for r in runs if r["arm"] == arm]
            if set(steps) != {args.steps}:
                raise SystemExit(f"{arm} ran {steps} steps, expected {args.steps}")
        span = {a: median_of(runs, a, "span_s") for a in ARMS}
        per_step = {a: median_of(runs, a, "train_runtime") / args.steps for a in ARMS}
        process = {a: median_of(runs, a, "process_s") for a in ARMS}
        outside = {a: median_of(runs, a, "outside_train_s") for a in ARMS}
        for a in ARMS:
            print(f"{a} median span (load + train + save): {span[a]:.2f} s")
        for a in ARMS:
            print(f"{a} median outside train() (load, adapter setup, trainer build, save): {outside[a]:.2f} s")
        for a in ARMS:
            print(f"{a} median train s/step (train_runtime / steps): {per_step[a]:.3f}")
        for a in ARMS:
            print(f"{a} median subprocess wall (incl. interpreter + imports): {process[a]:.2f} s")
        cpu = {a: median_of(runs, a, "cpu_s") for a in ARMS}
        for a in ARMS:
            print(f"{a} median span CPU time (all threads, user + sys): {cpu[a]:.2f} s")
        for a in ARMS:
            print(f"{a} median final train_loss: {median_of(runs, a, 'train_loss'):.4f}")
        by_repeat = {(r["repeat"], r["arm"]): r["train_runtime"] for r in runs}
        for bare in BARE:
            print(f"ratio pipeline/{bare} span: {span['pipeline'] / span[bare]:.3f}")
            print(f"ratio pipeline/{bare} s/step: {per_step['pipeline'] / per_step[bare]:.3f}")
            print(f"ratio pipeline/{bare} span CPU time: {cpu['pipeline'] / cpu[bare]:.3f}")
            print(f"ratio pipeline/{bare} subprocess wall: {process['pipeline'] / process[bare]:.3f}")
            # Each repeat's arms ran back to back, under about the same load from other jobs.
            paired = [by_repeat[i, "pipeline"] / by_repeat[i, bare] for i in range(args.repeats)]
            print(f"ratio pipeline/{bare} s/step, median of per-repeat pairs: {statistics.median(paired):.3f}")


# --- workers (one per subprocess) ----------------------------------------------------------------


def worker_pipeline(spec: dict, out_dir: Path) -> dict:
    from ftflow.configs.schema import PipelineConfig
    from ftflow.tasks.stages import StageContext, resolve_model
    from ftflow.tasks.tracking import RunLogger
    from ftflow.tasks.train.trainer import train

    cfg = PipelineConfig.model_validate(
        {
            "seed": spec["seed"],
            "model": {"name_or_path": spec["model_path"]},
            "sft": spec["sft"],
            "lora": {
                "r": spec["lora"]["r"],
                "alpha": spec["lora"]["lora_alpha"],
                "dropout": spec["lora"]["lora_dropout"],
                "target_modules": spec["lora"]["target_modules"],
            },
            "tracking": {
                "tracking_uri": f"sqlite:///{(out_dir.parent / 'mlflow-bench.db').resolve()}",
                "experiment": "bench-sft-overhead",
            },
        }
    )
    # The flow opens its run and resolves the model before the SFT stage; neither is SFT cost.
    run = RunLogger.start(cfg, run_name=out_dir.name)
    ctx = StageContext(cfg, resolve_model(cfg), run, out_dir, lambda line: None)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(ctx, "sft", spec["examples"])
    span, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "span_s": span,
        "cpu_s": cpu,
        "outside_train_s": span - result.wall_s,
        "global_step": result.global_step,
        "train_runtime": result.metrics["train_runtime"],
        "train_loss": result.metrics["train_loss"],
        "device": "cuda" if _cuda() else "cpu",
    }


def worker_bare(spec: dict, out_dir: Path, labelled_head: bool) -> dict:
    """The QLoRA script one would write by hand from the TRL and peft docs, with the pipeline's hyperparameters."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = _cuda()
    dtype = torch.bfloat16 if cuda else torch.float32
    path, sft = spec["model_path"], spec["sft"]
    steps = sft["max_steps"]
    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
        device_map={"": 0 if cuda else "cpu"},
    )
    model = get_peft_model(model, LoraConfig(**spec["lora"], bias="none", task_type="CAUSAL_LM"))
    args = SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=steps,
        learning_rate=sft["learning_rate"],
        per_device_train_batch_size=sft["per_device_batch_size"],
        gradient_accumulation_steps=sft["gradient_accumulation_steps"],
        warmup_steps=math.ceil(sft["warmup_ratio"] * steps),
        lr_scheduler_type="cosine",
        logging_steps=sft["logging_steps"],
        save_strategy="no",
        seed=spec["seed"],
        data_seed=spec["seed"],
        max_length=sft["max_length"],
        gradient_checkpointing=sft["gradient_checkpointing"],  # TRL's own default is True
        completion_only_loss=True,
        packing=False,
        # The same batches in the same order as the pipeline's (sft.group_by_length), so both arms do the same work.
        train_sampling_strategy="group_by_length" if sft["group_by_length"] else "random",
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
    )
    if labelled_head:
        from ftflow.tasks.train.trainer import score_labelled_positions_only

        score_labelled_positions_only()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(spec["examples"]), processing_class=tokenizer
    )
    t_train = time.perf_counter()
    output = trainer.train()
    train_wall = time.perf_counter() - t_train
    trainer.save_model(str(out_dir / "adapter"))
    tokenizer.save_pretrained(str(out_dir / "adapter"))
    span, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "span_s": span,
        "cpu_s": cpu,
        "outside_train_s": span - train_wall,
        "global_step": output.global_step,
        "train_runtime": output.metrics["train_runtime"],
        "train_loss": output.metrics["train_loss"],
        "device": "cuda" if cuda else "cpu",
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def work(arm: str, spec_path: Path, result_path: Path, out_dir: Path) -> None:
    from ftflow.tasks.train.model import offline_env

    offline_env()
    # Imports both arms pay alike happen before either clock starts.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if arm == "pipeline":
        result = worker_pipeline(spec, out_dir)
    else:
        result = worker_bare(spec, out_dir, labelled_head=arm == "bare-labelled-head")
    result_path.write_text(json.dumps({"arm": arm, **result}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work(args.worker, args.spec, args.result, args.out)
    else:
        drive(args)


if __name__ == "__main__":
    main()
