"""The base model read once per process against once per stage: `load_base_model` on the demo model, both ways.

    .venv/bin/python bench/bench_base_load.py                  # 5 loads per arm (a demo run's count), 3 rounds
    .venv/bin/python bench/bench_base_load.py --loads 6 --rounds 5 --quantization none

Arms, alternated in every round (ABBA), in one process:
- **disk**: every call reads and quantizes the weights (`BASE_KEEP_RAM_SHARE = 0`, as before the kept base);
- **kept**: the first call reads them, each later one copies the base kept in memory (the default on CPU).
Before each arm the kept base is dropped, so both start cold. Prints each arm's per-call seconds, the medians of
the first call and of the later ones, the median total per arm and the kept/disk ratio of the totals, and checks
that every kept copy gives the logits a disk read gives.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402

from ftflow.configs.loader import load_config  # noqa: E402
from ftflow.tasks.train import model as model_module  # noqa: E402


def one_arm(arm: str, loads: int, path: str, cfg) -> tuple[list[float], torch.Tensor]:
    model_module.forget_kept_base()
    share = model_module.BASE_KEEP_RAM_SHARE
    if arm == "disk":
        model_module.BASE_KEEP_RAM_SHARE = 0.0
    times, logits = [], None
    try:
        for _ in range(loads):
            start = time.perf_counter()
            model = model_module.load_base_model(path, cfg.model, cfg.quantization)
            times.append(time.perf_counter() - start)
            with torch.no_grad():
                out = model.eval()(input_ids=torch.tensor([[1, 5, 9, 42, 7, 3]])).logits
            if logits is not None and not torch.equal(out, logits):
                raise SystemExit(f"{arm}: a load gave different logits from the first")
            logits = out
            del model
    finally:
        model_module.BASE_KEEP_RAM_SHARE = share
        model_module.forget_kept_base()
    return times, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=5, help="load_base_model calls per arm (a demo run makes 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--quantization", default=None, help="quantization.mode override: 4bit, 8bit or none")
    args = parser.parse_args()
    overrides = [f"quantization.mode={args.quantization}"] if args.quantization else []
    cfg = load_config(args.recipe, overrides)
    path = model_module.resolve_model_path(cfg.model)
    print(cpu_line())
    print(f"model: {path}  quantization: {cfg.quantization.mode.value}  torch threads: {torch.get_num_threads()}")
    totals: dict[str, list[float]] = {"disk": [], "kept": []}
    first: dict[str, list[float]] = {"disk": [], "kept": []}
    later: dict[str, list[float]] = {"disk": [], "kept": []}
    reference = None
    for r in range(args.rounds):
        for arm in ("disk", "kept") if r % 2 == 0 else ("kept", "disk"):
            times, logits = one_arm(arm, args.loads, path, cfg)
            if reference is not None and not torch.equal(logits, reference):
                raise SystemExit(f"round {r}, {arm}: logits differ from the first arm's")
            reference = logits
            totals[arm].append(sum(times))
            first[arm].append(times[0])
            later[arm].extend(times[1:])
            print(f"round {r} {arm:4s}: " + " ".join(f"{t:.3f}" for t in times) + f"  total {sum(times):.2f} s")
    for arm in ("disk", "kept"):
        print(
            f"{arm:4s}: first call median {statistics.median(first[arm]):.3f} s, later calls median "
            f"{statistics.median(later[arm]) if later[arm] else float('nan'):.3f} s, "
            f"total per {args.loads} calls median {statistics.median(totals[arm]):.2f} s"
        )
    ratio = statistics.median(totals["kept"]) / statistics.median(totals["disk"])
    print(f"ratio_kept_vs_disk_total: {ratio:.3f}  (logits identical across every call of both arms)")


if __name__ == "__main__":
    main()
