"""What goes wrong around a run rather than in its data: folders it cannot write, processes killed under it,
runs started together, two gates racing for one registered model, credentials on their way to Prefect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ftflow.configs.loader import apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[2]


def _with(cfg, *overrides):
    return config_from_dict(apply_overrides(cfg.model_dump(mode="json"), list(overrides)))


def _runs(cfg):
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _recipe(cfg, tmp_path: Path, name: str = "recipe.yaml") -> Path:
    recipe = tmp_path / name
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return recipe


# --- an output folder that cannot be written ---------------------------------------------------------


def _unwritable(tmp_path: Path) -> Path:
    # chmod does not stop root; a folder "inside" a regular file cannot be made by anyone.
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "runs"


@pytest.mark.bad_input(
    "runtime",
    "output_dir that cannot be written (read-only, or under a file)",
    "ftflow: error: output_dir <path> is not writable (Not a directory)",
)
def test_unwritable_output_dir_is_one_line_before_any_run(prefect_harness, tiny_cfg, tmp_path, capsys):
    """Defect 13: a read-only output_dir is one line from the CLI, before any MLflow run is left RUNNING."""
    from ftflow.cli import main

    capsys.readouterr()
    rc = main(["run", str(_recipe(tiny_cfg, tmp_path)), f"output_dir={_unwritable(tmp_path)}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"ftflow: error: output_dir {_unwritable(tmp_path)} is not writable"), err
    assert [r.info.status for r in _runs(tiny_cfg)] in ([], ["FAILED"])


def test_unwritable_output_dir_inside_a_flow_marks_the_run_failed(prefect_harness, tiny_cfg, tmp_path):
    """Defect 13: the work dir is made inside the flow's `try`, so its MLflow run ends FAILED."""
    # A deployment run has no CLI check in front of it: the flow itself must end its MLflow run.
    from ftflow.pipeline import pipeline_flow
    from ftflow.tasks.errors import PipelineError

    with pytest.raises(PipelineError, match="output_dir .* is not writable"):
        pipeline_flow(config=_with(tiny_cfg, f"output_dir={_unwritable(tmp_path)}"))
    runs = _runs(tiny_cfg)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "is not writable" in runs[0].data.tags["failure_reason"]


# --- every row longer than the training window ------------------------------------------------------------


@pytest.mark.bad_input(
    "data",
    "every row longer than sft.max_length",
    "ftflow: error: sft: all <n> rows are longer than sft.max_length (<m> tokens; the shortest has <k>): ...",
)
def test_every_row_too_long_is_one_data_error_before_training(prefect_harness, tiny_cfg, tmp_path, capsys):
    """Defect 19: every row longer than sft.max_length is one data error, not a retried `num_samples=0`."""
    from ftflow.cli import main

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about item {i}: " + "word " * 60},
                {"role": "assistant", "content": f"Item {i} is a fine thing to have in the house."},
            ]
        }
        for i in range(40)
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    rc = main(
        [
            "run",
            str(_recipe(tiny_cfg, tmp_path)),
            "data.demo.enabled=false",
            f"data.sft_path={data}",
            "sft.max_length=32",
            "sft.truncation=truncate_left",
            "quality.max_tokens=512",
            "quality.min_kept_rows=1",
            "dpo.enabled=false",
            "registry.enabled=false",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert "are longer than sft.max_length (32 tokens" in err and "num_samples" not in err, err
    assert "Retries" not in out and "Retrying" not in out  # bad input is not retried as if it were transient
    assert [r.info.status for r in _runs(tiny_cfg)] == ["FAILED"]


def test_corrupt_safetensors_in_a_run_is_one_line_and_not_retried(prefect_harness, tiny_cfg, tmp_path, capsys):
    """Defect 15: a corrupt safetensors file is bad input: one line naming the file, never a retried task."""
    import shutil

    from ftflow.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_cfg.model.name_or_path, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cut-off download
    capsys.readouterr()
    rc = main(
        ["run", str(_recipe(tiny_cfg, tmp_path)), f"model.name_or_path={model}"]
        + ["dpo.enabled=false", "registry.enabled=false", "eval.max_examples=2", "eval.few_shot_k=0"]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("ftflow: error: ") and str(weights) in err, err
    assert "Retries" not in out and "Retrying" not in out, out[-3000:]
    assert [r.info.status for r in _runs(tiny_cfg)] in ([], ["FAILED"])


# --- a bad file fails before the model is touched; a code edit invalidates cached data ------------------------


@pytest.mark.fast
def test_validate_reads_the_file_before_it_resolves_the_model(tmp_path, capsys):
    """Defect 9: `ftflow validate` on a malformed file fails on the file in well under 2 s, never on the model.

    The model path does not exist: had the model been resolved (or a GGUF converted) first, that would be
    the error, after however long it took."""
    from ftflow.cli import main

    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [broken\n')
    args = ["validate", str(data), "--kind", "sft", f"model.name_or_path={tmp_path / 'no-such-model'}"]
    assert main(args) == 2  # the first call also pays for imports
    capsys.readouterr()
    started = time.perf_counter()
    rc = main(args)
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"ftflow: error: {data}:2: not valid JSON"), err
    assert "no-such-model" not in err
    assert elapsed < 2, f"{elapsed:.1f} s"


@pytest.mark.fast
def test_an_edit_to_formatting_code_changes_the_data_cache_key(tmp_path, monkeypatch):
    """Defect 5: the validation/formatting cache key hashes the code the cached stages import (formatting.py,
    rows.py included), so an edit there is a cache miss, not up to 7 days of stale rows."""
    import shutil

    from ftflow.configs.loader import load_config
    from ftflow.tasks import stages

    cfg = load_config("tiny")
    model = stages.ModelInfo(path="m", eos_token="</s>", template_fingerprint="t")
    paths = {"sft": None}
    before = stages.data_cache_key(cfg, model, paths)
    # A copy of the package stands in for the installed one, so the test edits no shared file.
    copy = tmp_path / "pkg" / "tasks"
    shutil.copytree(Path(stages.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data_contracts", tmp_path / "pkg" / "data_contracts")
    monkeypatch.setattr(stages, "__file__", str(copy / "stages.py"))
    assert stages.data_cache_key(cfg, model, paths) == before
    for module in ("data/formatting.py", "data/rows.py"):
        with (copy / module).open("a") as f:
            f.write("\n# an edit\n")
        edited = stages.data_cache_key(cfg, model, paths)
        assert edited != before, module
        before = edited


# --- two gates racing for one registered model ----------------------------------------------------------------

GATE = [
    "eval.primary_metric=heldout_logprob",
    "dpo.enabled=false",
    "sft.learning_rate=0.003",
    "sft.per_device_batch_size=8",
    "sft.save_steps=100",
    "eval.max_examples=4",
    "eval.few_shot_k=0",
]


def _lock():
    from ftflow import steps

    return steps.registry_lock


def _candidate(cfg, model, train_set, sets, max_steps: int):
    """A run that trained and scored one SFT adapter, as the pipeline leaves it just before its gate."""
    from ftflow.tasks import stages
    from ftflow.tasks.tracking import RunLogger
    from ftflow.tasks.train.trainer import train

    cfg = _with(cfg, f"sft.max_steps={max_steps}")
    run = RunLogger.start(cfg, tags={"pipeline": "fine-tune"})
    run.log_config(cfg)
    ctx = stages.StageContext(cfg, model, run, stages.run_dir(cfg, run), print, None, _lock())
    trained = stages.Trained.of(train(ctx, "sft", train_set.sft))
    results = stages.evaluate(ctx, sets, trained.adapters, trained.candidate)
    return ctx, results, trained


@pytest.mark.slow
def test_racing_gates_leave_the_alias_on_the_better_version_and_record_both(prefect_harness, tiny_cfg, tmp_path):
    """Defects 6 and 17: two gates for one registered model take turns; both decisions are recorded."""
    from dataclasses import replace

    from prefect.client.orchestration import get_client

    from ftflow import steps
    from ftflow.tasks import stages
    from ftflow.tasks.tracking import RunLogger

    cfg = _with(tiny_cfg, *GATE)
    model = stages.resolve_model(cfg)
    ctx = stages.StageContext(cfg, model, None, tmp_path / "prep")
    paths = stages.data_paths(ctx)
    data = stages.validate_data(ctx, paths, tmp_path / "validated")
    train_set, heldout_set, validation_set = stages.format_chat(ctx, data)
    sets = stages.eval_sets(data, train_set, heldout_set, validation_set)
    better = _candidate(cfg, model, train_set, sets, max_steps=12)
    worse = _candidate(cfg, model, train_set, sets, max_steps=3)
    client = MlflowClient(cfg.tracking.tracking_uri)

    def gate(candidate, name: str):
        (c, results, trained) = candidate
        cfg_named = _with(c.cfg, f"registry.model_name={name}")
        # Each gate read "no champion" before training: the stale view a concurrent run has.
        return stages.gate(replace(c, cfg=cfg_named), results, trained, None, sets.heldout_accounting, sets)

    # Interleaved: the better run moves the alias between the worse run's read and its decision.
    name = cfg.registry.model_name
    first, second = gate(better, name), gate(worse, name)
    assert first["promoted"] and not second["promoted"], (first["summary"], second["summary"])
    assert "vs champion" in second["summary"]  # compared with the champion of the moment, re-scored
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]

    # Truly concurrent, in two threads, against one MLflow store and one Prefect API.
    race = f"{name}-race"
    outcomes: dict[str, dict] = {}
    barrier = threading.Barrier(2)

    def contend(label, candidate):
        c, results, trained = candidate
        run = RunLogger.start(c.cfg, tags={"pipeline": "fine-tune"})  # a fresh run per gate
        barrier.wait()
        outcomes[label] = gate((replace(c, run=run), results, trained), race)

    threads = [
        threading.Thread(target=contend, args=(label, cand)) for label, cand in (("better", better), ("worse", worse))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert set(outcomes) == {"better", "worse"}
    assert str(client.get_model_version_by_alias(race, "champion").version) == outcomes["better"]["version"]
    for outcome in outcomes.values():  # both decisions are on record, on the version and in the run
        tags = client.get_model_version(race, outcome["version"]).tags
        assert tags["ftflow.gate"].startswith("PROMOTE" if outcome["promoted"] else "REFUSE")
    assert not outcomes["worse"]["promoted"] or outcomes["better"]["promoted"]

    # The lock is a Prefect global concurrency limit named after the model, free again.
    with get_client(sync_client=True) as prefect:
        limit = prefect.read_global_concurrency_limit_by_name(steps.registry_limit_name(race))
    assert limit.limit == 1 and limit.active_slots == 0


# --- killed runs: the MLflow run, the Prefect server, the next run --------------------------------------------


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: no Prefect server configured (so the ephemeral API), Prefect's state in its own home."""
    scratch = tmp_path / "tmp"  # its temporary files, where a test can see what a killed run left
    scratch.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(scratch),
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _start_cli(args: list[str], tmp_path: Path, log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "ftflow.cli", *args],
        cwd=tmp_path,
        env=env or _cli_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its parent has not reaped it


def _prefect_servers_of(pid: int) -> list[int]:
    """Prefect API server processes (uvicorn running prefect.server.api.server) started by `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if stat and stat[1] == str(pid) and b"prefect.server.api.server" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout:g} s" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def _long_run(tiny_cfg, tmp_path: Path) -> Path:
    cfg = _with(
        tiny_cfg,
        "sft.max_steps=400",
        "sft.logging_steps=1",
        "sft.save_steps=1000",
        "dpo.enabled=false",
        "registry.enabled=false",
        "eval.max_examples=2",
        "eval.few_shot_k=0",
    )
    return _recipe(cfg, tmp_path, "long.yaml")


def _training(tiny_cfg):
    def started():
        runs = [r for r in _runs(tiny_cfg) if r.info.status == "RUNNING"]
        return runs[0] if runs and "sft/loss" in runs[0].data.metrics else None

    return started


@pytest.mark.slow
@pytest.mark.bad_input(
    "runtime",
    "a run killed with SIGKILL (a lost machine), then the next run",
    "(no error: the next run marks the killed run FAILED, tag ftflow.reconciled = 'its process <pid> on <host> is gone ...')",
)
def test_sigkill_takes_the_prefect_server_along_and_the_next_run_reconciles(tiny_cfg, tmp_path):
    """Defects 16 and 7: SIGKILL leaves no orphaned Prefect server; the next run marks the killed run FAILED."""
    recipe = _long_run(tiny_cfg, tmp_path)
    proc = _start_cli(["run", str(recipe)], tmp_path, "killed.log")
    servers: list[int] = []
    try:
        run = _wait_until(_training(tiny_cfg), 900, "training started", proc, tmp_path / "killed.log")
        servers = _prefect_servers_of(proc.pid)
        assert servers, "the run should have started a local Prefect server"
        os.kill(proc.pid, signal.SIGKILL)  # only the run: its server must go by itself
        proc.wait()
        _wait_until(lambda: not any(_alive(p) for p in servers), 60, "the orphaned Prefect server exited")
        orphan_logs = list((tmp_path / "tmp").glob(f"ftflow-prefect-server-{proc.pid}-*.log"))
        assert orphan_logs, "SIGKILL gave the run no chance to remove its server's log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in servers:  # what this test started, should it still be there
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    client = MlflowClient(tiny_cfg.tracking.tracking_uri)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nobody was left to say otherwise

    # The next run of the experiment (here one that fails fast on its data) notices and says why.
    nxt = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftflow.cli",
            "run",
            str(recipe),
            "data.demo.enabled=false",
            f"data.sft_path={tmp_path / 'none.jsonl'}",
        ],
        cwd=tmp_path,
        env=_cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert nxt.returncode == 2, nxt.stdout[-2000:] + nxt.stderr[-2000:]
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "FAILED"
    assert f"its process {proc.pid} on " in killed.data.tags["ftflow.reconciled"]
    assert "is gone" in killed.data.tags["failure_reason"]
    assert not any(log.exists() for log in orphan_logs), "the next run should sweep the killed run's server log"


@pytest.mark.slow
def test_sigterm_ends_the_run_failed_and_stops_the_prefect_server(tiny_cfg, tmp_path):
    """Defects 16 and 7: SIGTERM ends the MLflow run FAILED and stops the ephemeral Prefect server."""
    proc = _start_cli(["run", str(_long_run(tiny_cfg, tmp_path))], tmp_path, "terminated.log")
    servers: list[int] = []
    try:
        run = _wait_until(_training(tiny_cfg), 900, "training started", proc, tmp_path / "terminated.log")
        servers = _prefect_servers_of(proc.pid)
        assert servers
        os.kill(proc.pid, signal.SIGTERM)  # what `docker stop`, systemd or a Prefect worker sends first
        proc.wait(timeout=300)
        _wait_until(lambda: not any(_alive(p) for p in servers), 60, "the Prefect server stopped")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in servers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "terminated.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert log.rstrip().endswith("ftflow: terminated (SIGTERM)"), log[-3000:]
    ended = MlflowClient(tiny_cfg.tracking.tracking_uri).get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and "TerminationSignal" in ended.data.tags["failure_reason"]


@pytest.mark.slow
@pytest.mark.bad_input(
    "runtime",
    "runs started at the same moment (one ephemeral Prefect database)",
    "(no error: each waits its turn to start its Prefect server; all run)",
)
def test_runs_started_together_all_finish(tiny_cfg, tmp_path):
    """Defect 17: runs started together no longer time out on the ephemeral Prefect API server."""
    # Three at once, on a Prefect database none has made yet: with Prefect's own ephemeral server they raced
    # each other's start-up (block type registration: UNIQUE constraint failed) and timed out after 20 s;
    # two at once did so often, three reliably.
    cfg = _with(
        tiny_cfg,
        "sft.max_steps=1",
        "dpo.enabled=false",
        "registry.enabled=false",
        "eval.max_examples=2",
        "eval.few_shot_k=0",
    )
    MlflowClient(cfg.tracking.tracking_uri).search_experiments()  # the store exists; Prefect's does not, yet
    procs = [
        _start_cli(
            ["run", str(_recipe(cfg, tmp_path)), f"output_dir={tmp_path / f'runs-{i}'}"], tmp_path, f"run-{i}.log"
        )
        for i in (1, 2, 3)
    ]
    try:
        codes = [p.wait(timeout=1500) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in (1, 2, 3)]
    assert codes == [0, 0, 0], "\n---\n".join(log[-3000:] for log in logs)
    assert sorted(r.info.status for r in _runs(cfg)) == ["FINISHED"] * 3


# --- credentials on their way to Prefect ----------------------------------------------------------------------


@pytest.mark.slow
def test_tracking_password_never_becomes_a_flow_run_parameter(
    prefect_harness, tiny_cfg, tmp_path, capsys, monkeypatch, mlflow_server_port
):
    """Defect 11: a password in the tracking URI never reaches Prefect's stored flow-run parameters."""
    import secrets

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from ftflow.cli import main

    password = "pw" + secrets.token_hex(12)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "restored-after-the-test")
    uri = f"http://bob:{password}@127.0.0.1:{mlflow_server_port}"
    rc = main(
        [
            "run",
            str(_recipe(tiny_cfg, tmp_path)),
            f"tracking.tracking_uri={uri}",
            "data.demo.enabled=false",
            f"data.sft_path={tmp_path / 'none.jsonl'}",
        ]
    )
    assert rc == 2  # the run stops at its data; by then Prefect has stored the flow run's parameters
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    stored = json.dumps(flow_run.parameters, default=str)
    assert password not in stored, stored[:2000]
    assert f"http://127.0.0.1:{mlflow_server_port}" in stored  # the URI itself is kept, without its credentials
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password  # where MLflow's client reads it from
    assert password not in capsys.readouterr().err
