"""Multi-process training through `accelerate launch`: the parent writes a spec, every rank trains, rank 0 reports.

    accelerate launch --num_processes 2 [--use_fsdp] -m ftflow.tasks.train.launch SPEC.json

Several nodes: the pipeline runs on node 0 (`distributed.machine_rank=0`), which launches its share of the
processes; every other node runs the same launcher on the same spec (on shared storage) with its own rank:

    accelerate launch --num_processes N --num_machines M --machine_rank K --main_process_ip NODE0 \
        --main_process_port PORT --multi_gpu -m ftflow.tasks.train.launch WORK_DIR/<kind>/launch_spec.json

Each rank calls the same builder as a single process, `trainer.train`; rank 0 logs to the MLflow run by id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.stages import ModelInfo, StageContext
from ftflow.tasks.train.trainer import Kind, TrainResult, train


def accelerate_command(cfg: PipelineConfig, spec_path: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(cfg.distributed.num_processes),
        "--num_machines",
        str(cfg.distributed.num_machines),
        "--main_process_port",
        str(cfg.distributed.main_process_port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if cfg.distributed.num_machines > 1:
        # torch.distributed's static rendezvous: every node runs this launcher with its own rank, node 0's address.
        cmd += [
            "--machine_rank",
            str(cfg.distributed.machine_rank),
            "--main_process_ip",
            str(cfg.distributed.main_process_ip),
        ]
    # torchrun-style launcher either way; without CUDA the process group comes up on gloo, so the
    # multi-process path runs (and is tested) on CPUs. accelerate's --cpu launcher would need MPI instead.
    cmd.append("--multi_gpu")
    if cfg.distributed.strategy == "fsdp":
        cmd += [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
        ]
    return cmd + ["-m", "ftflow.tasks.train.launch", str(spec_path)]


SECRETS_ENV = "FTFLOW_LAUNCH_SECRETS"


def spec_config(cfg: PipelineConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(the config as the spec file holds it, the workers' environment).

    The spec is a file on disk: its config has no credentials. A tracking or registry URI loses its
    `user:password@` (the workers get them as MLFLOW_TRACKING_USERNAME/PASSWORD, as MLflow reads them);
    any other secret-named value is redacted there and passed to the workers in FTFLOW_LAUNCH_SECRETS."""
    from ftflow.tasks.secrets import is_secret_key
    from ftflow.tasks.tracking import credentials_to_env, redact_config_dict

    env_before = dict(os.environ)
    stripped = credentials_to_env(cfg)  # sets the two MLFLOW_TRACKING_* variables in this process
    env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env_before)  # this process keeps what it had
    raw = stripped.model_dump(mode="json")
    hidden: dict[str, Any] = {}

    def collect(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if is_secret_key(str(k)) and v not in (None, "", [], {}):
                    hidden[".".join((*path, str(k)))] = v
                else:
                    collect(v, (*path, str(k)))

    collect(raw, ())
    env[SECRETS_ENV] = json.dumps(hidden)
    return redact_config_dict(raw), env


def with_secrets(config: dict[str, Any], hidden_json: str) -> dict[str, Any]:
    """The spec's config with the values spec_config hid put back (in a worker)."""
    for dotted, value in json.loads(hidden_json or "{}").items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def launch(ctx: StageContext, kind: Kind, examples: list[dict], start_adapter: Optional[str] = None) -> TrainResult:
    """`train` in cfg.distributed.num_processes processes; returns rank 0's result."""
    out_dir = ctx.work_dir / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "launch_examples.jsonl"
    with data_path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
    result_path = out_dir / "launch_result.json"
    config, launch_env = spec_config(ctx.cfg)
    spec = {
        "kind": kind,
        "config": config,
        "model": asdict(ctx.model),
        "work_dir": str(ctx.work_dir),
        "run_id": ctx.run.run_id if ctx.run else None,
        "start_adapter": start_adapter,
        "examples": str(data_path),
        "result": str(result_path),
    }
    spec_path = out_dir / "launch_spec.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    # The workers print their own progress; the caller's progress hook hears only the start and the end.
    update = ctx.start_progress(kind, getattr(ctx.cfg, kind).max_steps)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        accelerate_command(ctx.cfg, spec_path), cwd=root, capture_output=True, text=True, env=launch_env
    )
    if done.returncode != 0 or not result_path.exists():
        from ftflow.tasks.secrets import redact_text

        tail = redact_text("\n".join((done.stderr or done.stdout).strip().splitlines()[-15:]))
        raise RuntimeError(
            f"accelerate launch of {kind} with {ctx.cfg.distributed.num_processes} processes failed "
            f"(exit {done.returncode}):\n{tail}"
        )
    result = TrainResult(**json.loads(result_path.read_text()))
    update(result.global_step, result.metrics)
    return result


def main(spec_path: str) -> None:
    from accelerate import PartialState

    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(with_secrets(spec["config"], os.environ.pop(SECRETS_ENV, "{}")))
    examples = [json.loads(line) for line in Path(spec["examples"]).read_text(encoding="utf-8").splitlines()]
    state = PartialState()
    run = None
    if state.is_main_process and spec["run_id"]:
        from ftflow.tasks.tracking import RunLogger

        run = RunLogger(cfg, spec["run_id"])
    ctx = StageContext(cfg, ModelInfo(**spec["model"]), run, Path(spec["work_dir"]))
    result = train(ctx, spec["kind"], examples, spec["start_adapter"])
    if state.is_main_process:
        result.metrics["world_size"] = float(state.num_processes)
        result.backend = str(state.backend)
        Path(spec["result"]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: accelerate launch ... -m ftflow.tasks.train.launch SPEC.json")
    main(sys.argv[1])
