"""`backend: openai` end to end against tests/openai_standin.py, a loopback stand-in for the paid OpenAI API
(it cannot be reached from CI and costs money). The official `openai` client, the Prefect flow, the MLflow
store and registry are real; the stand-in scripts the far side (job states, events, the `ft:` model's answers).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from openai_standin import Script, StandIn

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.pipeline import pipeline_flow
from ftflow.tasks.data.demo import generate_demo
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.train.openai_api import default_epochs

KEY = "sk-standin-secret-7f3a9c"


def _cfg(base, base_url: str, *overrides: str):
    return config_from_dict(
        apply_overrides(
            base.model_dump(mode="json"),
            ["backend=openai", f"openai.base_url={base_url}", "openai.poll_interval_s=0.05", *overrides],
        )
    )


def _heldout_answers(cfg, tmp_path: Path) -> dict[str, str]:
    """The demo's held-out answers by question: generation is byte-identical for the same config."""
    made = generate_demo(cfg.data.demo, tmp_path / "expected-demo")
    answers = {}
    for line in Path(made["heldout"]).read_text().splitlines():
        messages = json.loads(line)["messages"]
        answers[messages[-2]["content"]] = messages[-1]["content"]
    return answers


def _everything_logged(client: MlflowClient, run_id: str, tmp_path: Path) -> str:
    run = client.get_run(run_id)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, dst_path=str(tmp_path / "artifacts"), tracking_uri=client.tracking_uri
    )
    texts = [p.read_text(errors="ignore") for p in Path(local).rglob("*") if p.is_file()]
    return json.dumps([run.data.params, run.data.tags]) + "".join(texts)


def test_fine_tune_through_the_api_is_tracked_gated_and_registered(prefect_harness, tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = Script(answers=_heldout_answers(tiny_cfg, tmp_path))
    with StandIn(script) as url:
        out = pipeline_flow(config=_cfg(tiny_cfg, url, "openai.n_epochs=2", "openai.suffix=weekly"))

        assert out["fine_tuned_model"] == "ft:gpt-4o-mini-2024-07-18:org-standin:weekly:ftjob-1"
        created = script.created_jobs[0]
        assert created["method"] == {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
        assert (created["suffix"], created["seed"]) == ("weekly", tiny_cfg.seed)
        # The validated rows went up, not the raw ones: the demo's injected defects are gone.
        uploaded = [json.loads(line) for line in script.uploads[0].decode().splitlines()]
        assert len(uploaded) == out["estimate"]["examples"] > 0
        assert all(row["messages"][-1]["role"] == "assistant" for row in uploaded)
        assert out["estimate"]["billed_tokens"] == 2 * out["estimate"]["file_tokens"]

        client = MlflowClient(tiny_cfg.tracking.tracking_uri)
        run = client.get_run(out["run_id"])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(out["run_id"], "openai/train_loss")]
        assert steps == [1, 2, 3]
        assert run.data.tags["openai.job_id"] == "ftjob-1"

        # The stand-in's ft model answers every held-out prompt right, the base none: McNemar clears 0.
        gate = out["gate"]
        assert gate["promoted"] and gate["alias"] == "champion", gate["summary"]
        assert gate["summary"].startswith("PROMOTE openai_ft: heldout_exact +1.000")
        name = tiny_cfg.registry.model_name
        version = client.get_model_version_by_alias(name, "champion")
        assert version.tags["openai.fine_tuned_model"] == out["fine_tuned_model"]
        assert "OpenAI fine-tuned model" in version.description

        # The registered model answers through the API with the key from the environment, not a stored one.
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        question = next(iter(script.answers))
        assert model.predict([question]) == [script.answers[question]]

    assert KEY not in _everything_logged(client, out["run_id"], tmp_path)


def test_dry_run_checks_and_estimates_without_a_key_or_an_upload(prefect_harness, tiny_cfg, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = Script()
    with StandIn(script) as url:
        out = pipeline_flow(config=_cfg(tiny_cfg, url, "openai.dry_run=true"))
    assert script.requests == []
    assert out["fine_tuned_model"] is None
    est = out["estimate"]
    # n_epochs left empty: the API's own rule, which for ~100 rows is its target of 3.
    assert est["n_epochs"] == default_epochs(est["examples"]) == 3
    assert est["usd"] == pytest.approx(est["billed_tokens"] / 1e6 * 3.0, abs=1e-4)
    run = MlflowClient(tiny_cfg.tracking.tracking_uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED" and "dry_run" in run.data.tags["openai.not_run"]


@pytest.mark.parametrize(
    "script, key, reason, reached_upload",
    [
        (Script(), None, "needs an API key: set the environment variable OPENAI_API_KEY", False),
        (Script(reject_files=True), KEY, "the API rejected the file: Invalid file format", True),
        (
            Script(outcome="failed"),
            KEY,
            "failed: invalid_training_file: The job failed due to an invalid training file",
            True,
        ),
        (Script(outcome="cancelled"), KEY, "ftjob-1 was cancelled", True),
    ],
    ids=["missing-key", "rejected-file", "failed-job", "cancelled-job"],
)
def test_api_failures_end_the_run_failed_with_the_api_reason_and_register_nothing(
    prefect_harness, tiny_cfg, monkeypatch, script, key, reason, reached_upload
):
    if key:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StandIn(script) as url:
        with pytest.raises(PipelineError, match=reason):
            pipeline_flow(config=_cfg(tiny_cfg, url))
    assert (("POST", "/v1/files") in script.requests) is reached_upload
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(tiny_cfg.tracking.experiment).experiment_id],
        "tags.pipeline = 'openai-fine-tune'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert reason.split(":")[0] in runs[0].data.tags["failure_reason"]
    assert client.search_model_versions(f"name='{tiny_cfg.registry.model_name}'") == []
