"""A loopback stand-in for the paid OpenAI API: the endpoints `backend: openai` and the LLM judge use, nothing more.

It stands in for https://api.openai.com because the real API costs money and cannot be reached from CI. The
official `openai` client talks to it through `base_url`, so the requests, the client's parsing and the
pipeline's handling are real; only the far side is scripted:
  - POST /v1/files                          multipart upload; `reject_files` answers 400 like the API does
  - POST /v1/fine_tuning/jobs               creates a job
  - GET  /v1/fine_tuning/jobs/{id}          validating_files → running → `outcome` (succeeded/failed/cancelled)
  - GET  /v1/fine_tuning/jobs/{id}/events   message and metrics events, newest first, as the API lists them
  - POST /v1/chat/completions               `ft:` models answer from `answers` (prompt → text); others say "I am not sure."
  - GET  /v1/models                         one model: what the LLM judge's reachability check lists
Nothing here feeds a measured table.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    outcome: str = "succeeded"  # or "failed", "cancelled"
    reject_files: bool = False
    answers: dict[str, str] = field(default_factory=dict)  # last user message -> the fine-tuned model's answer
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), in order
    uploads: list[bytes] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_jobs: list[dict[str, Any]] = field(default_factory=list)  # the create bodies


def _job_view(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    script: Script

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:
        s = self.script
        s.requests.append(("POST", self.path))
        body = self._body()
        if self.path == "/v1/files":
            return self._upload(body)
        if self.path == "/v1/fine_tuning/jobs":
            request = json.loads(body)
            s.created_jobs.append(request)
            job_id = f"ftjob-{len(s.jobs) + 1}"
            s.jobs[job_id] = {
                "id": job_id,
                "object": "fine_tuning.job",
                "created_at": int(time.time()),
                "model": request["model"],
                "training_file": request["training_file"],
                "validation_file": request.get("validation_file"),
                "status": "validating_files",
                "fine_tuned_model": None,
                "finished_at": None,
                "error": None,
                "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
                "organization_id": "org-standin",
                "result_files": [],
                "seed": request.get("seed", 0),
                "trained_tokens": None,
                "_polls": 0,
                "_suffix": request.get("suffix") or "",
            }
            return self._send(200, _job_view(s.jobs[job_id]))
        if self.path == "/v1/chat/completions":
            return self._chat(json.loads(body))
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _upload(self, body: bytes) -> None:
        s = self.script
        raw = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        content = next(
            part.get_payload(decode=True)
            for part in message.iter_parts()
            if part.get_param("name", header="content-disposition") == "file"
        )
        if s.reject_files:
            return self._send(
                400,
                {
                    "error": {
                        "message": "Invalid file format: line 1 is not a valid chat example",
                        "type": "invalid_request_error",
                        "param": "file",
                        "code": "invalid_file_format",
                    }
                },
            )
        s.uploads.append(content)
        file_id = f"file-{len(s.uploads)}"
        self._send(
            200,
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": "training.jsonl",
                "purpose": "fine-tune",
                "status": "processed",
            },
        )

    def _chat(self, request: dict[str, Any]) -> None:
        question = request["messages"][-1]["content"]
        model = request["model"]
        text = self.script.answers.get(question, "I am not sure.") if model.startswith("ft:") else "I am not sure."
        self._send(
            200,
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10},
            },
        )

    def do_GET(self) -> None:
        s = self.script
        s.requests.append(("GET", self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["v1", "models"]:
            return self._send(
                200, {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "standin"}]}
            )
        if parts[:3] != ["v1", "fine_tuning", "jobs"] or len(parts) < 4 or parts[3] not in s.jobs:
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        job = s.jobs[parts[3]]
        if len(parts) == 5 and parts[4] == "events":
            return self._send(200, {"object": "list", "data": list(reversed(_events(job))), "has_more": False})
        job["_polls"] += 1
        # One poll each in validating_files and running, then the scripted ending.
        if job["_polls"] == 1:
            job["status"] = "running"
        elif job["_polls"] >= 2 and job["status"] == "running":
            job["status"] = s.outcome
            job["finished_at"] = int(time.time())
            if s.outcome == "succeeded":
                job["fine_tuned_model"] = f"ft:{job['model']}:org-standin:{job['_suffix']}:{job['id']}"
                job["trained_tokens"] = 12345
            elif s.outcome == "failed":
                job["error"] = {
                    "code": "invalid_training_file",
                    "message": "The job failed due to an invalid training file: too few valid examples",
                    "param": "training_file",
                }
        self._send(200, _job_view(job))


def _events(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Oldest first; what the job has done by its current status."""
    made = job["created_at"]
    events = [_event(job, 1, made, "message", "Validating training file", None)]
    if job["status"] != "validating_files":
        events.append(_event(job, 2, made + 1, "message", "Fine-tuning job started", None))
        for step in (1, 2, 3):
            data = {"step": step, "train_loss": 2.0 / step, "train_mean_token_accuracy": 0.5 + 0.1 * step}
            events.append(_event(job, 2 + step, made + 1 + step, "metrics", f"Step {step}/3", data))
    if job["status"] in ("succeeded", "failed", "cancelled"):
        events.append(_event(job, 9, made + 9, "message", f"Job {job['status']}", None))
    return events


def _event(job, n: int, created: int, kind: str, message: str, data) -> dict[str, Any]:
    return {
        "id": f"ftevent-{job['id']}-{n}",
        "object": "fine_tuning.job.event",
        "created_at": created,
        "level": "info",
        "message": message,
        "type": kind,
        "data": data,
    }


class StandIn:
    """`with StandIn(script) as base_url:` serves on a free loopback port for the block."""

    def __init__(self, script: Script):
        handler = type("Handler", (_Handler,), {"script": script})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
