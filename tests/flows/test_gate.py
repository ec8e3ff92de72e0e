"""The promotion gate against a real MLflow store: promote a better candidate, refuse a worse one."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.pipeline import pipeline_flow
from ftflow.tasks.registry.gate import decide, register_candidate

# The tiny random model cannot produce exact JSON, so the gate ranks on held-out log-likelihood here;
# the demo recipe ranks on heldout_exact.
GATE = ["eval.primary_metric=heldout_logprob", "dpo.enabled=false", "sft.learning_rate=0.003",
        "sft.per_device_batch_size=8", "sft.save_steps=100", "eval.max_examples=4"]


def _cfg(base, *overrides):
    return config_from_dict(apply_overrides(base.model_dump(mode="json"), [*GATE, *overrides]))


def test_better_candidate_promoted_worse_refused(prefect_harness, tiny_cfg, tmp_path):
    first = pipeline_flow(config=_cfg(tiny_cfg, "sft.max_steps=12"))
    assert first["gate"]["promoted"] and first["gate"]["alias"] == "champion"
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    name = tiny_cfg.registry.model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["gate"]["version"] == "1"

    worse = pipeline_flow(config=_cfg(tiny_cfg, "sft.max_steps=1"))
    gate = worse["gate"]
    assert not gate["promoted"] and gate["alias"] == "challenger"
    assert any("does not beat champion" in r for r in gate["reasons"])
    # The champion was re-scored on the second run's held-out prompts, beside the candidate.
    assert "champion" in worse["metrics"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    tag = client.get_model_version(name, "2").tags["ftflow.gate"]
    assert tag.startswith("REFUSE") and "champion" in tag
    run = client.get_run(worse["run_id"])
    assert run.data.metrics["gate/promoted"] == 0.0
    decision = client.download_artifacts(worse["run_id"], "gate/decision.json", str(tmp_path))
    assert json.loads(open(decision).read())["promote"] is False

    # Idempotent registration: a retried task finds the version it created.
    assert register_candidate(client, name, worse["run_id"]) == "2"
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    # models:/<name>@champion reloads and generates in a fresh process.
    script = (
        "import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1]);"
        "m = mlflow.pyfunc.load_model(f'models:/{sys.argv[2]}@champion');"
        "out = m.predict(['Extract the order as JSON:\\nKen ordered 3 lamps in Osaka.']);"
        "print('GENERATED', len(out), type(out[0]).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", script, tiny_cfg.tracking.tracking_uri, name],
                          capture_output=True, text=True, timeout=300)
    assert "GENERATED 1 str" in done.stdout, done.stderr[-3000:]


def test_unreachable_registry_fails_and_registers_nothing(prefect_harness, tiny_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = _cfg(tiny_cfg, "sft.max_steps=1", "registry.registry_uri=http://127.0.0.1:9")
    from ftflow.tasks.registry.gate import RegistryError

    with pytest.raises(RegistryError, match="cannot be reached"):
        pipeline_flow(config=cfg)
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert runs[0].info.status == "FAILED"
    assert client.search_registered_models() == []


def _cfg_plain(**registry):
    from ftflow.configs.schema import PipelineConfig

    return PipelineConfig.model_validate({"registry": registry})


def test_decide_first_run_against_base_only():
    cfg = _cfg_plain()
    d = decide({"heldout_exact": 0.8, "eos_stop_rate": 1.0},
               {"base": {"heldout_exact": 0.0, "eos_stop_rate": 0.9}, "base_fewshot": {"heldout_exact": 0.3}}, None, cfg)
    assert d.promote
    d = decide({"heldout_exact": 0.2}, {"base": {"heldout_exact": 0.0}, "base_fewshot": {"heldout_exact": 0.3}}, None, cfg)
    assert not d.promote and any("base_fewshot" in r for r in d.reasons)


def test_decide_margin_and_guards():
    cfg = _cfg_plain(min_improvement=0.05, guard_tolerance=0.02)
    base = {"base": {"heldout_exact": 0.0}}
    champ = {"heldout_exact": 0.70, "eos_stop_rate": 1.0, "preference_accuracy": 0.8}
    assert not decide({"heldout_exact": 0.72, "eos_stop_rate": 1.0, "preference_accuracy": 0.8}, base, champ, cfg).promote
    assert decide({"heldout_exact": 0.80, "eos_stop_rate": 1.0, "preference_accuracy": 0.8}, base, champ, cfg).promote
    refused = decide({"heldout_exact": 0.80, "eos_stop_rate": 0.5, "preference_accuracy": 0.8}, base, champ, cfg)
    assert not refused.promote and any("eos_stop_rate regressed" in r for r in refused.reasons)
    refused = decide({"heldout_exact": 0.80, "eos_stop_rate": 1.0, "preference_accuracy": 0.7}, base, champ, cfg)
    assert not refused.promote and any("preference_accuracy regressed" in r for r in refused.reasons)
