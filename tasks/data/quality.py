"""Row-level quality checks: every dropped row gets a machine-readable reason.

Checks run cheapest first and a row is dropped for its first failing reason:

    malformed → empty_content → role_order → chosen_equals_rejected (pairs only)
    → too_short / too_long → exact_duplicate → near_duplicate → language → pii (when cfg.pii == "drop")

Each check only sees the rows that passed the checks before it, so "duplicate of an earlier kept row"
means an earlier row that passed every check up to that point (the first copy is kept).
Kept rows may carry flags instead: `pii` (cfg.pii == "flag") and, for preference pairs,
`duplicate_prompt` (several pairs per prompt are legitimate DPO data, so it is counted, not dropped).

Speed matters (the bench wants 10k rows/s on 2 cores), so the two heavy checks are vectorized:
- near-duplicates: one-permutation MinHash with rotation densification over character 4-gram
  shingles (Japanese has no spaces), hashed with numpy over a whole chunk of rows at once, then LSH
  banding with the band/row split datasketch picks for the threshold. Only rows that share a band
  with another row are compared, by the exact Jaccard of their shingle sets.
- language: py3langid's own model (byte n-gram DFA + naive Bayes), with the DFA walked for a whole
  chunk of rows in lockstep and the scores computed as one sparse matrix product.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.rows import Dropped, Kind, Record

TokenLength = Callable[[list[dict]], list[int]]

# Reasons in check order (a row is dropped for the first that applies).
REASONS = (
    "malformed",
    "empty_content",
    "role_order",
    "chosen_equals_rejected",
    "too_short",
    "too_long",
    "exact_duplicate",
    "near_duplicate",
    "language",
    "pii",
)
FLAGS = ("pii", "duplicate_prompt")

TOKEN_BATCH_ROWS = 2048
NUM_PERM = 64                 # one-permutation MinHash bins; a power of two
SHINGLE_CHARS = 4             # short enough that one edited character changes few shingles
MINHASH_SEED = 1
SIGNATURE_CHUNK_ROWS = 4096   # bounds the uint64 temporaries to a few tens of MB
LANGUAGE_WINDOW_BYTES = 256   # the first 256 UTF-8 bytes of user+assistant text decide the language
LANGUAGE_MIN_BYTES = 24       # below this much text the guess is noise: reported as "und", kept
LANGUAGE_MIN_PROBABILITY = 0.5  # a disallowed language must be at least this sure to drop a row
LANGUAGE_CHUNK_ROWS = 4096    # keeps the per-chunk feature matrix (4 MB) in cache for the transpose
# A sane candidate set: common languages with real training data. py3langid's full 142-class
# set labels short English as Latin, Occitan or Serbian now and then, which would drop good rows.
DETECTABLE_LANGUAGES = (
    "ar", "bg", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hu", "id", "it",
    "ja", "ko", "nl", "no", "pl", "pt", "ro", "ru", "sv", "th", "tr", "uk", "vi", "zh",
)

_MASK64 = (1 << 64) - 1
_EMPTY_BIN = np.uint64(_MASK64)
_BIN_BITS = NUM_PERM.bit_length() - 1
_VALUE_MASK = np.uint64((1 << (64 - _BIN_BITS)) - 1)

_EMAIL = re.compile(r"[a-z0-9][a-z0-9._%+\-]*@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}", re.IGNORECASE)
_DASH = r"[\-‐‑‒–—−]"
_PHONES = (
    # Japanese landline / mobile / free dial: 03-1234-5678, 090-1234-5678, 0120-123-456, (03)1234-5678
    re.compile(rf"(?<![\d\-])\(?0\d{{1,4}}\)?(?:{_DASH}|\)|\s)\d{{1,4}}{_DASH}\d{{3,4}}(?![\d\-])"),
    # Japanese mobile without separators: 09012345678
    re.compile(r"(?<!\d)0[5789]0\d{8}(?!\d)"),
    # International: +81 90-1234-5678, +1 (415) 555-0100, +44 20 7946 0958
    re.compile(rf"(?<![\w+])\+\d{{1,3}}(?:[\s.]|{_DASH})?\(?\d{{1,4}}\)?(?:(?:[\s.]|{_DASH})?\d{{2,4}}){{2,4}}(?!\d)"),
    # North American: (415) 555-0100, 415-555-0100, 415.555.0100
    re.compile(rf"(?<![\d\-])(?:\(\d{{3}}\)\s?|\d{{3}}[.\-])\d{{3}}[.\-]\d{{4}}(?![\d\-])"),
)
_DIGIT = re.compile(r"\d")
_CARD = re.compile(r"(?<!\d)(?:\d[ \-]?){12,18}\d(?!\d)")
# JSON punctuation and digits carry no language signal; braces and quotes would only dilute it.
_LANGUAGE_NOISE = str.maketrans({c: " " for c in '{}[]":,0123456789\\/<>|_=*#`'})


@dataclass
class QualityResult:
    kind: Kind
    kept: list[Record]
    dropped: list[Dropped]
    counts_in: int
    reasons: dict[str, int] = field(default_factory=dict)      # dropped rows per reason
    flags: dict[str, int] = field(default_factory=dict)        # kept-but-flagged rows per flag (e.g. pii)
    token_lengths: list[int] = field(default_factory=list)     # of kept rows, after the chat template
    stats: dict[str, Any] = field(default_factory=dict)        # e.g. length_bias for preference pairs

    @property
    def kept_ratio(self) -> float:
        return len(self.kept) / self.counts_in if self.counts_in else 0.0

    @property
    def dropped_fraction(self) -> float:
        return len(self.dropped) / self.counts_in if self.counts_in else 0.0


# ----------------------------------------------------------------------------- text helpers


def normalize_text(s: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def luhn_valid(digits: str) -> bool:
    """Luhn checksum of a digit string (the check every payment card number passes)."""
    if not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if position % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def pii_kinds(text: str) -> list[str]:
    """Kinds of personal data found in `text`: "email", "phone", "card" (Luhn-checked 13-19 digits)."""
    text = unicodedata.normalize("NFKC", text)  # full-width digits and ＠ become ASCII
    found = []
    if "@" in text and _EMAIL.search(text):
        found.append("email")
    if not _DIGIT.search(text):
        return found
    cards = [m for m in _CARD.finditer(text) if luhn_valid(re.sub(r"[ \-]", "", m.group()))]
    if cards:
        found.append("card")
    for pattern in _PHONES:
        # A card number's digit groups must not also count as a phone number.
        if any(not any(c.start() <= m.start() < c.end() for c in cards) for m in pattern.finditer(text)):
            found.append("phone")
            break
    return found


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return row["messages"] if "messages" in row else row["prompt"]


def _normalized_views(row: dict[str, Any]) -> tuple[str, str]:
    """(whole row, conversation) after normalize_text, each message normalized once.

    The whole row (roles included) keys exact duplicates and is scanned for PII. The conversation
    (user and assistant turns, no system turn) is what near-duplicates are judged on: a system
    prompt shared by every row would otherwise make all short rows look alike."""
    parts = [(m["role"], normalize_text(m["content"])) for m in _messages(row)]
    if "chosen" in row:
        parts += [("chosen", normalize_text(row["chosen"])), ("rejected", normalize_text(row["rejected"]))]
    whole = "\x1e".join(f"{role}\x1f{text}" for role, text in parts)
    return whole, " ".join(text for role, text in parts if role != "system")


def _language_text(row: dict[str, Any]) -> str:
    # User and assistant turns; for a pair the chosen answer only (the rejected one may be junk).
    parts = [m["content"] for m in _messages(row) if m["role"] != "system"]
    if "chosen" in row:
        parts.append(row["chosen"])
    return "\n".join(parts)


def _user_text(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in _messages(row) if m["role"] == "user")


# ----------------------------------------------------------------------------- structural checks


def _malformed(row: Any, kind: Kind) -> Optional[str]:
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    key = "messages" if kind == "sft" else "prompt"
    msgs = row.get(key)
    if not isinstance(msgs, list):
        return f"missing {key!r} list"
    for j, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} lacks a string 'role' and 'content'"
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                return f"missing string {key!r}"
    return None


def _empty_content(row: dict[str, Any], kind: Kind) -> Optional[str]:
    msgs = _messages(row)
    if not msgs:
        return "no messages" if kind == "sft" else "empty prompt"
    for j, m in enumerate(msgs, 1):
        content = m["content"]
        if not content or content.isspace():
            return f"message {j} ({m['role']}) is empty"
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if not row[key] or row[key].isspace():
                return f"{key} is empty"
    return None


def _role_order(row: dict[str, Any], kind: Kind) -> Optional[str]:
    roles = [m["role"] for m in _messages(row)]
    start = 1 if roles[0] == "system" else 0
    expected = "user"
    for j in range(start, len(roles)):
        if roles[j] != expected:
            return f"message {j + 1}: expected {expected!r}, got {roles[j]!r}"
        expected = "assistant" if expected == "user" else "user"
    if kind == "sft" and roles[-1] != "assistant":
        return "conversation must end with an assistant turn"
    if kind == "preference" and roles[-1] != "user":
        return "prompt must end with a user turn"
    return None


def _chosen_equals_rejected(row: dict[str, Any], kind: Kind) -> Optional[str]:
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical"
    if normalize_text(row["chosen"]) == normalize_text(row["rejected"]):
        return "chosen and rejected are identical after normalization"
    return None


# ----------------------------------------------------------------------------- token length


def estimate_token_lengths(rows: list[dict]) -> list[int]:
    """Tokenizer-free estimate: ~4 ASCII characters or 1 other character per token, +4 per turn."""
    out = []
    for row in rows:
        msgs = _messages(row)
        texts = [m["content"] for m in msgs]
        if "chosen" in row:
            texts.append(max(row["chosen"], row["rejected"], key=len))
        total = 4 * (len(texts) + 1)
        for text in texts:
            ascii_chars = len(text.encode("ascii", "ignore"))
            total += ascii_chars // 4 + (len(text) - ascii_chars)
        out.append(total)
    return out


def chat_token_lengths(tokenizer: Any) -> TokenLength:
    """A batched `token_length` for run_quality: tokens after the tokenizer's chat template.

    A preference pair counts as its longer completion (prompt + chosen or prompt + rejected),
    which is what DPO's max_length has to hold."""
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def lengths(rows: list[dict]) -> list[int]:
        conversations, owner = [], []
        for i, row in enumerate(rows):
            if "messages" in row:
                conversations.append(row["messages"])
                owner.append(i)
            else:
                for completion in (row["chosen"], row["rejected"]):
                    conversations.append([*row["prompt"], {"role": "assistant", "content": completion}])
                    owner.append(i)
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # Skips offsets and attention masks: only the count is needed.
            counts = [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        out = [0] * len(rows)
        for i, n in zip(owner, counts):
            out[i] = max(out[i], n)
        return out

    return lengths


# ----------------------------------------------------------------------------- MinHash + LSH


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place: a bijection that spreads every input bit over the word."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _padded(text: str) -> str:
    # A text shorter than one shingle is one shingle (NUL-padded, so it cannot equal a real 4-gram).
    return text if len(text) >= SHINGLE_CHARS else text + "\0" * (SHINGLE_CHARS - len(text))


def shingles(text: str) -> set[str]:
    """Character SHINGLE_CHARS-grams, the sets whose Jaccard similarity near-duplicates are judged by."""
    text = _padded(text)
    return {text[i:i + SHINGLE_CHARS] for i in range(len(text) - SHINGLE_CHARS + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def _shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every shingle of every text (in order) and the text each belongs to.

    All texts are hashed in one vectorized pass over their concatenated code points; a shingle's
    hash is a random linear combination of its code points, scrambled by splitmix64."""
    n = SHINGLE_CHARS
    multipliers = np.random.default_rng(MINHASH_SEED).integers(1, 1 << 63, size=n, dtype=np.uint64) | np.uint64(1)
    padded = [_padded(t) for t in texts]
    lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
    codes = np.frombuffer("".join(padded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    span = len(codes) - n + 1
    h = codes[:span] * multipliers[0]
    for j in range(1, n):
        h += codes[j:j + span] * multipliers[j]
    _mix64(h)
    # Keep the shingles that start and end inside one text.
    counts = lengths - n + 1
    owner = np.repeat(np.arange(len(padded), dtype=np.int64), counts)
    shift = (np.cumsum(lengths) - lengths) - (np.cumsum(counts) - counts)
    return h[np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(shift, counts)], owner


def minhash_signatures(texts: list[str]) -> np.ndarray:
    """(len(texts), NUM_PERM) uint64 one-permutation MinHash signatures of the texts' shingle sets.

    Each shingle is hashed once; the top bits pick one of NUM_PERM bins and the rest is the value,
    each bin keeping its minimum. Empty bins borrow from the next non-empty one (rotation
    densification), tagged with the distance so borrowed and genuine minima never collide.
    The fraction of equal bins estimates Jaccard similarity like a NUM_PERM-permutation MinHash."""
    out = np.empty((len(texts), NUM_PERM), dtype=np.uint64)
    for start in range(0, len(texts), SIGNATURE_CHUNK_ROWS):
        chunk = texts[start:start + SIGNATURE_CHUNK_ROWS]
        h, owner = _shingle_hashes(chunk)
        bins = (h >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
        sig = np.full(len(chunk) * NUM_PERM, _EMPTY_BIN, dtype=np.uint64)
        np.minimum.at(sig, owner * NUM_PERM + bins, h & _VALUE_MASK)
        out[start:start + len(chunk)] = _densify(sig.reshape(len(chunk), NUM_PERM))
    return out


def _shingle_sets(texts: list[str]) -> list[np.ndarray]:
    """Sorted distinct shingle hashes per text: exact Jaccard without building Python sets of strings."""
    h, owner = _shingle_hashes(texts)
    bounds = np.searchsorted(owner, np.arange(1, len(texts)))
    return [np.unique(part) for part in np.split(h, bounds)]


def _set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def _densify(sig: np.ndarray) -> np.ndarray:
    empty = sig == _EMPTY_BIN
    rows = np.flatnonzero(empty.any(axis=1))
    if not len(rows):
        return sig
    k = NUM_PERM
    doubled = np.concatenate([empty[rows], empty[rows]], axis=1)
    index = np.where(doubled, 2 * k, np.arange(2 * k))
    next_full = np.minimum.accumulate(index[:, ::-1], axis=1)[:, ::-1][:, :k]
    distance = (next_full - np.arange(k)).astype(np.uint64)
    borrowed = np.take_along_axis(sig[rows], next_full % k, axis=1)
    sig[rows] = borrowed | (distance << np.uint64(64 - _BIN_BITS))
    return sig


@functools.lru_cache(maxsize=16)
def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold and NUM_PERM."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


def _band_keys(sig: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, bands) uint64: one hash per LSH band; rows sharing a band key are candidates."""
    bands, per_band = lsh_bands(threshold)
    multipliers = np.random.default_rng(MINHASH_SEED + 1).integers(1, 1 << 63, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    for b in range(bands):
        cols = slice(b * per_band, (b + 1) * per_band)
        keys[:, b] = _mix64((sig[:, cols] * multipliers[cols]).sum(axis=1, dtype=np.uint64) + np.uint64(b))
    return keys


def near_duplicates(texts: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """Position → (earlier kept position, Jaccard) for each text that is a near-duplicate of an earlier
    kept one. Texts are compared in order, and a text found to be a duplicate is not kept, so it never
    becomes the reference for a later one."""
    if len(texts) < 2:
        return {}
    keys = _band_keys(minhash_signatures(texts), threshold)
    colliding = np.zeros(len(texts), dtype=bool)
    for b in range(keys.shape[1]):
        _, inverse, counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        colliding |= counts[inverse] > 1
    # Only rows that share some band with another row can be near-duplicates; walk those in order.
    walk = np.flatnonzero(colliding)
    sets = dict(zip(walk.tolist(), _shingle_sets([texts[p] for p in walk.tolist()])))
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    found: dict[int, tuple[int, float]] = {}
    for pos, row_keys in zip(walk.tolist(), keys[walk].tolist()):
        candidates = {c for b, key in enumerate(row_keys) for c in buckets[b].get(key, ())}
        best: Optional[tuple[int, float]] = None
        for c in sorted(candidates):
            sim = _set_jaccard(sets[pos], sets[c])
            if sim >= threshold and (best is None or sim > best[1]):
                best = (c, sim)
        if best is not None:
            found[pos] = best
            continue
        for b, key in enumerate(row_keys):
            buckets[b].setdefault(key, []).append(pos)
    return found


# ----------------------------------------------------------------------------- language


@dataclass(frozen=True)
class _LanguageModel:
    nextmove: np.ndarray   # flat DFA transition table, indexed by rowbase[state] + byte
    rowbase: np.ndarray    # state → offset of its 256-entry row
    output: np.ndarray     # state → feature id, or -1
    ptc: np.ndarray        # (features, columns) log P(feature | class), float32
    pc: np.ndarray         # (columns,) log prior
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
        encoded = [_language_bytes(t) for t in texts[start:start + LANGUAGE_CHUNK_ROWS]]
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


# ----------------------------------------------------------------------------- the run


def _take_batches(items: list[int], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_quality(
    records: list[Record],
    kind: Kind,
    cfg: QualityConfig,
    token_length: Optional[TokenLength] = None,
) -> QualityResult:
    """Check every record; each ends up exactly once in `kept` (input order) or `dropped` (input order).

    `token_length` maps a batch of canonical rows to their token counts after the chat template
    (see `chat_token_lengths`); without it a character-based estimate is used and
    stats["token_length_source"] says so."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"kind must be 'sft' or 'preference', not {kind!r}")
    started = time.perf_counter()
    rows = [r.row for r in records]
    timings: dict[str, float] = {}
    drops: dict[int, tuple[str, str]] = {}
    alive = list(range(len(rows)))

    def apply(check: str, found: dict[int, tuple[str, str]], since: float) -> None:
        nonlocal alive
        timings[check] = time.perf_counter() - since
        if found:
            drops.update(found)
            alive = [i for i in alive if i not in found]

    def where(i: int) -> str:
        return f"{records[i].source}:{records[i].line}"

    structural = [("malformed", _malformed), ("empty_content", _empty_content), ("role_order", _role_order)]
    if kind == "preference":
        structural.append(("chosen_equals_rejected", _chosen_equals_rejected))
    for reason, check in structural:
        since = time.perf_counter()
        found = {}
        for i in alive:
            detail = check(rows[i], kind)
            if detail is not None:
                found[i] = (reason, detail)
        apply(reason, found, since)

    since = time.perf_counter()
    measure = token_length or estimate_token_lengths
    lengths: dict[int, int] = {}
    for batch in _take_batches(alive, TOKEN_BATCH_ROWS):
        got = list(measure([rows[i] for i in batch]))
        if len(got) != len(batch):
            raise ValueError(f"token_length returned {len(got)} lengths for {len(batch)} rows")
        lengths.update(zip(batch, map(int, got)))
    found = {}
    for i in alive:
        n = lengths[i]
        if n < cfg.min_tokens:
            found[i] = ("too_short", f"token length {n} < min_tokens {cfg.min_tokens}")
        elif n > cfg.max_tokens:
            found[i] = ("too_long", f"token length {n} > max_tokens {cfg.max_tokens}")
    apply("token_length", found, since)

    since = time.perf_counter()
    views = {i: _normalized_views(rows[i]) for i in alive}
    first_seen: dict[str, int] = {}
    found = {}
    for i in alive:
        earlier = first_seen.setdefault(views[i][0], i)
        if earlier != i:
            found[i] = ("exact_duplicate", f"same text as {where(earlier)}")
    apply("exact_duplicate", found, since)

    since = time.perf_counter()
    near = near_duplicates([views[i][1] for i in alive], cfg.near_duplicate_threshold)
    found = {
        alive[pos]: ("near_duplicate", f"near-duplicate of {where(alive[ref])} (Jaccard {sim:.2f} >= {cfg.near_duplicate_threshold})")
        for pos, (ref, sim) in near.items()
    }
    apply("near_duplicate", found, since)

    languages_seen: Counter[str] = Counter()
    since = time.perf_counter()
    found = {}
    if cfg.languages:
        allowed = set(cfg.languages)
        detected = detect_languages(
            [_language_text(rows[i]) for i in alive],
            tuple(sorted(set(DETECTABLE_LANGUAGES) | allowed)),
        )
        for i, (lang, p) in zip(alive, detected):
            languages_seen[lang] += 1
            if lang != "und" and lang not in allowed and p >= LANGUAGE_MIN_PROBABILITY:
                found[i] = ("language", f"detected language {lang!r} (p={p:.2f}) not in {sorted(allowed)}")
    apply("language", found, since)

    pii_found: dict[int, list[str]] = {}
    pii_counts: Counter[str] = Counter()
    since = time.perf_counter()
    found = {}
    if cfg.pii != "off":
        for i in alive:
            kinds = pii_kinds(views[i][0])
            if kinds:
                pii_found[i] = kinds
                pii_counts.update(kinds)
                if cfg.pii == "drop":
                    found[i] = ("pii", "contains " + ", ".join(kinds))
    apply("pii", found, since)

    kept: list[Record] = []
    flags: Counter[str] = Counter()
    seen_prompts: set[str] = set()
    chosen_longer = 0
    for i in alive:
        record_flags = list(records[i].flags)
        if i in pii_found and cfg.pii == "flag":
            record_flags.append("pii")
        if kind == "preference":
            prompt = normalize_text("\n".join(m["content"] for m in rows[i]["prompt"]))
            if prompt in seen_prompts:
                record_flags.append("duplicate_prompt")
            seen_prompts.add(prompt)
            chosen_longer += len(rows[i]["chosen"]) > len(rows[i]["rejected"])
        for flag in record_flags[len(records[i].flags):]:
            flags[flag] += 1
        kept.append(records[i] if record_flags == records[i].flags else dataclasses.replace(records[i], flags=record_flags))

    dropped = [
        Dropped(source=records[i].source, line=records[i].line, reason=reason, detail=detail, row=rows[i])
        for i, (reason, detail) in sorted(drops.items())
    ]
    reasons = Counter(d.reason for d in dropped)
    elapsed = time.perf_counter() - started
    stats: dict[str, Any] = {
        "kept_ratio": len(kept) / len(records) if records else 0.0,
        "dropped_fraction": len(dropped) / len(records) if records else 0.0,
        "token_length_source": "tokenizer" if token_length else "estimate (no tokenizer: ~4 ASCII chars or 1 other char per token)",
        "languages": dict(languages_seen),
        "pii_kinds": dict(pii_counts),
        "near_duplicate": {"num_perm": NUM_PERM, "shingle_chars": SHINGLE_CHARS, "lsh_bands_rows": list(lsh_bands(cfg.near_duplicate_threshold))},
        "timings_s": timings,
        "seconds": elapsed,
        "rows_per_s": len(records) / elapsed if elapsed > 0 else 0.0,
    }
    if kind == "preference":
        stats["length_bias"] = chosen_longer / len(kept) if kept else 0.0
        stats["duplicate_prompt_share"] = flags["duplicate_prompt"] / len(kept) if kept else 0.0
    return QualityResult(
        kind=kind,
        kept=kept,
        dropped=dropped,
        counts_in=len(records),
        reasons={r: reasons[r] for r in REASONS if reasons[r]},
        flags={f: flags[f] for f in FLAGS if flags[f]},
        token_lengths=[lengths[i] for i in alive],
        stats=stats,
    )


# ----------------------------------------------------------------------------- leakage


def check_leakage(train: list[Record], heldout: list[Record], threshold: float) -> list[dict[str, Any]]:
    """Held-out prompts (user turns) that also appear in train: exactly after normalize_text, or as
    near-duplicates (character-shingle Jaccard >= threshold, found through MinHash LSH).

    One dict per (train row, held-out row) hit: train_source, train_line, heldout_source,
    heldout_line, kind ("exact" | "near"), similarity. Any hit should fail the run."""
    train_text = [normalize_text(_user_text(r.row)) for r in train]
    heldout_text = [normalize_text(_user_text(r.row)) for r in heldout]

    def hit(t: int, h: int, kind: str, similarity: float) -> dict[str, Any]:
        return {
            "train_source": train[t].source, "train_line": train[t].line,
            "heldout_source": heldout[h].source, "heldout_line": heldout[h].line,
            "kind": kind, "similarity": round(similarity, 4),
        }

    by_text: dict[str, list[int]] = {}
    for h, text in enumerate(heldout_text):
        if text:
            by_text.setdefault(text, []).append(h)
    hits = [hit(t, h, "exact", 1.0) for t, text in enumerate(train_text) for h in by_text.get(text, ())]

    train_idx = [t for t, text in enumerate(train_text) if text]
    heldout_idx = [h for h, text in enumerate(heldout_text) if text]
    if train_idx and heldout_idx:
        keys = _band_keys(minhash_signatures([train_text[t] for t in train_idx] + [heldout_text[h] for h in heldout_idx]), threshold)
        train_keys, heldout_keys = keys[: len(train_idx)], keys[len(train_idx):]
        candidates: set[tuple[int, int]] = set()
        for b in range(keys.shape[1]):
            buckets: dict[int, list[int]] = {}
            for pos, key in enumerate(heldout_keys[:, b].tolist()):
                buckets.setdefault(key, []).append(pos)
            shared = np.flatnonzero(np.isin(train_keys[:, b], heldout_keys[:, b]))
            for pos in shared.tolist():
                candidates.update((train_idx[pos], heldout_idx[h]) for h in buckets[int(train_keys[pos, b])])
        for t, h in sorted(candidates):
            if train_text[t] == heldout_text[h]:
                continue  # already an exact hit
            sim = jaccard(train_text[t], heldout_text[h])
            if sim >= threshold:
                hits.append(hit(t, h, "near", sim))
    return sorted(hits, key=lambda x: (x["train_source"], x["train_line"], x["heldout_source"], x["heldout_line"]))
