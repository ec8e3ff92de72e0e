"""Open the MLflow compare page for a sweep's child runs in headless Chromium and save a screenshot.

    python bench/sweep_compare_screenshot.py --tracking-uri sqlite:///mlflow.db --experiment ftflow-sweep \
        --out docs/sweep-compare.png
Needs Debian's chromium (apt-get install chromium). Starts `mlflow ui` on a free loopback port and stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str):
    """`mlflow ui` on a free loopback port for the block; yields its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def screenshot(url: str, out: Path, window_size: str = "1600,1400", budget_ms: int = 20000) -> Path:
    """Headless Chromium renders `url` into the PNG `out`; the virtual-time budget lets the MLflow SPA fetch and draw."""
    out.parent.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    profile = Path("/tmp") / f"chromium-profile-{free_port()}"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={window_size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="ftflow-sweep")
    p.add_argument("--parent-run-id", default=None, help="default: the newest sweep parent run")
    p.add_argument("--out", default="docs/sweep-compare.png")
    args = p.parse_args()

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    parents = client.search_runs([exp.experiment_id], "tags.pipeline = 'sweep'", order_by=["start_time DESC"])
    parent = client.get_run(args.parent_run_id) if args.parent_run_id else parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ids = [c.info.run_id for c in children]
    for c in sorted(children, key=lambda c: int(c.data.params["lora.r"])):
        print(
            f"arm r={c.data.params['lora.r']} alpha={c.data.params['lora.alpha']} "
            f"heldout_exact={c.data.metrics.get('eval/heldout_exact')} wall_s={c.data.metrics.get('arm/wall_s')}"
        )

    with mlflow_ui(args.tracking_uri) as base:
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
        url = f"{base}/#/compare-runs?{query}"
        out = screenshot(url, Path(args.out))
        print(f"screenshot: {out} ({out.stat().st_size} bytes) of {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
