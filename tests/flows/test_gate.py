"""The promotion gate against a real MLflow store: promote a better candidate, refuse a worse one; the candidate
is chosen on validation; an LLM judge wired through a local OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.pipeline import pipeline_flow
from ftflow.tasks.registry.gate import register_candidate

# The tiny random model cannot produce exact JSON, so the gate ranks on held-out log-likelihood here;
# the demo recipe ranks on heldout_exact.
GATE = [
    "eval.primary_metric=heldout_logprob",
    "dpo.enabled=false",
    "sft.learning_rate=0.003",
    "sft.per_device_batch_size=8",
    "sft.save_steps=100",
    "eval.max_examples=4",
]


def _cfg(base, *overrides):
    return config_from_dict(apply_overrides(base.model_dump(mode="json"), [*GATE, *overrides]))


def test_better_candidate_promoted_worse_refused(prefect_harness, tiny_cfg, tmp_path):
    first = pipeline_flow(config=_cfg(tiny_cfg, "sft.max_steps=12"))
    assert first["gate"]["promoted"] and first["gate"]["alias"] == "champion", first["gate"]["summary"]
    # Every held-out example improved, so every bootstrap resample does: the lower bound clears 0.
    assert first["gate"]["summary"].startswith("PROMOTE sft: heldout_logprob +")
    assert "vs base (n=4, higher is better)" in first["gate"]["summary"]
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    name = tiny_cfg.registry.model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["gate"]["version"] == "1"

    worse = pipeline_flow(config=_cfg(tiny_cfg, "sft.max_steps=1"))
    gate = worse["gate"]
    assert not gate["promoted"] and gate["alias"] == "challenger"
    assert any("does not clear 0.0 vs champion" in r for r in gate["reasons"])
    assert gate["summary"].startswith("REFUSE sft: heldout_logprob ") and "(n=4, higher is better)" in gate["summary"]
    # The champion was re-scored on the second run's held-out prompts, beside the candidate.
    assert "champion" in worse["metrics"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["ftflow.gate"].startswith("REFUSE") and "vs champion" in tags["ftflow.gate"]
    assert (tags["ftflow.gate.metric"], tags["ftflow.gate.direction"], tags["ftflow.gate.n"]) == (
        "heldout_logprob",
        "higher",
        "4",
    )
    run = client.get_run(worse["run_id"])
    assert run.data.metrics["gate/promoted"] == 0.0
    assert run.data.metrics["gate/champion/low"] <= 0.0  # the refusing interval, as a metric too
    decision = json.loads(open(client.download_artifacts(worse["run_id"], "gate/decision.json", str(tmp_path))).read())
    assert decision["promote"] is False and decision["metric"] == "heldout_logprob" and decision["n"] == 4
    champion_row = next(c for c in decision["comparisons"] if c["against"] == "champion")
    assert champion_row["method"] == "bootstrap" and champion_row["low"] <= champion_row["high"]
    # What happened to the held-out rows before scoring is part of the record.
    assert decision["heldout_exclusions"]["source"] == "heldout file" and decision["heldout_exclusions"]["kept"] >= 4

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
    done = subprocess.run(
        [sys.executable, "-c", script, tiny_cfg.tracking.tracking_uri, name],
        capture_output=True,
        text=True,
        timeout=300,
    )
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


def test_candidate_is_chosen_on_validation_never_on_heldout(prefect_harness, tiny_cfg, monkeypatch):
    """SFT vs DPO is decided by the primary metric on the validation split (here heldout_loss: lower is better);
    the held-out prompts are only scored afterwards, for the report and the gate."""
    from ftflow.tasks.evaluate import evaluation

    calls = []
    real = evaluation.score_variants

    def spy(ctx, model, tokenizer, variants, scoring, precomputed=None):
        calls.append((list(variants), [repr(ex["prompt"]) for ex in scoring.examples], set(scoring.sources)))
        return real(ctx, model, tokenizer, variants, scoring, precomputed)

    monkeypatch.setattr(evaluation, "score_variants", spy)
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "eval.primary_metric=heldout_loss",
                "registry.enabled=false",
                "eval.max_examples=4",
                "eval.validation_max_examples=6",
            ],
        )
    )
    out = pipeline_flow(config=cfg)

    selection = out["selection"]
    assert (selection["split"], selection["metric"], selection["direction"]) == ("validation", "heldout_loss", "lower")
    scores = selection["scores"]
    assert set(scores) == {"sft", "dpo"} and selection["n"] == 6
    lowest = min(scores.values())
    assert out["candidate"] == [k for k in ("sft", "dpo") if scores[k] == lowest][-1]  # a tie keeps the later one
    chose, heldout = calls[0], calls[1]
    assert chose[0] == ["sft", "dpo"] and chose[2] == {"loss"}  # the primary metric only: no generation
    assert "base" in heldout[0] and not set(chose[1]) & set(heldout[1])

    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.data.metrics["validation/sft/heldout_loss"] == pytest.approx(scores["sft"])
    assert run.data.tags["candidate"] == out["candidate"]
    assert run.data.metrics["eval/heldout_loss"] == pytest.approx(out["metrics"][out["candidate"]]["heldout_loss"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert "validation" in inputs and inputs["validation"].dataset.digest
    assert any(t.key == "mlflow.data.context" and t.value == "validation" for t in inputs["validation"].tags)


def test_judge_endpoint_down_fails_before_training(prefect_harness, tiny_cfg):
    from ftflow.tasks.evaluate.judge import JudgeError

    cfg = _cfg(
        tiny_cfg,
        "eval.judge.enabled=true",
        "eval.judge.base_url=http://127.0.0.1:9/v1",
        "eval.judge.model=judge",
        "eval.judge.timeout_s=2",
    )
    with pytest.raises(
        JudgeError, match=r"^eval.judge.base_url: judge endpoint http://127.0.0.1:9/v1 cannot be reached"
    ):
        pipeline_flow(config=cfg)
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("JudgeError")
    assert not any(k.startswith(("sft/", "dpo/", "data/")) for k in run.data.metrics)  # nothing was trained


@pytest.mark.slow
def test_judge_wiring_through_a_local_openai_compatible_server(prefect_harness, tiny_cfg, tiny_model_dir, tmp_path):
    """The judge path end to end: `transformers serve` (the command `ftflow serve` runs) on loopback serving the
    project's tiny random model, the official openai client, both answer orders asked, verdicts in MLflow.

    This checks the wiring, not the judge's quality: a random 2-layer model's verdicts are noise (mostly
    unreadable, so ties), which is exactly what the parsing must survive."""
    import socket
    import time
    import urllib.request

    from ftflow.tasks.registry.serve import serve_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "judge-server.log").open("w")
    proc = subprocess.Popen(
        serve_command(tiny_model_dir, "127.0.0.1", port, "cpu"),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError((tmp_path / "judge-server.log").read_text()[-4000:]) from None
                time.sleep(1)
        cfg = _cfg(
            tiny_cfg,
            "registry.enabled=false",
            "eval.judge.enabled=true",
            f"eval.judge.base_url=http://127.0.0.1:{port}/v1",
            f"eval.judge.model={tiny_model_dir}",
            "eval.judge.max_examples=2",
            "sft.max_steps=2",
        )
        out = pipeline_flow(config=cfg)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    sft = out["metrics"]["sft"]
    assert 0.0 <= sft["judge_win_rate"] <= 1.0 and "judge_win_rate" not in out["metrics"]["base"]
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    verdicts = json.loads(open(client.download_artifacts(out["run_id"], "eval/judge.json", str(tmp_path))).read())
    rows = [dict(zip(verdicts["columns"], row)) for row in verdicts["data"]]
    assert len(rows) == 2 and {r["variant"] for r in rows} == {"sft"}
    for row in rows:  # asked twice, positions swapped; the score follows both verdicts
        assert isinstance(row["reply_variant_first"], str) and isinstance(row["reply_variant_second"], str)
        assert row["score"] in (0.0, 0.5, 1.0) and row["baseline"] == "base"
    assert client.get_run(out["run_id"]).data.metrics["eval/sft/judge_win_rate"] == pytest.approx(sft["judge_win_rate"])
