"""ROUGE-L F1 (rouge-score) with a tokenizer that keeps Japanese, as an `evaluate.Metric`.

rouge-score's default tokenizer lowercases and replaces everything outside [a-z0-9] with spaces, so
a Japanese answer becomes zero tokens and scores 0 against anything. Here text is NFKC-normalized
and lowercased, CJK characters (kana, kanji, hangul) are one token each, since those scripts put no
spaces between words, and other text is split into runs of word characters; punctuation is dropped,
as in the default tokenizer.

`eos_token` (a marker or a list of them) cuts each prediction at its first marker, so the metric
combines with `eos_stop` under `evaluate.combine`, which forwards the same keywords to every module.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import datasets
import evaluate
from rouge_score import rouge_scorer, tokenizers

from ._text import CJK_CHARS, EosMarker, cut_at_eos

_DESCRIPTION = """\
ROUGE-L F1 (longest common subsequence of tokens) per example, averaged over examples. Tokens are
single characters for CJK scripts and words elsewhere, so Japanese and English answers both score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers, special tokens may be kept.
    references (list of str): expected answers.
    eos_token (str or list of str, optional): end-of-turn marker(s); predictions are cut at the first.
Returns:
    rougeL: mean ROUGE-L F1 in [0, 1].
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = {ROUGE: A Package for Automatic Evaluation of Summaries},
    author = {Lin, Chin-Yew},
    booktitle = {Text Summarization Branches Out},
    year = {2004},
    publisher = {Association for Computational Linguistics},
    pages = {74--81},
}
"""

_TOKEN_RE = re.compile(f"[{CJK_CHARS}]|(?:(?![{CJK_CHARS}])\\w)+")


class CjkAwareTokenizer(tokenizers.Tokenizer):
    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def rouge_l_f1(prediction: str, reference: str, eos_token: EosMarker = None) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CjkAwareTokenizer())
    return scorer.score(reference, cut_at_eos(prediction, eos_token))["rougeL"].fmeasure


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(
        self, predictions: list[str], references: list[str], eos_token: EosMarker = None, **_other_metrics_kwargs: Any
    ) -> dict[str, float]:
        # **_other_metrics_kwargs: evaluate.combine forwards every keyword to every module.
        scores = [rouge_l_f1(p, r, eos_token) for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / max(len(scores), 1)}
