"""Stage-level refusals that must promote nothing: an empty held-out set, an overlap with train, a missing adapter."""

from __future__ import annotations

import pytest

from ftflow.tasks import stages
from ftflow.tasks.errors import DataError
from ftflow.tasks.evaluate.evaluation import EvalSets

EXAMPLE = {
    "prompt": [{"role": "user", "content": "Extract the order as JSON:\nKen ordered 3 lamps."}],
    "completion": [{"role": "assistant", "content": '{"qty": 3}'}],
}


def _ctx(tiny_cfg, tmp_path) -> stages.StageContext:
    return stages.StageContext(tiny_cfg, stages.resolve_model(tiny_cfg), None, tmp_path)


def test_empty_heldout_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="held-out set is empty"):
        stages.evaluate(_ctx(tiny_cfg, tmp_path), EvalSets([EXAMPLE], [], []), {"sft": "unused"})


def test_heldout_overlapping_train_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="also occur in train"):
        stages.evaluate(_ctx(tiny_cfg, tmp_path), EvalSets([EXAMPLE], [EXAMPLE], []), {"sft": "unused"})


def test_missing_adapter_is_refused(tiny_cfg, tmp_path):
    other = dict(EXAMPLE, prompt=[{"role": "user", "content": "Extract the order as JSON:\nAmy ordered 5 mugs."}])
    with pytest.raises(DataError, match="sft adapter is missing"):
        stages.evaluate(_ctx(tiny_cfg, tmp_path), EvalSets([EXAMPLE], [other], []), {"sft": str(tmp_path / "gone")})


def test_default_progress_logs_one_line_per_update(tiny_cfg, tmp_path):
    lines: list[str] = []
    ctx = stages.StageContext(tiny_cfg, stages.ModelInfo("unused", "<|im_end|>", ""), None, tmp_path, lines.append)
    update = ctx.start_progress("sft", 40)
    update(3, {"loss": 1.23456, "grad_norm": 0.5})
    assert lines == ["sft step 3/40 loss=1.235"]


def test_trained_names_the_last_stage_the_candidate():
    from ftflow.tasks.train.trainer import TrainResult

    sft = TrainResult("runs/x/sft/adapter", [], 100, 1000, 2.0, 50.0)
    dpo = TrainResult("runs/x/dpo/adapter", [], 100, 1000, 3.0, 70.0)
    both = stages.Trained.of(sft, dpo)
    assert both.candidate == "dpo" and both.adapters == {"sft": sft.adapter_dir, "dpo": dpo.adapter_dir}
    assert (both.wall_s, both.peak_memory_mb, both.trainable_params) == (5.0, 70.0, 100)
    assert stages.Trained.of(sft).candidate == "sft"
    champion = stages.Champion("3", "run", "/tmp/champion", {})
    assert both.scored(champion) == {**both.adapters, "champion": "/tmp/champion"}
    assert both.scored(stages.Champion("3", "run", None, {})) == both.adapters
