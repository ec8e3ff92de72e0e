"""flows/local_api.py: what a killed process's Prefect server leaves in the temp folder is swept by the next start."""

from __future__ import annotations

import os
import subprocess
import sys

from ftflow.local_api import LOG_PREFIX, _new_log, _sweep_orphan_logs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphan_logs_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead = tmp_path / f"{LOG_PREFIX}{_dead_pid()}-abc.log"
    live = tmp_path / f"{LOG_PREFIX}{os.getpid()}-def.log"
    unowned = tmp_path / f"{LOG_PREFIX}x1y2z3.log"  # the older name, without an owner: not ours to judge
    for path in (dead, live, unowned):
        path.touch()
    _sweep_orphan_logs(tmp_path)
    assert not dead.exists()
    assert live.exists() and unowned.exists()


def test_a_new_log_is_named_after_its_process_and_sweeps_orphans(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    orphan = tmp_path / f"{LOG_PREFIX}{_dead_pid()}-old.log"
    orphan.touch()
    log = _new_log()
    assert log.parent == tmp_path and log.name.startswith(f"{LOG_PREFIX}{os.getpid()}-")
    assert not orphan.exists()
