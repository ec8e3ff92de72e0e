"""Planted fake credentials never show up in what a run leaves behind.

HF tokens and API keys come from environment variables or Prefect Secret blocks. One whole pipeline
run plants them everywhere a user could (env, a Secret block, a TRL pass-through argument, a tracking
URL with a password) and greps everything the run recorded: MLflow params, tags, dataset inputs, every
artifact file (zip members included), the registered model version, the Prefect logs and artifacts of
the flow run, and the process's own stdout/stderr.
"""

from __future__ import annotations

import asyncio
import secrets
import string
import zipfile
from pathlib import Path

import pytest

ALPHANUM = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHANUM) for _ in range(n))


def find_planted(secret_values: dict[str, str], places: dict[str, bytes]) -> list[str]:
    """`name in place: ...context...` for every planted value found in a place; empty means nothing leaked."""
    found = []
    for where, blob in places.items():
        for name, value in secret_values.items():
            at = blob.find(value.encode())
            while at >= 0:
                context = blob[max(0, at - 80) : at + len(value) + 20].replace(value.encode(), b"<SECRET>")
                found.append(f"{name} in {where}: ...{context.decode(errors='replace')}...")
                at = blob.find(value.encode(), at + len(value))
    return found


def _file_places(root: Path) -> dict[str, bytes]:
    places = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        places[f"artifact {rel}"] = path.read_bytes()
        if zipfile.is_zipfile(path):  # torch .bin / .pt files are zip archives of pickles
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    places[f"artifact {rel}!{member}"] = z.read(member)
    return places


def _prefect_places(flow_run_id) -> dict[str, bytes]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read():
        async with get_client() as client:
            logs, offset = [], 0
            while True:
                page = await client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset
                )
                logs += page
                offset += len(page)
                if len(page) < 200:
                    break
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return logs, artifacts

    logs, artifacts = asyncio.run(read())
    places = {"prefect logs": "\n".join(entry.message for entry in logs).encode()}
    for a in artifacts:
        places[f"prefect artifact {a.key or a.id} ({a.type})"] = f"{a.description}\n{a.data}".encode()
    return places


def test_find_planted_sees_a_leak():
    # The negative case the real test relies on: a planted value is found wherever it sits.
    assert find_planted({"hf": "hf_abc"}, {"params": b"x=hf_abc", "logs": b"clean"}) == [
        "hf in params: ...x=<SECRET>..."
    ]


@pytest.mark.slow
def test_planted_secrets_leave_no_trace(prefect_harness, tiny_cfg, tmp_path, monkeypatch, capfd, mlflow_server_port):
    from mlflow import MlflowClient
    from prefect.blocks.system import Secret

    from ftflow.configs.loader import apply_overrides, config_from_dict
    from ftflow.pipeline import pipeline_flow

    planted = {
        "HF_TOKEN env": "hf_" + _random(30),
        "OPENAI_API_KEY env": "sk-" + _random(40),
        "Secret block hf-token": "hf_" + _random(30),
        "sft.extra.hub_token": "hf_" + _random(30),
        "tracking URL password": _random(24),
    }
    monkeypatch.setenv("HF_TOKEN", planted["HF_TOKEN env"])
    monkeypatch.setenv("OPENAI_API_KEY", planted["OPENAI_API_KEY env"])
    block = f"ftflow-test-hf-token-{_random(6).lower()}"
    Secret(value=planted["Secret block hf-token"]).save(block, overwrite=True)
    tracking = f"http://ftflow:{planted['tracking URL password']}@127.0.0.1:{mlflow_server_port}"

    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"),
            [
                f"model.hf_token_block={block}",
                f"tracking.tracking_uri={tracking}",
                "eval.max_examples=2",
                "eval.few_shot_k=0",
                f"sft.extra.hub_token={planted['sft.extra.hub_token']}",
            ],
        )
    )  # a careless user passing a hub token to TRL

    state = pipeline_flow(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    captured = capfd.readouterr()

    client = MlflowClient(f"http://127.0.0.1:{mlflow_server_port}")
    run_id = state.result()["run_id"]
    run = client.get_run(run_id)
    places: dict[str, bytes] = {
        "mlflow params": repr(run.data.params).encode(),
        "mlflow tags": repr(run.data.tags).encode(),
        "mlflow metric names": repr(sorted(run.data.metrics)).encode(),
        "mlflow dataset inputs": repr(
            [(d.dataset.name, d.dataset.source, d.dataset.profile, d.dataset.schema) for d in run.inputs.dataset_inputs]
        ).encode(),
        "stdout": captured.out.encode(),
        "stderr": captured.err.encode(),
    }
    # Redacted, not dropped: the params still say a token and a password were configured.
    assert (
        run.data.params["sft.extra.hub_token"] == "***"
        and "ftflow:***@127.0.0.1" in run.data.params["tracking.tracking_uri"]
    )

    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / "downloaded")))
    files = _file_places(downloaded)
    assert any(k.endswith("adapter_model.safetensors") for k in files) and any("resolved_config" in k for k in files)
    places.update(files)
    for version in client.search_model_versions(f"name='{cfg.registry.model_name}'"):
        places[f"registry version {version.version}"] = repr(
            (version.source, version.tags, version.description, version.run_link)
        ).encode()
    places.update(_prefect_places(state.state_details.flow_run_id))
    assert b"Finished in state Completed" in places["prefect logs"]

    leaks = find_planted(planted, places)
    assert not leaks, "planted secrets found:\n" + "\n".join(leaks)


@pytest.mark.slow
def test_dead_tracking_server_password_stays_out_of_prefect(prefect_harness, tiny_cfg, tmp_path):
    import socket

    from prefect.client.orchestration import get_client

    from ftflow.configs.loader import apply_overrides, config_from_dict
    from ftflow.pipeline import pipeline_flow

    password = _random(24)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config_from_dict(
        apply_overrides(
            tiny_cfg.model_dump(mode="json"), [f"tracking.tracking_uri=http://ftflow:{password}@127.0.0.1:{port}"]
        )
    )
    state = pipeline_flow(config=cfg, return_state=True)
    assert state.is_failed()

    async def stored_state_message():
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).state.message

    places = _prefect_places(state.state_details.flow_run_id)
    places["prefect state message"] = (asyncio.run(stored_state_message()) or "").encode()
    assert b"not reachable" in places["prefect state message"]
    assert b"Traceback" in places["prefect logs"]  # the full trace is kept in the log, redacted
    leaks = find_planted({"tracking URL password": password}, places)
    assert not leaks, "planted secrets found:\n" + "\n".join(leaks)
