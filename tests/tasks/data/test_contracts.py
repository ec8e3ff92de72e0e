"""GX contracts on hand-built QualityResults: a clean set passes, each threshold fails on its own."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.contracts import (
    DEFAULT_CONTRACTS_DIR,
    contract_frame,
    enforce,
    load_suite,
    load_thresholds,
    run_contracts,
)
from ftflow.tasks.data.quality import QualityResult
from ftflow.tasks.data.rows import Dropped, Record
from ftflow.tasks.errors import ContractError

SUITE_FILES = sorted(p for p in DEFAULT_CONTRACTS_DIR.glob("*.json") if p.name != "thresholds.json")


def sft_record(i: int, *, last_role: str = "assistant", system: bool = False) -> Record:
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if system else []
    messages += [
        {"role": "user", "content": f"Please summarise the weekly sales report number {i} in one sentence."},
        {"role": last_role, "content": f"Sales in week {i} grew slightly while returns stayed flat."},
    ]
    return Record({"messages": messages}, "train.jsonl", i + 1)


def pair_record(i: int, *, chosen: str | None = None, rejected: str | None = None) -> Record:
    row = {
        "prompt": [{"role": "user", "content": f"Which city hosts the head office of company number {i}?"}],
        "chosen": chosen if chosen is not None else "The head office is in Osaka, next to the main station.",
        "rejected": rejected if rejected is not None else "I do not know anything about that company at all.",
    }
    return Record(row, "pairs.jsonl", i + 1)


def result_of(kind: str, kept: list[Record], counts_in: int | None = None, token_length: int = 40) -> QualityResult:
    counts_in = len(kept) if counts_in is None else counts_in
    # Dropped as duplicates of kept rows: well-formed input, so the row checks on the input pass as well.
    dropped = [
        Dropped("train.jsonl", 10_000 + j, "exact_duplicate", "same as line 1", kept[j % len(kept)].row if kept else {})
        for j in range(counts_in - len(kept))
    ]
    reasons = {"exact_duplicate": len(dropped)} if dropped else {}
    return QualityResult(kind, kept, dropped, counts_in, reasons, {}, [token_length] * len(kept))


def clean_sft(n: int = 120, **kw) -> QualityResult:
    return result_of("sft", [sft_record(i, system=i % 2 == 0) for i in range(n)], **kw)


def clean_pairs(n: int = 120, **kw) -> QualityResult:
    return result_of("preference", [pair_record(i) for i in range(n)], **kw)


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.stem for p in SUITE_FILES])
def test_every_suite_file_loads_into_a_gx_suite_with_all_its_expectations(path: Path):
    data = json.loads(path.read_text())
    suite = load_suite(path.stem)
    assert suite.name == data["name"] == path.stem
    assert [e.expectation_type for e in suite.expectations] == [e["type"] for e in data["expectations"]]
    # Every expectation is named, so a failure message can point at it.
    assert all(e.meta.get("contract") for e in suite.expectations)


def test_suite_files_exist_for_both_kinds_and_the_summary():
    assert {p.stem for p in SUITE_FILES} >= {"sft_rows", "preference_pairs", "dataset_summary"}


def test_thresholds_cover_every_task_type_with_the_faq_minimums():
    task_types = set(typing.get_args(QualityConfig.model_fields["task_type"].annotation))
    table = load_thresholds()
    assert set(table) == task_types
    assert (table["classification"], table["style"], table["knowledge"], table["reasoning"]) == (100, 500, 1000, 5000)


def test_load_suite_refuses_an_expectation_gx_cannot_build(tmp_path: Path):
    (tmp_path / "broken.json").write_text(
        json.dumps(
            {
                "name": "broken",
                "expectations": [
                    {"type": "expect_column_to_exist", "kwargs": {"column": "a"}, "meta": {}},
                    {"type": "expect_column_to_be_lovely", "kwargs": {"column": "a"}, "meta": {}},
                ],
            }
        )
    )
    with pytest.raises(ContractError, match="expect_column_to_be_lovely"):
        load_suite("broken", tmp_path)


def test_contract_frame_derives_one_row_per_kept_record():
    frame = contract_frame(clean_sft(4))
    assert list(frame["line"]) == [1, 2, 3, 4]
    assert set(frame["last_role"]) == {"assistant"}
    assert set(frame["first_nonsystem_role"]) == {"user"}
    assert list(frame["n_messages"]) == [3, 2, 3, 2]
    assert set(frame["language"]) == {"en"}
    pairs = contract_frame(result_of("preference", [pair_record(0), pair_record(1, chosen="same", rejected=" same ")]))
    assert list(pairs["chosen_equals_rejected"]) == [False, True]


def test_contract_frame_requires_token_lengths_parallel_to_kept_rows():
    result = clean_sft(3)
    result.token_lengths = [10, 12]
    with pytest.raises(ValueError, match="2 entries for 3 kept rows"):
        contract_frame(result)


def test_clean_sft_set_passes_with_no_warnings():
    report = run_contracts(clean_sft(), QualityConfig())
    assert report.passed, report.failures
    assert report.failures == [] and report.warnings == []
    assert {d["suite"] for d in report.details} == {"sft_rows", "dataset_summary"}
    assert all(d["success"] for d in report.details)
    assert report.parameters["max_tokens"] == 256
    enforce(report)  # does not raise


def test_clean_preference_set_passes():
    report = run_contracts(clean_pairs(), QualityConfig())
    assert report.passed, report.failures
    assert {d["suite"] for d in report.details} == {"preference_pairs", "dataset_summary"}


def test_too_few_kept_rows_fails_naming_the_expectation_and_the_count():
    report = run_contracts(clean_sft(60), QualityConfig(min_kept_rows=100))
    assert not report.passed
    [failure] = [f for f in report.failures if "min_kept_rows" in f]
    assert "expect_table_row_count_to_be_between" in failure
    assert "observed 60 rows" in failure and "expected >= 100" in failure
    with pytest.raises(ContractError) as err:
        enforce(report)
    assert "min_kept_rows" in str(err.value) and "\n" not in str(err.value)


def test_too_large_dropped_fraction_fails():
    report = run_contracts(clean_sft(120, counts_in=300), QualityConfig(max_dropped_fraction=0.5))
    assert not report.passed
    [failure] = report.failures
    assert "dataset_summary.max_dropped_fraction" in failure
    assert "observed 0.6" in failure and "0.5" in failure
    # The same data passes when the team allows a larger share.
    assert run_contracts(clean_sft(120, counts_in=300), QualityConfig(max_dropped_fraction=0.7)).passed


def test_faq_minimum_warns_under_warn_and_fails_under_fail():
    data = clean_sft(120)  # style needs 500 by the seed's FAQ
    warned = run_contracts(data, QualityConfig(task_type="style", size_policy="warn"))
    assert warned.passed and warned.failures == []
    [warning] = warned.warnings
    assert "faq_min_rows" in warning and "observed 120 rows" in warning and ">= 500" in warning
    enforce(warned)

    failed = run_contracts(data, QualityConfig(task_type="style", size_policy="fail"))
    assert not failed.passed and failed.warnings == []
    assert any("faq_min_rows" in f for f in failed.failures)


def test_identical_pair_that_slipped_through_fails_the_preference_suite():
    kept = [pair_record(i) for i in range(119)] + [pair_record(119, chosen="Tokyo.", rejected="Tokyo. ")]
    report = run_contracts(result_of("preference", kept), QualityConfig())
    assert not report.passed
    [failure] = report.failures
    assert "preference_pairs.chosen_differs_from_rejected" in failure and "pairs.jsonl:120" in failure
    with pytest.raises(ContractError, match="chosen_differs_from_rejected"):
        enforce(report)


def test_sft_row_not_ending_with_assistant_and_overlong_rows_fail():
    kept = [sft_record(i) for i in range(119)] + [sft_record(119, last_role="user")]
    report = run_contracts(result_of("sft", kept, token_length=600), QualityConfig(max_tokens=512))
    failed = {d["contract"] for d in report.details if not d["success"]}
    assert failed == {"ends_with_assistant", "token_length_in_range"}
    assert any("train.jsonl:120" in f for f in report.failures)


def test_empty_input_fails_before_training():
    report = run_contracts(result_of("sft", [], counts_in=0), QualityConfig())
    failed = {d["contract"] for d in report.details if not d["success"] and d["severity"] == "critical"}
    assert {"has_input_rows", "min_kept_rows"} <= failed


def test_unknown_suite_parameter_in_an_edited_suite_is_reported(tmp_path: Path):
    for name in ("sft_rows", "dataset_summary", "thresholds"):
        (tmp_path / f"{name}.json").write_text((DEFAULT_CONTRACTS_DIR / f"{name}.json").read_text())
    data = json.loads((tmp_path / "sft_rows.json").read_text())
    data["expectations"].append(
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "text_chars", "max_value": {"$PARAMETER": "max_chars"}},
            "meta": {},
        }
    )
    (tmp_path / "sft_rows.json").write_text(json.dumps(data))
    with pytest.raises(ContractError, match="max_chars"):
        run_contracts(clean_sft(), QualityConfig(), tmp_path)


def test_load_suite_names_the_file_when_it_is_missing_or_not_json(tmp_path: Path):
    with pytest.raises(ContractError, match="nope.json: contract suite not found"):
        load_suite("nope", tmp_path)
    (tmp_path / "bad.json").write_text('{"name": "bad", "expectations": [\n')
    with pytest.raises(ContractError, match=r"bad.json:2: invalid JSON"):
        load_suite("bad", tmp_path)


# --- row checks on the input before filtering (quality.contract_mostly) ------------------------------------


def _broken_input(n_good: int, n_bad: int) -> QualityResult:
    """What run_quality leaves when n_bad rows end with a user turn: they are dropped, the rest kept."""
    good = [sft_record(i) for i in range(n_good)]
    bad = [sft_record(n_good + j, last_role="user") for j in range(n_bad)]
    dropped = [
        Dropped(r.source, r.line, "role_order", "conversation must end with an assistant turn", r.row) for r in bad
    ]
    return QualityResult(
        "sft", good, dropped, n_good + n_bad, {"role_order": n_bad} if n_bad else {}, {}, [40] * n_good
    )


@pytest.mark.bad_input(
    "data",
    "40 % of rows broken (the filters would drop them)",
    "ftflow: error: data contract failed (sft): sft_rows.ends_with_assistant (... input before filtering, "
    "mostly 0.9): observed 80 of 200 rows ...",
)
def test_row_checks_run_on_the_input_so_a_mostly_broken_file_fails_even_though_filtering_would_hide_it():
    # 40 % of the rows are broken; filtering drops them and every kept row is fine, so checks on the kept
    # rows alone could never fail. The dropped share (0.4) is under max_dropped_fraction (0.5) too.
    report = run_contracts(_broken_input(120, 80), QualityConfig(contract_mostly=0.9))
    assert not report.passed
    [failure] = report.failures
    assert "sft_rows.ends_with_assistant" in failure and "input before filtering, mostly 0.9" in failure
    assert "observed 80 of 200 rows" in failure and "train.jsonl:121" in failure
    with pytest.raises(ContractError, match="ends_with_assistant"):
        enforce(report)


def test_a_few_broken_input_rows_pass_under_mostly_and_the_threshold_is_the_configs():
    assert run_contracts(_broken_input(190, 10), QualityConfig(contract_mostly=0.9)).passed  # 5 % broken
    assert not run_contracts(_broken_input(190, 10), QualityConfig(contract_mostly=0.99)).passed
    details = [d for d in run_contracts(_broken_input(190, 10), QualityConfig()).details if d.get("scope") == "input"]
    assert details and all(d["kwargs"]["mostly"] == 0.9 for d in details)  # the default


def test_rows_that_could_not_be_read_count_as_broken_input():
    good = [sft_record(i) for i in range(60)]
    unreadable = [Dropped("train.jsonl", 100 + j, "schema", "invalid JSON", "{not json") for j in range(40)]
    report = run_contracts(
        QualityResult("sft", good, unreadable, 100, {"schema": 40}, {}, [40] * 60), QualityConfig(contract_mostly=0.9)
    )
    assert any("last_role_present" in f and "40 of 100 rows" in f for f in report.failures), report.failures
