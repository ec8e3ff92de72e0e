"""The project's evaluation metrics, as local `evaluate` modules that load without the Hub.

`evaluate.load("rouge")` fetches a script from the Hugging Face Hub and fails offline, so each metric
here is an `evaluate.Metric` subclass in its own file, loaded by path: `evaluate.load` copies a local
script (and its relative imports) into the modules cache and imports it, with no network call.

    json_match  exact_match, field_accuracy, json_valid
    rouge_l     rougeL (CJK-aware tokens)
    sacre       bleu (corpus), chrf (sentence mean) (0-1 scale)
    eos_stop    eos_stop_rate

All scores lie in [0, 1]. Predictions are generations decoded with special tokens kept; every module
takes `eos_token` and the text metrics cut each prediction at its first marker, so the combined
suite takes one `compute(predictions=..., references=..., eos_token=...)` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import evaluate

from ftflow.tasks.evaluate.metrics._text import EosMarker
from ftflow.tasks.evaluate.metrics.eos_stop import stopped_flags
from ftflow.tasks.evaluate.metrics.json_match import score_example
from ftflow.tasks.evaluate.metrics.rouge_l import rouge_l_f1
from ftflow.tasks.evaluate.metrics.sacre import chrf_sentence

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("json_match", "rouge_l", "sacre", "eos_stop")
# The keys score_generations always returns, in a fixed order, so every run logs the same metrics.
SCORE_KEYS = ("exact_match", "field_accuracy", "json_valid", "rougeL", "bleu", "chrf", "eos_stop_rate")


def metric_path(name: str) -> Path:
    path = METRICS_DIR / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(METRIC_NAMES)}")
    return path


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One shipped metric, loaded by local path (never from the Hub).

    keep_in_memory: predictions stay in RAM instead of an Arrow file under ~/.cache, so concurrent
    evaluations (Prefect threads, sweep arms) never contend for cache-file locks.
    """
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def load_suite(names: Sequence[str] = METRIC_NAMES) -> evaluate.CombinedEvaluations:
    return evaluate.combine([load_metric(name) for name in names])


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no generations to score")


def score_generations(
    predictions: list[str],
    references: list[str],
    eos_token: EosMarker,
    *,
    stopped: Optional[Sequence[bool]] = None,
    suite: Optional[evaluate.CombinedEvaluations] = None,
) -> dict[str, float]:
    """Corpus scores under the stable keys of SCORE_KEYS.

    Pass a `suite` from `load_suite()` to reuse loaded modules across models (loading takes a
    second or so; a suite holds per-call state, so one per thread); `stopped` overrides the marker
    search for eos_stop_rate (see eos_stop.py).
    """
    _check_lengths(predictions, references)
    suite = suite if suite is not None else load_suite()
    kwargs: dict[str, Any] = {"eos_token": eos_token}
    if stopped is not None:
        kwargs["stopped"] = list(stopped)
    results = suite.compute(predictions=list(predictions), references=list(references), **kwargs)
    missing = [k for k in SCORE_KEYS if k not in results]
    if missing:
        raise ValueError(f"the metric suite did not produce {missing}; build it with load_suite()")
    return {k: float(results[k]) for k in SCORE_KEYS}


def per_example_scores(
    predictions: list[str],
    references: list[str],
    eos_token: EosMarker,
    *,
    stopped: Optional[Sequence[bool]] = None,
) -> list[dict[str, Any]]:
    """One row per generation for the predictions table: exact_match, field_accuracy, json_valid,
    rougeL, chrf and stopped. Same functions as the corpus metrics, so the rows average to them (all but
    BLEU, a corpus statistic); registry.py maps these columns to the eval/ metric names."""
    _check_lengths(predictions, references)
    flags = stopped_flags(predictions, eos_token, stopped)
    rows = []
    for prediction, reference, stop in zip(predictions, references, flags):
        row: dict[str, Any] = score_example(prediction, reference, eos_token)
        row["rougeL"] = rouge_l_f1(prediction, reference, eos_token)
        row["chrf"] = chrf_sentence(prediction, reference, eos_token)
        row["stopped"] = stop
        rows.append(row)
    return rows
