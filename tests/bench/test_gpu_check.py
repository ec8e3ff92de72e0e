"""bench/gpu_check.py --dry-run: the GPU script's whole code path (model from a config, NF4 replacement, peft,
paged 8-bit AdamW, the training loop, the table) on CPU with a 2-layer, hidden-64 model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh interpreter importing torch, transformers, peft and bitsandbytes, then 3 x 4 steps
def test_dry_run_prints_a_row_with_numbers_for_qlora_lora_and_full(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("device:") :]
    number = r"\d+(?:\.\d+)?"
    for row in ("qlora", "lora", "full"):
        line = next((ln for ln in table.splitlines() if ln.split()[:1] == [row]), None)
        assert line is not None, table
        # peak memory, s/step, tok/s and MFU are all figures, not OOM or skipped
        assert "OOM" not in line and "skipped" not in line, line
        assert len(re.findall(number, line)) >= 5, line
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"qlora", "lora", "full"}
    for r in rows.values():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    # LoRA trains the adapter only; full fine-tuning trains every weight.
    assert rows["qlora"]["trainable_params"] == rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert "paged" in rows["qlora"]["optimizer"].lower()
