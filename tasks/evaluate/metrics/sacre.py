"""Corpus BLEU and sentence-averaged chrF (sacrebleu), on a 0-1 scale, as an `evaluate.Metric`.

sacrebleu reports 0-100; both are divided by 100 so every ftflow metric lies in [0, 1] and they share
an axis in MLflow's compare view.

chrF is the mean of sentence-level chrF, not sacrebleu's corpus chrF: a metric the gate ranks on must
have one score per example (the paired bootstrap resamples examples), and the table must show the
average of those very scores. Sentence BLEU is unreliable on short answers, so BLEU stays a corpus
statistic, reported but never ranked (see registry.py).

BLEU's tokenizer decides what a "word" is, and one tokenizer must serve the whole corpus. The
offline-capable choices are "13a", "intl" and "char" ("ja-mecab" needs MeCab and its dictionary;
"spm"/"flores" download a model). Japanese has no spaces, so "13a"/"intl" turn a Japanese sentence
into a single token and BLEU is 0 for anything short of a perfect copy. Hence: "char" when any
reference contains CJK text, otherwise "intl" (13a plus Unicode-aware punctuation and symbol
splitting). Pass `bleu_tokenize=` to force one; keep it fixed when comparing runs, since BLEU
values under different tokenizers are not comparable. chrF works on characters and needs no choice.

`eos_token` (a marker or a list of them) cuts each prediction at its first marker, so the metric
combines with `eos_stop` under `evaluate.combine`, which forwards the same keywords to every module.
"""

from __future__ import annotations

from typing import Any, Optional

import datasets
import evaluate
from sacrebleu.metrics import BLEU, CHRF

from ._text import EosMarker, cut_at_eos, has_cjk

_DESCRIPTION = """\
Corpus-level BLEU (sacrebleu; "char" tokenization when references contain CJK text, "intl"
otherwise) and the mean of sentence chrF (character 6-grams, beta 2), both divided by 100 to lie in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers, special tokens may be kept.
    references (list of str): one expected answer per prediction.
    eos_token (str or list of str, optional): end-of-turn marker(s); predictions are cut at the first.
    bleu_tokenize (str, optional): force a sacrebleu tokenizer ("intl", "char", "13a", ...).
Returns:
    bleu, chrf: floats in [0, 1].
"""

_CITATION = """\
@inproceedings{post-2018-call,
    title = {A Call for Clarity in Reporting {BLEU} Scores},
    author = {Post, Matt},
    booktitle = {Proceedings of the Third Conference on Machine Translation: Research Papers},
    year = {2018},
    pages = {186--191},
}
@inproceedings{popovic-2015-chrf,
    title = {chr{F}: character n-gram {F}-score for automatic {MT} evaluation},
    author = {Popovi{\\'c}, Maja},
    booktitle = {Proceedings of the Tenth Workshop on Statistical Machine Translation},
    year = {2015},
    pages = {392--395},
}
"""


def bleu_tokenizer_for(references: list[str]) -> str:
    return "char" if any(has_cjk(r) for r in references) else "intl"


def chrf_sentence(prediction: str, reference: str, eos_token: EosMarker = None) -> float:
    """chrF of one answer against its reference, 0-1; the answer is cut at its end-of-turn marker."""
    return CHRF().sentence_score(cut_at_eos(prediction, eos_token).strip(), [reference.strip()]).score / 100.0


class Sacre(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W18-6319", "https://aclanthology.org/W15-3049"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        eos_token: EosMarker = None,
        bleu_tokenize: Optional[str] = None,
        **_other_metrics_kwargs: Any,
    ) -> dict[str, float]:
        # **_other_metrics_kwargs: evaluate.combine forwards every keyword to every module.
        hypotheses = [cut_at_eos(p, eos_token).strip() for p in predictions]
        references = [r.strip() for r in references]
        bleu = BLEU(tokenize=bleu_tokenize or bleu_tokenizer_for(references))
        chrf = CHRF()
        sentences = [chrf.sentence_score(h, [r]).score / 100.0 for h, r in zip(hypotheses, references)]
        return {
            "bleu": bleu.corpus_score(hypotheses, [references]).score / 100.0,
            "chrf": sum(sentences) / max(len(sentences), 1),
        }
