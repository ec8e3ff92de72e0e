"""The data quality report: counts per reason, kept ratio, token lengths, dropped examples, contract.

Everything here produces plain data or files; logging them to MLflow (metrics + artifacts) and
publishing to Prefect (markdown / table artifacts) is the caller's job.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from ftflow.tasks.data.contracts import ContractReport, json_safe
from ftflow.tasks.data.lengths import nearest_rank
from ftflow.tasks.data.quality import QualityResult
from ftflow.tasks.data.rows import Dropped
from ftflow.tasks.data.sources import write_jsonl, write_quarantine

EXAMPLES_PER_REASON = 3
MAX_EXAMPLE_CHARS = 240
MAX_EXAMPLE_ITEMS = 8


def _truncate(value: Any, limit: int = MAX_EXAMPLE_CHARS) -> Any:
    """Shrink a dropped row for display: long strings cut, long lists shortened, shape kept."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}… (+{len(value) - limit} chars)"
    if isinstance(value, dict):
        return {str(k): _truncate(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        head = [_truncate(v, limit) for v in value[:MAX_EXAMPLE_ITEMS]]
        return head + ([f"… (+{len(value) - MAX_EXAMPLE_ITEMS} items)"] if len(value) > MAX_EXAMPLE_ITEMS else [])
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _truncate(str(value), limit)


def _length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(int(n) for n in lengths)
    return {
        "count": len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": nearest_rank(ordered, 0.5),
        "p95": nearest_rank(ordered, 0.95),
    }


def build_report(result: QualityResult, contract: Optional[ContractReport] = None) -> dict[str, Any]:
    """A JSON-serializable summary of one quality pass (and its contract, when run)."""
    # `reasons` is the quality step's own tally; fall back to counting the dropped list.
    reasons = dict(result.reasons) if result.reasons else dict(Counter(d.reason for d in result.dropped))
    examples: dict[str, list[dict[str, Any]]] = {}
    for d in result.dropped:
        bucket = examples.setdefault(d.reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append({"source": d.source, "line": d.line, "detail": _truncate(d.detail), "row": _truncate(d.row)})
    report: dict[str, Any] = {
        "kind": result.kind,
        "counts_in": result.counts_in,
        "counts_out": len(result.kept),
        "dropped": len(result.dropped),
        "kept_ratio": round(result.kept_ratio, 6),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "flags": dict(sorted(result.flags.items(), key=lambda kv: (-kv[1], kv[0]))),
        "token_lengths": _length_stats(result.token_lengths),
        "stats": json_safe(result.stats),
        "examples": examples,
        "contract": None,
    }
    if contract is not None:
        report["contract"] = {
            "passed": contract.passed,
            "failures": list(contract.failures),
            "warnings": list(contract.warnings),
            "parameters": json_safe(contract.parameters),
            "expectations": len(contract.details),
            "failed_expectations": sum(1 for d in contract.details if not d.get("success")),
        }
    return report


def report_markdown(report: dict[str, Any]) -> str:
    total = report["counts_in"] or 1
    lines = [
        f"## Data quality: {report['kind']}",
        "",
        f"**{report['counts_out']} of {report['counts_in']} rows kept** (kept ratio {report['kept_ratio']:.1%}, "
        f"{report['dropped']} dropped).",
        "",
    ]
    if report["reasons"]:
        lines += ["| reason | dropped | share of input |", "|---|---:|---:|"]
        lines += [f"| {r} | {n} | {n / total:.1%} |" for r, n in report["reasons"].items()]
        lines.append("")
    if report["flags"]:
        lines += ["| flag (kept) | rows |", "|---|---:|"]
        lines += [f"| {f} | {n} |" for f, n in report["flags"].items()]
        lines.append("")
    t = report["token_lengths"]
    if t.get("count"):
        lines += [
            f"Token lengths (kept, after the chat template): min {t['min']}, p50 {t['p50']}, "
            f"p95 {t['p95']}, max {t['max']}, mean {t['mean']}.",
            "",
        ]
    w = report.get("window")
    if w:
        lines += [
            f"Training window: {w['max_length'] or 'no'} token limit, truncation {w['truncation']}: "
            f"{w['kept']} of {w['in']} rows fit, {w['truncated_left']} with their earliest turns dropped, "
            f"{sum(w['dropped'].values())} dropped (truncated_answer).",
            "",
        ]
    scalar_stats = {k: v for k, v in report["stats"].items() if isinstance(v, (int, float, str, bool))}
    if scalar_stats:
        lines += [
            "Stats: "
            + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in scalar_stats.items()),
            "",
        ]
    c = report.get("contract")
    if c is not None:
        lines += [
            f"**Contract: {'passed' if c['passed'] else 'FAILED'}** "
            f"({c['failed_expectations']} of {c['expectations']} expectations unmet)."
        ]
        lines += [f"- ❌ {_md_escape(f)}" for f in c["failures"]]
        lines += [f"- ⚠️ {_md_escape(w)}" for w in c["warnings"]]
        lines.append("")
    if report["examples"]:
        lines += ["<details><summary>Examples of dropped rows</summary>", ""]
        for reason, rows in report["examples"].items():
            for ex in rows:
                row = json.dumps(ex["row"], ensure_ascii=False)
                lines.append(
                    f"- `{reason}` {ex['source']}:{ex['line']}: {_md_escape(str(ex['detail']))} — "
                    f"`{_md_escape(row[:MAX_EXAMPLE_CHARS])}`"
                )
        lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _metric_key(prefix: str, name: str) -> str:
    # MLflow accepts alphanumerics, _ - . / and spaces in metric keys; anything else would be refused.
    return prefix + _METRIC_KEY_BAD.sub("_", name)


def _numeric_items(mapping: dict[str, Any], path: str = "") -> list[tuple[str, float]]:
    items = []
    for k, v in mapping.items():
        key = f"{path}{k}"
        if isinstance(v, bool):
            items.append((key, float(v)))
        elif isinstance(v, (int, float)) and math.isfinite(v):
            items.append((key, float(v)))
        elif isinstance(v, dict):
            items += _numeric_items(v, f"{key}/")
    return items


def report_metrics(report: dict[str, Any], prefix: str = "data/") -> dict[str, float]:
    """Flat MLflow metrics. Log SFT and preference reports into one run with different prefixes
    (e.g. "data/" and "data/preference/") or the second overwrites the first."""
    m = {
        _metric_key(prefix, "rows_in"): float(report["counts_in"]),
        _metric_key(prefix, "rows_kept"): float(report["counts_out"]),
        _metric_key(prefix, "rows_dropped"): float(report["dropped"]),
        _metric_key(prefix, "kept_ratio"): float(report["kept_ratio"]),
    }
    m.update({_metric_key(prefix, f"dropped/{r}"): float(n) for r, n in report["reasons"].items()})
    m.update({_metric_key(prefix, f"flagged/{f}"): float(n) for f, n in report["flags"].items()})
    t = report["token_lengths"]
    m.update({_metric_key(prefix, f"token_length_{k}"): float(t[k]) for k in ("mean", "p50", "p95", "max") if k in t})
    m.update({_metric_key(prefix, k): v for k, v in _numeric_items(report["stats"])})
    w = report.get("window")
    if w:
        m[_metric_key(prefix, "window/truncated_left")] = float(w["truncated_left"])
        m[_metric_key(prefix, "window/dropped")] = float(sum(w["dropped"].values()))
    c = report.get("contract")
    if c is not None:
        m[_metric_key(prefix, "contract_passed")] = 1.0 if c["passed"] else 0.0
        m[_metric_key(prefix, "contract_failures")] = float(len(c["failures"]))
        m[_metric_key(prefix, "contract_warnings")] = float(len(c["warnings"]))
    return m


def plot_token_histogram(
    token_lengths: Sequence[int], path: Path, max_tokens: Optional[int] = None, min_tokens: Optional[int] = None
) -> Path:
    """PNG histogram of kept rows' token lengths, with the configured limits drawn in."""
    # Figure + Agg canvas directly, not pyplot: no global figure registry, safe in Prefect's worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if token_lengths:
        ax.hist(list(token_lengths), bins=min(50, max(5, len(set(token_lengths)))), color="#4C72B0")
    else:
        ax.text(0.5, 0.5, "no kept rows", ha="center", va="center", transform=ax.transAxes)
    for limit, label in ((min_tokens, "min_tokens"), (max_tokens, "max_tokens")):
        if limit is not None:
            ax.axvline(limit, color="#C44E52", linestyle="--", linewidth=1)
            ax.annotate(
                label,
                (limit, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="#C44E52",
            )
    ax.set_xlabel("tokens after the chat template")
    ax.set_ylabel("rows")
    ax.set_title(f"Token lengths of kept rows (n={len(token_lengths)})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_report_files(report: dict[str, Any], result: QualityResult, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md, token_lengths.png and quarantine.jsonl (every dropped row with its reason).

    One directory per data kind: the names are fixed, so SFT and preference reports need separate dirs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "histogram": out / "token_lengths.png",
        "quarantine": out / "quarantine.jsonl",
    }
    paths["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(report_markdown(report), encoding="utf-8")
    params = (report.get("contract") or {}).get("parameters") or {}
    plot_token_histogram(
        result.token_lengths,
        paths["histogram"],
        max_tokens=params.get("max_tokens"),
        min_tokens=params.get("min_tokens"),
    )
    write_quarantine(result.dropped, paths["quarantine"])
    return paths


def print_report(report: dict[str, Any]) -> str:
    """Plain-text summary for the CLI."""
    lines = [
        f"data quality ({report['kind']}): kept {report['counts_out']}/{report['counts_in']} "
        f"({report['kept_ratio']:.1%}), dropped {report['dropped']}"
    ]
    width = max((len(r) for r in [*report["reasons"], *report["flags"]]), default=0)
    lines += [f"  dropped  {r:<{width}}  {n}" for r, n in report["reasons"].items()]
    lines += [f"  flagged  {f:<{width}}  {n}" for f, n in report["flags"].items()]
    t = report["token_lengths"]
    if t.get("count"):
        lines.append(f"  tokens   min {t['min']}  p50 {t['p50']}  p95 {t['p95']}  max {t['max']}")
    c = report.get("contract")
    if c is not None:
        lines.append(f"  contract {'passed' if c['passed'] else 'FAILED'}")
        lines += [f"    FAIL {f}" for f in c["failures"]]
        lines += [f"    WARN {w}" for w in c["warnings"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- after formatting


def add_window_drops(
    report: dict[str, Any], tally: dict[str, Any], dropped: Sequence[Dropped], quarantine: Optional[Path] = None
) -> dict[str, Any]:
    """The validation report of a split once formatting has fitted its rows to the training window
    (formatting.FormattedData.window / .dropped for that kind): the rows it dropped join the counts, the
    reasons and the examples, and the tally (truncated_left included) is kept under "window", so the report
    says what training and evaluation really saw. With `quarantine`, the file gets the dropped rows too,
    replacing any an earlier formatting of the same split wrote there (reruns do not pile them up)."""
    out = json.loads(json.dumps(report, ensure_ascii=False, default=str))
    reasons = Counter(out.get("reasons", {}))
    reasons.update(d.reason for d in dropped)
    out["counts_out"] = out["counts_out"] - len(dropped)
    out["dropped"] = out["dropped"] + len(dropped)
    out["kept_ratio"] = round(out["counts_out"] / out["counts_in"], 6) if out["counts_in"] else 0.0
    out["reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    for d in dropped:
        bucket = out.setdefault("examples", {}).setdefault(d.reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append({"source": d.source, "line": d.line, "detail": _truncate(d.detail), "row": _truncate(d.row)})
    out["window"] = dict(tally)
    if quarantine is not None:
        path = Path(quarantine)
        window_reasons = {d.reason for d in dropped} | {"truncated_answer"}
        earlier = []
        if path.exists():
            earlier = [
                row
                for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())
                if row.get("reason") not in window_reasons
            ]
        write_jsonl([*earlier, *(d.as_dict() for d in dropped)], path)
    return out


def heldout_accounting(validation_report: Optional[dict[str, Any]], tally: dict[str, Any]) -> dict[str, Any]:
    """What happened to the held-out rows, for the gate to state beside its decision: rows in, kept (scored),
    and dropped by reason, counting both validation and the training window. Without a held-out file
    (`validation_report` None) the rows were split off the train set after validation, so only the window
    could drop any."""
    reasons: Counter[str] = Counter()
    if validation_report is not None:
        reasons.update(validation_report.get("reasons", {}))
        rows_in = int(validation_report["counts_in"])
        source = "heldout file"
    else:
        rows_in = int(tally.get("in", 0))
        source = "seeded split of the sft rows"
    reasons.update(tally.get("dropped", {}))
    return {
        "source": source,
        "in": rows_in,
        "kept": int(tally.get("kept", 0)),
        "truncated_left": int(tally.get("truncated_left", 0)),
        "dropped": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
