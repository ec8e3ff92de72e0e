"""YAML recipe + `key.sub=value` overrides → a validated PipelineConfig, with errors naming key and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.secrets import REDACTED, is_secret_key, redact_args, redact_text

RECIPES_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree; the message names the key and the source.

    Redacted when made: the message echoes overrides and values, and a tracking URI may carry a password.
    """

    def __init__(self, *args):
        super().__init__(*redact_args(args))


def redact_override(item: str) -> str:
    """`key=value` as fit to echo: the value hidden when the key names a secret, URL passwords always."""
    key, eq, value = item.partition("=")
    if eq and is_secret_key(key.strip().split(".")[-1]) and value:
        return f"{key}={REDACTED}"
    return redact_text(item)


def resolve_recipe(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    # Short names (`demo`, `demo.yaml`) refer to the recipes shipped in configs/.
    for candidate in (RECIPES_DIR / p, RECIPES_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{path}: recipe not found (expected a YAML file or one of: {', '.join(list_recipes())})")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _parse_value(text: str) -> Any:
    # YAML scalars give ints, floats, bools, null and [lists] the way a user types them.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads `1e-2` as a string; a user typing it means a number.
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: Iterable[str], source: str = "command line") -> dict:
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {redact_override(item)!r} is not key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = REDACTED if is_secret_key(str(e["loc"][-1]) if e["loc"] else "") else repr(e.get("input"))
            lines.append(f"{source}: key '{key}': {e['msg']} (got {got})")
    return "; ".join(lines)


def config_from_dict(raw: dict, source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    raw: dict = {}
    source = "defaults"
    if path is not None:
        recipe = resolve_recipe(path)
        source = str(recipe)
        try:
            raw = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{recipe}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{recipe}: expected a mapping at the top level, got {type(raw).__name__}")
    overrides = list(overrides)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} + overrides {[redact_override(o) for o in overrides]}"
    return config_from_dict(raw, source)


def flatten(cfg: PipelineConfig) -> dict[str, Any]:
    """Dotted keys (`lora.r`, `dpo.beta`) for MLflow params; resolved values (alpha, primary metric, guards)
    replace empty ones."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", cfg.model_dump(mode="json"))
    out["lora.alpha"] = cfg.lora.resolved_alpha
    # Empty means "follows quantization.mode": the run records the method that trained.
    out["method"] = cfg.resolved_method.value
    # Empty means "the task preset's": the run records what was actually ranked and guarded on.
    out["eval.primary_metric"] = cfg.eval.resolved_primary_metric
    out["eval.guards"] = cfg.eval.resolved_guards
    return out
