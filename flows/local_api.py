"""A Prefect API for one `ftflow` process when none is configured: started here, gone with the process.

Prefect's own ephemeral server (`SubprocessASGIServer`) is started by the first client call, given 20 s,
and stopped only by an atexit hook. So SIGKILL, and SIGTERM (whose default action skips atexit), leave it
running; and two processes starting at once on one SQLite database (PREFECT_HOME/prefect.db) time each
other out while the first one migrates it ("Timed out while attempting to connect to ephemeral Prefect
API server"). This module starts the same server app itself, for the lifetime of a `with prefect_api():`:

- under a file lock in PREFECT_HOME, so concurrent starts take turns: the first migrates the database,
  the next finds it current and starts in seconds;
- waiting up to FTFLOW_PREFECT_STARTUP_TIMEOUT_S (default 300 s: a loaded CI machine needs more than 20);
- with the kernel's parent-death signal (Linux PR_SET_PDEATHSIG), so the server gets SIGTERM when the
  process that started it dies, however it dies, SIGKILL included;
- stopped on the way out of the block, after Prefect's log and event workers are drained (the CLI turns
  SIGTERM into SystemExit, so a terminated run leaves the block too).

With PREFECT_API_URL set (a real server) or ephemeral mode off, nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

STARTUP_TIMEOUT_S = 300.0
LOCK_NAME = ".ftflow-ephemeral-start.lock"
PR_SET_PDEATHSIG = 1
PORT_IN_USE_EXIT = 3  # uvicorn's exit status when it cannot bind
LOG_PREFIX = "ftflow-prefect-server-"


def _die_with(parent_pid: int):
    """preexec_fn: ask the kernel for SIGTERM when the parent dies; exit at once if it already has."""

    def hook() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(0)

    return hook


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep_orphan_logs(folder: Path) -> None:
    """Remove the server logs of processes that died before `LocalServer.stop` could (SIGKILL skips every
    clean-up); the owner's pid is the first part of the name, so a live server's log is left alone."""
    from ftflow.tasks.tracking import pid_alive

    for path in folder.glob(f"{LOG_PREFIX}*.log"):
        owner = path.name[len(LOG_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            with contextlib.suppress(OSError):
                path.unlink()


def _new_log() -> Path:
    _sweep_orphan_logs(Path(tempfile.gettempdir()))
    fd, name = tempfile.mkstemp(prefix=f"{LOG_PREFIX}{os.getpid()}-", suffix=".log")
    os.close(fd)
    return Path(name)


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class LocalServer:
    """One Prefect server process on 127.0.0.1, owned by this process."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process, self.port, self.log_path = process, port, log_path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _spawn(port: int, log_path: Path) -> subprocess.Popen:
    import prefect
    from prefect.settings import get_current_settings

    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        # what Prefect's own ephemeral server sets: no UI, ephemeral-mode services
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches ftflow, which then stops the server itself
            # after the flow has recorded its end (not the server first, under the flow's feet).
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )


def start(timeout: Optional[float] = None) -> LocalServer:
    """Start a server on a free port and wait for /api/health; concurrent starts under one PREFECT_HOME take turns."""
    from filelock import FileLock
    from prefect.settings import get_current_settings

    from ftflow.tasks.errors import PipelineError

    timeout = timeout or float(os.environ.get("FTFLOW_PREFECT_STARTUP_TIMEOUT_S", STARTUP_TIMEOUT_S))
    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log_path = _new_log()
    with FileLock(str(home / LOCK_NAME), timeout=timeout):
        deadline = time.monotonic() + timeout
        port = _free_port()
        process = _spawn(port, log_path)
        server = LocalServer(process, port, log_path)
        while not _healthy(server.api_url):
            code = process.poll()
            if code == PORT_IN_USE_EXIT:  # another program took the port between the check and the bind
                server.port = _free_port()
                server.process = process = _spawn(server.port, log_path)
                continue
            if code is not None or time.monotonic() > deadline:
                server.stop()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
                why = f"exited with status {code}" if code is not None else f"did not answer within {timeout:g} s"
                raise PipelineError(
                    f"the local Prefect server (PREFECT_HOME={home}) {why}"
                    + (f": {' / '.join(tail)}" if tail else "")
                    + "; set PREFECT_API_URL to use a running server instead"
                )
            time.sleep(0.5)
    return server


def _drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold, while the server is up to take it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (lambda: APILogWorker.instance().drain(), EventsWorker.drain_all):
        with contextlib.suppress(Exception):
            drain()


@contextlib.contextmanager
def prefect_api() -> Iterator[Optional[str]]:
    """Within the block Prefect talks to the configured API, else to a private local server (its URL is yielded)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    server = start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()
