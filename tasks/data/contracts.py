"""Data contracts: Great Expectations 1.x suites run on the data before any training.

The suites live as GX JSON in `data_contracts/` so a team can read and edit them without Python:
- `sft_rows.json` / `preference_pairs.json`: row-level checks plus the dataset size checks
  (`quality.min_kept_rows`, the FAQ minimum (docs/guidance.md) for `quality.task_type` from `thresholds.json`).
  The row checks (`expect_column_values_*`) run twice:
  - on the input before filtering (`input_frame(result)`: every row read, kept or dropped; a row that
    could not be read at all has null columns), with GX's `mostly` = `quality.contract_mostly`. Filtering
    drops broken rows, so checks on the kept rows alone could never fail on a mostly broken file;
    here "40 % of the rows end with a user turn" fails the contract although those rows would be dropped.
  - on the kept rows (`contract_frame(result)`), strictly: a kept row that fails is one the filters missed.
  The size checks and column checks run on the kept rows.
- `dataset_summary.json`: the dropped share, on a one-row summary frame (it is a property of the
  input, which the kept-rows frame no longer holds).
Thresholds enter through GX suite parameters (`{"$PARAMETER": "max_tokens"}` in the JSON), filled
from `QualityConfig` at validation time, so the JSON never duplicates a number the config owns.
Severity is GX's own field: "critical" fails the contract, "warning" is reported only. An
expectation whose meta says `"severity_from": "size_policy"` takes its severity from the config.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.quality import QualityResult
from ftflow.tasks.data.rows import record_text
from ftflow.tasks.errors import ContractError

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuite

DEFAULT_CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "data_contracts"
SUITE_FOR_KIND = {"sft": "sft_rows", "preference": "preference_pairs"}
SUMMARY_SUITE = "dataset_summary"
THRESHOLDS_FILE = "thresholds.json"


@dataclass
class ContractReport:
    passed: bool
    failures: list[str] = field(default_factory=list)  # one line per failed critical expectation
    warnings: list[str] = field(default_factory=list)  # one line per failed warning expectation
    details: list[dict[str, Any]] = field(default_factory=list)  # every expectation, JSON-safe
    kind: str = "sft"
    parameters: dict[str, Any] = field(default_factory=dict)  # the suite parameter values used
    # Each detail has "scope": "input" (every row read, before filtering, with `mostly`) or "kept".

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "kind": self.kind,
            "failures": list(self.failures),
            "warnings": list(self.warnings),
            "parameters": dict(self.parameters),
            "details": list(self.details),
        }


# --- frames -------------------------------------------------------------------------------------


def _language(text: str) -> str | None:
    import py3langid

    return py3langid.classify(text)[0] if text.strip() else None


def _sft_columns(row: dict[str, Any]) -> dict[str, Any]:
    messages = row.get("messages") or []
    roles = [m.get("role") for m in messages]
    nonsystem = [r for r in roles if r != "system"]
    text = record_text(row) if messages else ""
    return {
        "n_messages": len(messages),
        "last_role": roles[-1] if roles else None,
        "first_nonsystem_role": nonsystem[0] if nonsystem else None,
        "text_chars": len(text),
        "language": _language(text),
    }


def _preference_columns(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row.get("prompt") or []
    chosen, rejected = row.get("chosen") or "", row.get("rejected") or ""
    return {
        "prompt_turns": len(prompt),
        "prompt_last_role": prompt[-1].get("role") if prompt else None,
        "chosen_chars": len(chosen.strip()),
        "rejected_chars": len(rejected.strip()),
        # Whitespace-only differences are still the same answer to a reward model.
        "chosen_equals_rejected": " ".join(chosen.split()) == " ".join(rejected.split()),
        "language": _language(record_text({"prompt": prompt, "chosen": chosen, "rejected": rejected})),
    }


_FRAME_COLUMNS = {
    "sft": [
        "source",
        "line",
        "n_messages",
        "last_role",
        "first_nonsystem_role",
        "token_length",
        "text_chars",
        "language",
    ],
    "preference": [
        "source",
        "line",
        "prompt_turns",
        "prompt_last_role",
        "chosen_chars",
        "rejected_chars",
        "chosen_equals_rejected",
        "token_length",
        "language",
    ],
}


def contract_frame(result: QualityResult) -> "pd.DataFrame":
    """One row per kept record with the columns the row-level suites check.

    `token_length` comes from `result.token_lengths`, which must be parallel to `result.kept`.
    """
    import pandas as pd

    if result.kind not in _FRAME_COLUMNS:
        raise ContractError(f"unknown data kind {result.kind!r}; expected one of {sorted(_FRAME_COLUMNS)}")
    if len(result.token_lengths) != len(result.kept):
        raise ValueError(
            f"QualityResult.token_lengths has {len(result.token_lengths)} entries for {len(result.kept)} kept rows"
        )
    derive = _sft_columns if result.kind == "sft" else _preference_columns
    rows = [
        {"source": rec.source, "line": rec.line, **derive(rec.row), "token_length": int(n)}
        for rec, n in zip(result.kept, result.token_lengths)
    ]
    frame = pd.DataFrame(rows, columns=_FRAME_COLUMNS[result.kind])
    if not rows:  # keep numeric dtypes so range checks on an empty frame stay well-typed
        frame = frame.astype({"line": "int64", "token_length": "int64"})
    return frame


def _well_formed(row: Any, kind: str) -> bool:
    """A canonical row the frame's columns can be derived from (the quality checks' own `malformed` test)."""
    if not isinstance(row, dict):
        return False
    msgs = row.get("messages" if kind == "sft" else "prompt")
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return False
    return kind == "sft" or all(isinstance(row.get(k), str) for k in ("chosen", "rejected"))


def _lengths(rows: list[dict], token_length: Any) -> list[Any]:
    """Token lengths of rows the filters dropped; None where the chat template refuses a row (it is broken)."""
    from ftflow.tasks.data.lengths import estimate_token_lengths

    measure = token_length or estimate_token_lengths
    try:
        return list(measure(rows))
    except Exception:
        out: list[Any] = []
        for row in rows:
            try:
                out.append(measure([row])[0])
            except Exception:
                out.append(None)
        return out


def input_frame(result: QualityResult, token_length: Any = None) -> "pd.DataFrame":
    """One row per input row before filtering (kept and dropped, in file order), with contract_frame's columns.

    Kept rows reuse their measured token lengths; dropped rows are measured with `token_length` (a batched
    `chat_token_lengths`), else estimated. A row that could not be read (schema) has null columns."""
    import pandas as pd

    kept = contract_frame(result)
    derive = _sft_columns if result.kind == "sft" else _preference_columns
    readable = [d for d in result.dropped if _well_formed(d.row, result.kind)]
    lengths = dict(zip(map(id, readable), _lengths([d.row for d in readable], token_length))) if readable else {}
    rows = []
    for d in result.dropped:
        if id(d) in lengths:
            n = lengths[id(d)]
            rows.append(
                {"source": d.source, "line": d.line, **derive(d.row), "token_length": None if n is None else int(n)}
            )
        else:
            rows.append({"source": d.source, "line": d.line})
    frame = (
        pd.concat([kept, pd.DataFrame(rows, columns=_FRAME_COLUMNS[result.kind])], ignore_index=True) if rows else kept
    )
    frame["line"] = pd.to_numeric(frame["line"], errors="coerce").fillna(0).astype("int64")
    frame["token_length"] = pd.to_numeric(frame["token_length"], errors="coerce").astype("Float64")
    return frame.sort_values(["source", "line"], kind="stable").reset_index(drop=True)


def summary_frame(result: QualityResult) -> "pd.DataFrame":
    import pandas as pd

    dropped = result.counts_in - len(result.kept)
    fraction = dropped / result.counts_in if result.counts_in else 1.0
    return pd.DataFrame(
        [
            {
                "rows_in": result.counts_in,
                "rows_kept": len(result.kept),
                "rows_dropped": dropped,
                "dropped_fraction": fraction,
            }
        ]
    )


# --- suites -------------------------------------------------------------------------------------


def _gx():
    # GX 1.x sends no usage statistics when this is false; set before the (slow, ~2 s) import.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _suite_path(name: str, contracts_dir: Path) -> Path:
    return Path(contracts_dir) / (name if name.endswith(".json") else f"{name}.json")


def _read_suite_dict(name: str, contracts_dir: Path) -> dict[str, Any]:
    path = _suite_path(name, contracts_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractError(f"{path}: contract suite not found") from None
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ContractError(f"{path}: not a GX ExpectationSuite (needs 'name' and an 'expectations' list)")
    return data


def _build_suite(data: dict[str, Any], path: Path) -> "ExpectationSuite":
    _gx()
    from great_expectations.core import ExpectationSuite

    data = {k: v for k, v in data.items() if k in {"name", "expectations", "meta", "notes", "suite_parameters"}}
    try:
        suite = ExpectationSuite(**data)
    except (TypeError, ValueError) as e:
        raise ContractError(f"{path}: not a valid GX ExpectationSuite: {e}") from None
    # GX logs and skips an expectation it cannot build; a contract must not lose a check silently.
    if len(suite.expectations) != len(data["expectations"]):
        built = {e.expectation_type for e in suite.expectations}
        bad = [e.get("type") for e in data["expectations"] if e.get("type") not in built]
        raise ContractError(f"{path}: invalid expectation(s) {bad or '(bad kwargs)'}; GX could not build them")
    return suite


def load_suite(name: str, contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> "ExpectationSuite":
    """Load `data_contracts/<name>.json` into a GX ExpectationSuite, refusing any unbuildable expectation."""
    return _build_suite(_read_suite_dict(name, contracts_dir), _suite_path(name, contracts_dir))


def load_thresholds(contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> dict[str, int]:
    path = Path(contracts_dir) / THRESHOLDS_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))["min_rows_by_task_type"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise ContractError(f"{path}: cannot read min_rows_by_task_type ({e})") from None
    return {str(k): int(v) for k, v in table.items()}


def suite_parameters(
    cfg: QualityConfig, observed_languages: list[str], contracts_dir: Path = DEFAULT_CONTRACTS_DIR
) -> dict[str, Any]:
    faq = load_thresholds(contracts_dir)
    if cfg.task_type not in faq:
        raise ContractError(f"{Path(contracts_dir) / THRESHOLDS_FILE}: no minimum for task_type {cfg.task_type!r}")
    return {
        "min_tokens": cfg.min_tokens,
        "max_tokens": cfg.max_tokens,
        # An empty allow-list means "any language": accept whatever was observed.
        "languages": sorted(cfg.languages) if cfg.languages else sorted(observed_languages),
        "min_kept_rows": cfg.min_kept_rows,
        "faq_min_rows": faq[cfg.task_type],
        "max_dropped_fraction": cfg.max_dropped_fraction,
    }


ROW_CHECK_PREFIX = "expect_column_values_"


def _input_checks(data: dict[str, Any], mostly: float) -> dict[str, Any]:
    """The suite's row checks only, each holding for `mostly` of the rows unless the suite sets its own."""
    expectations = [
        {**e, "kwargs": {"mostly": mostly, **e.get("kwargs", {})}}
        for e in data["expectations"]
        if str(e.get("type", "")).startswith(ROW_CHECK_PREFIX)
    ]
    return {**data, "expectations": expectations}


def _resolve_severity(data: dict[str, Any], cfg: QualityConfig) -> dict[str, Any]:
    policy = {"warn": "warning", "fail": "critical"}[cfg.size_policy]
    expectations = []
    for e in data["expectations"]:
        if (e.get("meta") or {}).get("severity_from") == "size_policy":
            e = {**e, "severity": policy}
        expectations.append(e)
    return {**data, "expectations": expectations}


# --- validation ---------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Plain JSON types only (numpy scalars unwrapped, NaN/inf as null, anything else as str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _expected_text(expectation: str, kwargs: dict[str, Any]) -> str:
    if expectation == "expect_column_to_exist":
        return "column present"
    if expectation == "expect_column_values_to_not_be_null":
        return "no nulls"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    share = f" for {kwargs['mostly']:.0%} of rows" if kwargs.get("mostly", 1) < 1 else ""
    if "value_set" in kwargs:
        return f"in {list(kwargs['value_set'])}{share}"
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}{share}"
    if lo is not None:
        return f">= {lo}{share}"
    if hi is not None:
        return f"<= {hi}{share}"
    return json.dumps(json_safe(kwargs))


def _observed(result: dict[str, Any], frame: "pd.DataFrame", expectation: str, column: str | None) -> tuple[Any, str]:
    if "observed_value" in result:
        unit = " rows" if "row_count" in expectation else ""
        return result["observed_value"], f"{result['observed_value']}{unit}"
    if column is not None and len(frame) == 1 and column in frame.columns and "source" not in frame.columns:
        value = json_safe(frame[column].iloc[0])  # a summary frame: the one value is the observation
        return value, f"{value:.4g}" if isinstance(value, float) else str(value)
    if "unexpected_count" in result:
        n, total = result.get("unexpected_count") or 0, result.get("element_count") or 0
        text = f"{n} of {total} rows"
        examples = list(dict.fromkeys(repr(v) for v in (result.get("partial_unexpected_list") or [])))[:3]
        where = []
        if "source" in frame.columns:
            for i in (result.get("partial_unexpected_index_list") or [])[:3]:
                if i in frame.index:
                    where.append(f"{frame.at[i, 'source']}:{frame.at[i, 'line']}")
        if examples:
            text += f" (e.g. {', '.join(examples)}" + (f" at {', '.join(where)}" if where else "") + ")"
        return {"unexpected_count": n, "element_count": total}, text
    return None, "failed"


def _validate(
    suite: "ExpectationSuite", frame: "pd.DataFrame", params: dict[str, Any], context: Any, scope: str = "kept"
) -> list[dict[str, Any]]:
    asset = context.data_sources.add_pandas(f"ftflow-{suite.name}-{scope}").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    run = batch.validate(
        suite,
        expectation_parameters={k: v for k, v in params.items() if k in set(suite.suite_parameter_options)},
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": 3,
            "include_unexpected_rows": False,
            "return_unexpected_index_query": False,
        },
    )
    details = []
    for r in run.results:
        cfg = r.expectation_config
        meta = cfg.meta or {}
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        observed, observed_text = _observed(r.result or {}, frame, cfg.type, kwargs.get("column"))
        error = (
            (r.exception_info or {}).get("exception_message")
            if (r.exception_info or {}).get("raised_exception")
            else None
        )
        details.append(
            {
                "suite": suite.name,
                "scope": scope,
                "contract": meta.get("contract", cfg.type),
                "expectation": cfg.type,
                "column": kwargs.get("column"),
                "severity": getattr(cfg.severity, "value", str(cfg.severity)),
                "success": bool(r.success),
                "observed": json_safe(observed),
                "observed_text": observed_text if error is None else f"error: {error}",
                "expected": _expected_text(cfg.type, kwargs),
                "kwargs": json_safe(kwargs),
            }
        )
    # GX returns results grouped by domain; the suite file's order reads better in a report.
    names = [(e.configuration.meta or {}).get("contract") for e in suite.expectations]
    details.sort(key=lambda d: names.index(d["contract"]) if d["contract"] in names else len(names))
    return details


def _line(d: dict[str, Any]) -> str:
    on = f" on {d['column']}" if d["column"] else ""
    if d.get("scope") == "input":
        on += f", input before filtering, mostly {d['kwargs'].get('mostly')}"
    return f"{d['suite']}.{d['contract']} ({d['expectation']}{on}): observed {d['observed_text']}; expected {d['expected']}"


def run_contracts(
    result: QualityResult, cfg: QualityConfig, contracts_dir: Path = DEFAULT_CONTRACTS_DIR, token_length: Any = None
) -> ContractReport:
    """Validate the input (row checks, `mostly`), the kept rows (every check) and the dataset summary.

    `token_length` (a batched `chat_token_lengths`) measures the rows the filters dropped; without it
    they are estimated."""
    gx = _gx()
    if result.kind not in SUITE_FOR_KIND:
        raise ContractError(f"unknown data kind {result.kind!r}; expected one of {sorted(SUITE_FOR_KIND)}")
    rows = contract_frame(result)
    params = suite_parameters(cfg, [str(x) for x in rows["language"].dropna().unique()], contracts_dir)

    inputs = input_frame(result, token_length)
    if not cfg.languages:  # "any language" accepts whatever the input holds, dropped rows included
        params["languages"] = sorted({str(x) for x in inputs["language"].dropna().unique()})

    suites = []
    row_suite = SUITE_FOR_KIND[result.kind]
    for name, frame, scope in (
        (row_suite, rows, "kept"),
        (row_suite, inputs, "input"),
        (SUMMARY_SUITE, summary_frame(result), "kept"),
    ):
        path = _suite_path(name, contracts_dir)
        data = _resolve_severity(_read_suite_dict(name, contracts_dir), cfg)
        if scope == "input":
            data = _input_checks(data, cfg.contract_mostly)
        suite = _build_suite(data, path)
        missing = sorted(set(suite.suite_parameter_options) - set(params))
        if missing:
            raise ContractError(f"{path}: unknown suite parameter(s) {missing}; known: {sorted(params)}")
        suites.append((suite, frame, scope))

    # A fresh in-memory context per call: nothing persists between runs and nothing is written to disk.
    context = gx.get_context(mode="ephemeral")
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    details = [d for suite, frame, scope in suites for d in _validate(suite, frame, params, context, scope)]

    failures = [_line(d) for d in details if not d["success"] and d["severity"] == "critical"]
    warnings = [_line(d) for d in details if not d["success"] and d["severity"] != "critical"]
    return ContractReport(
        passed=not failures,
        failures=failures,
        warnings=warnings,
        details=details,
        kind=result.kind,
        parameters=json_safe(params),
    )


def enforce(report: ContractReport) -> None:
    """Stop the flow before training when a critical expectation failed."""
    if not report.passed:
        raise ContractError(f"data contract failed ({report.kind}): " + "; ".join(report.failures).replace("\n", " "))
