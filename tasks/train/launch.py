"""Multi-process training through `accelerate launch`: the parent writes a spec, every rank trains, rank 0 reports.

    accelerate launch --num_processes 2 [--cpu] [--use_fsdp] -m ftflow.tasks.train.launch SPEC.json
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.train.training import TrainResult


def accelerate_command(cfg: PipelineConfig, spec_path: Path, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.distributed.num_processes),
           "--num_machines", "1", "--main_process_port", str(cfg.distributed.main_process_port),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    # torchrun-style launcher either way; without CUDA the process group comes up on gloo, so the
    # multi-process path runs (and is tested) on CPUs. accelerate's --cpu launcher would need MPI instead.
    cmd.append("--multi_gpu")
    if cfg.distributed.strategy == "fsdp":
        cmd += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    return cmd + ["-m", "ftflow.tasks.train.launch", str(spec_path)]


def launch(kind: str, cfg: PipelineConfig, model_path: str, examples: list[dict], out_dir: Path,
           run_id: Optional[str], sft_adapter: Optional[str], device: str) -> TrainResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "launch_examples.jsonl"
    with data_path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
    spec = {"kind": kind, "config": cfg.model_dump(mode="json"), "model_path": model_path, "examples": str(data_path),
            "out_dir": str(out_dir), "run_id": run_id, "sft_adapter": sft_adapter, "result": str(out_dir / "launch_result.json")}
    spec_path = out_dir / "launch_spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(accelerate_command(cfg, spec_path, device), cwd=root, capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["result"]).exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"accelerate launch of {kind} with {cfg.distributed.num_processes} processes failed "
                           f"(exit {done.returncode}):\n{tail}")
    payload = json.loads(Path(spec["result"]).read_text())
    backend = payload.pop("backend", None)
    result = TrainResult(**payload)
    result.backend = backend  # type: ignore[attr-defined]
    return result


def main(spec_path: str) -> None:
    from accelerate import PartialState

    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(spec["config"])
    examples = [json.loads(line) for line in Path(spec["examples"]).read_text(encoding="utf-8").splitlines()]
    state = PartialState()
    log_metrics = lambda metrics, step: None  # noqa: E731
    if state.is_main_process and spec["run_id"]:
        from ftflow.tasks.tracking import RunLogger

        log_metrics = RunLogger(cfg, spec["run_id"]).log_metrics
    if spec["kind"] == "sft":
        from ftflow.tasks.train.sft import run_sft

        result = run_sft(cfg, spec["model_path"], examples, Path(spec["out_dir"]), log_metrics)
    else:
        from ftflow.tasks.train.dpo import run_dpo

        result = run_dpo(cfg, spec["model_path"], spec["sft_adapter"], examples, Path(spec["out_dir"]), log_metrics)
    if state.is_main_process:
        payload = asdict(result)
        payload["metrics"]["world_size"] = float(state.num_processes)
        payload["backend"] = str(state.backend)
        Path(spec["result"]).write_text(json.dumps(payload))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: accelerate launch ... -m ftflow.tasks.train.launch SPEC.json")
    main(sys.argv[1])
