"""MLflow tracking by explicit run id.

Prefect runs tasks in worker threads and MLflow's active run is per thread, so nothing here relies on
`mlflow.start_run()` context: every call names its run.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

from ftflow.configs.loader import flatten
from ftflow.configs.schema import PipelineConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "evaluate", "mlflow",
                     "prefect", "great_expectations", "accelerate")
# Whole name parts only: `max_tokens` is a count, `hf_token` is a secret.
SECRET_KEY = re.compile(r"(?:^|[_\-.])(token|secret|password|passwd|credentials?|api[_-]?key)(?:$|[_\-.])", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,})\b")
REDACTED = "***"


def redact_text(text: str) -> str:
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = SECRET_VALUE.sub(REDACTED, text)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY"):
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, REDACTED)
    return text


def is_secret_key(key: str) -> bool:
    # `hf_token_block` names where a secret lives (a Prefect block), not the secret itself.
    return bool(SECRET_KEY.search(key)) and not key.endswith("_block")


def strip_credentials(uri: str) -> str:
    """A URL fit to print or link: without its `user:password@` part."""
    return re.sub(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/@\s]+@", r"\g<scheme>", uri, flags=re.IGNORECASE)


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


def client(cfg: PipelineConfig):
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if strip_credentials(uri) != uri:
        # MLflow prints "View run at <uri>" on its own; with credentials in the URI that line would leak them.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


class RunLogger:
    """One MLflow run, addressed by id, with helpers that batch what MLflow wants batched."""

    def __init__(self, cfg: PipelineConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.client = client(cfg)

    @classmethod
    def start(cls, cfg: PipelineConfig, run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[dict[str, str]] = None) -> "RunLogger":
        c = client(cfg)
        exp_id = ensure_experiment(c, cfg.tracking.experiment, tracking_uri(cfg))
        all_tags = {"git_commit": git_commit(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, run_name=run_name or cfg.tracking.run_name, tags=all_tags)
        return cls(cfg, run.info.run_id)

    @classmethod
    def resume(cls, cfg: PipelineConfig, run_id: str) -> "RunLogger":
        from mlflow.exceptions import MlflowException

        from ftflow.tasks.errors import PipelineError

        logger = cls(cfg, run_id)
        try:
            logger.client.get_run(run_id)
        except MlflowException:
            raise PipelineError(f"--resume {run_id}: no such MLflow run at {tracking_uri(cfg)}") from None
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
