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
TRACKED_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "evaluate",
    "mlflow",
    "prefect",
    "great_expectations",
    "accelerate",
)


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
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
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
        rest = uri[len("sqlite://") :].split("?", 1)[0]
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
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("SSLError", "TLS handshake failed"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
    ):
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
            raise PipelineError(
                f"MLflow tracking server {shown} is not reachable ({_why_unreachable(err, timeout)}): "
                f"start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI (leave both empty "
                f"for a local SQLite store)"
            ) from None
        return
    folder = _local_store_folder(uri)
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PipelineError(
            f"MLflow store {shown}: folder {folder} is not writable ({err.strerror or type(err).__name__})"
        ) from None


def ensure_experiment(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local store keeps artifacts beside the database; a server decides where they go itself.
    location = (
        Path(DEFAULT_ARTIFACTS).resolve().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
    )
    return c.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
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
    from mlflow.exceptions import MlflowException

    from ftflow.tasks.errors import PipelineError

    try:
        yield
    except MlflowException as err:
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"MLflow store {uri}: {first}") from None


RESOLVED_CONFIG = "config/resolved_config.yaml"
# Tags naming the process that owns a RUNNING run, so a later run can tell a live run from one whose process died.
HOST_TAG, PID_TAG, PID_STARTED_TAG = "ftflow.host", "ftflow.pid", "ftflow.pid_started"
FLOW_RUN_TAG = "ftflow.prefect_flow_run_id"


def credentials_to_env(cfg: PipelineConfig) -> PipelineConfig:
    """The config without `user:password@` in its MLflow URIs; the credentials go to this process's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's client sends as basic auth.

    The CLI calls this before the config becomes a flow run's parameters, which the Prefect API stores."""
    from urllib.parse import unquote, urlsplit

    updates = {}
    for section, key in (("tracking", "tracking_uri"), ("registry", "registry_uri")):
        uri = getattr(getattr(cfg, section), key)
        if not uri or "://" not in uri or strip_credentials(uri) == uri:
            continue
        parts = urlsplit(uri)
        if parts.username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
        if parts.password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
        updates[section] = getattr(cfg, section).model_copy(update={key: strip_credentials(uri)})
    return cfg.model_copy(update=updates) if updates else cfg


def process_started(pid: int) -> str:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22): tells a reused pid apart; '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def process_tags() -> dict[str, str]:
    import socket

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_STARTED_TAG: process_started(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (it may be a later process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    return True


def owner_alive(tags: dict[str, str]) -> Optional[bool]:
    """Whether the process a run's tags name is alive: None when it ran on another host or is not recorded."""
    import socket

    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    if not pid_alive(pid):
        return False
    started = tags.get(PID_STARTED_TAG)
    return not started or process_started(pid) in ("", started)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict, as loader.flatten makes them (an empty dict is a value)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _comparable(value: Any) -> str:
    # Credentials never take part: a URI compares without `user:password@`, a secret as its redaction.
    return strip_credentials(redact_text(json.dumps(value, sort_keys=True, default=str)))


def logged_config(c, run) -> tuple[Optional[dict[str, str]], bool]:
    """The config a run was started with, flattened and comparable, and whether it came from the params.

    Its resolved-config artifact when there is one, else its params (strings), else None (a run killed
    before it logged anything)."""
    import tempfile

    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = c.download_artifacts(run.info.run_id, RESOLVED_CONFIG, tmp)
            data = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
        return {k: _comparable(v) for k, v in _flat(data).items()}, False
    except Exception:
        known = set(flatten(PipelineConfig()))
        params = {k: _comparable(v) for k, v in run.data.params.items() if k in known}
        return (params or None), True


def config_differences(run_config: dict[str, str], cfg: PipelineConfig, from_params: bool = False) -> list[str]:
    """`key (run: X, now: Y)` for every key where `cfg` differs from a run's logged config."""
    if from_params:
        now = {k: _comparable(str(v)[:6000]) for k, v in redact(flatten(cfg)).items()}
    else:
        now = {k: _comparable(v) for k, v in _flat(redact_config_dict(cfg.model_dump(mode="json"))).items()}
    out = []
    for key in sorted(set(run_config) | set(now)):
        if from_params and key not in run_config:
            continue
        old, new = run_config.get(key, "(absent)"), now.get(key, "(absent)")
        if old != new:
            out.append(f"{key} (run: {old[:60]}, now: {new[:60]})")
    return out


def check_resumable(c, run, cfg: PipelineConfig) -> None:
    """Raise one PipelineError line when `run` cannot be continued with `cfg`; reads only, writes nothing."""
    from ftflow.tasks.errors import PipelineError

    run_id, status = run.info.run_id, run.info.status
    if status == "FINISHED":
        raise PipelineError(
            f"--resume {run_id}: the run FINISHED; only an interrupted run (FAILED, KILLED, or "
            f"RUNNING with its process gone) can be resumed; start a new run instead"
        )
    if status == "RUNNING" and owner_alive(run.data.tags):
        raise PipelineError(
            f"--resume {run_id}: the run is still RUNNING in process {run.data.tags.get(PID_TAG)} "
            f"on {run.data.tags.get(HOST_TAG)}"
        )
    logged, from_params = logged_config(c, run)
    if logged is None:
        return  # killed before its config was logged: nothing trained, nothing to disagree with
    diff = config_differences(logged, cfg, from_params=from_params)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise PipelineError(
            f"--resume {run_id}: the config differs from the run's in {len(diff)} key(s): {shown}; "
            f"resume with the run's own recipe and overrides (its {RESOLVED_CONFIG} artifact)"
        )


class RunLogger:
    """One MLflow run, addressed by id, with helpers that batch what MLflow wants batched."""

    def __init__(self, cfg: PipelineConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.client = client(cfg)
        # A resumed run's params are already logged (and immutable): re-logging checks them instead.
        self.resumed = False

    @classmethod
    def start(
        cls,
        cfg: PipelineConfig,
        run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
    ) -> "RunLogger":
        uri = tracking_uri(cfg)
        install_log_redaction()
        check_tracking_store(uri)
        c = client(cfg)
        with _store_errors(uri):
            exp_id = ensure_experiment(c, cfg.tracking.experiment, uri)
            all_tags = {"git_commit": git_commit(), **process_tags(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = c.create_run(exp_id, run_name=run_name or cfg.tracking.run_name, tags=all_tags)
        return cls(cfg, run.info.run_id)

    @classmethod
    def resume(cls, cfg: PipelineConfig, run_id: str, tags: Optional[dict[str, str]] = None) -> "RunLogger":
        """Continue an interrupted run. Everything is checked first (the run exists, did not finish, is not
        running elsewhere, and `cfg` equals its logged config); only then is the run touched."""
        from mlflow.exceptions import MlflowException

        from ftflow.tasks.errors import PipelineError

        uri = tracking_uri(cfg)
        install_log_redaction()
        check_tracking_store(uri)
        logger = cls(cfg, run_id)
        try:
            run = logger.client.get_run(run_id)
        except MlflowException:
            raise PipelineError(f"--resume {run_id}: no such MLflow run at {uri}") from None
        check_resumable(logger.client, run, cfg)
        with _store_errors(uri):
            logger.client.update_run(run_id, status="RUNNING")
            count = int(run.data.tags.get("ftflow.resume_count", "0")) + 1
            for key, value in {
                "resumed": "true",
                "ftflow.resume_count": str(count),
                **process_tags(),
                **(tags or {}),
            }.items():
                logger.client.set_tag(run_id, key, value)
        logger.resumed = True
        return logger

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = {k: str(v)[:6000] for k, v in redact(params).items()}
        if self.resumed:
            values = self._not_yet_logged(values)
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _not_yet_logged(self, values: dict[str, str]) -> dict[str, str]:
        """A resumed run: the params it lacks; one equal to its logged value is skipped, a different one refused."""
        from ftflow.tasks.errors import PipelineError

        logged = self.client.get_run(self.run_id).data.params
        changed = [
            f"{k} (run: {logged[k][:60]}, now: {v[:60]})" for k, v in values.items() if k in logged and logged[k] != v
        ]
        if changed:
            raise PipelineError(
                f"--resume {self.run_id}: this attempt differs from the run in {'; '.join(changed)}; "
                f"an MLflow param cannot change, start a new run instead"
            )
        return {k: v for k, v in values.items() if k not in logged}

    def log_config(self, cfg: PipelineConfig) -> None:
        if self.resumed:
            # Same config (checked by resume); the libraries may have moved on since the first attempt.
            self._record_resumed_versions()
            return
        self.log_params(flatten(cfg))
        self.log_params({f"version.{k}": v for k, v in library_versions().items()})
        self.log_dict(redact_config_dict(cfg.model_dump(mode="json")), "config/resolved_config.yaml")

    def _record_resumed_versions(self) -> None:
        logged = {
            k[len("version.") :]: v
            for k, v in self.client.get_run(self.run_id).data.params.items()
            if k.startswith("version.")
        }
        now = library_versions()
        changes = [f"{lib} {logged.get(lib, '?')} -> {v}" for lib, v in now.items() if logged.get(lib) != v]
        n = self.client.get_run(self.run_id).data.tags.get("ftflow.resume_count", "1")
        tags = {f"ftflow.resume.{n}.versions": json.dumps(now, sort_keys=True)}
        if changes:
            tags[f"ftflow.resume.{n}.version_changes"] = "; ".join(changes)
        self.set_tags(tags)

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
        dataset = mlflow.data.from_pandas(frame, source=dataset_source(redact_text(source)), name=name)
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


def dataset_source(raw: str):
    """`raw` as the DatasetSource MLflow would pick (the last registered that reads it), chosen here: MLflow
    registers its local-file source under two schemes and, given the string, warns that a plain path "can be
    interpreted in multiple ways" for every dataset logged."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    for source in reversed(get_registered_sources()):
        try:
            if source._can_resolve(raw):
                return source._resolve(raw)
        except Exception:  # a resolver that cannot read it; MLflow itself skips it too
            continue
    return raw
