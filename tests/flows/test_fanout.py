"""sweep.fan_out=deployment on a real `prefect server`: the `arm` deployment from prefect.yaml, two real process
workers on one pool, real training of the tiny model in each arm, a real `mlflow server`."""

from __future__ import annotations

import importlib.util
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
from ftflow.tasks.tracking import FLOW_RUN_TAG

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKERS = ("arm-worker-1", "arm-worker-2")

# The server, CLI and process-stopping helpers of the deployment test, not a copy of them.
_spec = importlib.util.spec_from_file_location("_deployments_harness", Path(__file__).with_name("test_deployments.py"))
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.fixture(scope="module")
def arm_pool(tmp_path_factory):
    """A real Prefect server, the `arm` deployment of prefect.yaml on a `process` pool, and two workers that
    take one flow run each at a time (so three arms must spread over both). Yields the env to talk to it."""
    tmp = tmp_path_factory.mktemp("fanout")
    server = harness.prefect_server.__wrapped__(tmp)  # the generator behind the function-scoped fixture
    env = next(server)
    workers = []
    try:
        log = tmp / "cli.log"
        harness._cli(["work-pool", "create", "local-process", "--type", "process", "--overwrite"], env, log)
        harness._cli(["--no-prompt", "deploy", "--name", "arm"], env, log)
        worker_env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        worker_env.pop("MLFLOW_TRACKING_URI", None)
        for name in WORKERS:
            out = (tmp / f"{name}.log").open("w")
            workers.append(
                subprocess.Popen(
                    [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "local-process"]
                    + ["--name", name, "--limit", "1"],
                    env=worker_env,
                    cwd=tmp,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield env
    finally:
        for worker in workers:
            harness._stop(worker)
        next(server, None)


def _cfg(tiny_cfg, mlflow_server: str, ranks: list[int], registry: bool):
    return config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                f"tracking.tracking_uri={mlflow_server}",
                f"sweep.ranks={ranks}",
                "sweep.fan_out=deployment",
                "sweep.arm_timeout_s=1200",
                "sft.max_steps=2",
                "dpo.max_steps=2",
                "eval.max_examples=2",
                "eval.few_shot_k=0",
                f"registry.enabled={str(registry).lower()}",
            ],
        )
    )


def _arm_runs(env: dict, parent_flow_run_id=None) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read(client):
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sweep-arm"])))

    runs = harness.asyncio.run(harness._api(env, read))
    tag = f"ftflow.sweep:{parent_flow_run_id}"
    return [r for r in runs if parent_flow_run_id is None or tag in r.tags]


def _sweep(cfg, env: dict, tmp_path: Path) -> subprocess.Popen:
    """`ftflow sweep` in its own process: Prefect's process-wide services (the concurrency-slot client the gate's
    lock uses) stay bound to this module's server, which stops with the module, and never to later tests'."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = (tmp_path / "sweep.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "ftflow.cli", "sweep", str(recipe)],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_three_arms_fan_out_over_two_workers(arm_pool, tiny_cfg, mlflow_server_port, tmp_path):
    mlflow_server = f"http://127.0.0.1:{mlflow_server_port}"
    cfg = _cfg(tiny_cfg, mlflow_server, [4, 8, 16], registry=True)
    sweep = _sweep(cfg, arm_pool, tmp_path)
    try:
        assert sweep.wait(timeout=1500) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.pipeline = 'sweep'")
    parent_id = parent.info.run_id
    arms = [a for a in _arm_runs(arm_pool) if a.parameters["parent_run_id"] == parent_id]
    assert len(arms) == 3 and all(a.state.is_completed() for a in arms), [(a.name, a.state) for a in arms]
    # Placed by the pool: both workers took arms, and arms ran at the same time.
    assert {a.labels.get("prefect.worker.name") for a in arms} == set(WORKERS)
    spans = sorted((a.start_time, a.end_time) for a in arms)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    # Each arm got references, never the data.
    assert all(set(a.parameters) == {"inputs_uri", "digest", "overrides", "parent_run_id"} for a in arms)

    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.fan_out"] == "deployment"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 3
    assert sorted(int(c.data.params["lora.r"]) for c in children) == [4, 8, 16]
    assert {c.data.tags[FLOW_RUN_TAG] for c in children} == {str(a.id) for a in arms}
    # The gate writes its gate/ metrics into the best arm's run only.
    keys = [{k for k in c.data.metrics if not k.startswith("gate/")} for c in children]
    assert keys[0] == keys[1] == keys[2] and "validation/sft/heldout_exact" in keys[0]

    # The best arm by validation (its candidate's score; a tie to the smaller r) is tagged and was registered.
    def rank(c):
        return (c.data.metrics[f"validation/{c.data.tags['candidate']}/heldout_exact"], -int(c.data.params["lora.r"]))

    best = [c for c in children if c.data.tags.get("best_arm") == "true"]
    assert len(best) == 1 and best[0].info.run_id == parent.data.params["sweep.best_run_id"]
    assert rank(best[0]) == max(rank(c) for c in children)
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert [v.run_id for v in versions] == [best[0].info.run_id]


def test_killed_arm_is_reported_and_the_others_finish(arm_pool, tiny_cfg, mlflow_server_port, tmp_path):
    mlflow_server = f"http://127.0.0.1:{mlflow_server_port}"
    cfg = _cfg(tiny_cfg, mlflow_server, [4, 8], registry=False)
    sweep = _sweep(cfg, arm_pool, tmp_path)
    client = MlflowClient(mlflow_server)
    victim = None
    try:
        deadline = time.time() + 900
        while victim is None and time.time() < deadline:
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-4000:]
            for arm in _arm_runs(arm_pool):
                if arm.state.is_running() and arm.infrastructure_pid:
                    exp = client.get_experiment_by_name(cfg.tracking.experiment)
                    mine = client.search_runs([exp.experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{arm.id}'") if exp else []
                    # Killed mid-run: once its MLflow child run exists, i.e. after its inputs were checked.
                    if mine:
                        victim = arm
                        os.kill(int(arm.infrastructure_pid.split(":")[-1]), signal.SIGKILL)
                        break
            time.sleep(1)
        assert victim is not None, "no arm reached its MLflow run within 15 minutes"
        assert sweep.wait(timeout=900) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)

    arms = {str(a.id): a for a in _arm_runs(arm_pool) if a.parameters["overrides"] and a.tags}
    killed = arms[str(victim.id)]
    assert killed.state.is_crashed(), killed.state
    others = [a for a in arms.values() if a.parameters["parent_run_id"] == victim.parameters["parent_run_id"]]
    assert len(others) == 2 and sum(a.state.is_completed() for a in others) == 1

    parent_id = victim.parameters["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = {
        c.data.tags[FLOW_RUN_TAG]: c
        for c in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    }
    assert children[str(victim.id)].info.status == "FAILED"
    assert "Crashed" in children[str(victim.id)].data.tags["failure_reason"]
    assert sum(c.info.status == "FINISHED" for c in children.values()) == 1
    assert parent.data.params["sweep.best_run_id"] != children[str(victim.id)].info.run_id
    assert "failed_arms" in parent.data.tags


def test_cancelling_the_sweep_cancels_its_arms(arm_pool):
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Scheduled

    from ftflow.sweep import arm_tag, cancel_arms

    later = Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(hours=1))  # no worker takes them
    params = {"inputs_uri": "/nowhere", "digest": "0" * 64, "overrides": [], "parent_run_id": "none"}
    with temporary_settings({PREFECT_API_URL: arm_pool["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("sweep-arm/arm")

            def arm(tag: str):
                return client.create_flow_run_from_deployment(dep.id, parameters=params, tags=[tag], state=later)

            sweep = arm("stand-in-for-the-sweep")
            mine, other = arm(arm_tag(sweep.id)), arm(arm_tag("another-sweep"))
            cancel_arms(None, sweep, Cancelled())
            assert client.read_flow_run(mine.id).state.type.value in ("CANCELLING", "CANCELLED")
            assert client.read_flow_run(other.id).state.is_scheduled()  # another sweep's arm is left alone
            client.set_flow_run_state(other.id, Cancelled(), force=True)
