"""An optional LLM judge behind any OpenAI-compatible endpoint (`eval.judge`, off by default).

Two modes:
- pairwise: the judge sees the question, the reference answer and two answers, the tuned variant's and the
  base model's, and names the better one. It is asked twice with the answers' positions swapped, because
  judges favour a position; a variant wins an example only when it wins in both orders (score 1), loses
  only when it loses in both (0), and anything else is a tie (0.5). Mean: `judge_win_rate`.
- graded: the judge grades the variant's answer against the reference from 1 to 10; `judge_score` is the
  grade scaled to 0-1.

The official `openai` client talks to the endpoint (`pip install 'ftflow[serve]'`). The API key comes
from a Prefect Secret block (`eval.judge.key_block`) or an environment variable (`eval.judge.key_env`),
and goes nowhere but the client. `check_endpoint` runs at the start of a flow, so a judge that is down
fails the run before anything is trained. Verdicts, raw replies included, go to MLflow as a table.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from ftflow.configs.schema import JudgeConfig, JudgeMode
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.evaluate import registry

if TYPE_CHECKING:
    from ftflow.tasks.evaluate.evaluation import VariantResult
    from ftflow.tasks.stages import StageContext

PAIRWISE_PROMPT = """You compare two answers to the same request. The reference answer shows what a correct \
answer contains.

Request:
{question}

Reference answer:
{reference}

Answer A:
{a}

Answer B:
{b}

Which answer is better: closer to the reference in content, correct, and complete? Reply with one letter: \
A, B, or T for a tie."""

GRADED_PROMPT = """Grade an answer against the reference answer, from 1 (wrong or empty) to 10 (as good as the \
reference).

Request:
{question}

Reference answer:
{reference}

Answer:
{answer}

Reply with the grade only, a whole number from 1 to 10."""

_VERDICT = re.compile(r"\b(A|B|T|TIE)\b")
_GRADE = re.compile(r"\b(10|[1-9])\b")


class JudgeError(PipelineError):
    pass


def api_key(cfg: JudgeConfig) -> str:
    from ftflow.tasks.secrets import secret

    try:
        key = secret(cfg.key_block, "eval.judge.key_block", (cfg.key_env,) if cfg.key_env else ())
    except PipelineError as err:
        raise JudgeError(str(err)) from None
    # A local server needs no key, but the client insists on one.
    return key or "not-needed"


def client(cfg: JudgeConfig):
    try:
        from openai import OpenAI
    except ImportError:
        raise JudgeError("eval.judge needs the openai client: pip install 'ftflow[serve]'") from None
    # No retries: a flaky judge should fail loudly, not triple the evaluation time.
    return OpenAI(base_url=cfg.base_url, api_key=api_key(cfg), timeout=cfg.timeout_s, max_retries=0)


def check_endpoint(ctx: StageContext) -> None:
    """Fail before training, with one line, when the judge is enabled and its endpoint does not answer."""
    from ftflow.tasks.secrets import redact_text

    cfg = ctx.cfg.eval.judge
    if not cfg.enabled:
        return
    try:
        client(cfg).models.list()
    except JudgeError:
        raise
    except Exception as err:  # connection refused, timeout, 401: the openai client raises several types
        status = getattr(err, "status_code", None)
        raise JudgeError(
            f"eval.judge.base_url: judge endpoint {redact_text(str(cfg.base_url))} cannot be reached "
            f"({type(err).__name__}{f' {status}' if status else ''}); nothing was trained"
        ) from None
    ctx.log(f"judge endpoint {cfg.base_url} answers; model {cfg.model}, mode {cfg.mode.value}")


def parse_verdict(text: str) -> Optional[str]:
    """ "A", "B" or "T" from the judge's reply; None when it says none of them."""
    found = _VERDICT.search((text or "").strip().upper())
    if not found:
        return None
    return "T" if found.group(1) in ("T", "TIE") else found.group(1)


def parse_grade(text: str) -> Optional[int]:
    found = _GRADE.search(text or "")
    return int(found.group(1)) if found else None


def _ask(judge, cfg: JudgeConfig, prompt: str) -> str:
    reply = judge.chat.completions.create(
        model=cfg.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8
    )
    return reply.choices[0].message.content or ""


def pairwise_score(first: Optional[str], swapped: Optional[str]) -> float:
    """first: the verdict with the variant as A; swapped: with the variant as B. Win only in both orders."""
    won = (first == "A") + (swapped == "B")
    lost = (first == "B") + (swapped == "A")
    if won == 2:
        return 1.0
    if lost == 2:
        return 0.0
    return 0.5


def judge_variants(ctx: StageContext, results: dict[str, VariantResult]) -> None:
    """Judge every tuned variant's held-out answers (the first eval.judge.max_examples) that has no verdict yet;
    adds the per-example judge metric to each result, and one row per verdict (`judged`) for the MLflow table.

    A result judged already (a sweep judges the champion once, beside the base, and hands it to every arm) is
    not asked about again: the judge is a paid call and would answer the same."""
    cfg = ctx.cfg.eval.judge
    judge = client(cfg)
    metric = registry.get(registry.JUDGE_METRICS[cfg.mode.value])
    base = results["base"].predictions[: cfg.max_examples]
    for variant, result in results.items():
        if not metric.for_variant(variant) or metric.name in result.metrics:
            continue
        scores: list[float] = []
        rows: list[dict[str, Any]] = []
        for mine, theirs in zip(result.predictions[: cfg.max_examples], base):
            question, reference, answer = mine["prompt"], mine["reference"], mine["prediction"]
            row: dict[str, Any] = {"variant": variant, "prompt": question, "reference": reference, "answer": answer}
            if cfg.mode == JudgeMode.pairwise:
                ask = dict(question=question, reference=reference)
                first = _ask(judge, cfg, PAIRWISE_PROMPT.format(a=answer, b=theirs["prediction"], **ask))
                swapped = _ask(judge, cfg, PAIRWISE_PROMPT.format(a=theirs["prediction"], b=answer, **ask))
                score = pairwise_score(parse_verdict(first), parse_verdict(swapped))
                row.update(
                    baseline="base",
                    baseline_answer=theirs["prediction"],
                    reply_variant_first=first,
                    reply_variant_second=swapped,
                    score=score,
                )
            else:
                reply = _ask(judge, cfg, GRADED_PROMPT.format(question=question, reference=reference, answer=answer))
                grade = parse_grade(reply)
                # An unreadable grade counts as the lowest: a judge that cannot be read must not inflate a score.
                score = ((grade or 1) - 1) / 9
                row.update(reply=reply, grade=grade, score=score)
            scores.append(score)
            rows.append(row)
        result.add(metric.name, scores)
        result.refresh()
        result.judged = rows
        ctx.log(f"judged {variant}: {metric.name}={result.metrics[metric.name]:.3f} (n={len(scores)})")
