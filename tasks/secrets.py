"""Credentials come from the environment or a Prefect Secret block, and go nowhere but the library call."""
from __future__ import annotations

import os
from typing import Optional

from ftflow.configs.schema import ModelConfig
from ftflow.tasks.errors import PipelineError


def hf_token(cfg: ModelConfig) -> Optional[str]:
    if cfg.hf_token_block:
        try:
            from prefect.blocks.system import Secret

            return Secret.load(cfg.hf_token_block).get()
        except Exception as err:
            raise PipelineError(f"model.hf_token_block: cannot load Prefect Secret block {cfg.hf_token_block!r} "
                                f"({type(err).__name__})") from None
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
