"""Validation on its own: the CLI on public-style files, injected defects caught, contracts that stop the flow, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow

from ftflow import steps
from ftflow.cli import main
from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import DemoDataConfig
from ftflow.pipeline import pipeline_flow
from ftflow.tasks import stages
from ftflow.tasks.data.demo import generate_demo
from ftflow.tasks.errors import ContractError

FIXTURES = Path(__file__).resolve().parents[1] / "tasks" / "data" / "fixtures" / "importers"
EXPECTED = {
    "duplicate": {"exact_duplicate"},
    "near_duplicate": {"exact_duplicate", "near_duplicate"},
    "empty_answer": {"empty_content"},
    "overlong": {"too_long"},
    "broken_role_order": {"role_order"},
    "chosen_equals_rejected": {"chosen_equals_rejected"},
    "empty_chosen": {"empty_content"},
}


@pytest.mark.parametrize(
    "name,kind",
    [
        ("alpaca_tatsu.json", "sft"),
        ("openai_finetune.jsonl", "sft"),
        ("sharegpt.json", "sft"),
        ("hh_rlhf.jsonl", "preference"),
    ],
)
def test_cli_validate_public_formats(name, kind, tmp_path, capsys, tiny_model_dir):
    rc = main(
        [
            "validate",
            str(FIXTURES / name),
            "--kind",
            kind,
            "--out",
            str(tmp_path),
            f"model.name_or_path={tiny_model_dir}",
            "quality.min_kept_rows=1",
            "quality.max_dropped_fraction=1.0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts_in"] >= 1 and "kept_ratio" in report
    quarantine = (tmp_path / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == report["counts_in"] - report["counts_out"]
    assert "quarantine:" in out


def test_cli_validate_exits_nonzero_when_a_contract_fails(tmp_path, capsys, tiny_model_dir):
    rc = main(
        [
            "validate",
            str(FIXTURES / "openai_finetune.jsonl"),
            "--kind",
            "sft",
            "--out",
            str(tmp_path),
            f"model.name_or_path={tiny_model_dir}",
            "quality.min_kept_rows=1000",
        ]
    )
    assert rc == 1
    assert "contract failed" in capsys.readouterr().out


def test_injected_defects_are_caught_at_their_known_lines(tmp_path, tiny_cfg):
    made = generate_demo(DemoDataConfig(seed=3, n_sft=300, n_preference=150, n_heldout=20, defect_rate=0.06), tmp_path)
    manifest = made["manifest_content"]
    model = stages.resolve_model(tiny_cfg)
    for split in ("sft", "preference"):
        kind = split
        stages.validate_split(made[split], kind, tiny_cfg, None, tmp_path / split)
        dropped = {
            json.loads(row)["line"]: json.loads(row)["reason"]
            for row in (tmp_path / split / "quarantine.jsonl").read_text().splitlines()
        }
        injected = set()
        for defect, info in manifest["defects"][split].items():
            for line in info["lines"]:
                injected.add(line)
                assert dropped.get(line) in EXPECTED[defect], (split, defect, line, dropped.get(line))
        # Clean rows stay: nothing outside the injected lines is dropped.
        assert set(dropped) == injected, sorted(set(dropped) - injected)
    assert model.eos_token == "<|im_end|>"


def test_failed_contract_stops_before_training(prefect_harness, tiny_cfg):
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), ["quality.min_kept_rows=100000"]))
    with pytest.raises(ContractError):
        pipeline_flow(config=cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("ContractError")
    assert not any(k.startswith(("sft/", "dpo/")) for k in run.data.metrics)  # nothing was trained
    assert client.search_registered_models() == []
    assert any(a.path == "data" for a in client.list_artifacts(run.info.run_id))  # the reports explain why


def test_validation_is_cached_by_content(prefect_harness, tiny_cfg, tmp_path):
    model = stages.resolve_model(tiny_cfg)
    ctx = stages.StageContext(tiny_cfg, model, None, tmp_path)
    paths = stages.data_paths(ctx)
    key_dir = stages.validated_dir(ctx, paths)
    assert key_dir == Path(tiny_cfg.output_dir) / "validated" / stages.data_cache_key(tiny_cfg, model, paths)

    @flow
    def twice():
        first = steps.validate(ctx, paths, key_dir, return_state=True)
        second = steps.validate(ctx, paths, key_dir, return_state=True)
        formatted = steps.format_chat(ctx, second.result(), return_state=True)
        again = steps.format_chat(ctx, second.result(), return_state=True)
        return first, second, formatted, again

    first, second, formatted, again = twice()
    assert first.is_completed() and not first.name == "Cached"
    assert second.name == "Cached"
    assert len(second.result().sft) == len(first.result().sft)
    assert formatted.is_completed() and again.name == "Cached"
    assert len(again.result()[0].sft) == len(second.result().sft)
    # Other content, other key.
    changed = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), ["quality.max_tokens=100"]))
    assert stages.data_cache_key(changed, model, paths) != key_dir.name
