"""The multi-process path: `accelerate launch` with 2 CPU processes (gloo), the same code GPUs run under DDP."""

from __future__ import annotations

import json

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.tasks.data.formatting import sft_example
from ftflow.tasks.stages import StageContext, resolve_model
from ftflow.tasks.train.launch import accelerate_command
from ftflow.tasks.train.trainer import train


def _rows(n):
    return [
        sft_example(
            {
                "messages": [
                    {"role": "user", "content": f"Extract the order as JSON:\nKen ordered {i} lamps."},
                    {"role": "assistant", "content": f'{{"qty": {i}}}'},
                ]
            },
            None,
        )
        for i in range(n)
    ]


def test_two_processes_train_one_adapter(tiny_cfg, tmp_path):
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "distributed.num_processes=2",
                "quantization.mode=none",
                "sft.max_steps=2",
                "sft.per_device_batch_size=2",
                "sft.save_steps=100",
            ],
        )
    )
    reported: list[tuple[str, int, int]] = []

    def progress(label: str, total: int):
        return lambda step, metrics: reported.append((label, total, step))

    ctx = StageContext(cfg, resolve_model(cfg), None, tmp_path, lambda line: None, progress)
    # The same builder a single process uses: with num_processes > 1 it launches the workers itself.
    result = train(ctx, "sft", _rows(16))
    assert result.metrics["world_size"] == 2.0 and result.backend == "gloo"
    assert result.global_step == 2
    adapter = tmp_path / "sft" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "ftflow_meta.json").read_text())["stage"] == "sft"  # written by rank 0
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2]
    assert reported == [("sft", 2, 2)]


def test_launch_command_shapes(tiny_cfg, tmp_path):
    cfg = config_from_dict(
        apply_overrides(tiny_cfg.model_dump(mode="json"), ["distributed.num_processes=4", "distributed.strategy=fsdp"])
    )
    cmd = accelerate_command(cfg, tmp_path / "spec.json")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert (
        "--multi_gpu" in cmd
        and "--use_fsdp" in cmd
        and cmd[-2:] == ["ftflow.tasks.train.launch", str(tmp_path / "spec.json")]
    )


def test_launch_keeps_credentials_out_of_its_spec_file_and_its_error(tiny_cfg, tmp_path, monkeypatch):
    import secrets
    import socket

    import pytest

    from ftflow.tasks.tracking import RunLogger

    password, token = "pw" + secrets.token_hex(12), "hf_" + secrets.token_hex(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: the workers' first metric fails
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                "distributed.num_processes=2",
                "quantization.mode=none",
                "sft.max_steps=2",
                "sft.logging_steps=1",
                "sft.per_device_batch_size=2",
                "sft.save_steps=100",
                f"tracking.tracking_uri=http://bob:{password}@127.0.0.1:{port}",
                f"sft.extra.hub_token={token}",
            ],
        )
    )
    ctx = StageContext(cfg, resolve_model(cfg), RunLogger(cfg, "0" * 32), tmp_path, lambda line: None)
    with pytest.raises(RuntimeError) as err:
        train(ctx, "sft", _rows(16))
    spec = (tmp_path / "sft" / "launch_spec.json").read_text()
    assert password not in spec and token not in spec
    assert password not in str(err.value) and token not in str(err.value)
    assert f"127.0.0.1:{port}" in spec and "accelerate launch of sft" in str(err.value)


def test_two_nodes_rendezvous_on_loopback_and_train_one_adapter(tiny_cfg, tmp_path):
    """Two "nodes" on one machine: node 0 is the pipeline's own launcher, node 1 runs the same launcher on the
    same spec with machine_rank 1; the ranks meet through torch.distributed's rendezvous on node 0's address."""
    import subprocess
    import threading
    import time
    from pathlib import Path

    overrides = [
        "distributed.num_processes=2",
        "distributed.num_machines=2",
        "distributed.main_process_ip=127.0.0.1",
        "distributed.main_process_port=29731",
        "quantization.mode=none",
        "sft.max_steps=2",
        "sft.per_device_batch_size=2",
        "sft.save_steps=100",
    ]
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), overrides))
    node1 = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), ["distributed.machine_rank=1"]))
    spec = tmp_path / "sft" / "launch_spec.json"
    ran: dict = {}

    def second_node():
        deadline = time.monotonic() + 300
        while not spec.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        root = Path(__file__).resolve().parents[3]
        ran["node1"] = subprocess.run(
            accelerate_command(node1, spec), cwd=root, capture_output=True, text=True, timeout=600
        )

    thread = threading.Thread(target=second_node)
    thread.start()
    ctx = StageContext(cfg, resolve_model(cfg), None, tmp_path, lambda line: None)
    result = train(ctx, "sft", _rows(16))
    thread.join(timeout=600)
    assert ran["node1"].returncode == 0, ran["node1"].stderr[-2000:]
    assert result.metrics["world_size"] == 2.0 and result.backend == "gloo" and result.global_step == 2
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").exists()
    cmd = accelerate_command(node1, spec)
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--num_machines") + 1] == "2"
