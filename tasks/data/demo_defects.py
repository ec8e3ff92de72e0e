"""What both seeded demo tasks (demo.py's extraction, demo_free_text.py's free text) share: how defects are
counted, copied, emptied and scattered among the clean rows, and the files and manifest sections they write.

Every function draws from the caller's `rng` in a fixed order, so a task stays byte-identical for its seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ftflow.configs.schema import DemoDataConfig
from ftflow.tasks.data.sources import write_jsonl

PREFERENCE_DEFECTS = ("chosen_equals_rejected", "empty_chosen")
# (defect kind, the row, the index of the clean row it copies or None)
Extra = tuple[str, dict, "int | None"]


def defect_count(rate: float, n: int) -> int:
    return round(rate * n)


def interleave(rng: random.Random, clean: list[dict], extras: list[Extra]):
    """Scatter defect rows among clean rows; a duplicate always lands after its original.

    Returns the final rows and, per defect kind, the 1-based lines (and for copies the original's line).
    """
    slots: list[tuple[float, int, dict, str | None, int | None]] = [
        (i + 0.5, i, r, None, None) for i, r in enumerate(clean)
    ]
    for j, (kind, row, original) in enumerate(extras):
        low = original + 0.5 if original is not None else 0.0
        slots.append((rng.uniform(low, len(clean)), len(clean) + j, row, kind, original))
    slots.sort(key=lambda s: (s[0], s[1]))
    line_of_clean = {s[1]: n for n, s in enumerate(slots, start=1) if s[3] is None}
    report: dict[str, dict[str, Any]] = {}
    for n, (_, _, _, kind, original) in enumerate(slots, start=1):
        if kind is None:
            continue
        entry = report.setdefault(kind, {"count": 0, "lines": []})
        entry["count"] += 1
        entry["lines"].append(n)
        if original is not None:
            entry.setdefault("original_lines", []).append(line_of_clean[original])
    return [s[2] for s in slots], report


def copies(rng: random.Random, clean: list[dict], n_dup: int, near: Callable[[dict], dict]) -> list[Extra]:
    """`n_dup` exact and `n_dup` near duplicates (`near` of the row) of distinct clean rows."""
    originals = rng.sample(range(len(clean)), min(len(clean), 2 * n_dup))
    dup_of, near_of = originals[:n_dup], originals[n_dup:]
    # Fewer originals than asked for (tiny n_sft): near-duplicates reuse the exact-duplicate originals.
    near_of = near_of + dup_of[: n_dup - len(near_of)]
    extras: list[Extra] = [("duplicate", json.loads(json.dumps(clean[i])), i) for i in dup_of]
    return extras + [("near_duplicate", near(clean[i]), i) for i in near_of]


def empty_answers(rows: Iterable[dict]) -> list[Extra]:
    """The rows with their last (assistant) answer emptied: empty, spaces only, or a newline in turn."""
    extras: list[Extra] = []
    for k, row in enumerate(rows):
        row["messages"][-1]["content"] = ("", "   ", "\n")[k % 3]
        extras.append(("empty_answer", row, None))
    return extras


def preference_rows(rng: random.Random, sources: Sequence, pair: Callable, n_defect: int):
    """One pair per source from `pair(source, rng) -> (pair, mistake kind)`, then `n_defect` pairs whose chosen
    equals the rejected and `n_defect` with an empty chosen, scattered among them.

    Returns the rows, their defect report (as `interleave`), and the count of each kind of rejected mistake."""
    clean, mistakes = [], {}
    for source in sources:
        row, kind = pair(source, rng)
        clean.append(row)
        mistakes[kind] = mistakes.get(kind, 0) + 1
    extras: list[Extra] = []
    for i in rng.sample(range(len(clean)), min(len(clean), n_defect)):
        extras.append(("chosen_equals_rejected", {**clean[i], "rejected": clean[i]["chosen"]}, None))
    for i in rng.sample(range(len(clean)), min(len(clean), n_defect)):
        extras.append(("empty_chosen", {**clean[i], "chosen": ""}, None))
    rows, defects = interleave(rng, clean, extras)
    return rows, defects, mistakes


def counts(cfg: DemoDataConfig, sft_rows: list[dict], pref_rows: list[dict]) -> dict[str, int]:
    """The manifest's `counts`: rows written and clean rows asked for, per file."""
    return {
        "sft": len(sft_rows),
        "sft_clean": cfg.n_sft,
        "preference": len(pref_rows),
        "preference_clean": cfg.n_preference,
        "heldout": cfg.n_heldout,
        "heldout_preference": cfg.n_heldout,
    }


def defect_lines(sft: dict, sft_kinds: Sequence[str], preference: dict) -> dict[str, dict]:
    """The manifest's `defects`: every kind the task injects, with a zero entry for a kind it did not."""
    return {
        "sft": {k: sft.get(k, {"count": 0, "lines": []}) for k in sft_kinds},
        "preference": {k: preference.get(k, {"count": 0, "lines": []}) for k in PREFERENCE_DEFECTS},
    }


def write_files(out_dir: Path, files: dict[str, list[dict]], manifest: dict[str, Any]) -> dict[str, Any]:
    """`<name>.jsonl` per entry of `files` and manifest.json; returns their paths and the manifest."""
    paths = {name: out_dir / f"{name}.jsonl" for name in files}
    paths["manifest"] = out_dir / "manifest.json"
    for name, rows in files.items():
        write_jsonl(rows, paths[name])
    paths["manifest"].write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return {**{k: str(v) for k, v in paths.items()}, "manifest_content": manifest}
