"""Time the whole demo (`ftflow run demo`) and each stage, read back from MLflow and Prefect.

    .venv/bin/python bench/bench_demo.py                              # the demo as `make demo` runs it
    .venv/bin/python bench/bench_demo.py sft.max_steps=20 lora.r=8    # key.sub=value overrides, passed through
    .venv/bin/python bench/bench_demo.py --sweep                      # the rank sweep as `make sweep` runs it
    .venv/bin/python bench/bench_demo.py --dry-run                    # print the command and the paths, run nothing
    options: --recipe NAME (default demo, or sweep with --sweep) --workdir DIR (default: a new temp dir)
             --json out.json --no-prefect

The run happens in a scratch folder (its cwd), with its own SQLite MLflow store (tracking.tracking_uri=),
outputs (output_dir=) and Prefect home, so it neither reads nor writes the repository's mlflow.db or runs/.
Afterwards it prints the subprocess wall time, the MLflow run's duration and every timing metric the run
logged (sft/wall_s, dpo/wall_s, *_runtime, ...), and the Prefect task runs of the flow run with their
durations, so the stages add up against the total. With --sweep (`ftflow sweep sweep`) the MLflow run is the
sweep's parent, each arm's child run gets a line (its duration, candidate, training wall, held-out score), and
the stages an arm runs inside its `sweep-arm` task are listed under it, indented.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import AVX2_ENV, cpu_line  # noqa: E402

TIMING_SUFFIXES = ("wall_s", "elapsed_s", "_runtime", "_seconds", "_time_s")
HEADLINE = ("eval/heldout_exact", "eval/heldout_chrf", "eval/heldout_logprob")


def demo_command(work: Path, overrides: list[str], recipe: str = "demo", verb: str = "run") -> list[str]:
    exe = ROOT / ".venv" / "bin" / "ftflow"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "ftflow.cli"]
    return [
        *base,
        verb,
        recipe,
        f"output_dir={work / 'runs'}",
        f"tracking.tracking_uri={tracking_uri(work)}",
        *overrides,
    ]


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def demo_env(work: Path, isolate_prefect: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    if isolate_prefect and "PREFECT_API_URL" not in os.environ:
        # The ephemeral API keeps its SQLite database under PREFECT_HOME: a private one holds only this flow run.
        env["PREFECT_HOME"] = str(work / "prefect-home")
    return env


def mlflow_timings(work: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(work))
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
    # The flow's own run: a sweep's arms are its children, started after it.
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not top:
        return {"error": "no MLflow run found"}
    run = max(top, key=lambda r: r.info.start_time)
    arms = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id), key=lambda r: r.info.start_time
    )
    metrics = run.data.metrics
    timing = {k: v for k, v in sorted(metrics.items()) if k.endswith(TIMING_SUFFIXES) or k.endswith("/duration_s")}
    duration = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "run_s": duration,
        "timing_metrics": timing,
        "peak_memory": {k: v for k, v in sorted(metrics.items()) if "peak_memory" in k},
        "eval": {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/") and k.count("/") == 1},
        "arms": [arm_line(a) for a in arms],
    }


def arm_line(run) -> dict[str, Any]:
    m = run.data.metrics
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "run_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "candidate": run.data.tags.get("candidate"),
        "train_wall_s": m.get("arm/wall_s"),
        "eval": {k: v for k, v in sorted(m.items()) if k.startswith("eval/") and k.count("/") == 1},
    }


PREFECT_READER = r"""
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort

async def main():
    async with get_client() as client:
        flows = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not flows:
            print(json.dumps({"error": "no flow run"})); return
        fr = flows[0]
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
        rows = []
        for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time):
            # A task run inside another (a sweep arm's stages) names its parent among its inputs.
            nested = any(getattr(i, "id", None) for i in (t.task_inputs or {}).get("__parents__", []))
            rows.append({"name": t.name, "state": t.state_name, "run_s": t.total_run_time.total_seconds(),
                         "start": t.start_time.isoformat() if t.start_time else None, "nested": nested})
        print(json.dumps({"flow_run": fr.name, "state": fr.state_name, "flow_s": fr.total_run_time.total_seconds(),
                          "tasks": rows}))

asyncio.run(main())
"""


def prefect_timings(env: dict[str, str]) -> dict[str, Any]:
    # A separate interpreter with the run's PREFECT_HOME: Prefect reads its settings once, at import.
    proc = subprocess.run([sys.executable, "-c", PREFECT_READER], env=env, capture_output=True, text=True, timeout=300)
    # The ephemeral API can fail its own shutdown (and exit non-zero) after the answer is printed: the answer counts.
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def report(result: dict[str, Any]) -> str:
    lines = [
        result.get("machine", ""),
        f"command: {result['command']}",
        f"workdir: {result['workdir']}",
        f"exit status {result['returncode']}; subprocess wall {result['wall_s']:.1f} s",
    ]
    ml = result.get("mlflow", {})
    if "error" in ml:
        lines.append(f"mlflow: {ml['error']}")
    elif ml:
        lines.append(
            f"mlflow run {ml['run_id']} ({ml['status']}): {ml['run_s']:.1f} s from run start to end"
            if ml.get("run_s") is not None
            else f"mlflow run {ml['run_id']} ({ml['status']})"
        )
        lines.append("  timing metrics (s):")
        for k, v in ml["timing_metrics"].items():
            lines.append(f"    {k:40} {v:10.1f}")
        for k, v in ml.get("peak_memory", {}).items():
            lines.append(f"    {k:40} {v:10.0f}")
        for k, v in ml.get("eval", {}).items():
            lines.append(f"    {k:40} {v:10.3f}")
        for arm in ml.get("arms", []):
            scores = ", ".join(f"{k[5:]} {v:.3f}" for k, v in arm["eval"].items() if k in HEADLINE)
            run_s = f"{arm['run_s']:.1f} s" if arm["run_s"] is not None else "unfinished"
            train = f", training {arm['train_wall_s']:.1f} s" if arm["train_wall_s"] is not None else ""
            lines.append(
                f"  arm {arm['name']} ({arm['status']}): {run_s}{train}; candidate {arm['candidate']}; {scores}"
            )
    pf = result.get("prefect")
    if pf:
        if "error" in pf:
            lines.append(f"prefect: {pf['error']}")
        else:
            lines.append(
                f"prefect flow run {pf['flow_run']} ({pf['state']}): {pf['flow_s']:.1f} s flow run time; "
                "task runs in start order (train is SFT, align DPO; a sweep arm's stages indented under it)"
            )
            for t in pf["tasks"]:
                share = t["run_s"] / result["wall_s"] if result["wall_s"] else 0
                name = ("  " + t["name"]) if t.get("nested") else t["name"]
                lines.append(f"    {name:40} {t['run_s']:10.1f} s  {share:6.1%} of wall  ({t['state']})")
            lines.append(
                f"    {'(outside tasks: imports, startup, flow glue)':40} "
                f"{result['wall_s'] - sum(t['run_s'] for t in pf['tasks'] if not t.get('nested')):10.1f} s"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="key.sub=value, passed to `ftflow run demo`")
    ap.add_argument("--recipe", help="recipe to run (default demo, or sweep with --sweep; tiny: a quick check)")
    ap.add_argument("--sweep", action="store_true", help="run `ftflow sweep` (the rank sweep) instead of `ftflow run`")
    ap.add_argument("--dry-run", action="store_true", help="print the command and paths, run nothing")
    ap.add_argument("--workdir", help="scratch folder (default: a new temp dir, kept for inspection)")
    ap.add_argument("--no-prefect", action="store_true", help="skip reading the Prefect task runs")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="run the demo on the code paths of an AVX2-only CPU (torch, oneDNN and MKL capped; see machine.py)",
    )
    args = ap.parse_args(argv)

    if args.workdir:
        work = Path(args.workdir).resolve()
    elif args.dry_run:
        work = Path(tempfile.gettempdir()) / "bench-demo-XXXXXXXX"  # named only: a dry run creates nothing
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-demo-")).resolve()
    recipe = args.recipe or ("sweep" if args.sweep else "demo")
    cmd = demo_command(work, args.overrides, recipe, "sweep" if args.sweep else "run")
    env = demo_env(work, isolate_prefect=not args.no_prefect)
    if args.emulate_avx2:
        env.update(AVX2_ENV)
    if args.dry_run:
        print(f"cwd: {work}")
        if "PREFECT_HOME" in env:
            print(f"PREFECT_HOME={env['PREFECT_HOME']}")
        print("command: " + shlex.join(cmd))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "demo.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {
        "machine": cpu_line()
        + (
            f"; emulating AVX2 only ({shlex.join(f'{k}={v}' for k, v in AVX2_ENV.items())})"
            if args.emulate_avx2
            else ""
        ),
        "command": shlex.join(cmd),
        "workdir": str(work),
        "returncode": proc.returncode,
        "wall_s": wall,
        "log": str(log_path),
    }
    if proc.returncode != 0:
        sys.stderr.write(log_path.read_text()[-3000:])
    result["mlflow"] = mlflow_timings(work) if (work / "mlflow.db").exists() else {"error": "no mlflow.db written"}
    if not args.no_prefect:
        result["prefect"] = prefect_timings(env)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
