"""The seeded demo task: deterministic, disjoint, checkable, and defective exactly where it says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftflow.configs.schema import DemoDataConfig
from ftflow.tasks.data.demo import KEYS, PREFERENCE_DEFECTS, SFT_DEFECTS, generate_demo, render_answer
from ftflow.tasks.evaluate.metrics.json_match import score_example

FILES = ("sft", "preference", "heldout", "heldout_preference", "manifest")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
SMALL = DemoDataConfig(seed=3, n_sft=120, n_preference=60, n_heldout=30, defect_rate=0.1)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return generate_demo(DemoDataConfig(), tmp_path_factory.mktemp("demo"))


def defect_lines(manifest: dict, kind: str) -> set[int]:
    return {line for entry in manifest["defects"][kind].values() for line in entry["lines"]}


def clean_rows(demo: dict, kind: str) -> list[dict]:
    bad = defect_lines(demo["manifest_content"], kind)
    return [row for line, row in enumerate(read_jsonl(demo[kind]), start=1) if line not in bad]


def user_text(row: dict) -> str:
    return row["prompt"][0]["content"] if "prompt" in row else row["messages"][0]["content"]


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    first, second = generate_demo(SMALL, tmp_path / "a"), generate_demo(SMALL, tmp_path / "b")
    for key in FILES:
        assert Path(first[key]).read_bytes() == Path(second[key]).read_bytes(), key


def test_different_seed_gives_different_rows(tmp_path: Path):
    first = generate_demo(SMALL, tmp_path / "a")
    second = generate_demo(SMALL.model_copy(update={"seed": 4}), tmp_path / "b")
    for key in ("sft", "preference", "heldout", "heldout_preference"):
        assert Path(first[key]).read_bytes() != Path(second[key]).read_bytes(), key


def test_return_value_names_the_files_and_the_manifest(demo: dict):
    for key in FILES:
        assert Path(demo[key]).is_file()
    assert json.loads(Path(demo["manifest"]).read_text(encoding="utf-8")) == demo["manifest_content"]
    assert demo["manifest_content"]["seed"] == 0


def test_heldout_is_disjoint_from_training(demo: dict):
    heldout = read_jsonl(demo["heldout"]) + [
        {"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]}
        for p in read_jsonl(demo["heldout_preference"])
    ]
    train = read_jsonl(demo["sft"]) + read_jsonl(demo["preference"])
    train_text = "\n".join(m["content"] for r in train for m in (r.get("messages") or r["prompt"]))
    train_prompts = {user_text(r) for r in train if (r.get("messages") or r["prompt"])}
    train_pairs = {
        (a["name"], a["city"]) for r in clean_rows(demo, "sft") for a in [json.loads(r["messages"][1]["content"])]
    }
    for row in heldout:
        prompt = row["messages"][0]["content"]
        assert prompt not in train_prompts
        sentence = prompt.split("\n", 1)[1]
        assert sentence not in train_text  # not even inside an over-long training row
        answer = json.loads(row["messages"][1]["content"])
        assert (answer["name"], answer["city"]) not in train_pairs


def test_heldout_and_heldout_preference_are_clean(demo: dict):
    heldout, pairs = read_jsonl(demo["heldout"]), read_jsonl(demo["heldout_preference"])
    assert len(heldout) == len(pairs) == 60
    for row, pair in zip(heldout, pairs):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert pair["prompt"] == row["messages"][:1]
        assert pair["chosen"] == row["messages"][1]["content"]
        assert pair["rejected"] not in ("", pair["chosen"])


@pytest.mark.parametrize(
    "cfg", [DemoDataConfig(), SMALL, DemoDataConfig(n_sft=50, n_preference=20, n_heldout=5, defect_rate=0.25)]
)
def test_defect_counts_follow_the_rate(cfg: DemoDataConfig, tmp_path: Path):
    out = generate_demo(cfg, tmp_path)
    manifest = out["manifest_content"]
    for kind, n, names in (("sft", cfg.n_sft, SFT_DEFECTS), ("preference", cfg.n_preference, PREFERENCE_DEFECTS)):
        entries = manifest["defects"][kind]
        assert set(entries) == set(names)
        for name, entry in entries.items():
            assert entry["count"] == round(cfg.defect_rate * n) == len(entry["lines"]), (kind, name)
        rows = read_jsonl(out[kind])
        assert len(rows) == manifest["counts"][kind] == n + sum(e["count"] for e in entries.values())
        assert len(defect_lines(manifest, kind)) == sum(e["count"] for e in entries.values())  # one kind per line


def test_zero_rate_injects_nothing(tmp_path: Path):
    cfg = SMALL.model_copy(update={"defect_rate": 0.0})
    out = generate_demo(cfg, tmp_path)
    assert len(read_jsonl(out["sft"])) == cfg.n_sft
    assert len(read_jsonl(out["preference"])) == cfg.n_preference
    assert all(
        e["count"] == 0 for kind in ("sft", "preference") for e in out["manifest_content"]["defects"][kind].values()
    )


def _well_formed_sft(row: dict) -> bool:
    msgs = row["messages"]
    return (
        [m["role"] for m in msgs] == ["user", "assistant"]
        and msgs[1]["content"].strip() != ""
        and len(msgs[0]["content"]) < 300
    )


def test_sft_manifest_lines_point_at_the_defective_rows(demo: dict):
    rows = read_jsonl(demo["sft"])
    at = lambda line: rows[line - 1]  # noqa: E731
    defects = demo["manifest_content"]["defects"]["sft"]
    for line, original in zip(defects["duplicate"]["lines"], defects["duplicate"]["original_lines"]):
        assert original < line and at(line) == at(original)
    for line, original in zip(defects["near_duplicate"]["lines"], defects["near_duplicate"]["original_lines"]):
        assert original < line and at(line) != at(original)
        squash = lambda r: [re.sub(r"\s+", "", m["content"]).lower() for m in r["messages"]]  # noqa: E731
        assert squash(at(line)) == squash(at(original))
    for line in defects["empty_answer"]["lines"]:
        assert at(line)["messages"][-1]["role"] == "assistant" and at(line)["messages"][-1]["content"].strip() == ""
    for line in defects["overlong"]["lines"]:
        assert len(at(line)["messages"][0]["content"]) >= 3000
    shapes = set()
    for line in defects["broken_role_order"]["lines"]:
        roles = tuple(m["role"] for m in at(line)["messages"])
        assert roles != ("user", "assistant")
        shapes.add(roles)
    assert len(shapes) == 3  # assistant first, two user turns in a row, ending with a user turn
    # Every row not named in the manifest is clean, and clean prompts are unique.
    flagged = defect_lines(demo["manifest_content"], "sft")
    clean = [r for n, r in enumerate(rows, start=1) if n not in flagged]
    assert all(_well_formed_sft(r) for r in clean)
    assert len({user_text(r) for r in clean}) == len(clean) == demo["manifest_content"]["counts"]["sft_clean"]
    assert not any(
        _well_formed_sft(at(n))
        for n in flagged
        if n not in defects["duplicate"]["lines"] and n not in defects["near_duplicate"]["lines"]
    )


def test_preference_manifest_lines_point_at_the_defective_pairs(demo: dict):
    rows = read_jsonl(demo["preference"])
    defects = demo["manifest_content"]["defects"]["preference"]
    assert all(rows[n - 1]["chosen"] == rows[n - 1]["rejected"] for n in defects["chosen_equals_rejected"]["lines"])
    assert all(rows[n - 1]["chosen"] == "" for n in defects["empty_chosen"]["lines"])
    clean = clean_rows(demo, "preference")
    assert all(p["chosen"] and p["rejected"] and p["chosen"] != p["rejected"] for p in clean)
    assert all([m["role"] for m in p["prompt"]] == ["user"] for p in rows)


def test_every_answer_is_one_line_json_with_the_fixed_keys(demo: dict):
    answers = [r["messages"][1]["content"] for r in clean_rows(demo, "sft") + read_jsonl(demo["heldout"])]
    answers += [p["chosen"] for p in clean_rows(demo, "preference") + read_jsonl(demo["heldout_preference"])]
    for text in answers:
        obj = json.loads(text)
        assert list(obj) == list(KEYS) and render_answer(obj) == text and "\n" not in text
        assert isinstance(obj["qty"], int) and 1 <= obj["qty"] <= 20
        assert obj["lang"] in ("en", "ja") and all(isinstance(obj[k], str) and obj[k] for k in ("name", "item", "city"))
        assert not JAPANESE.search(obj["item"] + obj["city"])  # catalog and romanized values


def test_both_languages_about_half(demo: dict):
    rows = clean_rows(demo, "sft")
    langs = [json.loads(r["messages"][1]["content"])["lang"] for r in rows]
    assert 0.45 <= langs.count("ja") / len(langs) <= 0.55
    for row, lang in zip(rows, langs):
        assert bool(JAPANESE.search(user_text(row))) == (lang == "ja")
        if lang == "ja":
            assert JAPANESE.search(json.loads(row["messages"][1]["content"])["name"])  # kanji names
    assert demo["manifest_content"]["languages"]["heldout"] == {"en": 30, "ja": 30}


def test_rejected_answers_are_realistic_mistakes(demo: dict):
    mistakes = demo["manifest_content"]["rejected_mistakes"]
    assert len(mistakes) >= 6 and sum(mistakes.values()) == demo["manifest_content"]["counts"]["preference_clean"]
    pairs = clean_rows(demo, "preference")
    scores = [score_example(p["rejected"], p["chosen"]) for p in pairs]
    assert all(not s["exact_match"] for s in scores)
    # Most mistakes keep some fields right: they are near misses, not noise.
    assert sum(s["field_accuracy"] > 0 for s in scores) > 0.7 * len(scores)
