"""`ftflow serve`: an exported model behind an OpenAI-compatible `/v1/chat/completions`.

The server is transformers' own `transformers serve` (FastAPI + uvicorn, OpenAI request and response
types, shipped with transformers 5), pinned to one local folder and run offline; ftflow writes no
HTTP code. Before handing over it checks what the server cannot: the folder's chat template is the
one the adapter was trained under (its fingerprint against the exported meta), and the port is free.
A `models:/name@alias` is exported first (with the equivalence check) into `.cache/exports/`.

On a GPU, vLLM serves the base with the LoRA adapter unmerged (README, "Serve").
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import PipelineError

EXPORTS_DIR = Path(".cache") / "exports"
RUN_ID = re.compile(r"[0-9a-f]{32}")


class ServeError(PipelineError):
    pass


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ServeError(f"--port {port}: {host}:{port} is in use") from None


def check_served_template(model_dir: Path) -> dict:
    """The exported folder's tokenizer must carry the template the adapter was trained under."""
    from transformers import AutoTokenizer

    from ftflow.tasks.data.formatting import template_fingerprint
    from ftflow.tasks.registry.export import EXPORT_META

    meta_file = model_dir / EXPORT_META
    if not meta_file.exists():
        raise ServeError(f"{model_dir}: no {EXPORT_META}; serve a folder written by `ftflow export` or a models:/ URI")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # as load_tokenizer does when the fingerprint was taken
        tokenizer.pad_token = tokenizer.eos_token
    found = template_fingerprint(tokenizer)
    if found != meta.get("template_fingerprint"):
        raise ServeError(
            f"{model_dir}: chat template fingerprint {found} does not match the one the adapter was "
            f"trained under ({meta.get('template_fingerprint')}); not serving"
        )
    return meta


def resolve_model_dir(cfg: PipelineConfig, spec: str, log: Callable[[str], None]) -> Path:
    """A folder as is; a models:/ URI or run id exported once per version into .cache/exports/."""
    from ftflow.tasks.registry.export import EXPORT_META, ExportOptions, _version, export_model, parse_model_uri
    from ftflow.tasks.tracking import client as tracking_client

    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if parse_model_uri(spec):
        mv = _version(tracking_client(cfg), spec)
        target = EXPORTS_DIR / f"{mv.name}-v{mv.version}"
    elif RUN_ID.fullmatch(spec):
        target = EXPORTS_DIR / f"run-{spec}"
    else:
        raise ServeError(f"{spec}: not a directory, a models:/<name>@<alias> URI or an MLflow run id")
    target = target.resolve()
    if (target / EXPORT_META).exists():
        log(f"{spec}: using the export in {target}")
        return target
    export_model(cfg, spec, target, ExportOptions(log=log))
    return target


def serve_command(model_dir: Path, host: str, port: int, device: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        "auto",
        "--log-level",
        "warning",
    ]


def serve(
    cfg: PipelineConfig,
    spec: str,
    port: int = 8000,
    host: str = "127.0.0.1",
    log: Callable[[str], None] = print,
    exec_server: bool = True,
) -> Optional[list[str]]:
    """Check, then replace this process with `transformers serve` (so signals reach the server directly)."""
    from transformers.utils.import_utils import is_serve_available

    from ftflow.tasks.train.model import offline_env, pick_device

    if not is_serve_available():
        raise ServeError("`transformers serve` needs openai, fastapi and uvicorn: pip install 'ftflow[serve]'")
    check_port(host, port)
    model_dir = resolve_model_dir(cfg, spec, log)
    meta = check_served_template(model_dir)
    offline_env()
    # The served model is a local folder: the server has no reason to reach a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    command = serve_command(model_dir, host, port, pick_device(cfg.model))
    log(f"serving {meta.get('model_name') or meta.get('run_id')} v{meta.get('version') or '-'} from {model_dir}")
    log(f"  OpenAI-compatible: http://{host}:{port}/v1/chat/completions  model={str(model_dir)!r}")
    if not exec_server:
        return command
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return None  # not reached
