"""Language identification with py3langid's own model, vectorized over many rows at once.

py3langid's model is a byte n-gram DFA plus naive Bayes; here the DFA is walked for a whole chunk of
rows in lockstep and the scores are one sparse matrix product, with the same features and scores as
py3langid's classify(norm_probs=True) on the same window of text.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftflow.tasks.data.rows import conversation

LANGUAGE_WINDOW_BYTES = 256  # the first 256 UTF-8 bytes of user+assistant text decide the language
LANGUAGE_MIN_BYTES = 24  # below this much text the guess is noise: reported as "und", kept
LANGUAGE_MIN_PROBABILITY = 0.5  # a disallowed language must be at least this sure to drop a row
LANGUAGE_CHUNK_ROWS = 4096  # keeps the per-chunk feature matrix (4 MB) in cache for the transpose
# A sane candidate set: common languages with real training data. py3langid's full 142-class
# set labels short English as Latin, Occitan or Serbian now and then, which would drop good rows.
DETECTABLE_LANGUAGES = (
    "ar",
    "bg",
    "cs",
    "da",
    "de",
    "el",
    "en",
    "es",
    "fa",
    "fi",
    "fr",
    "he",
    "hi",
    "hu",
    "id",
    "it",
    "ja",
    "ko",
    "nl",
    "no",
    "pl",
    "pt",
    "ro",
    "ru",
    "sv",
    "th",
    "tr",
    "uk",
    "vi",
    "zh",
)
# JSON punctuation and digits carry no language signal; braces and quotes would only dilute it.
_LANGUAGE_NOISE = str.maketrans({c: " " for c in '{}[]":,0123456789\\/<>|_=*#`'})


def language_text(row: dict[str, Any]) -> str:
    """The text a row's language is judged on: its user and assistant turns and, for a pair, the
    chosen answer only (the rejected one may be junk)."""
    parts = [m["content"] for m in conversation(row) if m["role"] != "system"]
    if "chosen" in row:
        parts.append(row["chosen"])
    return "\n".join(parts)


@dataclass(frozen=True)
class _LanguageModel:
    nextmove: np.ndarray  # flat DFA transition table, indexed by rowbase[state] + byte
    rowbase: np.ndarray  # state → offset of its 256-entry row
    output: np.ndarray  # state → feature id, or -1
    ptc: np.ndarray  # (features, columns) log P(feature | class), float32
    pc: np.ndarray  # (columns,) log prior
    column_label: np.ndarray  # column → index into labels (a language can own several columns)
    labels: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def _language_model(languages: tuple[str, ...]) -> _LanguageModel:
    # Cached because unpacking py3langid's model takes ~0.7 s; the cached value is never mutated.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE)
    unknown = set(languages) - set(ident.nb_classes)
    if unknown:
        raise ValueError(f"quality.languages: py3langid does not know {sorted(unknown)}")
    columns = [i for i, c in enumerate(ident.nb_classes) if c in languages]
    labels = tuple(dict.fromkeys(ident.nb_classes[i] for i in columns))
    return _LanguageModel(
        # Views on py3langid's own arrays: the 9.8M-entry transition table is not copied.
        nextmove=np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode)),
        rowbase=np.frombuffer(ident.tk_row, dtype=np.dtype(ident.tk_row.typecode)).astype(np.int64) << 8,
        output=np.asarray(ident.tk_output, dtype=np.int32),
        ptc=np.ascontiguousarray(ident.nb_ptc[:, columns], dtype=np.float32),
        pc=np.asarray(ident.nb_pc[columns], dtype=np.float32),
        column_label=np.array([labels.index(ident.nb_classes[i]) for i in columns]),
        labels=labels,
    )


_KANA = re.compile(r"[\u3040-\u30ff]")


def _language_bytes(text: str) -> bytes:
    # Twice the window in characters is plenty once noise is removed, and bounds the work per row.
    text = " ".join(text[: 2 * LANGUAGE_WINDOW_BYTES].translate(_LANGUAGE_NOISE).split())
    if text.isupper():
        text = text.lower()  # as py3langid does: all-caps text scores like no language
    return unicodedata.normalize("NFC", text).encode("utf-8", "surrogatepass")[:LANGUAGE_WINDOW_BYTES]


def detect_languages(texts: list[str], candidates: tuple[str, ...] = DETECTABLE_LANGUAGES) -> list[tuple[str, float]]:
    """(language, probability) per text with py3langid's model over `candidates`; "und" when the
    text (JSON punctuation and digits removed, first LANGUAGE_WINDOW_BYTES bytes) is too short to tell.

    Same features and scores as py3langid's classify(norm_probs=True) on that window, computed for
    all texts at once: the DFA is stepped for every text in lockstep (one numpy gather per byte
    position) and the naive Bayes scores are one sparse product."""
    from scipy.sparse import csr_matrix

    model = _language_model(tuple(sorted(set(candidates))))
    result: list[tuple[str, float]] = [("und", 0.0)] * len(texts)
    for start in range(0, len(texts), LANGUAGE_CHUNK_ROWS):
        encoded = [_language_bytes(t) for t in texts[start : start + LANGUAGE_CHUNK_ROWS]]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        # Longest first, so the rows still walking at byte t are always a prefix.
        order = np.argsort(-lengths, kind="stable")
        lengths = lengths[order]
        width = int(lengths[0]) if len(lengths) else 0
        if width == 0:
            continue
        matrix = np.frombuffer(b"".join(encoded[i].ljust(width, b"\0") for i in order.tolist()), dtype=np.uint8)
        matrix = matrix.reshape(len(encoded), width)
        active_rows = np.searchsorted(-lengths, -np.arange(1, width + 1), side="right")
        state = np.zeros(len(encoded), dtype=np.int64)
        features = np.full((width, len(encoded)), -1, dtype=np.int32)
        for t in range(width):
            active = int(active_rows[t])
            state[:active] = model.nextmove[model.rowbase[state[:active]] + matrix[:active, t]]
            features[t, :active] = model.output[state[:active]]
        # Count each feature per row: sort each row's features, then measure the runs of equal ones.
        by_row = np.sort(np.ascontiguousarray(features.T), axis=1).ravel()
        hit = np.flatnonzero(by_row >= 0)
        feature, row = by_row[hit], hit // width
        run_start = np.flatnonzero(np.concatenate(([True], (feature[1:] != feature[:-1]) | (row[1:] != row[:-1]))))
        run_length = np.diff(np.append(run_start, len(hit))).astype(np.float32)
        indptr = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row[run_start], minlength=len(encoded)), out=indptr[1:])
        counts = csr_matrix((run_length, feature[run_start], indptr), shape=(len(encoded), model.ptc.shape[0]))
        np.log1p(counts.data, out=counts.data)
        scores = np.asarray(counts @ model.ptc) + model.pc
        scores *= (1.0 / np.sqrt(np.maximum(lengths, 1)))[:, None]
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        per_label = np.zeros((len(encoded), len(model.labels)), dtype=np.float32)
        np.add.at(per_label.T, model.column_label, scores.T)
        best = per_label.argmax(axis=1)
        probability = per_label[np.arange(len(encoded)), best]
        for i, original in enumerate(order.tolist()):
            if lengths[i] >= LANGUAGE_MIN_BYTES:
                result[start + original] = (model.labels[best[i]], float(probability[i]))
    # Kanji-heavy Japanese scores as Chinese on byte n-grams, but Chinese never writes kana: the script decides.
    if "ja" in model.labels:
        for i, (lang, p) in enumerate(result):
            if lang == "zh" and _KANA.search(texts[i]):
                result[i] = ("ja", p)
    return result
