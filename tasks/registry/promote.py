"""`ftflow promote`: move `champion` by hand, with a recorded reason, never past the chat-template check.

The gate is the normal way a version becomes champion; this is the override (a rollback, a version a
human reviewed). The reason is required and lands on the version as the `ftflow.manual_promotion` tag
(with who, when and which version it displaced). The version's adapter must still match the current
base model's chat template: an adapter served under another template answers in the wrong format.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import PipelineError

MANUAL_TAG = "ftflow.manual_promotion"


class PromotionError(PipelineError):
    pass


def promote(
    cfg: PipelineConfig, name: str, version: str, reason: Optional[str], log: Callable[[str], None] = print, client=None
) -> Optional[str]:
    """Point `champion` at `name` v`version`; returns the version it displaced (None if there was none)."""
    from mlflow.exceptions import MlflowException

    from ftflow.tasks.data.formatting import template_fingerprint
    from ftflow.tasks.registry import gate as registry
    from ftflow.tasks.registry.export import find_adapter
    from ftflow.tasks.train.model import load_tokenizer, offline_env, resolve_model_path

    if not reason or not reason.strip():
        raise PromotionError("promote needs --reason TEXT: a manual promotion is recorded with its reason")
    client = client or registry.registry_client(cfg)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise PromotionError(f"registered model {name!r} has no version {version}") from None
    adapter = find_adapter(client, mv.run_id, mv)
    meta_file = Path(adapter, "ftflow_meta.json") if adapter else None
    if meta_file is None or not meta_file.exists():
        raise PromotionError(
            f"{name} v{version}: no packaged adapter with ftflow_meta.json; cannot check its chat template"
        )
    packaged = json.loads(meta_file.read_text()).get("template_fingerprint")
    offline_env()
    current = template_fingerprint(load_tokenizer(resolve_model_path(cfg.model), cfg.model))
    if packaged != current:
        raise PromotionError(
            f"{name} v{version} was trained under chat template {packaged}, but the current base model "
            f"{cfg.model.name_or_path!r} has {current}; not promoted"
        )
    previous = registry.champion_version(client, name)
    previous_version = str(previous.version) if previous is not None else None
    record = {
        "reason": reason.strip(),
        "by": getpass.getuser(),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "previous": previous_version,
    }
    client.set_registered_model_alias(name, registry.CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), MANUAL_TAG, json.dumps(record, ensure_ascii=False)[:5000])
    log(
        f"{name}: @champion -> v{version} (was {f'v{previous_version}' if previous_version else 'unset'}); "
        f"reason recorded as {MANUAL_TAG}"
    )
    return previous_version
