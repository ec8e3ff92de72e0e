"""The `ftflow` command line: arguments, exit codes, and one clean error line instead of tracebacks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftflow.cli import main, parse_args

PASSWORD = "Pa55w0rdXYZ"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`ftflow ...` in a fresh process, the way a user runs it (the console script calls the same main)."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings on: they must still stay off stderr
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "ftflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- argument handling --------------------------------------------------------------------------


def test_recipes_lists_the_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out, err = capsys.readouterr()
    assert {"demo", "tiny", "sweep"} <= set(out.split()) and err == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-command"], "invalid choice"),
        ([], "required"),
        (["run", "tiny", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["validate", "f.jsonl", "--kind", "sft", "stray"], "unrecognized arguments: stray"),
        (["recipes", "extra"], "unrecognized arguments: extra"),
        (["--quiet", "run", "tiny", "--verbose"], "not allowed with"),
    ],
)
def test_bad_usage_exits_2_with_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_overrides_may_follow_options():
    args = parse_args(
        ["validate", "data.jsonl", "--kind", "preference", "quality.pii=drop", "--format", "hh", "quality.min_tokens=4"]
    )
    assert (args.file, args.kind, args.format) == ("data.jsonl", "preference", "hh")
    assert args.overrides == ["quality.pii=drop", "quality.min_tokens=4"]
    args = parse_args(["run", "tiny", "--resume", "abc123", "lora.r=8"])
    assert (args.recipe, args.resume, args.overrides) == ("tiny", "abc123", ["lora.r=8"])


def test_an_override_is_not_taken_for_the_recipe():
    args = parse_args(["run", "lora.r=8", "sft.max_steps=3"])
    assert args.recipe == "demo" and args.overrides == ["lora.r=8", "sft.max_steps=3"]
    assert parse_args(["sweep", "lora.r=8"]).recipe == "sweep"


def test_verbosity_flags_go_before_or_after_the_command():
    assert parse_args(["run", "tiny"]).verbosity == "normal"
    assert parse_args(["--quiet", "run", "tiny"]).verbosity == "quiet"
    assert parse_args(["run", "tiny", "-q"]).verbosity == "quiet"
    assert parse_args(["--verbose", "validate", "f.jsonl"]).verbosity == "verbose"
    assert parse_args(["run", "tiny", "lora.r=8", "-v"]).verbosity == "verbose"


# --- errors: one line on stderr, exit 2, secrets redacted ---------------------------------------------


def test_config_error_is_one_line_and_exit_2(capsys):
    assert main(["run", "tiny", f"tracking.tracking_uri=http://bob:{PASSWORD}@h:5000", "lora.rank=8"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("ftflow: error: ")
    assert "unknown key 'lora.rank'" in err and PASSWORD not in err + out


def test_dead_tracking_server_fails_fast_in_one_redacted_line(tmp_path):
    port = _closed_port()
    started = time.time()
    done = _cli("run", "tiny", f"tracking.tracking_uri=http://bob:{PASSWORD}@127.0.0.1:{port}", cwd=tmp_path)
    assert time.time() - started < 60  # a Python start-up and one refused connection, not 5 minutes of retries
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ftflow: error: "), done.stderr
    assert f"http://bob:***@127.0.0.1:{port}" in done.stderr and "not reachable" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


def test_verbose_shows_the_traceback_still_redacted(tmp_path):
    port = _closed_port()
    done = _cli(
        "run", "tiny", f"tracking.tracking_uri=http://bob:{PASSWORD}@127.0.0.1:{port}", "--verbose", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "Traceback" in done.stderr and done.stderr.splitlines()[-1].startswith("ftflow: error: ")
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.slow
def test_unexpected_errors_are_one_line_too_and_exit_1(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "a-file").write_text("")
    # A report folder under a plain file: an OSError no ftflow check anticipates.
    done = _cli(
        "validate",
        str(data),
        "--out",
        str(tmp_path / "a-file" / "report"),
        f"model.name_or_path={tiny_model_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("ftflow: error: unexpected NotADirectoryError") and "--verbose" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_pipeline_error_inside_the_flow_prints_one_line_and_no_traceback(tmp_path, tiny_model_dir):
    done = _cli(
        "run",
        "tiny",
        "data.sft_path=/nonexistent.jsonl",
        "data.demo.enabled=false",
        f"model.name_or_path={tiny_model_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("ftflow: error: /nonexistent.jsonl: file not found")
    assert "Traceback" not in done.stdout + done.stderr
    # Progress still shows, on stdout: the run is not silent, only its error is not repeated as a trace.
    assert "Beginning flow run" in done.stdout


# --- what the terminal shows -------------------------------------------------------------------------

KNOWN_NOISE = (
    "interpreted in multiple ways",
    "is_gradient_checkpointing",
    "gemm_4bit_forward",
    "ephemeral docs site",
    "Loading weights",
    "Writing model shards",
    "Downloading artifacts",
    "Pandas4Warning",
)


def _tiny_run(tmp_path: Path, tiny_model_dir: str, *flags: str) -> subprocess.CompletedProcess:
    return _cli(
        "run",
        "tiny",
        f"model.name_or_path={tiny_model_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *flags,
        cwd=tmp_path,
        timeout=900,
    )


@pytest.mark.slow
def test_a_run_shows_no_known_library_noise_and_ends_with_the_result(tmp_path, tiny_model_dir):
    done = _tiny_run(tmp_path, tiny_model_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [n for n in KNOWN_NOISE if n in done.stdout] == [], done.stdout[-5000:]
    assert "sft step 2/2" in done.stdout  # not a terminal: progress as log lines
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    header = max(i for i, line in enumerate(lines) if line.startswith("| model |"))
    last = lines[header:]
    assert all(line.startswith("|") for line in last[:6]) and any(line.startswith("Gate: ") for line in last)
    assert last[-1].startswith("Open the MLflow UI: "), last


@pytest.mark.slow
def test_quiet_run_prints_no_progress(tmp_path, tiny_model_dir):
    done = _tiny_run(tmp_path, tiny_model_dir, "--quiet", "dpo.enabled=false")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " step " not in done.stdout and "ETA" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("Open the MLflow UI: ")
