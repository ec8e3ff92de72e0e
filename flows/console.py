"""What the terminal shows: one live bar per stage on a TTY, periodic lines elsewhere, and known library noise off.

The StageContext's `progress(label, total) -> update(step, metrics)` hook is built here (steps.progress adds the
Prefect progress artifact around it). `configure(verbosity)` is called once by the CLI; a Prefect worker that never
calls it gets the defaults: no live bar, a line at most every `LINE_EVERY_S` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

LINE_EVERY_S = 30.0
_verbosity = "normal"

# (message regex, module regex): warnings every run prints and no user can act on.
KNOWN_WARNINGS = [
    (r"The specified dataset source can be interpreted in multiple ways", r"mlflow\.data"),
    (r"Starting with pandas version 4\.0", r"mlflow\.data"),
    (r"For backward compatibility, 'str' dtypes", r"mlflow\.tracking"),
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    (r"`torch\.jit\.script_method` is deprecated", r"torch\.jit"),
    (r"module 'sre_(constants|parse)' is deprecated", r"great_expectations"),
    (r".*Add type hints to the `predict` method", r"mlflow\.pyfunc"),
    (r".*An input example was not provided", r"mlflow\.pyfunc"),
    (r"The ``noload`` loader strategy is deprecated", r"mlflow\.store"),
]
# Loggers whose INFO/WARNING lines describe the library's own setup, not the run.
QUIET_LOGGERS = {
    "bitsandbytes.backends.cpu.ops": logging.ERROR,  # the optional `kernels` package; CPU falls back by itself
    "great_expectations.data_context.types.base": logging.WARNING,  # "ephemeral docs site" temp folders
    "mlflow.store.db.utils": logging.WARNING,
    "mlflow.pyfunc": logging.WARNING,  # "Validating input example against model signature" on every registration
}


def configure(verbosity: str, late: bool = True) -> None:
    """Before the libraries are imported (env) and again after (loggers): in --verbose everything shows."""
    global _verbosity
    _verbosity = verbosity
    if verbosity == "verbose":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for message, module in KNOWN_WARNINGS:
        # Full-module regexes: pytest's and PYTHONWARNINGS' own filters stay in force for everything else.
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if not late:
        return  # importing transformers costs seconds; `ftflow recipes` should not pay them
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" and "Writing model shards" bars
    except ImportError:
        pass


@dataclass
class Rate:
    """Steps per second and tokens per second since the first update, and the time left at that pace."""

    total: int
    started: float = field(default_factory=time.monotonic)
    first_step: Optional[int] = None
    first_tokens: Optional[float] = None
    step: int = 0
    tokens_per_s: Optional[float] = None
    eta_s: Optional[float] = None

    def update(self, step: int, metrics: dict[str, float], now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self.step = step
        tokens = metrics.get("num_tokens")  # TRL's running count of trained tokens
        if self.first_step is None:
            # A resumed run starts past 0: pace is measured from the first step seen, not from step 0.
            self.first_step, self.first_tokens, self.started = step, tokens, now
            return
        elapsed = now - self.started
        done = step - self.first_step
        if elapsed <= 0 or done <= 0:
            return
        self.eta_s = max(0.0, (self.total - step) * elapsed / done) if self.total else None
        if tokens is not None and self.first_tokens is not None:
            self.tokens_per_s = (tokens - self.first_tokens) / elapsed

    def describe(self) -> str:
        parts = []
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        return " ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


Update = Callable[[int, dict[str, float]], None]


def progress_line(label: str, rate: Rate, metrics: dict[str, float]) -> str:
    from ftflow.tasks.stages import progress_line as base

    return " ".join(part for part in (base(label, rate.step, rate.total, metrics).rstrip(), rate.describe()) if part)


def periodic(
    label: str,
    total: int,
    log: Callable[[str], None],
    every_s: float = LINE_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> Update:
    """Log lines for a non-terminal (a Prefect worker, CI): the first, then at most one per `every_s`, and the last."""
    rate = Rate(total, started=clock())
    last: list[Optional[float]] = [None]
    done = [False]

    def update(step: int, metrics: dict[str, float]) -> None:
        if done[0]:
            return  # the trainer's closing log (runtime, mean loss) comes after the last step: no second last line
        now = clock()
        rate.update(step, metrics, now)
        done[0] = bool(total) and step >= total
        if last[0] is None or done[0] or now - last[0] >= every_s:
            last[0] = now
            log(progress_line(label, rate, metrics))

    return update


_live = None  # the one rich Progress shown, shared by the stages


def _terminal_bar(label: str, total: int) -> Update:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    global _live
    if _live is None:
        # redirect_stdout: Prefect's console handler writes through sys.stdout (cli._route_logs), so its lines
        # print above the bar instead of through it.
        _live = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            redirect_stdout=True,
            redirect_stderr=True,
            transient=True,
        )
        _live.start()
    task = _live.add_task(label, total=total or None, info="")
    rate = Rate(total)

    done = [False]

    def update(step: int, metrics: dict[str, float]) -> None:
        global _live
        if done[0] or _live is None:
            return  # the trainer's closing log (runtime, mean loss) comes after the last step
        rate.update(step, metrics)
        loss = f"loss {metrics['loss']:.4f} " if "loss" in metrics else ""
        # Drawn now, not at the next 10 Hz tick: a fast step (or the last, removed below) would otherwise never show.
        _live.update(task, completed=step, info=loss + rate.describe(), refresh=True)
        if total and step >= total:
            done[0] = True
            _live.remove_task(task)
            if not _live.tasks:
                _live.stop()
                _live = None

    return update


def progress(label: str, total: int, log: Callable[[str], None]) -> Update:
    """The live bar on a terminal, periodic `log` lines elsewhere, nothing in --quiet."""
    if _verbosity == "quiet":
        return lambda step, metrics: None
    if _verbosity == "normal" and sys.stdout.isatty():
        return _terminal_bar(label, total)
    return periodic(label, total, log)


def _known_warning(record: logging.LogRecord) -> bool:
    """A KNOWN_WARNINGS entry that reached logging through captureWarnings anyway: mlflow's model logging runs in
    its own `catch_warnings` with a "once" filter in front of ours. The record's text names the warning's file."""
    if record.name != "py.warnings":
        return False
    text = record.getMessage()
    return any(
        re.search(message, text) and re.search(module.replace(r"\.", "/"), text) for message, module in KNOWN_WARNINGS
    )


class DropCompleted(logging.Filter):
    """Prefect's "Finished in state Completed()" per task and flow: the bars and the final table already say so,
    and the flow's own line would otherwise come after the table, which must end the output. Known library
    warnings and setup lines go too."""

    def filter(self, record: logging.LogRecord) -> bool:
        # QUIET_LOGGERS again at the handler: Prefect's logging setup resets some of those loggers' levels.
        if record.levelno < QUIET_LOGGERS.get(record.name, 0) or _known_warning(record):
            return False
        return not (
            record.name.startswith("prefect.") and record.getMessage().endswith("Finished in state Completed()")
        )
