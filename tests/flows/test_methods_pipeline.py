"""Every `method` through the same pipeline on the tiny Llama: trained, scored beside the base, gated, registered,
and the registered model loads and answers (a prompt encoder, a LoRA adapter on a 32-bit base, full weights)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from ftflow.cli import main
from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.pipeline import pipeline_flow


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=prompt_tuning", "quantization.mode=none", "prompt_tuning.num_virtual_tokens=4"],
        ["method=lora", "quantization.mode=none"],
        ["method=full", "quantization.mode=none"],
    ],
    ids=["prompt_tuning", "lora", "full"],
)
def test_each_method_runs_the_whole_pipeline_and_registers_what_it_made(prefect_harness, tiny_cfg, overrides, tmp_path):
    cfg = config_from_dict(
        apply_overrides(tiny_cfg.model_dump(mode="json"), [*overrides, "eval.primary_metric=heldout_logprob"])
    )
    out = pipeline_flow(config=cfg)
    method = cfg.resolved_method.value
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == method
    assert {"base", "sft", "dpo"} <= set(out["metrics"])
    version = client.get_model_version(cfg.registry.model_name, out["gate"]["version"])
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{version.version}")
    answers = model.predict(["Extract the city: I live in Paris."])
    assert len(answers) == 1 and isinstance(answers[0], str)
    if method in ("full", "prompt_tuning"):
        # A full fine-tune exports as it is, a prompt-tuning model as the base with its adapter beside it;
        # both pass the same equivalence check as a merged adapter.
        out_dir = tmp_path / f"export-{method}"
        spec = f"models:/{cfg.registry.model_name}/{version.version}"
        store = [f"model.name_or_path={cfg.model.name_or_path}", f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]
        assert main(["export", spec, "--to", str(out_dir), "--recipe", "tiny", *store]) == 0
        assert (out_dir / "model.safetensors").exists() and not (out_dir / "adapter_config.json").exists()
        assert client.get_run(version.run_id).data.metrics["export/agreement"] >= 0.95
        if method == "prompt_tuning":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            loaded = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(out_dir), out_dir / "prompt_adapter"
            )
            assert loaded.peft_config["default"].num_virtual_tokens == 4


def test_rlhf_alignment_runs_the_whole_pipeline(prefect_harness, tiny_cfg):
    """alignment=rlhf: reward model, GRPO from the SFT adapter, then evaluated and gated like DPO."""
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "alignment=rlhf",
                "eval.primary_metric=heldout_logprob",
                "rlhf.max_steps=2",
                "rlhf.per_device_batch_size=4",
                "rlhf.num_generations=2",
                "rlhf.max_completion_length=8",
                "rlhf.logging_steps=1",
                "rlhf.reward.max_steps=2",
            ],
        )
    )
    out = pipeline_flow(config=cfg)
    assert {"base", "sft", "rlhf"} <= set(out["metrics"]) and "dpo" not in out["metrics"]
    assert out["selection"]["scores"].keys() == {"sft", "rlhf"}
    client = MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(out["run_id"]).data.metrics
    assert 0.0 <= metrics["reward/heldout_pair_accuracy"] <= 1.0
    assert [m.step for m in client.get_metric_history(out["run_id"], "rlhf/reward")] == [1, 2]
    assert "rlhf/kl" in metrics and metrics["rlhf/models_held"] == 2.0
    assert out["gate"]["version"]
