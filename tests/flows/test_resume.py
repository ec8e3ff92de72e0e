"""Kill a training run mid-way, re-run it: training resumes from the last checkpoint, in the same MLflow run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict

SAVE_EVERY = 4


def test_killed_run_resumes_from_checkpoint(tiny_cfg, tmp_path):
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), [
        "sft.max_steps=40", f"sft.save_steps={SAVE_EVERY}", "sft.logging_steps=1", "dpo.enabled=false",
        "registry.enabled=false", "eval.max_examples=2", "eval.few_shot_k=0"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "ftflow.cli", "run", str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runs_dir = Path(cfg.output_dir)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            ckpts = list(runs_dir.glob("*/sft/checkpoints/checkpoint-8/trainer_state.json"))
            if ckpts:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise TimeoutError("no checkpoint-8 within 10 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, as with a lost machine
        proc.wait()
    run_id = ckpts[0].parents[3].name
    client = MlflowClient(cfg.tracking.tracking_uri)
    killed_at = max(m.step for m in client.get_metric_history(run_id, "sft/loss"))
    assert killed_at < 40

    done = subprocess.run([*cmd, "--resume", run_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    resumed_from = int(run.data.metrics["sft/resumed_from_step"])
    assert resumed_from >= 8 and resumed_from % SAVE_EVERY == 0
    assert killed_at - resumed_from <= SAVE_EVERY  # steps lost are bounded by the save interval
    steps = sorted({m.step for m in client.get_metric_history(run_id, "sft/loss")})
    assert steps == list(range(1, 41))  # one curve in one run, killed part and resumed part together
