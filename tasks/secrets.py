"""Credentials come from the environment or a Prefect Secret block, and go nowhere but the library call.

The redaction helpers live here, beneath everything else, because errors.py and configs/loader.py need
them before any message is built: an error that carries a password has already leaked it.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ftflow.configs.schema import ModelConfig

REDACTED = "***"
# Whole name parts only: `max_tokens` is a count, `hf_token` is a secret.
SECRET_KEY = re.compile(
    r"(?:^|[_\-.])(token|secret|password|passwd|credentials?|api[_-]?key)(?:$|[_\-.])", re.IGNORECASE
)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,})\b")
# `key=value` as echoed overrides and query strings show them; the key decides (see is_secret_key).
KEY_VALUE = re.compile(r"(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>=)(?P<value>[^\s,;&'\"\])]+)")
ENV_SECRETS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def is_secret_key(key: str) -> bool:
    # `hf_token_block` names where a secret lives (a Prefect block), not the secret itself.
    return bool(SECRET_KEY.search(key)) and not key.endswith("_block")


def redact_text(text: str) -> str:
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = SECRET_VALUE.sub(REDACTED, text)
    text = KEY_VALUE.sub(lambda m: f"{m['key']}={REDACTED}" if is_secret_key(m["key"].split(".")[-1]) else m[0], text)
    for name in ENV_SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, REDACTED)
    return text


def strip_credentials(uri: str) -> str:
    """A URL fit to print or link: without its `user:password@` part."""
    return re.sub(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/@\s]+@", r"\g<scheme>", uri, flags=re.IGNORECASE)


def redact_args(args: tuple) -> tuple:
    return tuple(redact_text(a) if isinstance(a, str) else a for a in args)


class RedactingFilter(logging.Filter):
    """Redacts a record's message and traceback in place, before any handler formats or ships it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ftflow_redacted", False):
            return True
        try:
            record.msg = redact_text(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                # Formatters reuse exc_text when it is set, so the traceback they print is this one.
                record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        except Exception:  # a log line must never fail the run it describes
            pass
        record._ftflow_redacted = True
        return True


_REDACTING_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to every handler now configured (Prefect's console and API handlers included).

    A handler filter, not a logger filter: records that propagate up from child loggers skip the
    parents' logger filters but always pass through the handlers that emit them.
    """
    loggers: list[Any] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if _REDACTING_FILTER not in handler.filters:
                handler.addFilter(_REDACTING_FILTER)


def secret(block: Optional[str], block_key: str, env_names: tuple[str, ...] = ()) -> Optional[str]:
    """A credential from the Prefect Secret block `block` (named in the config at `block_key`), else the first set
    environment variable of `env_names`; None when neither has it. A block that cannot be loaded is an error."""
    from ftflow.tasks.errors import PipelineError

    if block:
        try:
            from prefect.blocks.system import Secret

            return Secret.load(block).get()
        except Exception as err:
            raise PipelineError(
                f"{block_key}: cannot load Prefect Secret block {block!r} ({type(err).__name__})"
            ) from None
    return next((os.environ[name] for name in env_names if os.environ.get(name)), None)


def hf_token(cfg: "ModelConfig") -> Optional[str]:
    return secret(cfg.hf_token_block, "model.hf_token_block", ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
