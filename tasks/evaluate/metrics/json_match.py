"""Exact match and field accuracy of structured (JSON) answers, as an `evaluate.Metric`.

A reference that is a JSON object (optionally inside a ```json fence) is compared with the first JSON
object found in the prediction, canonically: key order and number spelling (1 vs 1.0) do not matter,
strings compare after NFKC + whitespace normalization, true is not 1. Any other reference is
compared as text after the same normalization.

Predictions may be decoded with special tokens kept; pass `eos_token` (a marker or a list of them)
and each prediction is cut at its first marker before scoring, so the metric combines with
`eos_stop` under `evaluate.combine`, which hands every module the same keyword arguments.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import datasets
import evaluate

from ftflow.tasks.text import normalize_text

from ._text import EosMarker, cut_at_eos

_DESCRIPTION = """\
exact_match: share of predictions equal to their reference (JSON objects canonically, text after
normalization). field_accuracy: per example, the share of the reference object's top-level keys
whose values the prediction matches (a text reference counts as one field), averaged.
json_valid: share of predictions that contain a parseable JSON object.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers, special tokens may be kept.
    references (list of str): expected answers (JSON object text or plain text).
    eos_token (str or list of str, optional): end-of-turn marker(s); predictions are cut at the first.
Returns:
    exact_match, field_accuracy, json_valid: floats in [0, 1].
Examples:
    >>> m = evaluate.load("tasks/metrics/json_match.py")
    >>> m.compute(predictions=['{"a": 1}<|im_end|>'], references=['{"a": 1.0}'], eos_token="<|im_end|>")
    {'exact_match': 1.0, 'field_accuracy': 1.0, 'json_valid': 1.0}
"""

_CITATION = """\
@misc{ftflow_json_match, title={ftflow json_match metric}, note={exact match of parsed JSON objects}}
"""

_DECODER = json.JSONDecoder()


def first_json_object(text: str) -> Optional[dict[str, Any]]:
    """The first `{...}` in `text` that parses as a JSON object, wherever it sits (prose, fences)."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def reference_object(reference: str) -> Optional[dict[str, Any]]:
    """The reference as a JSON object when the whole reference is one; None means compare as text."""
    text = reference.strip()
    if text.startswith("```"):
        # A fenced reference: drop the opening line (```json) and the closing fence.
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rstrip().removesuffix("```")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _same_text(a: str, b: str) -> bool:
    # Case stays significant: "Tokyo" for "tokyo" is a wrong answer, unlike a full-width letter.
    return normalize_text(a, casefold=False) == normalize_text(b, casefold=False)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values that ignores spelling but not type (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return _same_text(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return a is None and b is None


def score_example(prediction: str, reference: str, eos_token: EosMarker = None) -> dict[str, Any]:
    """exact_match (bool), field_accuracy (float) and json_valid (bool) of one generation."""
    answer = cut_at_eos(prediction, eos_token)
    predicted = first_json_object(answer)
    expected = reference_object(reference)
    if expected is None:
        exact = _same_text(answer, reference)
        return {"exact_match": exact, "field_accuracy": float(exact), "json_valid": predicted is not None}
    exact = predicted is not None and json_equal(predicted, expected)
    if not expected:
        fields = float(exact)  # an empty object has no fields: all or nothing
    elif predicted is None:
        fields = 0.0
    else:
        hits = sum(1 for k, v in expected.items() if k in predicted and json_equal(predicted[k], v))
        fields = hits / len(expected)
    return {"exact_match": exact, "field_accuracy": fields, "json_valid": predicted is not None}


class JsonMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], eos_token: EosMarker = None, **_other_metrics_kwargs: Any
    ) -> dict[str, float]:
        # **_other_metrics_kwargs: evaluate.combine forwards every keyword to every module.
        scores = [score_example(p, r, eos_token) for p, r in zip(predictions, references)]
        n = max(len(scores), 1)
        return {
            "exact_match": sum(float(s["exact_match"]) for s in scores) / n,
            "field_accuracy": sum(s["field_accuracy"] for s in scores) / n,
            "json_valid": sum(float(s["json_valid"]) for s in scores) / n,
        }
