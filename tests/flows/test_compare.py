"""`ftflow compare-methods` on the tiny Llama: every method trains in its own child run on the same data, the table
has a measured row for each, and the API row is the offline estimate marked not run (no key, no spending)."""

from __future__ import annotations

from mlflow import MlflowClient

from ftflow.compare import compare_flow
from ftflow.configs.loader import apply_overrides, config_from_dict


def test_compare_methods_measures_every_method_on_the_same_data(prefect_harness, tiny_cfg, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "compare.methods=[qlora,lora,full,prompt_tuning]",
                "compare.alignments=[dpo,rlhf]",
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
    out = compare_flow(config=cfg)
    rows = {r["method"]: r for r in out["rows"]}
    assert [r["status"] for r in out["rows"]] == ["FINISHED"] * 4 + ["not run"]
    params = {m: rows[m]["trainable_params"] for m in ("qlora", "lora", "full", "prompt_tuning")}
    assert params["full"] > params["lora"] == params["qlora"] > params["prompt_tuning"] > 0
    assert params["full"] == rows["full"]["total_params"]
    for m in params:
        row = rows[m]
        assert row["s_per_step"] > 0 and row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["metric"] == "heldout_logprob" and row["interval"]["against"] == "base"
    assert "format check passed" in rows["openai"]["note"] and "billed tokens est." in rows["openai"]["note"]
    assert out["qlora_claim"].startswith("QLoRA vs LoRA on heldout_logprob")

    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(out["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{out['run_id']}'", order_by=["start_time ASC"]
    )
    assert [c.data.tags["method"] for c in children] == ["qlora", "lora", "full", "prompt_tuning", "qlora"]
    assert [c.data.params["alignment"] for c in children] == ["dpo"] * 4 + ["rlhf"]
    # Table 2: DPO (the QLoRA arm's) beside RLHF after the same QLoRA SFT.
    aligned = {r["alignment"]: r for r in out["alignment_rows"]}
    assert aligned.keys() == {"dpo", "rlhf"} and {r["status"] for r in aligned.values()} == {"FINISHED"}
    assert (aligned["dpo"]["models_held"], aligned["rlhf"]["models_held"]) == (1, 2)
    assert aligned["dpo"]["run_id"] == rows["qlora"]["run_id"]
    assert 0.0 <= aligned["rlhf"]["reward_pair_accuracy"] <= 1.0 and aligned["rlhf"]["wall_s"] > 0
    children = children[:4]
    keys = [sorted(k for k in c.data.metrics if k.startswith("compare/")) for c in children]
    assert all(k == keys[0] for k in keys) and keys[0]
    printed = capsys.readouterr().out
    assert "| method | status | trainable params" in printed and "| alignment | status |" in printed
    assert "whole comparison:" in printed
    # Nothing registered: a comparison is not a release.
    assert client.search_registered_models() == []
