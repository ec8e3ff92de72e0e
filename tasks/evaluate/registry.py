"""The metric registry: every evaluation metric, which way is better, where it applies, how it aggregates.

One table drives everything that names a metric: evaluation (which numbers to compute, per example), the
comparison tables, the validation-split selection (SFT vs DPO, the sweep's best arm), the gate's paired
tests and guards, and the config check of `eval.primary_metric` / `eval.guards` when a recipe loads.
Nothing else in ftflow keeps its own list of metric names.

Imports nothing heavy (no torch, no configs) so configs/schema.py can validate against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

Direction = Literal["higher", "lower"]
# What evaluation must run to get a metric: greedy answers, teacher-forced log-probs of the reference answer,
# log-probs of held-out preference pairs, or an LLM judge's verdicts.
Source = Literal["generation", "loss", "preference", "judge"]
# mean: of the per-example values; token_mean: weighted by each reference answer's tokens (a corpus loss);
# corpus: a corpus statistic with no per-example form (BLEU); exp: exp() of another metric (perplexity).
Aggregate = Literal["mean", "token_mean", "corpus", "exp"]
# Which variants have it: every one, all but the few-shot prompt (a loss under few-shot turns conditions on
# other text), or tuned adapters only (their preference rewards are measured against the base).
Variants = Literal["every", "zero_shot", "tuned"]

TASKS = ("extraction", "free_text", "classification")
BASE_VARIANTS = ("base", "base_fewshot")
ALL_TASKS = frozenset(TASKS)


@dataclass(frozen=True)
class Metric:
    name: str  # the key under eval/ and eval/<variant>/ in MLflow
    direction: Direction
    source: Source
    aggregate: Aggregate
    per_example: bool  # one score per example, so it can be tested paired (bootstrap / McNemar)
    tasks: frozenset[str]  # task presets where it means something
    variants: Variants = "every"
    binary: bool = False  # per-example 0/1: the gate uses McNemar's exact test instead of the bootstrap
    rankable: bool = True  # may be eval.primary_metric
    in_table: bool = True  # a column of the comparison tables
    # Its key in the metric modules' output: the per-example column of the predictions table, or for a corpus
    # metric the key score_generations returns.
    column: Optional[str] = None
    of: Optional[str] = None  # aggregate "exp": the metric it is exp() of
    description: str = ""

    @property
    def sign(self) -> int:
        """+1 when higher is better: (candidate - other) * sign is an improvement."""
        return 1 if self.direction == "higher" else -1

    def for_variant(self, variant: str) -> bool:
        if self.variants == "every":
            return True
        if self.variants == "zero_shot":
            return variant != "base_fewshot"
        return variant not in BASE_VARIANTS


_STRUCTURED = frozenset({"extraction", "classification"})
_TEXT = frozenset({"extraction", "free_text"})

METRICS: tuple[Metric, ...] = (
    Metric(
        "heldout_exact",
        "higher",
        "generation",
        "mean",
        True,
        _STRUCTURED,
        binary=True,
        column="exact_match",
        description="answer equals the reference (JSON canonically, text normalized)",
    ),
    Metric(
        "heldout_field_accuracy",
        "higher",
        "generation",
        "mean",
        True,
        frozenset({"extraction"}),
        column="field_accuracy",
        description="share of the reference object's fields answered right",
    ),
    Metric(
        "heldout_json_valid",
        "higher",
        "generation",
        "mean",
        True,
        frozenset({"extraction"}),
        binary=True,
        rankable=False,
        in_table=False,
        column="json_valid",
        description="answer holds a parseable JSON object",
    ),
    Metric(
        "heldout_chrf",
        "higher",
        "generation",
        "mean",
        True,
        _TEXT,
        column="chrf",
        description="sentence chrF against the reference, 0-1, averaged",
    ),
    Metric(
        "heldout_rougeL",
        "higher",
        "generation",
        "mean",
        True,
        _TEXT,
        column="rougeL",
        description="ROUGE-L F1 against the reference (CJK-aware tokens), averaged",
    ),
    Metric(
        "heldout_bleu",
        "higher",
        "generation",
        "corpus",
        False,
        _TEXT,
        rankable=False,
        in_table=False,
        column="bleu",
        description="corpus BLEU, 0-1 (no per-example form: not rankable)",
    ),
    Metric(
        "eos_stop_rate",
        "higher",
        "generation",
        "mean",
        True,
        ALL_TASKS,
        binary=True,
        rankable=False,
        column="stopped",
        description="share of answers that ended their turn before the generation budget",
    ),
    Metric(
        "mean_new_tokens",
        "lower",
        "generation",
        "mean",
        True,
        ALL_TASKS,
        rankable=False,
        in_table=False,
        column="new_tokens",
        description="tokens generated per answer (cost; reported, never ranked)",
    ),
    Metric(
        "heldout_loss",
        "lower",
        "loss",
        "token_mean",
        True,
        ALL_TASKS,
        variants="zero_shot",
        column="answer_loss",
        description="mean token cross-entropy of the reference answer",
    ),
    Metric(
        "heldout_perplexity",
        "lower",
        "loss",
        "exp",
        False,
        ALL_TASKS,
        variants="zero_shot",
        rankable=False,
        of="heldout_loss",
        description="exp(heldout_loss); rank on heldout_loss",
    ),
    Metric(
        "heldout_logprob",
        "higher",
        "loss",
        "token_mean",
        True,
        ALL_TASKS,
        variants="zero_shot",
        in_table=False,
        description="-heldout_loss: the same evidence, higher is better",
    ),
    Metric(
        "preference_accuracy",
        "higher",
        "preference",
        "mean",
        True,
        ALL_TASKS,
        variants="tuned",
        binary=True,
        rankable=False,
        description="share of held-out pairs whose implicit reward (vs the base) prefers chosen",
    ),
    Metric(
        "reward_margin",
        "higher",
        "preference",
        "mean",
        True,
        ALL_TASKS,
        variants="tuned",
        rankable=False,
        description="mean implicit reward margin chosen - rejected, beta * log-ratio to the base",
    ),
    Metric(
        "judge_win_rate",
        "higher",
        "judge",
        "mean",
        True,
        ALL_TASKS,
        variants="tuned",
        rankable=False,
        description="LLM judge, pairwise vs the base model's answer, both orders: win 1, tie 0.5, loss 0",
    ),
    Metric(
        "judge_score",
        "higher",
        "judge",
        "mean",
        True,
        ALL_TASKS,
        variants="tuned",
        rankable=False,
        description="LLM judge, graded 1-10 against the reference, scaled to 0-1",
    ),
)
BY_NAME = {m.name: m for m in METRICS}
# eval.judge.mode -> the metric its verdicts make
JUDGE_METRICS = {"pairwise": "judge_win_rate", "graded": "judge_score"}


@dataclass(frozen=True)
class TaskPreset:
    """What `eval.task` picks when `eval.primary_metric` / `eval.guards` are left empty."""

    name: str
    primary: str
    guards: tuple[str, ...]


PRESETS = {
    "extraction": TaskPreset("extraction", "heldout_exact", ("eos_stop_rate", "preference_accuracy")),
    # Free text has no single right answer: exact match is ~0 for every model, so rank on a reference metric.
    "free_text": TaskPreset("free_text", "heldout_chrf", ("eos_stop_rate", "preference_accuracy")),
    "classification": TaskPreset("classification", "heldout_exact", ("eos_stop_rate", "preference_accuracy")),
}


def get(name: str) -> Metric:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(BY_NAME)}") from None


def for_task(task: str) -> list[Metric]:
    return [m for m in METRICS if task in m.tasks]


def rankable(task: str) -> list[str]:
    return [m.name for m in for_task(task) if m.rankable and m.per_example]


def guardable(task: str) -> list[str]:
    return [m.name for m in for_task(task) if m.per_example]


def check_primary(name: str, task: str) -> str:
    """The metric name when it may rank runs of this task; else a ValueError naming the choices."""
    choices = ", ".join(rankable(task))
    if name not in BY_NAME:
        raise ValueError(f"unknown metric {name!r}; choices for eval.task={task}: {choices}")
    metric = BY_NAME[name]
    if task not in metric.tasks:
        raise ValueError(f"{name!r} does not apply to eval.task={task}; choices: {choices}")
    if not (metric.rankable and metric.per_example):
        raise ValueError(f"{name!r} cannot rank runs ({metric.description}); choices for eval.task={task}: {choices}")
    return name


def check_guard(name: str, task: str) -> str:
    choices = ", ".join(guardable(task))
    if name not in BY_NAME:
        raise ValueError(f"unknown metric {name!r}; choices for eval.task={task}: {choices}")
    if task not in BY_NAME[name].tasks or not BY_NAME[name].per_example:
        raise ValueError(f"{name!r} cannot guard eval.task={task}; choices: {choices}")
    return name


def table_metrics(task: str, primary: Optional[str] = None) -> list[str]:
    """The comparison tables' columns for a task, primary metric first."""
    names = [m.name for m in for_task(task) if m.in_table]
    if primary:
        names = [primary] + [n for n in names if n != primary]
    return names


def sources_for(names: Sequence[str]) -> set[str]:
    return {BY_NAME[n].source for n in names}


def aggregate(metric: Metric, values: Sequence[float], weights: Optional[Sequence[float]] = None) -> float:
    """The corpus figure from per-example values: the one function tables, selection and the gate share."""
    if not values:
        return float("nan")
    if metric.aggregate == "token_mean":
        if weights is None:
            raise ValueError(f"{metric.name} is token-weighted; per-example weights are missing")
        total = float(sum(weights))
        return sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")
    if metric.aggregate == "mean":
        return float(sum(values)) / len(values)
    raise ValueError(f"{metric.name} ({metric.aggregate}) has no per-example aggregate")


def aggregate_all(
    per_example: dict[str, list[float]], weights: dict[str, list[float]], corpus: Optional[dict[str, float]] = None
) -> dict[str, float]:
    """Every metric the per-example scores (and corpus figures) give, in registry order."""
    out: dict[str, float] = {}
    for metric in METRICS:
        if metric.per_example and metric.name in per_example:
            out[metric.name] = aggregate(metric, per_example[metric.name], weights.get(metric.name))
        elif metric.aggregate == "corpus" and corpus and metric.name in corpus:
            out[metric.name] = float(corpus[metric.name])
        elif metric.aggregate == "exp" and metric.of in out:
            out[metric.name] = math.exp(min(out[metric.of], 50.0))
    return out


def better(metric: Metric, a: float, b: float) -> bool:
    """a strictly better than b in the metric's direction."""
    return (a - b) * metric.sign > 0
