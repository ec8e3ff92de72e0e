"""The free-text demo task: deterministic, multi-turn, bilingual, a house style that follows from the input,
disjoint held-out, defects exactly where the manifest says, and a recipe whose limits fit it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftflow.configs.loader import load_config
from ftflow.configs.schema import DemoDataConfig, DemoTask, QualityConfig
from ftflow.tasks.data.demo import generate_demo
from ftflow.tasks.data.demo_free_text import PREFERENCE_DEFECTS, SFT_DEFECTS
from ftflow.tasks.data.formats import load_rows
from ftflow.tasks.data.formatting import format_data
from ftflow.tasks.data.quality import chat_token_lengths, check_leakage, run_quality

CFG = DemoDataConfig(task=DemoTask.free_text, seed=0, n_sft=200, n_preference=100, n_heldout=30, defect_rate=0.06)
EXPECTED = {
    "duplicate": {"exact_duplicate"},
    "near_duplicate": {"exact_duplicate", "near_duplicate"},
    "empty_answer": {"empty_content"},
    "overlong": {"too_long"},
    "broken_role_order": {"role_order"},
    "repetition": {"repetition"},
    "chosen_equals_rejected": {"chosen_equals_rejected"},
    "empty_chosen": {"empty_content"},
}
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return generate_demo(CFG, tmp_path_factory.mktemp("free-text"))


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


def defect_lines(demo: dict, kind: str) -> set[int]:
    return {line for entry in demo["manifest_content"]["defects"][kind].values() for line in entry["lines"]}


def clean_sft(demo: dict) -> list[dict]:
    bad = defect_lines(demo, "sft")
    return [row for line, row in enumerate(read_jsonl(demo["sft"]), 1) if line not in bad]


def expected_answer(prompt: str) -> str:
    """The house style, re-derived from the user's text alone (an independent statement of the rules)."""
    if prompt.startswith("Rewrite politely: "):
        text = prompt.removeprefix("Rewrite politely: ")
        text = re.sub(r"^I need you to |(, okay\?| right away\.|\.)$", "", text)
        return f"Could you please {text[0].lower()}{text[1:]}? Thank you."
    if prompt.startswith("Summarize in one sentence: "):
        m = re.match(r"Summarize in one sentence: (.+?) works at the .+? in \w+\. On (\w+), \w+ (.+?)\. ", prompt)
        return f"In short: {m[1]} {m[3]} on {m[2]}."
    if prompt.startswith("丁寧に言い換えて:"):
        m = re.match(r"丁寧に言い換えて:(?:(.+?)を(.+?)までに|(.+?)までに(.+?)を|(.+?)、(.+?)までに)(.+?)。$", prompt)
        obj = m[1] or m[4] or m[5]
        time = m[2] or m[3] or m[6]
        return f"恐れ入りますが、{obj}を{time}までに{m[7]}いただけますか。"
    m = re.match(r"一文で要約:(.+?)さんは.+?勤務。(.+?)に(.+?)。", prompt)
    return f"要するに、{m[1]}さんは{m[2]}に{m[3]}。"


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path: Path, demo: dict):
    again = generate_demo(CFG, tmp_path / "again")
    other = generate_demo(CFG.model_copy(update={"seed": 1}), tmp_path / "other")
    for name in ("sft", "preference", "heldout", "heldout_preference", "manifest"):
        assert Path(again[name]).read_bytes() == Path(demo[name]).read_bytes()
    assert Path(other["sft"]).read_bytes() != Path(demo["sft"]).read_bytes()


def test_conversations_have_two_or_three_turns_in_one_language_about_half_each(demo: dict):
    rows = clean_sft(demo) + read_jsonl(demo["heldout"])
    turns = {len(r["messages"]) // 2 for r in rows}
    assert turns == {2, 3}
    langs = []
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * (len(row["messages"]) // 2)
        kinds = {bool(JAPANESE.search(m["content"])) for m in row["messages"]}
        assert len(kinds) == 1
        langs.append(kinds.pop())
    assert 0.4 < sum(langs) / len(langs) < 0.6


def test_every_answer_is_the_house_style_of_its_input(demo: dict):
    rows = clean_sft(demo) + read_jsonl(demo["heldout"])
    for row in rows:
        for user, assistant in zip(row["messages"][::2], row["messages"][1::2]):
            assert assistant["content"] == expected_answer(user["content"]), user["content"]


def test_heldout_is_disjoint_and_the_leakage_check_agrees(demo: dict):
    from ftflow.tasks.data.rows import Record

    train = read_jsonl(demo["sft"]) + read_jsonl(demo["preference"])
    train_text = "\n".join(m["content"] for r in train for m in (r.get("messages") or r["prompt"]))
    for row in read_jsonl(demo["heldout"]):
        for m in row["messages"][::2]:
            assert m["content"] not in train_text
    records = lambda path: [Record(r, path, i) for i, r in enumerate(read_jsonl(path), 1)]  # noqa: E731
    assert check_leakage(records(demo["sft"]), records(demo["heldout"]), 0.9) == []
    assert check_leakage(records(demo["preference"]), records(demo["heldout_preference"]), 0.9) == []


def test_preference_pairs_reject_with_a_realistic_slip(demo: dict):
    bad = defect_lines(demo, "preference")
    pairs = [p for line, p in enumerate(read_jsonl(demo["preference"]), 1) if line not in bad]
    assert len(pairs) == CFG.n_preference
    for pair in pairs:
        assert pair["chosen"] == expected_answer(pair["prompt"][-1]["content"])
        assert pair["rejected"] and pair["rejected"] != pair["chosen"]
    assert set(demo["manifest_content"]["rejected_mistakes"]) == {"echo", "off_style", "other_language", "wrong_slot"}


def test_defects_are_caught_at_their_lines_and_clean_rows_stay(demo: dict, tokenizer):
    manifest = demo["manifest_content"]
    assert set(manifest["defects"]["sft"]) == set(SFT_DEFECTS)
    assert set(manifest["defects"]["preference"]) == set(PREFERENCE_DEFECTS)
    quality = load_config("demo-chat").quality
    for kind in ("sft", "preference"):
        records, schema_dropped = load_rows(demo[kind], kind)
        assert schema_dropped == []
        result = run_quality(records, kind, quality, chat_token_lengths(tokenizer))
        dropped = {d.line: d.reason for d in result.dropped}
        injected = set()
        for defect, info in manifest["defects"][kind].items():
            assert info["count"] == round(CFG.defect_rate * (CFG.n_sft if kind == "sft" else CFG.n_preference))
            for line in info["lines"]:
                injected.add(line)
                assert dropped.get(line) in EXPECTED[defect], (kind, defect, line, dropped.get(line))
        assert set(dropped) == injected


def test_the_recipe_fits_the_task(demo: dict, tokenizer):
    cfg = load_config("demo-chat")
    assert cfg.data.demo.task == DemoTask.free_text and cfg.eval.primary_metric == "heldout_chrf"
    from ftflow.tasks.data.rows import Record

    rows = [Record(r, "sft", i) for i, r in enumerate(clean_sft(demo) + read_jsonl(demo["heldout"]), 1)]
    formatted = format_data(tokenizer, rows, [], cfg.data.system_prompt, cfg.sft, cfg.dpo)
    assert formatted.dropped["sft"] == []  # no clean row is near the window
    answers = [ex["completion"][0]["content"] for ex in formatted.sft]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert longest + 1 <= cfg.eval.max_new_tokens  # + the end-of-turn token the EOS-stop metric wants to see
    assert QualityConfig.model_fields["max_tokens"].default <= cfg.quality.max_tokens <= cfg.sft.max_length
