"""compare-methods' arms: each method's config, and what table 2's stability column needs from them."""

from __future__ import annotations

import pytest

from ftflow.configs.loader import load_config
from ftflow.configs.schema import Alignment, Method, Quantization
from ftflow.tasks.evaluate.methods import arm_config
from ftflow.tasks.train.rlhf import step_variance


@pytest.mark.parametrize(
    "method, mode",
    [(Method.qlora, Quantization.four_bit), (Method.lora, Quantization.none), (Method.full, Quantization.none)],
)
def test_arm_config_sets_the_method_its_base_and_per_step_alignment_logs(method, mode):
    cfg = load_config("compare-methods")
    arm = arm_config(cfg, method, Alignment.rlhf)
    assert (arm.method, arm.quantization.mode, arm.alignment) == (method, mode, Alignment.rlhf)
    assert not arm.registry.enabled
    # The recipe logs every 5 steps; a variance of step-to-step changes needs every step.
    assert cfg.dpo.logging_steps == 5 and (arm.dpo.logging_steps, arm.rlhf.logging_steps) == (1, 1)
    assert (arm.sft.max_steps, arm.dpo.max_steps) == (cfg.sft.max_steps, cfg.dpo.max_steps)


def test_step_variance_is_the_variance_of_step_to_step_changes():
    assert step_variance([0.0, 1.0, 2.0, 3.0]) == 0.0  # steady climb: perfectly stable
    assert step_variance([0.0, 1.0, 0.0, 1.0]) == pytest.approx(4 / 3)  # changes +1, -1, +1
    assert step_variance([0.0, 1.0]) != step_variance([0.0, 1.0])  # one change: no variance (NaN)
