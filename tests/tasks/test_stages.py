"""Stage-level refusals that must promote nothing: an empty held-out set, an overlap with train, a missing adapter."""
from __future__ import annotations

import pytest

from ftflow.tasks import stages
from ftflow.tasks.errors import DataError

EXAMPLE = {"prompt": [{"role": "user", "content": "Extract the order as JSON:\nKen ordered 3 lamps."}],
           "completion": [{"role": "assistant", "content": '{"qty": 3}'}]}


def _model(tiny_cfg):
    return stages.resolve_model(tiny_cfg)


def test_empty_heldout_is_refused(tiny_cfg):
    with pytest.raises(DataError, match="held-out set is empty"):
        stages.evaluate_stage(tiny_cfg, _model(tiny_cfg), [EXAMPLE], [], [], {"sft": "unused"}, None)


def test_heldout_overlapping_train_is_refused(tiny_cfg):
    with pytest.raises(DataError, match="also occur in train"):
        stages.evaluate_stage(tiny_cfg, _model(tiny_cfg), [EXAMPLE], [EXAMPLE], [], {"sft": "unused"}, None)


def test_missing_adapter_is_refused(tiny_cfg, tmp_path):
    other = dict(EXAMPLE, prompt=[{"role": "user", "content": "Extract the order as JSON:\nAmy ordered 5 mugs."}])
    with pytest.raises(DataError, match="sft adapter is missing"):
        stages.evaluate_stage(tiny_cfg, _model(tiny_cfg), [EXAMPLE], [other], [], {"sft": str(tmp_path / "gone")}, None)
