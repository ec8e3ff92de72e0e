"""The whole chain as a real Prefect flow on the tiny model, recorded in a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from ftflow.cli import main
from ftflow.pipeline import pipeline_flow


def _runs(cfg):
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _artifacts(**filters) -> dict:
    """Prefect artifacts by key (the newest of each), filtered by flow run and/or key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[filters["flow_run_id"]]) if "flow_run_id" in filters else None,
        key=ArtifactFilterKey(any_=[filters["key"]]) if "key" in filters else None,
    )
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=flt)
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def test_pipeline_records_everything(prefect_harness, tiny_cfg):
    state = pipeline_flow(config=tiny_cfg, return_state=True)
    out = state.result()
    client, runs = _runs(tiny_cfg)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == out["run_id"]

    params = run.data.params
    assert params["lora.r"] == "16" and params["lora.alpha"] == "32"
    assert params["dpo.beta"] == "0.1" and params["quantization.mode"] == "4bit"
    assert len(params["chat_template.fingerprint"]) == 16
    assert "version.transformers" in params and "version.trl" in params
    assert run.data.tags["git_commit"]

    metrics = run.data.metrics
    for key in (
        "eval/heldout_exact",
        "eval/eos_stop_rate",
        "eval/heldout_loss",
        "eval/base/heldout_exact",
        "eval/base_fewshot/heldout_exact",
        "eval/sft/heldout_perplexity",
        "eval/dpo/preference_accuracy",
        "data/kept_ratio",
        "sft/loss",
        "dpo/rewards/margins",
        "sft/trainable_params",
    ):
        assert key in metrics, key
    assert 0.0 < metrics["data/kept_ratio"] < 1.0  # the demo data carries injected defects
    sft_curve = client.get_metric_history(run.info.run_id, "sft/loss")
    assert [m.step for m in sft_curve] == [1, 2]

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"sft", "preference", "heldout", "heldout_preference"} <= set(inputs)
    assert all(d.dataset.digest for d in inputs.values())

    def listed(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    top = listed()
    assert {"adapters", "config", "data", "eval", "plots", "summary.md"} <= top
    assert "adapters/dpo/adapter_model.safetensors" in listed("adapters/dpo")
    assert "data/sft/quarantine.jsonl" in listed("data/sft")
    assert "plots/loss_curves.png" in listed("plots")
    quarantine = Path(client.download_artifacts(run.info.run_id, "data/sft/quarantine.jsonl"))
    reasons = {json.loads(line)["reason"] for line in quarantine.read_text(encoding="utf-8").splitlines()}
    assert {"exact_duplicate", "empty_content", "role_order", "too_long"} <= reasons
    predictions = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/predictions.json")).read_text())
    assert set(predictions["columns"]) >= {"variant", "prompt", "reference", "prediction", "exact_match"}

    # The dashboard's view of the same run.
    shown = _artifacts(flow_run_id=state.state_details.flow_run_id)
    assert {"data-validation", "sft-progress", "dpo-progress", "heldout-comparison", "fine-tune-summary"} <= set(shown)
    assert shown["sft-progress"].data == 100.0 and shown["dpo-progress"].data == 100.0
    assert shown["sft-progress"].description == "sft done: 2 steps"
    assert run.info.run_id in shown["fine-tune-summary"].data
    assert {row["model"] for row in json.loads(shown["heldout-comparison"].data)} == {
        "base",
        "base_fewshot",
        "sft",
        "dpo",
    }


def _failed_run(cfg):
    _, runs = _runs(cfg)
    assert runs, "the failing run must still be recorded"
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags.get("failure_reason")
    assert runs[0].info.run_id in _artifacts(key="run-failure")["run-failure"].data
    return runs[0]


def _cli(cfg, tmp_path, *overrides):
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return main(["run", str(recipe), *overrides])


def test_missing_data_file_fails_clearly(prefect_harness, tiny_cfg, tmp_path, capsys):
    rc = _cli(tiny_cfg, tmp_path, "data.demo.enabled=false", f"data.sft_path={tmp_path / 'nope.jsonl'}")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nope.jsonl" in err and ("does not exist" in err.lower() or "not found" in err.lower())
    _failed_run(tiny_cfg)


def test_malformed_jsonl_names_the_line(prefect_harness, tiny_cfg, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    bad.write_text(good + "\n" + good + '\n{"messages": [\n')
    rc = _cli(tiny_cfg, tmp_path, "data.demo.enabled=false", f"data.sft_path={bad}")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{bad}:3" in err
    _failed_run(tiny_cfg)


def test_empty_after_filtering_fails(prefect_harness, tiny_cfg, tmp_path, capsys):
    rows = tmp_path / "empty_answers.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "  "}]})
            + "\n"
            for i in range(5)
        )
    )
    rc = _cli(tiny_cfg, tmp_path, "data.demo.enabled=false", f"data.sft_path={rows}")
    assert rc == 2
    assert "no sft rows left after validation" in capsys.readouterr().err
    _failed_run(tiny_cfg)


def test_unknown_config_key_fails_before_anything_runs(tiny_cfg, tmp_path, capsys):
    rc = _cli(tiny_cfg, tmp_path, "lora.rank=8")
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora.rank'" in err and "recipe.yaml" in err
    _, runs = _runs(tiny_cfg)
    assert runs == []


def test_missing_model_path_fails(prefect_harness, tiny_cfg, tmp_path, capsys):
    rc = _cli(tiny_cfg, tmp_path, f"model.name_or_path={tmp_path / 'no-model'}")
    assert rc == 2
    assert "path does not exist" in capsys.readouterr().err
    _failed_run(tiny_cfg)


def test_4bit_without_bitsandbytes_fails(prefect_harness, tiny_cfg, tmp_path, capsys, monkeypatch):
    # A machine whose bitsandbytes cannot load cannot exist here (it loads fine), so its import is made to fail.
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    rc = _cli(tiny_cfg, tmp_path)
    assert rc == 2
    assert "needs bitsandbytes" in capsys.readouterr().err
    _failed_run(tiny_cfg)
