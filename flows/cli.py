"""`ftflow` command line: run a recipe, validate a data file, run a sweep, list recipes.

Output: progress and results go to stdout; stderr carries only the final `ftflow: error: ...` line
(with --verbose, also debug logs and the full traceback). The traceback is always in the Prefect flow-run
log and in the MLflow run's failure/traceback.txt.

Exit status: 0 success; 1 a validated file failed its contract, or an unexpected internal error;
2 bad usage, a config error, or an input / environment error (PipelineError); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_RECIPE = {"run": "demo", "sweep": "sweep", "search": "search", "compare-methods": "compare-methods"}


def quiet_env() -> None:
    # No telemetry, and Prefect's ephemeral API needs no server. Offline mode is not set here: a hub id must
    # download for a user who set nothing (the Makefile and the tests choose HF_HUB_OFFLINE=1 themselves).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _output_env(verbosity: str) -> None:
    """Settings the libraries read once, at import: set before the command imports them."""
    if verbosity == "quiet":
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    elif verbosity == "verbose":
        os.environ["PREFECT_LOGGING_LEVEL"] = "DEBUG"
    from ftflow import console

    console.configure(verbosity, late=False)


class _BriefFormatter(logging.Formatter):
    """The wrapped formatter's line without the traceback: the CLI prints the error once, on stderr."""

    def __init__(self, inner: Optional[logging.Formatter]):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _CurrentStdout:
    """sys.stdout as it is at each write: a caller that swaps sys.stdout later (pytest does, per test) still
    gets the output, and nothing is left holding a closed stream."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def __getattr__(self, name: str):
        return getattr(sys.stdout, name)


def _console_handlers() -> list[logging.StreamHandler]:
    terminals = {id(sys.__stderr__), id(sys.__stdout__), id(sys.stderr), id(sys.stdout)}
    found = []
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            # logging's last-resort handler looks sys.stderr up itself (and has no settable stream).
            if (
                not isinstance(h, logging.StreamHandler)
                or isinstance(h, logging.FileHandler)
                or type(h).__name__ == "_StderrHandler"
                or h in found
            ):
                continue
            # MLflow's handler writes through a proxy that looks sys.stderr up on every write.
            if id(h.stream) in terminals or type(h.stream).__name__ in ("MlflowLoggingStream", "_CurrentStdout"):
                found.append(h)
    return found


def _route_logs(verbosity: str) -> None:
    """After the libraries configured their logging: redact every handler, and send the console ones to stdout.

    Prefect's engine logs a failing task or flow at ERROR with its traceback, 60-80 lines before the one
    line that says what is wrong; outside --verbose the console keeps the line and drops the trace.
    """
    from ftflow.tasks.secrets import install_log_redaction

    install_log_redaction()
    from ftflow import console

    # Again now the libraries are imported: some set their loggers' levels at import.
    console.configure(verbosity)
    if verbosity == "verbose":
        for name in ("prefect", "ftflow"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        return
    stdout = _CurrentStdout()
    for h in _console_handlers():
        h.setStream(stdout)
        if hasattr(h, "console"):  # Prefect's rich console keeps its own reference to the stream
            h.console.file = stdout
        if not isinstance(h.formatter, _BriefFormatter):
            h.setFormatter(_BriefFormatter(h.formatter))
        if not any(isinstance(f, console.DropCompleted) for f in h.filters):
            h.addFilter(console.DropCompleted())
        if verbosity == "quiet":
            h.setLevel(max(h.level, logging.WARNING))


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="Warnings and the final result only."
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="Debug logs, and the full traceback of an error."
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftflow",
        description="Orchestrated LLM fine-tuning: validate → SFT → DPO → evaluate → gate.",
        epilog="exit status: 0 ok, 1 contract failed or internal error, 2 usage, config or "
        "input error, 130 interrupted",
    )
    _add_verbosity(p, False)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="One pipeline run from a YAML recipe, with key.sub=value overrides.")
    run.add_argument("recipe", nargs="?", default="demo", help="Recipe file or shipped recipe name (default: demo).")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lora.r=8 sft.max_steps=10")
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        default=None,
        help="Continue an interrupted run: same MLflow run, training resumes from its last checkpoint.",
    )

    sweep = sub.add_parser("sweep", help="LoRA rank sweep (sweep.ranks), one MLflow child run per arm.")
    sweep.add_argument("recipe", nargs="?", default="sweep")
    sweep.add_argument("overrides", nargs="*")

    search = sub.add_parser(
        "search", help="Hyperparameter search on Optuna (search.*): trials pruned early, the best one gated."
    )
    search.add_argument("recipe", nargs="?", default="search")
    search.add_argument("overrides", nargs="*")

    cmp = sub.add_parser(
        "compare-methods",
        help="QLoRA, LoRA, full fine-tuning, prompt tuning (and OpenAI's API) on the same data: a measured table.",
    )
    cmp.add_argument("recipe", nargs="?", default="compare-methods")
    cmp.add_argument("overrides", nargs="*")

    val = sub.add_parser("validate", help="Validate a data file without training; non-zero exit when a contract fails.")
    val.add_argument("file")
    val.add_argument("--kind", choices=["sft", "preference"], default="sft")
    val.add_argument(
        "--format", default="auto", help="auto, openai, alpaca, sharegpt, prompt_completion, preference, hh"
    )
    val.add_argument("--recipe", default="demo", help="Recipe whose quality thresholds and tokenizer apply.")
    val.add_argument("--out", default=None, help="Folder for the report and quarantine file.")
    val.add_argument("overrides", nargs="*")

    sub.add_parser("recipes", help="List the shipped recipes.")

    # Registry commands read the tracking store from a recipe (default demo) and key.sub=value overrides.
    exp = sub.add_parser(
        "export",
        help="Merge a registered adapter into plain Hugging Face weights, checked against the evaluated model.",
    )
    exp.add_argument("model", help="models:/<name>@<alias>, models:/<name>/<version> or an MLflow run id")
    exp.add_argument("--to", required=True, help="Export directory (must be empty or absent).")
    exp.add_argument("--format", default="merged", help="merged (safetensors); GGUF is not offered, see README")
    exp.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"
    )
    exp.add_argument("--recipe", default="demo", help="Recipe naming the tracking store (tracking.tracking_uri).")
    exp.add_argument("overrides", nargs="*")

    srv = sub.add_parser(
        "serve", help="Serve an exported model (or models:/<name>@<alias>) as an OpenAI-compatible API."
    )
    srv.add_argument("model", help="An `ftflow export` directory, models:/<name>@<alias> or an MLflow run id")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--host", default="127.0.0.1", help="Listen address (default loopback).")
    srv.add_argument("--recipe", default="demo")
    srv.add_argument("overrides", nargs="*")

    pro = sub.add_parser("promote", help="Move @champion to a version by hand; the reason is recorded on the version.")
    pro.add_argument("name", help="Registered model name")
    pro.add_argument("version", help="Version number")
    pro.add_argument(
        "--reason", default=None, help="Why (required; stored as the version tag ftflow.manual_promotion)."
    )
    pro.add_argument("--recipe", default="demo", help="Recipe naming the registry and the current base model.")
    pro.add_argument("overrides", nargs="*")
    for command in sub.choices.values():
        # Accepted after the command too (`ftflow run tiny -v`); SUPPRESS keeps one given before it.
        _add_verbosity(command, argparse.SUPPRESS)
    return p


def _registry_command(args, cfg) -> int:
    if args.command == "export":
        from ftflow.tasks.registry.export import ExportOptions, export_model

        export_model(cfg, args.model, args.to, ExportOptions(fmt=args.format, dtype=args.dtype))
    elif args.command == "serve":
        from ftflow.tasks.registry.serve import serve

        serve(cfg, args.model, port=args.port, host=args.host)
    else:
        from ftflow.tasks.registry.promote import promote

        promote(cfg, args.name, args.version, args.reason)
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _parser()
    # key=value overrides may come after options too (`validate FILE --kind sft quality.pii=drop`).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        parser.error("argument -v/--verbose: not allowed with argument -q/--quiet")
    args.verbosity = (
        "quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else "normal"
    )
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    recipe = getattr(args, "recipe", None)
    if args.command in DEFAULT_RECIPE and recipe and "=" in recipe and not Path(recipe).exists():
        # `ftflow run lora.r=8`: an override, not a recipe file named "lora.r=8".
        args.overrides.insert(0, recipe)
        args.recipe = DEFAULT_RECIPE[args.command]
    return args


def _preflight(cfg, command: str) -> None:
    # Seconds, before Prefect starts: a dead tracking server otherwise fails only inside the flow run.
    from ftflow.tasks.tracking import check_tracking_store, tracking_uri

    check_tracking_store(tracking_uri(cfg))
    if command in ("run", "sweep", "search", "compare-methods"):
        from ftflow.tasks.stages import writable_dir

        writable_dir(Path(cfg.output_dir), "output_dir")


def _dispatch(args: argparse.Namespace) -> int:
    from ftflow.configs.loader import list_recipes, load_config

    if args.command == "recipes":
        print("\n".join(list_recipes()))
        return 0
    if args.command == "validate":
        cfg = load_config(args.recipe, [f"data.format={args.format}", *args.overrides])
        from ftflow.validate import validate_file

        _route_logs(args.verbosity)
        return 0 if validate_file(cfg, args.file, args.kind, args.out) else 1
    cfg = load_config(args.recipe, args.overrides)
    if args.command != "serve":
        _preflight(cfg, args.command)
    import mlflow  # noqa: F401  (configures its log handler, which _route_logs then routes)

    if args.command in ("export", "serve", "promote"):
        _route_logs(args.verbosity)
        return _registry_command(args, cfg)
    from ftflow.local_api import prefect_api
    from ftflow.tasks.tracking import credentials_to_env

    # The config becomes the flow run's parameters, stored by the Prefect API: no password in it.
    cfg = credentials_to_env(cfg)
    with prefect_api():
        if args.command == "run":
            from ftflow.pipeline import pipeline_flow

            _route_logs(args.verbosity)
            pipeline_flow(config=cfg, resume_run_id=args.resume)
        elif args.command == "compare-methods":
            from ftflow.compare import compare_flow

            _route_logs(args.verbosity)
            compare_flow(config=cfg)
        elif args.command == "search":
            from ftflow.search import search_flow

            _route_logs(args.verbosity)
            search_flow(config=cfg)
        else:
            from ftflow.sweep import sweep_flow

            _route_logs(args.verbosity)
            sweep_flow(config=cfg)
    return 0


class Terminated(BaseException):
    """SIGTERM as an exception: the stack unwinds, so the flow records its end and the local Prefect server stops.

    The default action of SIGTERM ends the process on the spot, skipping every `finally` and atexit hook."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the one it replaces; a no-op off the main thread."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _report(err: BaseException, verbosity: str, stderr, expected: bool) -> None:
    from ftflow.tasks.secrets import redact_text

    if verbosity == "verbose":
        print(redact_text("".join(traceback.format_exception(err))).rstrip("\n"), file=stderr)
    lines = [line.strip() for line in redact_text(str(err)).splitlines() if line.strip()]
    message = "; ".join(lines) or type(err).__name__
    if not expected:
        message = f"unexpected {type(err).__name__}: {message}"
        if verbosity != "verbose":
            message += " (rerun with --verbose for the traceback)"
    print(f"ftflow: error: {message}", file=stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_env()
    args = parse_args(argv)
    _output_env(args.verbosity)
    stdout, stderr = sys.stdout, sys.stderr
    from ftflow.configs.loader import ConfigError
    from ftflow.tasks.errors import PipelineError

    previous = _on_sigterm(_terminated)
    try:
        if args.verbosity == "verbose":
            return _dispatch(args)
        # Whatever the libraries write to stderr on their own (warnings, progress bars) is progress, not error.
        with contextlib.redirect_stderr(stdout):
            return _dispatch(args)
    except (ConfigError, PipelineError) as err:
        _report(err, args.verbosity, stderr, expected=True)
        return 2
    except KeyboardInterrupt:
        print("ftflow: interrupted", file=stderr)
        return 130
    except Terminated:
        print("ftflow: terminated (SIGTERM)", file=stderr)
        return 128 + signal.SIGTERM
    except Exception as err:
        _report(err, args.verbosity, stderr, expected=False)
        return 1
    finally:
        _on_sigterm(previous)


if __name__ == "__main__":
    sys.exit(main())
