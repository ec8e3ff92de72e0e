"""Fine-tuning through OpenAI's API (`backend: openai`): the seed chapter's code example 5, made safe to run weekly.

1. The validated rows become the API's JSONL: `{"messages": [...]}` per SFT row; for DPO jobs, `{"input":
   {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}` per pair.
2. The file is checked offline the way OpenAI's data-preparation guide checks it (keys, roles, role order,
   `weight`, token limit per example, minimum count) and its training tokens and cost are estimated, before
   anything is uploaded. OpenAI's own tokenizer files cannot be downloaded here, so tokens are counted with
   the local base model's tokenizer and the report says so.
3. Upload, create the job, poll it; its events and metrics stream into the MLflow run.

The official `openai` client does the talking (`pip install 'ftflow[serve]'`). The key comes from a Prefect
Secret block or an environment variable and goes nowhere but the client.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ftflow.configs.schema import OpenAIConfig, OpenAIMethod
from ftflow.tasks.data.rows import Record
from ftflow.tasks.errors import PipelineError

# The API's documented defaults when n_epochs is "auto": about 3 epochs, kept between 100 and 25,000
# examples seen in total, and 1 to 25 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}
TERMINAL = {"succeeded", "failed", "cancelled"}


class OpenAIJobError(PipelineError):
    """The API refused a file or a job, or a job ended failed or cancelled: the API's reason, never retried."""


def with_system(messages: list[dict[str, str]], system_prompt: Optional[str]) -> list[dict[str, str]]:
    """The conversation as training sees it locally: the configured system prompt first when it has none."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and (not clean or clean[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *clean]
    return clean


def sft_records(rows: Iterable[Record], system_prompt: Optional[str] = None) -> list[dict[str, Any]]:
    return [{"messages": with_system(r.row["messages"], system_prompt)} for r in rows]


def dpo_records(rows: Iterable[Record], system_prompt: Optional[str] = None) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": with_system(r.row["prompt"], system_prompt)},
            "preferred_output": [{"role": "assistant", "content": r.row["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": r.row["rejected"]}],
        }
        for r in rows
    ]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@dataclass
class FormatReport:
    """What the offline check found in one file, and what training on it would cost."""

    path: str
    method: str
    examples: int = 0
    # problem -> the file's 1-based line numbers that have it
    errors: dict[str, list[int]] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    counted_with: str = ""
    n_epochs: int = 0
    billed_tokens: int = 0
    usd: Optional[float] = None  # None: the price table has no entry for the model

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: str, line: int) -> None:
        self.errors.setdefault(problem, []).append(line)

    def error_line(self) -> str:
        """`file: problem (lines 3, 7, ...); ...`: one line for the run's error."""
        parts = [
            f"{problem} (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}"
            f"{', ...' if len(lines) > 5 else ''})"
            for problem, lines in self.errors.items()
        ]
        return f"{self.path}: OpenAI fine-tuning format check failed: {'; '.join(parts)}"

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tokens")
        out["max_tokens"] = max(self.tokens, default=0)
        out["file_tokens"] = sum(self.tokens)
        return out


def _check_messages(messages: Any, report: FormatReport, line: int, needs_answer: bool) -> list[dict]:
    """Keys, roles and role order of one conversation: system first if at all, then user and assistant in turn."""
    if not isinstance(messages, list) or not messages:
        report.add("missing_messages_list", line)
        return []
    roles = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            report.add("message_missing_key", line)
            return []
        if set(m) - MESSAGE_KEYS:
            report.add("message_unrecognized_key", line)
        if m["role"] not in ROLES:
            report.add("unrecognized_role", line)
        if not isinstance(m["content"], str) or not m["content"].strip():
            report.add("missing_content", line)
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
            report.add("bad_weight", line)
        roles.append(m["role"])
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected:
        report.add("role_order", line)
    if needs_answer and (not turns or turns[-1] != "assistant"):
        report.add("example_missing_assistant_message", line)
    if not needs_answer and (not turns or turns[-1] != "user"):
        report.add("input_not_ending_with_user", line)
    return messages


def _check_output(output: Any, report: FormatReport, line: int, key: str) -> list[dict]:
    ok = (
        isinstance(output, list)
        and len(output) == 1
        and isinstance(output[0], dict)
        and output[0].get("role") == "assistant"
        and isinstance(output[0].get("content"), str)
        and output[0]["content"].strip()
    )
    if not ok:
        report.add(f"bad_{key}", line)
        return []
    return output


def default_epochs(n_examples: int) -> int:
    """The epochs the API picks for n_epochs "auto", per its data-preparation guide."""
    epochs = TARGET_EPOCHS
    if n_examples * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    elif n_examples * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return epochs


def check_file(
    path: Path, cfg: OpenAIConfig, count_tokens: Callable[[list[dict]], int], counted_with: str
) -> FormatReport:
    """The API's format checks, offline, and the token and cost estimate of training on `path`."""
    report = FormatReport(str(path), cfg.method.value, counted_with=counted_with)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate(lines, start=1):
        try:
            example = json.loads(text)
        except json.JSONDecodeError:
            report.add("invalid_json", number)
            continue
        if not isinstance(example, dict):
            report.add("data_type", number)
            continue
        report.examples += 1
        if cfg.method == OpenAIMethod.supervised:
            messages = _check_messages(example.get("messages"), report, number, needs_answer=True)
        else:
            prompt = _check_messages((example.get("input") or {}).get("messages"), report, number, needs_answer=False)
            chosen = _check_output(example.get("preferred_output"), report, number, "preferred_output")
            rejected = _check_output(example.get("non_preferred_output"), report, number, "non_preferred_output")
            # Both answers are trained on, each after the prompt.
            messages = prompt + chosen + rejected if prompt and chosen and rejected else []
        if messages:
            n = count_tokens(messages)
            report.tokens.append(n)
            if n > cfg.max_tokens_per_example:
                report.add(f"over_{cfg.max_tokens_per_example}_tokens", number)
    if report.examples < cfg.min_examples:
        report.add(f"fewer_than_{cfg.min_examples}_examples ({report.examples})", 0)
    report.n_epochs = cfg.n_epochs or default_epochs(max(report.examples, 1))
    report.billed_tokens = sum(min(cfg.max_tokens_per_example, n) for n in report.tokens) * report.n_epochs
    price = cfg.prices.get(cfg.model)
    report.usd = None if price is None else round(report.billed_tokens / 1e6 * price, 4)
    return report


def token_counter(tokenizer) -> Callable[[list[dict]], int]:
    """Tokens of a conversation rendered with the local model's chat template: an estimate of OpenAI's count."""

    def count(messages: list[dict]) -> int:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(tokenizer.apply_chat_template(plain, tokenize=True, return_dict=False))

    return count


def api_key(cfg: OpenAIConfig) -> str:
    """The key, or a PipelineError naming where it was looked for; checked before anything is uploaded."""
    from ftflow.tasks.secrets import secret

    key = secret(cfg.key_block, "openai.key_block", (cfg.key_env,))
    if not key:
        raise PipelineError(
            f"backend=openai needs an API key: set the environment variable {cfg.key_env} (openai.key_env) "
            "or name a Prefect Secret block in openai.key_block; nothing was uploaded"
        )
    return key


def client(cfg: OpenAIConfig, key: str):
    try:
        from openai import OpenAI
    except ImportError:
        raise PipelineError("backend=openai needs the openai client: pip install 'ftflow[serve]'") from None
    # The client's own retries cover dropped connections and 429/5xx per request; the poll loop's Prefect
    # task retries cover longer outages.
    return OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.request_timeout_s, max_retries=2)


def _api_reason(err: Exception) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", None) or err)


def upload(api, path: Path) -> str:
    """The file's id; a file the API rejects is an OpenAIJobError with the API's reason."""
    import openai

    try:
        with path.open("rb") as f:
            return api.files.create(file=f, purpose="fine-tune").id
    except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
        raise OpenAIJobError(f"{path}: the API rejected the file: {_api_reason(err)}") from None


def create_job(api, cfg: OpenAIConfig, files: tuple[str, Optional[str]], seed: int) -> str:
    """The job's id. Hyperparameters left empty are omitted, so the API's "auto" applies."""
    import openai

    hyper = {
        k: v
        for k, v in {
            "n_epochs": cfg.n_epochs,
            "learning_rate_multiplier": cfg.learning_rate_multiplier,
            "batch_size": cfg.batch_size,
            **({"beta": cfg.beta} if cfg.method == OpenAIMethod.dpo else {}),
        }.items()
        if v is not None
    }
    kind = cfg.method.value
    training, validation = files
    try:
        job = api.fine_tuning.jobs.create(
            model=cfg.model,
            training_file=training,
            validation_file=validation,
            suffix=cfg.suffix,
            seed=seed,
            method={"type": kind, kind: {"hyperparameters": hyper}},
        )
    except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
        raise OpenAIJobError(f"openai: the API refused the fine-tuning job: {_api_reason(err)}") from None
    return job.id


@dataclass
class JobWatch:
    """What polling has seen so far: event ids already streamed, and the last status."""

    job_id: str
    seen: set[str] = field(default_factory=set)
    status: str = ""
    started: float = field(default_factory=time.monotonic)


def new_events(api, watch: JobWatch) -> list[Any]:
    """Events not streamed yet, oldest first (the API lists newest first)."""
    page = api.fine_tuning.jobs.list_events(watch.job_id, limit=100)
    fresh = [e for e in page.data if e.id not in watch.seen]
    watch.seen.update(e.id for e in fresh)
    return sorted(fresh, key=lambda e: (e.created_at, e.id))


def event_metrics(event: Any) -> Optional[tuple[int, dict[str, float]]]:
    """(step, numbers) of a `metrics` event, else None."""
    data = getattr(event, "data", None) or {}
    if getattr(event, "type", None) != "metrics" or "step" not in data:
        return None
    numbers = {k: float(v) for k, v in data.items() if k != "step" and isinstance(v, (int, float))}
    return int(data["step"]), numbers


def poll_once(api, watch: JobWatch, on_event: Callable[[Any], None]) -> Any:
    """One status check: stream new events, return the job. A failed or cancelled job raises with its reason."""
    job = api.fine_tuning.jobs.retrieve(watch.job_id)
    for event in new_events(api, watch):
        on_event(event)
    watch.status = job.status
    if job.status == "failed":
        error = getattr(job, "error", None)
        reason = ": ".join(str(x) for x in (getattr(error, "code", None), getattr(error, "message", None)) if x)
        raise OpenAIJobError(f"openai job {watch.job_id} failed: {reason or 'no reason given'}")
    if job.status == "cancelled":
        raise OpenAIJobError(f"openai job {watch.job_id} was cancelled")
    return job


def wait(api, watch: JobWatch, cfg: OpenAIConfig, on_event: Callable[[Any], None]) -> Any:
    """Poll until the job succeeds (its `ft:` model id is on the returned job) or fails, or the timeout."""
    while True:
        job = poll_once(api, watch, on_event)
        if job.status == "succeeded":
            if not getattr(job, "fine_tuned_model", None):
                raise OpenAIJobError(f"openai job {watch.job_id} succeeded without a fine_tuned_model")
            return job
        if time.monotonic() - watch.started > cfg.job_timeout_s:
            raise OpenAIJobError(
                f"openai job {watch.job_id} still {job.status} after {cfg.job_timeout_s:.0f} s (openai.job_timeout_s)"
            )
        time.sleep(cfg.poll_interval_s)


def complete(api, model: str, prompts: list[list[dict]], cfg: OpenAIConfig, seed: int) -> list[dict[str, Any]]:
    """Greedy answers through chat completions, shaped like local generations for the shared scorers."""
    out = []
    for messages in prompts:
        reply = api.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=cfg.max_new_tokens, seed=seed
        )
        choice = reply.choices[0]
        text = choice.message.content or ""
        out.append(
            {
                "text": text,
                "answer": text,
                "stopped": choice.finish_reason == "stop",
                "new_tokens": getattr(reply.usage, "completion_tokens", 0) if reply.usage else 0,
            }
        )
    return out
