"""Row-level checks that need no other row: structural checks in order, PII detection, the Luhn checksum."""

from __future__ import annotations

import pytest

from ftflow.tasks.data.checks import luhn_valid, pii_kinds, structural_checks


def test_structural_checks_run_shape_first_and_pairs_add_chosen_equals_rejected():
    assert [r for r, _ in structural_checks("sft")] == ["malformed", "empty_content", "role_order"]
    assert [r for r, _ in structural_checks("preference")] == [
        "malformed",
        "empty_content",
        "role_order",
        "chosen_equals_rejected",
    ]


def test_each_structural_check_passes_a_good_row_and_names_what_is_wrong_with_a_bad_one():
    checks = dict(structural_checks("preference"))
    good = {"prompt": [{"role": "user", "content": "Sky colour?"}], "chosen": "Blue.", "rejected": "Green."}
    assert all(check(good, "preference") is None for check in checks.values())
    assert checks["malformed"]({"prompt": "Sky colour?"}, "preference") == "missing 'prompt' list"
    assert checks["empty_content"]({**good, "chosen": " \n"}, "preference") == "chosen is empty"
    assert checks["chosen_equals_rejected"]({**good, "rejected": "  BLUE. "}, "preference") == (
        "chosen and rejected are identical after normalization"
    )


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("Write to taro.yamada@example.co.jp for details.", ["email"]),
        ("Ｍａｉｌ： ｈａｎａｋｏ＠ｅｘａｍｐｌｅ．ｃｏｍ", ["email"]),
        ("携帯は090-1234-5678です。", ["phone"]),
        ("会社の番号は03-1234-5678です。", ["phone"]),
        ("お問い合わせは０１２０－１２３－４５６まで", ["phone"]),
        ("携帯 09012345678 に電話して", ["phone"]),
        ("Call +81 90 1234 5678 tomorrow.", ["phone"]),
        ("Call (415) 555-0100 tomorrow.", ["phone"]),
        ("Pay with 4111 1111 1111 1111 please.", ["card"]),
        ("Card 5500-0000-0000-0004 on file.", ["card"]),
        ("Mail a@b.io or call 090-1234-5678.", ["email", "phone"]),
        # negatives: a failing Luhn checksum, a date, a price, a version, a plain count
        ("Pay with 4111 1111 1111 1112 please.", []),
        ("The meeting is on 2024-05-17 at 10:30.", []),
        ("It costs 12,800 yen, version 3.12.1, and 1234567 users.", []),
        ("No personal data in this sentence at all.", []),
    ],
)
def test_pii_kinds(text: str, kinds: list[str]):
    assert pii_kinds(text) == kinds


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710") and not luhn_valid("4111-1111")
