"""MLflow tracking by explicit run id.

Prefect runs tasks in worker threads and MLflow's active run is per thread, so nothing here relies on
`mlflow.start_run()` context: every call names its run.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

from ftflow.configs.loader import flatten
from ftflow.configs.schema import PipelineConfig

# Redaction lives beneath errors.py (tasks/secrets.py); these names stay importable from here.
from ftflow.tasks.secrets import (  # noqa: F401
    REDACTED,
    SECRET_KEY,
    SECRET_VALUE,
    URL_PASSWORD,
    install_log_redaction,
    is_secret_key,
    redact_text,
    strip_credentials,
)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "evaluate", "mlflow",
                     "prefect", "great_expectations", "accelerate")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Secrets never reach params or artifacts: by key name, by URL password, by known token shapes and values."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key.split(".")[-1]) and value not in (None, "", [], {}):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = redact_text(value)
        else:
            out[key] = value
    return out


def tracking_uri(cfg: PipelineConfig) -> str:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


# MLflow's own default retries a dead server for about 4 minutes (7 retries, backoff 2, 120 s timeouts).
# The store is checked up front (check_tracking_store), so these only bound a server lost mid-run: about 30 s.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
CHECK_TIMEOUT_S = 5.0


def client(cfg: PipelineConfig):
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if strip_credentials(uri) != uri:
        # MLflow prints "View run at <uri>" on its own; with credentials in the URI that line would leak them.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.lower().startswith(("http://", "https://")):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _local_store_folder(uri: str) -> Optional[Path]:
    """The folder a sqlite:// or file: store writes to; None for stores that are not local files."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite://"):].split("?", 1)[0]
        if rest in ("", "/", "/:memory:"):
            return None
        return Path(unquote(rest[1:] if rest.startswith("/") else rest)).expanduser().resolve().parent
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path)).expanduser().resolve()
    if "://" not in uri:
        return Path(uri).expanduser().resolve()
    return None


def _why_unreachable(err: BaseException, timeout: float) -> str:
    import requests

    text = str(err)
    if isinstance(err, requests.Timeout):
        return f"no answer within {timeout:g} s"
    for needle, reason in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                           ("nodename nor servname", "unknown host"), ("Temporary failure in name resolution", "unknown host"),
                           ("No route to host", "no route to host"), ("Network is unreachable", "network unreachable"),
                           ("SSLError", "TLS handshake failed"), ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted")):
        if needle in text:
            return reason
    return type(err).__name__


def check_tracking_store(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when the store cannot work, instead of minutes of MLflow retries.

    http(s): one GET of `<uri>/health` with a short timeout; any HTTP answer counts as reachable (a server
    without that route, or one that wants credentials sent MLflow's way, still answers; refused credentials
    then fail MLflow's first call, not retried, as one PipelineError). sqlite / file: the folder must exist
    or be creatable, and take a file.
    """
    import tempfile

    from ftflow.tasks.errors import PipelineError

    shown = redact_text(uri)
    if uri.lower().startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=(timeout, timeout))
        except requests.RequestException as err:
            raise PipelineError(f"MLflow tracking server {shown} is not reachable ({_why_unreachable(err, timeout)}): "
                                f"start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI (leave both empty "
                                f"for a local SQLite store)") from None
        return
    folder = _local_store_folder(uri)
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PipelineError(f"MLflow store {shown}: folder {folder} is not writable "
                            f"({err.strerror or type(err).__name__})") from None


def ensure_experiment(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local store keeps artifacts beside the database; a server decides where they go itself.
    location = Path(DEFAULT_ARTIFACTS).resolve().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
    return c.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in TRACKED_LIBRARIES:
        try:
            versions[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[lib] = "missing"
    return versions


@contextmanager
def _store_errors(uri: str):
    """A store that answered the check but refuses the run (permissions, schema, a bad experiment) is a
    configuration problem: one redacted PipelineError line, nothing chained that repeats the URI."""
    from ftflow.tasks.errors import PipelineError
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"MLflow store {uri}: {first}") from None


class RunLogger:
    """One MLflow run, addressed by id, with helpers that batch what MLflow wants batched."""

    def __init__(self, cfg: PipelineConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.client = client(cfg)

    @classmethod
    def start(cls, cfg: PipelineConfig, run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[dict[str, str]] = None) -> "RunLogger":
        uri = tracking_uri(cfg)
        install_log_redaction()
        check_tracking_store(uri)
        c = client(cfg)
        with _store_errors(uri):
            exp_id = ensure_experiment(c, cfg.tracking.experiment, uri)
            all_tags = {"git_commit": git_commit(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = c.create_run(exp_id, run_name=run_name or cfg.tracking.run_name, tags=all_tags)
        return cls(cfg, run.info.run_id)

    @classmethod
    def resume(cls, cfg: PipelineConfig, run_id: str) -> "RunLogger":
        from ftflow.tasks.errors import PipelineError
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(cfg)
        install_log_redaction()
        check_tracking_store(uri)
        logger = cls(cfg, run_id)
        try:
            logger.client.get_run(run_id)
        except MlflowException:
            raise PipelineError(f"--resume {run_id}: no such MLflow run at {uri}") from None
        with _store_errors(uri):
            logger.client.update_run(run_id, status="RUNNING")
            logger.client.set_tag(run_id, "resumed", "true")
        return logger

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, cfg: PipelineConfig) -> None:
        self.log_params(flatten(cfg))
        self.log_params({f"version.{k}": v for k, v in library_versions().items()})
        self.log_dict(redact_config_dict(cfg.model_dump(mode="json")), "config/resolved_config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact_text(str(v)))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_table(self, data, artifact_file: str) -> None:
        self.client.log_table(self.run_id, data, artifact_file)

    def log_dataset(self, rows: Iterable[dict], name: str, context: str, source: str) -> str:
        """`mlflow.log_input` equivalent by run id, so the UI shows each dataset with its digest."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        frame = pd.DataFrame([{k: json.dumps(v, ensure_ascii=False) for k, v in r.items()} for r in rows])
        dataset = mlflow.data.from_pandas(frame, source=redact_text(source), name=name)
        self.client.log_inputs(
            self.run_id,
            datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
        )
        return dataset.digest

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def url(self) -> str:
        uri = strip_credentials(tracking_uri(self.cfg))
        base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def redact_config_dict(data: Any, key: str = "") -> Any:
    if isinstance(data, dict):
        return {k: redact_config_dict(v, k) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_config_dict(v, key) for v in data]
    if isinstance(data, str):
        return REDACTED if is_secret_key(key) and data else redact_text(data)
    return data


def ui_command(cfg: PipelineConfig) -> str:
    uri = strip_credentials(tracking_uri(cfg))
    if uri.startswith("http"):
        return f"open {uri}"
    return f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"
