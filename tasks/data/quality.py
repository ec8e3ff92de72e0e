"""Row-level quality checks: every dropped row gets a machine-readable reason.

Checks run cheapest first and a row is dropped for its first failing reason:

    malformed → empty_content → role_order → chosen_equals_rejected (pairs only)
    → too_short / too_long → repetition → exact_duplicate → near_duplicate → language → pii (when cfg.pii == "drop")

Each check only sees the rows that passed the checks before it, so "duplicate of an earlier kept row"
means an earlier row that passed every check up to that point (the first copy is kept).
Kept rows may carry flags instead: `pii` (cfg.pii == "flag") and, for preference pairs,
`duplicate_prompt` (several pairs per prompt are legitimate DPO data, so it is counted, not dropped).

The checks themselves live beside this module: checks.py (structure, PII), lengths.py (token
lengths), repetition.py (degenerate answers), dedup.py (exact and near duplicates) and language.py; this
module runs them in order.
Speed matters (the bench wants 10k rows/s on 2 cores), which is why dedup and language are vectorized and
the tokenizer counts batches ahead in a thread while a batch goes through repetition and language detection
(languages are applied after deduplication, so the order above still decides every reason). Those three
timings in stats["timings_s"] therefore overlap, and can sum to more than stats["seconds"].
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.checks import pii_kinds, structural_checks
from ftflow.tasks.data.dedup import (
    NUM_PERM,
    SHINGLE_CHARS,
    exact_duplicates,
    fold,
    lsh_bands,
    near_duplicates,
    near_pairs,
    normalized_views,
)
from ftflow.tasks.data.language import DETECTABLE_LANGUAGES, LANGUAGE_MIN_PROBABILITY, detect_languages, language_text
from ftflow.tasks.data.lengths import (
    TOKEN_BATCH_ROWS,
    TokenLength,
    chat_token_lengths,
    estimate_token_lengths,
    measure_ahead,
)
from ftflow.tasks.data.repetition import repetition_problem
from ftflow.tasks.data.rows import Dropped, Kind, Record, conversation
from ftflow.tasks.text import normalize_text

# Re-exported so callers of the names that lived here before the split keep working (normalize_text now
# requires casefold=, so a caller that relied on the old folding fails loudly instead of silently changing).
__all__ = ["REASONS", "FLAGS", "QualityResult", "run_quality", "check_leakage", "chat_token_lengths", "normalize_text"]

# Reasons in check order (a row is dropped for the first that applies).
REASONS = (
    "malformed",
    "empty_content",
    "role_order",
    "chosen_equals_rejected",
    "too_short",
    "too_long",
    "repetition",
    "exact_duplicate",
    "near_duplicate",
    "language",
    "pii",
)
FLAGS = ("pii", "duplicate_prompt")

Found = dict[int, tuple[str, str]]  # row index → (reason, detail)


@dataclass
class QualityResult:
    kind: Kind
    kept: list[Record]
    dropped: list[Dropped]
    counts_in: int
    reasons: dict[str, int] = field(default_factory=dict)  # dropped rows per reason
    flags: dict[str, int] = field(default_factory=dict)  # kept-but-flagged rows per flag (e.g. pii)
    token_lengths: list[int] = field(default_factory=list)  # of kept rows, after the chat template
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. length_bias for preference pairs

    @property
    def kept_ratio(self) -> float:
        return len(self.kept) / self.counts_in if self.counts_in else 0.0


@dataclass
class _Pass:
    """The rows still alive as the checks run in order, why the others went, and how long each check took."""

    records: list[Record]
    alive: list[int]
    drops: Found = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def apply(self, check: str, found: Found, seconds: float) -> None:
        self.timings[check] = seconds
        if found:
            self.drops.update(found)
            self.alive = [i for i in self.alive if i not in found]

    def where(self, i: int) -> str:
        return f"{self.records[i].source}:{self.records[i].line}"


def _run_structural(run: _Pass, rows: list[Any], kind: Kind) -> None:
    for reason, check in structural_checks(kind):
        since = time.perf_counter()
        found: Found = {}
        for i in run.alive:
            detail = check(rows[i], kind)
            if detail is not None:
                found[i] = (reason, detail)
        run.apply(reason, found, time.perf_counter() - since)


def _answers(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, text) of every answer: each assistant turn of a conversation; chosen and rejected of a pair."""
    if "messages" in row:
        return [
            (f"assistant turn {j}", m["content"])
            for j, m in enumerate((m for m in row["messages"] if m["role"] == "assistant"), 1)
        ]
    return [("chosen", row["chosen"]), ("rejected", row["rejected"])]


def _length_problem(n: int, cfg: QualityConfig) -> Optional[tuple[str, str]]:
    if n < cfg.min_tokens:
        return ("too_short", f"token length {n} < min_tokens {cfg.min_tokens}")
    if n > cfg.max_tokens:
        return ("too_long", f"token length {n} > max_tokens {cfg.max_tokens}")
    return None


def _repetition_found(rows: list[Any], alive: list[int], cfg: QualityConfig, sides: Counter[str]) -> Found:
    """Degenerate answers; a degenerate rejected answer drops its pair too, since a looping answer loses to
    any chosen one and teaches the preference nothing about the mistakes that matter."""
    found: Found = {}
    for i in alive:
        for where, text in _answers(rows[i]):
            problem = repetition_problem(text, cfg.max_dup_line_frac, cfg.max_dup_ngram_char_frac, cfg.max_repeat_run)
            if problem:
                found[i] = ("repetition", f"{where}: {problem}")
                sides[where.split(" turn")[0]] += 1
                break
    return found


@dataclass
class _RowChecks:
    """What the per-row pass found: every measured length, the repetition sides, each row's detected language."""

    lengths: dict[int, int] = field(default_factory=dict)
    repetition_sides: Counter[str] = field(default_factory=Counter)
    languages: dict[int, tuple[str, float]] = field(default_factory=dict)
    language_seconds: float = 0.0


def _run_row_checks(run: _Pass, rows: list[Any], cfg: QualityConfig, token_length: Optional[TokenLength]) -> _RowChecks:
    """Token length, then repetition, then language detection, batch by batch as the lengths arrive.

    A batch's repetition check sees only the rows its lengths kept, as in the check order. Languages are
    detected here too, while the tokenizer runs, and applied after deduplication (`_apply_language`)."""
    out = _RowChecks()
    seconds: Counter[str] = Counter()
    found: dict[str, Found] = {"token_length": {}, "repetition": {}}
    candidates = tuple(sorted(set(DETECTABLE_LANGUAGES) | set(cfg.languages)))
    batches = [run.alive[at : at + TOKEN_BATCH_ROWS] for at in range(0, len(run.alive), TOKEN_BATCH_ROWS)]
    measured_batches = measure_ahead([[rows[i] for i in b] for b in batches], token_length or estimate_token_lengths)
    for batch, (measured, took) in zip(batches, measured_batches, strict=True):
        seconds["token_length"] += took
        out.lengths.update(zip(batch, measured))
        survivors = []
        for i, n in zip(batch, measured):
            problem = _length_problem(n, cfg)
            if problem:
                found["token_length"][i] = problem
            else:
                survivors.append(i)

        since = time.perf_counter()
        repeated = _repetition_found(rows, survivors, cfg, out.repetition_sides)
        found["repetition"].update(repeated)
        seconds["repetition"] += time.perf_counter() - since

        if cfg.languages:
            since = time.perf_counter()
            checked = [i for i in survivors if i not in repeated]
            out.languages.update(zip(checked, detect_languages([language_text(rows[i]) for i in checked], candidates)))
            out.language_seconds += time.perf_counter() - since
    for check in ("token_length", "repetition"):
        run.apply(check, found[check], seconds[check])
    return out


def _run_duplicates(run: _Pass, rows: list[Any], threshold: float) -> dict[int, tuple[str, str]]:
    """Exact then near duplicates; returns every checked row's normalized views, which the PII scan reuses."""
    since = time.perf_counter()
    views = {i: normalized_views(rows[i]) for i in run.alive}
    alive = run.alive
    found: Found = {
        alive[pos]: ("exact_duplicate", f"same text as {run.where(alive[ref])}")
        for pos, ref in exact_duplicates([views[i][0] for i in alive]).items()
    }
    run.apply("exact_duplicate", found, time.perf_counter() - since)

    since = time.perf_counter()
    alive = run.alive
    found = {
        alive[pos]: ("near_duplicate", f"near-duplicate of {run.where(alive[ref])} (Jaccard {sim:.2f} >= {threshold})")
        for pos, (ref, sim) in near_duplicates([views[i][1] for i in alive], threshold).items()
    }
    run.apply("near_duplicate", found, time.perf_counter() - since)
    return views


def _apply_language(run: _Pass, checked: _RowChecks, languages: list[str]) -> Counter[str]:
    seen: Counter[str] = Counter()
    since = time.perf_counter()
    found: Found = {}
    if languages:
        allowed = set(languages)
        for i in run.alive:
            lang, p = checked.languages[i]
            seen[lang] += 1
            if lang != "und" and lang not in allowed and p >= LANGUAGE_MIN_PROBABILITY:
                found[i] = ("language", f"detected language {lang!r} (p={p:.2f}) not in {sorted(allowed)}")
    run.apply("language", found, checked.language_seconds + time.perf_counter() - since)
    return seen


def _run_pii(run: _Pass, views: dict[int, tuple[str, str]], mode: str) -> tuple[dict[int, list[str]], Counter[str]]:
    pii_found: dict[int, list[str]] = {}
    counts: Counter[str] = Counter()
    since = time.perf_counter()
    found: Found = {}
    if mode != "off":
        for i in run.alive:
            kinds = pii_kinds(views[i][0])
            if kinds:
                pii_found[i] = kinds
                counts.update(kinds)
                if mode == "drop":
                    found[i] = ("pii", "contains " + ", ".join(kinds))
    run.apply("pii", found, time.perf_counter() - since)
    return pii_found, counts


def _keep(
    run: _Pass, rows: list[Any], kind: Kind, flag_pii: dict[int, list[str]]
) -> tuple[list[Record], Counter[str], int]:
    """The surviving records with their new flags (copies, the input is not mutated), the flag
    counts, and how many kept pairs have the longer answer chosen."""
    kept: list[Record] = []
    flags: Counter[str] = Counter()
    seen_prompts: set[str] = set()
    chosen_longer = 0
    for i in run.alive:
        record = run.records[i]
        record_flags = list(record.flags)
        if i in flag_pii:
            record_flags.append("pii")
        if kind == "preference":
            prompt = fold("\n".join(m["content"] for m in rows[i]["prompt"]))
            if prompt in seen_prompts:
                record_flags.append("duplicate_prompt")
            seen_prompts.add(prompt)
            chosen_longer += len(rows[i]["chosen"]) > len(rows[i]["rejected"])
        for flag in record_flags[len(record.flags) :]:
            flags[flag] += 1
        kept.append(record if record_flags == record.flags else dataclasses.replace(record, flags=record_flags))
    return kept, flags, chosen_longer


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
    run = _Pass(records, list(range(len(rows))))

    _run_structural(run, rows, kind)
    checked = _run_row_checks(run, rows, cfg, token_length)
    views = _run_duplicates(run, rows, cfg.near_duplicate_threshold)
    languages_seen = _apply_language(run, checked, cfg.languages)
    pii_found, pii_counts = _run_pii(run, views, cfg.pii)
    kept, flags, chosen_longer = _keep(run, rows, kind, pii_found if cfg.pii == "flag" else {})

    dropped = [
        Dropped(source=records[i].source, line=records[i].line, reason=reason, detail=detail, row=rows[i])
        for i, (reason, detail) in sorted(run.drops.items())
    ]
    reasons = Counter(d.reason for d in dropped)
    elapsed = time.perf_counter() - started
    stats: dict[str, Any] = {
        "kept_ratio": len(kept) / len(records) if records else 0.0,
        "dropped_fraction": len(dropped) / len(records) if records else 0.0,
        "token_length_source": "tokenizer"
        if token_length
        else "estimate (no tokenizer: ~4 ASCII chars or 1 other char per token)",
        "languages": dict(languages_seen),
        "pii_kinds": dict(pii_counts),
        "repetition_by_answer": dict(checked.repetition_sides),
        "near_duplicate": {
            "num_perm": NUM_PERM,
            "shingle_chars": SHINGLE_CHARS,
            "lsh_bands_rows": list(lsh_bands(cfg.near_duplicate_threshold)),
        },
        "timings_s": run.timings,
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
        token_lengths=[checked.lengths[i] for i in run.alive],
        stats=stats,
    )


# ----------------------------------------------------------------------------- leakage


def _user_text(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in conversation(row) if m["role"] == "user")


def check_leakage(train: list[Record], heldout: list[Record], threshold: float) -> list[dict[str, Any]]:
    """Held-out prompts (user turns) that also appear in train: exactly after normalization (case
    folded), or as near-duplicates (character-shingle Jaccard >= threshold, found through MinHash LSH).

    One dict per (train row, held-out row) hit: train_source, train_line, heldout_source,
    heldout_line, kind ("exact" | "near"), similarity. Any hit should fail the run."""
    train_text = [fold(_user_text(r.row)) for r in train]
    heldout_text = [fold(_user_text(r.row)) for r in heldout]

    def hit(t: int, h: int, kind: str, similarity: float) -> dict[str, Any]:
        return {
            "train_source": train[t].source,
            "train_line": train[t].line,
            "heldout_source": heldout[h].source,
            "heldout_line": heldout[h].line,
            "kind": kind,
            "similarity": round(similarity, 4),
        }

    by_text: dict[str, list[int]] = {}
    for h, text in enumerate(heldout_text):
        if text:
            by_text.setdefault(text, []).append(h)
    hits = [hit(t, h, "exact", 1.0) for t, text in enumerate(train_text) for h in by_text.get(text, ())]

    train_idx = [t for t, text in enumerate(train_text) if text]
    heldout_idx = [h for h, text in enumerate(heldout_text) if text]
    pairs = near_pairs([train_text[t] for t in train_idx], [heldout_text[h] for h in heldout_idx], threshold)
    for i, j, sim in pairs:
        t, h = train_idx[i], heldout_idx[j]
        if train_text[t] != heldout_text[h]:  # equal texts are already exact hits
            hits.append(hit(t, h, "near", sim))
    return sorted(hits, key=lambda x: (x["train_source"], x["train_line"], x["heldout_source"], x["heldout_line"]))
