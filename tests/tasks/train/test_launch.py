"""The multi-process path: `accelerate launch` with 2 CPU processes (gloo), the same code GPUs run under DDP."""
from __future__ import annotations

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.tasks.data.formatting import sft_example
from ftflow.tasks.train.launch import accelerate_command, launch


def _rows(n):
    return [sft_example({"messages": [{"role": "user", "content": f"Extract the order as JSON:\nKen ordered {i} lamps."},
                                      {"role": "assistant", "content": f'{{"qty": {i}}}'}]}, None) for i in range(n)]


def test_two_processes_train_one_adapter(tiny_cfg, tmp_path):
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"), [
        "distributed.num_processes=2", "quantization.mode=none", "sft.max_steps=2", "sft.per_device_batch_size=2",
        "sft.save_steps=100"]))
    result = launch("sft", cfg, cfg.model.name_or_path, _rows(16), tmp_path / "sft", None, None, "cpu")
    assert result.metrics["world_size"] == 2.0 and result.backend == "gloo"
    assert result.global_step == 2
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").exists()
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2]


def test_launch_command_shapes(tiny_cfg, tmp_path):
    cfg = config_from_dict(apply_overrides(tiny_cfg.model_dump(mode="json"),
                                           ["distributed.num_processes=4", "distributed.strategy=fsdp"]))
    cmd = accelerate_command(cfg, tmp_path / "spec.json", "cuda")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" in cmd and "--use_fsdp" in cmd and cmd[-2:] == ["ftflow.tasks.train.launch", str(tmp_path / "spec.json")]
