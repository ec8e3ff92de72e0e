"""The terminal's progress hook and its noise filters, without a terminal."""

from __future__ import annotations

import logging
import warnings

import pytest

from ftflow import console

pytestmark = pytest.mark.fast


def test_rate_measures_pace_from_the_first_update_and_projects_the_rest():
    rate = console.Rate(total=100, started=0.0)
    rate.update(10, {"num_tokens": 1000.0}, now=50.0)  # a resumed run: pace starts at the first step seen
    assert rate.eta_s is None and rate.tokens_per_s is None
    rate.update(20, {"num_tokens": 3000.0}, now=70.0)  # 10 steps and 2000 tokens in 20 s
    assert rate.tokens_per_s == pytest.approx(100.0)
    assert rate.eta_s == pytest.approx(160.0)  # 80 steps at 2 s each
    assert rate.describe() == "100 tok/s ETA 2:40"
    rate.update(100, {"num_tokens": 9000.0}, now=230.0)
    assert rate.eta_s == 0.0


def test_rate_without_token_counts_still_gives_an_eta():
    rate = console.Rate(total=4, started=0.0)
    rate.update(1, {"loss": 1.0}, now=0.0)
    rate.update(2, {"loss": 0.9}, now=3.0)
    assert rate.tokens_per_s is None and rate.eta_s == pytest.approx(6.0)
    assert rate.describe() == "ETA 0:06"


def test_format_seconds():
    assert console.format_seconds(59.6) == "1:00"
    assert console.format_seconds(3725) == "1:02:05"


def test_periodic_lines_log_the_first_then_at_most_one_per_interval_and_the_last():
    now = [0.0]
    lines: list[str] = []
    update = console.periodic("sft", 10, lines.append, every_s=30.0, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = step * 10.0
        update(step, {"loss": 2.0 / step, "num_tokens": step * 500.0})
    update(10, {"train_runtime": 100.0})  # the trainer's closing log, after the last step
    steps = [line.split()[2] for line in lines]
    assert steps == ["1/10", "4/10", "7/10", "10/10"]
    assert "loss=" in lines[1] and "50 tok/s" in lines[1] and "ETA 1:00" in lines[1]


def test_quiet_shows_no_progress(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(console, "_verbosity", "quiet")
    update = console.progress("sft", 2, lines.append)
    update(1, {"loss": 1.0})
    update(2, {"loss": 1.0})
    assert lines == []


def test_not_a_terminal_falls_back_to_log_lines(monkeypatch, capsys):
    lines: list[str] = []
    monkeypatch.setattr(console, "_verbosity", "normal")
    update = console.progress("eval-base", 4, lines.append)  # pytest's stdout is no TTY
    update(4, {})
    assert lines == ["eval-base step 4/4"] and capsys.readouterr().out == ""
    now = [0.0]
    update = console.periodic("eval-sft", 4, lines.append, clock=lambda: now[0])
    update(2, {})
    now[0] = 5.0
    update(4, {})  # no metrics to show: one space between the step and the pace
    assert lines[-1] == "eval-sft step 4/4 ETA 0:00"


def test_known_warnings_are_filtered_by_message_and_module_only(monkeypatch):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for name in (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    ):
        monkeypatch.setenv(name, "1")  # configure() sets these; monkeypatch restores them after
    monkeypatch.setattr(console, "_verbosity", "normal")
    console.configure("normal", late=False)
    message = "The specified dataset source can be interpreted in multiple ways: A, B."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.configure("normal", late=False)  # catch_warnings restored the filters: install again inside
        warnings.warn_explicit(message, UserWarning, "registry.py", 1, module="mlflow.data.dataset_source_registry")
        warnings.warn_explicit(message, UserWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in caught] == [message]  # the same text from our own code still shows
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR


def test_console_filter_drops_library_setup_lines_and_completed_states_only():
    def record(name, level, msg):
        return logging.LogRecord(name, level, "x.py", 1, msg, None, None)

    keep = console.DropCompleted().filter
    assert not keep(record("great_expectations.data_context.types.base", logging.INFO, "ephemeral docs site"))
    assert keep(record("great_expectations.data_context.types.base", logging.WARNING, "a real problem"))
    assert not keep(record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert keep(record("prefect.task_runs", logging.ERROR, "Finished in state Failed('boom')"))
    assert not keep(record("mlflow.pyfunc", logging.INFO, "Validating input example against model signature"))


def test_known_warnings_that_reach_logging_anyway_are_dropped_by_message_and_file():
    """mlflow logs a model inside its own catch_warnings, so a KNOWN_WARNINGS filter does not hold there; what
    logging.captureWarnings hands the console is dropped instead, and only for that library's file."""
    text = (
        "/venv/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: \x1b[93mAdd type hints to "
        "the `predict` method to enable data validation\x1b[0m\n  color_warning("
    )
    keep = console.DropCompleted().filter
    assert not keep(logging.LogRecord("py.warnings", logging.WARNING, "x.py", 1, text, None, None))
    mine = text.replace("mlflow/pyfunc", "ftflow/tasks")
    assert keep(logging.LogRecord("py.warnings", logging.WARNING, "x.py", 1, mine, None, None))
