"""Duplicates: exact (same normalized text) and near (MinHash + LSH over character shingles, then exact Jaccard).

Near-duplicates use one-permutation MinHash with rotation densification over character 4-gram
shingles (Japanese has no spaces), hashed with numpy over a whole chunk of rows at once, then LSH
banding with the band/row split datasketch picks for the threshold. Only rows that share a band with
another row are compared, by the exact Jaccard of their shingle sets.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from ftflow.tasks.data.rows import conversation
from ftflow.tasks.text import normalize_text

NUM_PERM = 64  # one-permutation MinHash bins; a power of two
SHINGLE_CHARS = 4  # short enough that one edited character changes few shingles
MINHASH_SEED = 1
SIGNATURE_CHUNK_ROWS = 4096  # bounds the uint64 temporaries to a few tens of MB

_MASK64 = (1 << 64) - 1
_EMPTY_BIN = np.uint64(_MASK64)
_BIN_BITS = NUM_PERM.bit_length() - 1
_VALUE_MASK = np.uint64((1 << (64 - _BIN_BITS)) - 1)


def fold(text: str) -> str:
    """The text duplicates are judged on: normalized, case folded ("Hello" and "HELLO" are one text)."""
    return normalize_text(text, casefold=True)


def normalized_views(row: dict[str, Any]) -> tuple[str, str]:
    """(whole row, conversation) after `fold`, each message folded once.

    The whole row (roles included) keys exact duplicates and is scanned for PII. The conversation
    (user and assistant turns, no system turn) is what near-duplicates are judged on: a system
    prompt shared by every row would otherwise make all short rows look alike."""
    parts = [(m["role"], fold(m["content"])) for m in conversation(row)]
    if "chosen" in row:
        parts += [("chosen", fold(row["chosen"])), ("rejected", fold(row["rejected"]))]
    whole = "\x1e".join(f"{role}\x1f{text}" for role, text in parts)
    return whole, " ".join(text for role, text in parts if role != "system")


def exact_duplicates(keys: list[str]) -> dict[int, int]:
    """Position → position of the first equal key, for every key that repeats an earlier one."""
    first_seen: dict[str, int] = {}
    found = {}
    for pos, key in enumerate(keys):
        earlier = first_seen.setdefault(key, pos)
        if earlier != pos:
            found[pos] = earlier
    return found


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
    return {text[i : i + SHINGLE_CHARS] for i in range(len(text) - SHINGLE_CHARS + 1)}


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
        h += codes[j : j + span] * multipliers[j]
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
        chunk = texts[start : start + SIGNATURE_CHUNK_ROWS]
        h, owner = _shingle_hashes(chunk)
        bins = (h >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
        sig = np.full(len(chunk) * NUM_PERM, _EMPTY_BIN, dtype=np.uint64)
        np.minimum.at(sig, owner * NUM_PERM + bins, h & _VALUE_MASK)
        out[start : start + len(chunk)] = _densify(sig.reshape(len(chunk), NUM_PERM))
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
    multipliers = np.random.default_rng(MINHASH_SEED + 1).integers(
        1, 1 << 63, size=NUM_PERM, dtype=np.uint64
    ) | np.uint64(1)
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


def near_pairs(left: list[str], right: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(left position, right position, Jaccard) for every pair across the two lists with Jaccard >= threshold,
    sorted; only pairs sharing an LSH band are compared, as in near_duplicates."""
    if not left or not right:
        return []
    keys = _band_keys(minhash_signatures(left + right), threshold)
    left_keys, right_keys = keys[: len(left)], keys[len(left) :]
    candidates: set[tuple[int, int]] = set()
    for b in range(keys.shape[1]):
        buckets: dict[int, list[int]] = {}
        for pos, key in enumerate(right_keys[:, b].tolist()):
            buckets.setdefault(key, []).append(pos)
        shared = np.flatnonzero(np.isin(left_keys[:, b], right_keys[:, b]))
        for pos in shared.tolist():
            candidates.update((pos, r) for r in buckets[int(left_keys[pos, b])])
    pairs = []
    for i, j in sorted(candidates):
        sim = jaccard(left[i], right[j])
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs
