"""Per-stage peak memory: compare-methods trains every arm in one process, so each stage's peak starts afresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.tasks.train.trainer import peak_memory_mb, reset_peak_memory

MB = 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS resets on Linux only")
def test_a_stage_after_a_bigger_one_reports_its_own_peak():
    reset_peak_memory("cpu")
    before = peak_memory_mb("cpu")
    ballast = bytearray(400 * MB)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident, not just reserved
    big_stage = peak_memory_mb("cpu")
    del ballast
    reset_peak_memory("cpu")
    small_stage = peak_memory_mb("cpu")
    assert big_stage - before > 380
    # Without the reset the second stage would report the first one's 400 MB as its own (ru_maxrss did).
    assert small_stage < big_stage - 300
