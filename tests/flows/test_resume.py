"""Kill a training run mid-way, re-run it: training resumes from the last checkpoint, in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict

SAVE_EVERY = 4


def test_killed_run_resumes_from_checkpoint(tiny_cfg, tmp_path):
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "sft.max_steps=40",
                f"sft.save_steps={SAVE_EVERY}",
                "sft.logging_steps=1",
                "dpo.enabled=false",
                "registry.enabled=false",
                "eval.max_examples=2",
                "eval.few_shot_k=0",
            ],
        )
    )
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

    done = subprocess.run(
        [*cmd, "--resume", run_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    resumed_from = int(run.data.metrics["sft/resumed_from_step"])
    assert resumed_from >= 8 and resumed_from % SAVE_EVERY == 0
    assert killed_at - resumed_from <= SAVE_EVERY  # steps lost are bounded by the save interval
    steps = sorted({m.step for m in client.get_metric_history(run_id, "sft/loss")})
    assert steps == list(range(1, 41))  # one curve in one run, killed part and resumed part together


# --- what a resume may and may not do to the run it names ------------------------------------------


def _recipe(cfg, tmp_path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return recipe


def _recorded_run(cfg, status: str, versions: dict | None = None) -> str:
    """A run as the pipeline leaves it: its config logged (params + resolved config), then ended with `status`."""
    from ftflow.tasks.tracking import RunLogger

    run = RunLogger.start(cfg, tags={"pipeline": "fine-tune"})
    if versions is None:
        run.log_config(cfg)
    else:  # as an older install logged it
        from ftflow.configs.loader import flatten
        from ftflow.tasks.tracking import redact_config_dict

        run.log_params(flatten(cfg))
        run.log_params({f"version.{k}": v for k, v in versions.items()})
        run.log_dict(redact_config_dict(cfg.model_dump(mode="json")), "config/resolved_config.yaml")
    run.finish(status)
    return run.run_id


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ftflow: error: "), err
    return err.strip()


@pytest.mark.bad_input(
    "runtime",
    "--resume with a changed recipe or override",
    "ftflow: error: --resume <id>: the config differs from the run's in 2 key(s): lora.r (run: 16, now: 8); ...",
)
def test_resume_with_a_changed_config_names_the_keys_and_touches_nothing(prefect_harness, tiny_cfg, tmp_path, capsys):
    from ftflow.cli import main

    run_id = _recorded_run(tiny_cfg, "FAILED")
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    before = client.get_run(run_id)
    capsys.readouterr()  # the store's own start-up lines
    rc = main(["run", str(_recipe(tiny_cfg, tmp_path)), "lora.r=8", "sft.max_steps=5", "--resume", run_id])
    line = _one_error_line(capsys)
    assert rc == 2, line
    assert "config differs" in line and "lora.r (run: 16, now: 8)" in line and "sft.max_steps (run: 2, now: 5)" in line
    after = client.get_run(run_id)
    assert after.info.status == "FAILED" and after.info.end_time == before.info.end_time
    assert after.data.params == before.data.params and "resumed" not in after.data.tags


@pytest.mark.bad_input(
    "runtime",
    "--resume of a FINISHED (registered) run",
    "ftflow: error: --resume <id>: the run FINISHED; only an interrupted run ... can be resumed; start a new run instead",
)
def test_resume_of_a_finished_registered_run_is_refused_and_leaves_it_alone(
    prefect_harness, tiny_cfg, tmp_path, capsys
):
    from ftflow.cli import main
    from ftflow.tasks.registry.gate import register_candidate

    run_id = _recorded_run(tiny_cfg, "FINISHED")
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    name = tiny_cfg.registry.model_name
    version = register_candidate(client, name, run_id)
    client.set_registered_model_alias(name, "champion", version)
    before = client.get_run(run_id)
    capsys.readouterr()
    for extra in (["lora.r=8"], []):  # another recipe, or the same one: a finished run is never reopened
        rc = main(["run", str(_recipe(tiny_cfg, tmp_path)), *extra, "--resume", run_id])
        line = _one_error_line(capsys)
        assert rc == 2 and "the run FINISHED" in line, line
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert str(client.get_model_version_by_alias(name, "champion").version) == version


@pytest.mark.bad_input(
    "runtime", "--resume with an id no run has", "ftflow: error: --resume <id>: no such MLflow run at <tracking uri>"
)
def test_resume_of_an_unknown_run_id_is_one_line(prefect_harness, tiny_cfg, tmp_path, capsys):
    from ftflow.cli import main

    capsys.readouterr()
    rc = main(["run", str(_recipe(tiny_cfg, tmp_path)), "--resume", "0" * 32])
    line = _one_error_line(capsys)
    assert rc == 2 and f"--resume {'0' * 32}: no such MLflow run" in line, line


def test_resume_after_a_library_upgrade_records_the_versions_without_touching_params(tiny_cfg):
    from ftflow.tasks.tracking import RunLogger, library_versions

    old = {**library_versions(), "transformers": "4.0.0", "trl": "0.9.0"}
    run_id = _recorded_run(tiny_cfg, "FAILED", versions=old)
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    params_before = client.get_run(run_id).data.params

    run = RunLogger.resume(tiny_cfg, run_id)
    run.log_config(tiny_cfg)  # what the flow does first; it used to re-log every param and crash
    run.log_params({"chat_template.fingerprint": "abc"})  # new keys still land
    after = client.get_run(run_id)
    assert after.info.status == "RUNNING"
    assert {k: v for k, v in after.data.params.items() if k in params_before} == params_before
    assert (
        after.data.params["version.transformers"] == "4.0.0" and after.data.params["chat_template.fingerprint"] == "abc"
    )
    changes = after.data.tags["ftflow.resume.1.version_changes"]
    assert f"transformers 4.0.0 -> {library_versions()['transformers']}" in changes and "trl 0.9.0 -> " in changes

    # A value the run already holds cannot change: one line, not a raw MlflowException.
    from ftflow.tasks.errors import PipelineError

    with pytest.raises(PipelineError, match=r"chat_template.fingerprint \(run: abc, now: def\)"):
        run.log_params({"chat_template.fingerprint": "def"})
