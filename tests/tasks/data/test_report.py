"""The quality report: counts, metrics, histogram PNG, quarantine file, markdown and text."""

from __future__ import annotations

import json
from pathlib import Path

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.contracts import run_contracts
from ftflow.tasks.data.quality import QualityResult
from ftflow.tasks.data.report import (
    build_report,
    plot_token_histogram,
    print_report,
    report_markdown,
    report_metrics,
    write_report_files,
)
from ftflow.tasks.data.rows import Dropped, Record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sft_result() -> QualityResult:
    kept = [
        Record(
            {
                "messages": [
                    {"role": "user", "content": f"Translate sentence number {i} into French please."},
                    {"role": "assistant", "content": "Voici la traduction de la phrase."},
                ]
            },
            "train.jsonl",
            i + 1,
        )
        for i in range(10)
    ]
    dropped = [
        Dropped(
            "train.jsonl",
            100 + j,
            "too_long",
            f"{900 + j} tokens > 512",
            {"messages": [{"role": "user", "content": "x" * 5000}]},
        )
        for j in range(5)
    ]
    dropped += [
        Dropped("train.jsonl", 200, "exact_duplicate", "same as line 3", {"messages": []}),
        Dropped(
            "train.jsonl", 201, "language", "detected ko", {"messages": [{"role": "user", "content": "안녕하세요"}]}
        ),
        Dropped("train.jsonl", 202, "invalid_json", "Expecting value", "{not json"),
    ]
    return QualityResult(
        "sft",
        kept,
        dropped,
        counts_in=18,
        reasons={"too_long": 5, "exact_duplicate": 1, "language": 1, "invalid_json": 1},
        flags={"pii": 2},
        token_lengths=[20 + i for i in range(10)],
        stats={"length_bias": 0.25, "languages": {"en": 10}},
    )


def test_build_report_counts_reasons_and_caps_examples():
    report = build_report(sft_result())
    assert (report["counts_in"], report["counts_out"], report["dropped"]) == (18, 10, 8)
    assert report["kept_ratio"] == round(10 / 18, 6)
    assert report["reasons"] == {"too_long": 5, "exact_duplicate": 1, "invalid_json": 1, "language": 1}
    assert len(report["examples"]["too_long"]) == 3
    long_text = report["examples"]["too_long"][0]["row"]["messages"][0]["content"]
    assert len(long_text) < 300 and long_text.endswith("chars)")
    assert report["token_lengths"] == {"count": 10, "min": 20, "max": 29, "mean": 24.5, "p50": 24, "p95": 29}
    assert report["contract"] is None
    json.dumps(report)  # serializable as is


def test_report_counts_reasons_from_dropped_rows_when_the_tally_is_missing():
    result = sft_result()
    result.reasons = {}
    assert build_report(result)["reasons"]["too_long"] == 5


def test_report_metrics_keys_and_values():
    metrics = report_metrics(build_report(sft_result()))
    assert metrics["data/kept_ratio"] == round(10 / 18, 6)
    assert metrics["data/rows_in"] == 18.0 and metrics["data/rows_kept"] == 10.0 and metrics["data/rows_dropped"] == 8.0
    assert metrics["data/dropped/too_long"] == 5.0 and metrics["data/dropped/invalid_json"] == 1.0
    assert metrics["data/flagged/pii"] == 2.0
    assert metrics["data/length_bias"] == 0.25 and metrics["data/languages/en"] == 10.0
    assert metrics["data/token_length_p95"] == 29.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert "data/preference/kept_ratio" in report_metrics(build_report(sft_result()), prefix="data/preference/")


def test_metric_keys_only_use_characters_mlflow_accepts():
    result = sft_result()
    result.reasons = {"pii:email+phone": 1}
    assert "data/dropped/pii_email_phone" in report_metrics(build_report(result))


def test_contract_outcome_reaches_report_metrics_and_markdown():
    result = sft_result()
    contract = run_contracts(result, QualityConfig(min_kept_rows=50))
    report = build_report(result, contract)
    assert report["contract"]["passed"] is False
    assert any("min_kept_rows" in f for f in report["contract"]["failures"])
    metrics = report_metrics(report)
    assert metrics["data/contract_passed"] == 0.0 and metrics["data/contract_failures"] >= 1.0
    md = report_markdown(report)
    assert "Contract: FAILED" in md and "min_kept_rows" in md
    assert "contract FAILED" in print_report(report)
    json.dumps(report)


def test_histogram_is_a_valid_png(tmp_path: Path):
    path = plot_token_histogram([10, 20, 20, 30, 400], tmp_path / "plots" / "hist.png", max_tokens=512, min_tokens=8)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    empty = plot_token_histogram([], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC


def test_write_report_files_writes_quarantine_one_line_per_dropped_row(tmp_path: Path):
    result = sft_result()
    paths = write_report_files(build_report(result), result, tmp_path / "sft")
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "token_lengths.png", "quarantine.jsonl"}
    lines = paths["quarantine"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(result.dropped) == 8
    rows = [json.loads(line) for line in lines]
    assert [r["reason"] for r in rows] == [d.reason for d in result.dropped]
    assert rows[0]["line"] == 100 and rows[0]["source"] == "train.jsonl"
    assert "안녕하세요" in lines[6]  # ensure_ascii=False keeps the text readable
    assert rows[7]["row"] == "{not json"
    assert json.loads(paths["json"].read_text())["counts_in"] == 18
    assert paths["histogram"].read_bytes()[:8] == PNG_MAGIC


def test_markdown_table_and_text_summary_list_every_reason():
    report = build_report(sft_result())
    md = report_markdown(report)
    assert "| reason | dropped | share of input |" in md
    for reason, n in report["reasons"].items():
        assert f"| {reason} | {n} |" in md
    assert "| flag (kept) | rows |" in md and "| pii | 2 |" in md
    text = print_report(report)
    assert text.startswith("data quality (sft): kept 10/18")
    assert all(reason in text for reason in report["reasons"])


# --- after formatting: the training window's drops join the report; held-out accounting -------

WINDOW_TALLY = {
    "in": 10,
    "kept": 8,
    "truncated_left": 1,
    "dropped": {"truncated_answer": 2},
    "max_length": 256,
    "truncation": "truncate_left",
}


def window_drops() -> list[Dropped]:
    return [
        Dropped(
            "train.jsonl",
            3 + j,
            "truncated_answer",
            f"train.jsonl:{3 + j}: 300 tokens > sft.max_length 256",
            {"messages": []},
        )
        for j in range(2)
    ]


def test_window_drops_join_counts_reasons_metrics_and_markdown(tmp_path: Path):
    from ftflow.tasks.data.report import add_window_drops

    result = sft_result()
    report = build_report(result)
    files = write_report_files(report, result, tmp_path)
    merged = add_window_drops(report, WINDOW_TALLY, window_drops(), files["quarantine"])
    assert report["counts_out"] == 10 and merged["counts_out"] == 8  # the input report is left alone
    assert merged["dropped"] == report["dropped"] + 2
    assert merged["reasons"]["truncated_answer"] == 2
    assert merged["kept_ratio"] == round(8 / 18, 6)
    assert merged["window"] == WINDOW_TALLY
    assert "truncated_answer" in merged["examples"]
    metrics = report_metrics(merged)
    assert metrics["data/dropped/truncated_answer"] == 2.0 and metrics["data/window/truncated_left"] == 1.0
    assert "1 with their earliest turns dropped" in report_markdown(merged)
    lines = [json.loads(line) for line in files["quarantine"].read_text().splitlines()]
    assert len(lines) == merged["counts_in"] - merged["counts_out"]
    # Formatting the same split again replaces its drops instead of piling them up.
    add_window_drops(report, WINDOW_TALLY, window_drops(), files["quarantine"])
    assert [json.loads(line) for line in files["quarantine"].read_text().splitlines()] == lines
    assert [row["reason"] for row in lines].count("truncated_answer") == 2


def test_heldout_accounting_names_every_exclusion():
    from ftflow.tasks.data.report import heldout_accounting

    validation = {"counts_in": 12, "counts_out": 10, "reasons": {"exact_duplicate": 1, "too_long": 1}}
    tally = {"in": 10, "kept": 9, "truncated_left": 0, "dropped": {"truncated_answer": 1}}
    assert heldout_accounting(validation, tally) == {
        "source": "heldout file",
        "in": 12,
        "kept": 9,
        "truncated_left": 0,
        "dropped": {"exact_duplicate": 1, "too_long": 1, "truncated_answer": 1},
    }
    split = heldout_accounting(None, {"in": 6, "kept": 6, "truncated_left": 0, "dropped": {}})
    assert split == {"source": "seeded split of the sft rows", "in": 6, "kept": 6, "truncated_left": 0, "dropped": {}}
