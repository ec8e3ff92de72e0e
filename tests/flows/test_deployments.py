"""prefect.yaml deployed to a real `prefect server` on loopback, run by a real process worker.

Run as a script to regenerate the recipe blocks of prefect.yaml after a recipe or the schema changed:
    .venv/bin/python tests/flows/test_deployments.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "prefect.yaml"
VENV_BIN = Path(sys.executable).parent
# The recipe blocks: `# BEGIN configs/<recipe>.yaml ...` / `config: &<recipe>` ... / `# END configs/<recipe>.yaml`
RECIPE_BLOCK = re.compile(
    r"^(?P<indent> *)# BEGIN configs/(?P<recipe>[\w-]+)\.yaml[^\n]*\n.*?^(?P=indent)# END configs/(?P=recipe)\.yaml\n",
    re.MULTILINE | re.DOTALL,
)


def render_recipe_blocks(text: str) -> str:
    """prefect.yaml with every BEGIN/END block replaced by the resolved recipe it names (as a YAML anchor)."""
    from ftflow.configs.loader import load_config

    def block(m: re.Match) -> str:
        indent, recipe = m["indent"], m["recipe"]
        body = yaml.safe_dump(load_config(recipe).model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        lines = m[0].splitlines(keepends=True)
        return (
            lines[0]
            + f"{indent}config: &{recipe}\n"
            + "".join(f"{indent}  {line}" for line in body.splitlines(keepends=True))
            + lines[-1]
        )

    return RECIPE_BLOCK.sub(block, text)


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["deployments"]}


# ---------------------------------------------------------------- prefect.yaml as a file (fast)


def test_deployment_parameters_are_the_resolved_recipes():
    from ftflow.configs.loader import load_config

    deps = deployments()
    production = load_config("production").model_dump(mode="json")
    hint = "prefect.yaml drifted from configs/; regenerate: .venv/bin/python tests/flows/test_deployments.py"
    assert deps["retrain"]["parameters"]["config"] == production, hint
    assert deps["rank-sweep"]["parameters"]["config"] == load_config("sweep").model_dump(mode="json"), hint
    assert deps["search"]["parameters"]["config"] == load_config("search").model_dump(mode="json"), hint
    assert deps["validate-data"]["parameters"]["config"] == production, hint
    assert render_recipe_blocks(PREFECT_YAML.read_text(encoding="utf-8")) == PREFECT_YAML.read_text(encoding="utf-8"), (
        hint
    )


def test_render_replaces_only_the_marked_block():
    from ftflow.configs.loader import load_config

    text = "a:\n  # BEGIN configs/tiny.yaml (generated)\n  config: &tiny\n    stale: true\n  # END configs/tiny.yaml\nb: *tiny\n"
    out = render_recipe_blocks(text)
    assert out.startswith("a:\n  # BEGIN configs/tiny.yaml (generated)\n  config: &tiny\n    seed: 7\n")
    assert out.endswith("  # END configs/tiny.yaml\nb: *tiny\n") and "stale" not in out
    tiny = load_config("tiny").model_dump(mode="json")
    assert yaml.safe_load(out) == {"a": {"config": tiny}, "b": tiny}
    assert render_recipe_blocks("a: 1\n") == "a: 1\n"  # no markers, nothing touched


def test_deployments_are_scheduled_and_limited_as_designed():
    deps = deployments()
    assert set(deps) == {"retrain", "rank-sweep", "search", "compare-methods", "arm", "validate-data"}
    assert deps["compare-methods"]["entrypoint"] == "flows/compare.py:compare_flow"
    retrain = deps["retrain"]
    assert retrain["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert [(s["cron"], s["timezone"]) for s in retrain["schedules"]] == [("0 3 * * 1", "Asia/Tokyo")]
    assert retrain["concurrency_limit"]["limit"] == 1
    assert deps["rank-sweep"]["entrypoint"] == "flows/sweep.py:sweep_flow" and not deps["rank-sweep"].get("schedules")
    assert deps["validate-data"]["entrypoint"] == "flows/validate.py:validate_flow" and not deps["validate-data"].get(
        "schedules"
    )
    assert {d["work_pool"]["name"] for d in deps.values()} == {"local-process"}
    # A negative beside the positive: a schedule without a timezone would silently run in UTC.
    from prefect.cli.deploy._models import RawScheduleConfig

    assert RawScheduleConfig(**retrain["schedules"][0]).timezone == "Asia/Tokyo"


def _schema_checks(schema: dict) -> None:
    """What the dashboard's Custom run form needs: the typed config, its descriptions, defaults and choices."""
    defs = schema.get("definitions") or schema.get("$defs")
    assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
    assert defs["Quantization"]["enum"] == ["4bit", "8bit", "none"]
    assert defs["DPOLoss"]["enum"] == ["sigmoid", "hinge", "ipo"]
    # The issue-12 choices are drop-downs too: method, backend, the OpenAI job's method.
    assert defs["Method"]["enum"] == ["qlora", "lora", "full", "prompt_tuning"]
    assert defs["Backend"]["enum"] == ["local", "openai"]
    assert defs["OpenAIMethod"]["enum"] == ["supervised", "dpo"]
    quant = defs["QuantizationConfig"]["properties"]["mode"]
    assert quant["$ref"].endswith("/Quantization") and quant["default"] == "4bit" and quant["description"]
    lora = defs["LoraConfig"]["properties"]["r"]
    assert lora["default"] == 16 and lora["minimum"] == 1 and "rank" in lora["description"]
    assert defs["DPOConfig"]["properties"]["loss_type"]["$ref"].endswith("/DPOLoss")
    top = list(defs["PipelineConfig"]["properties"])
    assert top.index("model") < top.index("lora") < top.index("sft") < top.index("dpo") < top.index("eval")
    undocumented = [
        f"{name}.{field}"
        for name, d in defs.items()
        for field, p in d.get("properties", {}).items()
        if not p.get("description")
    ]
    assert not undocumented, f"fields without a description in the form: {undocumented}"


def test_flow_parameter_schema_is_the_typed_config():
    from prefect.utilities.callables import parameter_schema

    from ftflow.pipeline import pipeline_flow

    _schema_checks(parameter_schema(pipeline_flow).model_dump_for_openapi())


# ---------------------------------------------------------------- a real server, deploy --all, a worker (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    import psutil  # a peft/accelerate dependency

    # Flow runs start in sessions of their own: a failed test must not leave one training.
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for signal_child in (psutil.Process.terminate, psutil.Process.kill):
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_child(child)
        _, children = psutil.wait_procs(children, timeout=15)
    # A Prefect 3.9 worker may idle after the first TERM; a second TERM is its own "exit now".
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGTERM, 25), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server` on a free loopback port with its own PREFECT_HOME; yields the env to talk to it."""
    port = _free_port()
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "COLUMNS": "200",
    }
    env.pop("PREFECT_API_KEY", None)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
                "--analytics-off",
            ],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", proc, log)
        yield env
    finally:
        _stop(proc)


def _cli(args: list[str], env: dict, log: Path) -> str:
    out = subprocess.run(
        [str(VENV_BIN / "prefect"), *args],
        env={**env, "PWD": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log.write_text(log.read_text() + out.stdout + out.stderr if log.exists() else out.stdout + out.stderr)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


async def _api(env: dict, call):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        async with get_client() as client:
            return await call(client)


@pytest.mark.slow
def test_deploy_all_then_run_retrain_like_the_dashboard(prefect_server, tiny_cfg, tmp_path):
    from mlflow import MlflowClient

    from ftflow.configs.loader import apply_overrides, config_from_dict

    env = prefect_server
    cli_log = tmp_path / "cli.log"
    _cli(["work-pool", "create", "local-process", "--type", "process", "--overwrite"], env, cli_log)
    _cli(["--no-prompt", "deploy", "--all"], env, cli_log)

    async def read_deployments(client):
        return {f"{(await client.read_flow(d.flow_id)).name}/{d.name}": d for d in await client.read_deployments()}

    deps = asyncio.run(_api(env, read_deployments))
    assert set(deps) == {
        "fine-tune/retrain",
        "rank-sweep/rank-sweep",
        "sweep-arm/arm",
        "search/search",
        "compare-methods/compare-methods",
        "validate-data/validate-data",
    }
    assert not deps["rank-sweep/rank-sweep"].schedules and not deps["validate-data/validate-data"].schedules
    assert deps["validate-data/validate-data"].parameter_openapi_schema["required"] == ["path"]
    dep = deps["fine-tune/retrain"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [
        ("0 3 * * 1", "Asia/Tokyo", True)
    ]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.enforce_parameter_schema and dep.work_pool_name == "local-process"
    # `{{ $PWD }}` is filled in at deploy time: runs start in the repository whatever the worker's folder.
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    _schema_checks(dep.parameter_openapi_schema)
    assert dep.parameters["config"]["tracking"]["experiment"] == "ftflow-retrain"

    # What the dashboard's "Custom run" posts: the deployment's parameters with edited fields.
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            ["lora.r=4", "registry.enabled=false", "eval.few_shot_k=0", "eval.max_examples=2"],
        )
    )
    mlflow = MlflowClient(cfg.tracking.tracking_uri)
    # The run's working directory is the repository; keep its artifacts in tmp_path, not in ./mlartifacts.
    mlflow.create_experiment(cfg.tracking.experiment, artifact_location=(tmp_path / "mlartifacts").as_uri())

    async def trigger(client):
        return await client.create_flow_run_from_deployment(
            dep.id, parameters={"config": cfg.model_dump(mode="json")}, name="dashboard-custom-run"
        )

    flow_run = asyncio.run(_api(env, trigger))

    worker_log = tmp_path / "worker.log"
    worker_env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker_env.pop("MLFLOW_TRACKING_URI", None)
    with worker_log.open("w") as out:
        worker = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "local-process", "--name", "test-worker"],
            env=worker_env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def state(client):
        return (await client.read_flow_run(flow_run.id)).state

    try:
        deadline = time.time() + 600
        current = None
        while time.time() < deadline:
            current = asyncio.run(_api(env, state))
            if current is not None and current.is_final():
                break
            if worker.poll() is not None:
                break
            time.sleep(3)
        assert current is not None and current.is_completed(), (
            f"flow run ended {current and current.type}: {current and current.message}\n"
            f"--- worker log ---\n{worker_log.read_text()[-8000:]}"
        )
    finally:
        _stop(worker)

    async def logs(client):
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

    messages = [entry.message for entry in asyncio.run(_api(env, logs))]
    assert any("Finished in state Completed" in m for m in messages), messages[-20:]

    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = mlflow.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["lora.alpha"] == "8"  # the edited form values
    assert "eval/heldout_exact" in run.data.metrics and "sft/loss" in run.data.metrics
    assert any(a.path == "adapters" for a in mlflow.list_artifacts(run.info.run_id))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    original = PREFECT_YAML.read_text(encoding="utf-8")
    rendered = render_recipe_blocks(original)
    PREFECT_YAML.write_text(rendered, encoding="utf-8")
    print(f"{PREFECT_YAML}: {'updated' if rendered != original else 'already up to date'}")
