"""Packaging from worker threads: the pyfunc folder is written and MLflow's models-from-code mock stays out."""

from __future__ import annotations

import json
import sys
import threading

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.registry.packaging import package_model


def test_concurrent_packaging_leaves_no_dbutils_mock(tmp_path):
    # Sweep arms gate in parallel threads; MLflow's loader swaps sys.modules["dbutils"] without a lock,
    # and a mock left there breaks any later code that reads module attributes (hypothesis did).
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    cfg = PipelineConfig()
    before = sys.modules.get("dbutils")
    errors: list[BaseException] = []

    def pack(i: int) -> None:
        try:
            package_model(cfg, str(adapter), {"stage": "sft"}, tmp_path / f"out{i}")
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=pack, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sys.modules.get("dbutils") is before
    for i in range(3):
        assert (tmp_path / f"out{i}" / "model" / "MLmodel").is_file()
