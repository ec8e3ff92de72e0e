"""`ftflow run` in a real pseudo-terminal: the live training bar shows steps, loss, tokens/s and ETA, and the
result still ends the output."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from ftflow import console

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(argv: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a 160x40 pty; return its exit code and everything it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:
        # Read while it runs: a pty's buffer is a few KiB, and a full one would block the bar's writes.
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every copy of the follower side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """Every line or redrawn frame, escape sequences removed."""
    return [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", raw)) if line.strip()]


@pytest.mark.slow  # a fresh interpreter, Prefect's local server, 4 real SFT steps on the tiny model, evaluation
def test_training_bar_shows_steps_loss_tokens_per_second_and_eta(tmp_path, tiny_model_dir):
    code, raw = run_in_pty(
        [
            sys.executable,
            "-m",
            "ftflow.cli",
            "run",
            "tiny",
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "sft.max_steps=4",
            "dpo.enabled=false",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    lines = screen_lines(raw)
    assert code == 0, "\n".join(lines[-40:])
    # rich draws the bar, so it shows only on a terminal: `sft <bar> 3/4 0:00:05 loss 10.8104 42 tok/s ETA 0:07`
    bar = re.compile(r"^sft\s+\S+\s+(\d+)/4\s+\d+:\d\d:\d\d\s+loss (\d+\.\d{4}) ([\d,]+) tok/s ETA (\d+:\d\d)$")
    frames = [m for m in map(bar.match, lines) if m]
    assert frames, "\n".join(line for line in lines if line.startswith("sft"))[-3000:]
    assert {int(m.group(1)) for m in frames} >= {2, 3, 4}  # pace needs two steps; each later step is drawn
    assert all(float(m.group(2)) > 0 and int(m.group(3).replace(",", "")) > 0 for m in frames)
    assert not any("sft step " in line for line in lines)  # the bar replaces the periodic log lines
    # mlflow logs the registered model inside its own catch_warnings: the console still drops what is known.
    noise = [line for line in lines if any(re.search(message, line) for message, _ in console.KNOWN_WARNINGS)]
    assert noise == [], noise
    assert not any("Validating input example against model signature" in line for line in lines)
    assert any(line.startswith("Open the MLflow UI: ") for line in lines[-2:]), lines[-5:]  # the result ends it
