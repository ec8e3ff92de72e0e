"""The shipped evaluate metrics: known answers on hand-made examples, loaded offline by local path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
from rouge_score import rouge_scorer

from ftflow.tasks.evaluate.metrics import (
    METRIC_NAMES,
    SCORE_KEYS,
    load_metric,
    load_suite,
    per_example_scores,
    score_generations,
)
from ftflow.tasks.evaluate.metrics.eos_stop import stopped_flags
from ftflow.tasks.evaluate.metrics.json_match import first_json_object, reference_object, score_example
from ftflow.tasks.evaluate.metrics.rouge_l import CjkAwareTokenizer, rouge_l_f1
from ftflow.tasks.evaluate.metrics.sacre import bleu_tokenizer_for

EOS = "<|im_end|>"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: any request fails at once
REPO_ROOT = Path(__file__).resolve().parents[3]


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[:2]}")


@pytest.fixture(scope="module")
def loaded():
    """Every metric and the combined suite, loaded with the Hub unreachable and sockets refused.

    The sockets stay refused for the whole module, so computing does not reach out either.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        metrics = {name: load_metric(name) for name in METRIC_NAMES}
        yield {"metrics": metrics, "suite": load_suite()}


# --- json_match -------------------------------------------------------------------------------


def test_json_object_extracted_from_prose_fence_and_eos():
    text = 'Sure:\n```json\n{"city": "東京", "n": [1, {"x": null}]}\n```<|im_end|>'
    assert first_json_object(text) == {"city": "東京", "n": [1, {"x": None}]}
    assert first_json_object('a {broken and then {"ok": true}') == {"ok": True}
    assert first_json_object("[1, 2] no object here") is None
    assert reference_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert reference_object("use {} for sets") is None  # prose around braces is a text reference


def test_json_exact_match_is_canonical():
    # key order, number spelling and NFKC forms of strings do not matter; the EOS tail is cut
    row = score_example('{"b": "ＡＢＣ", "a": 1}<|im_end|>{"junk": 1}', '{"a": 1.0, "b": "ABC"}', EOS)
    assert row == {"exact_match": True, "field_accuracy": 1.0, "json_valid": True}


def test_json_type_mismatch_is_not_a_match():
    row = score_example('{"flag": 1}', '{"flag": true}')
    assert row == {"exact_match": False, "field_accuracy": 0.0, "json_valid": True}


def test_json_partial_fields():
    reference = '{"name": "佐藤", "age": 30, "city": "大阪", "tags": ["a", "b"]}'
    row = score_example('{"name": "佐藤", "age": 31, "city": "大阪", "tags": ["b", "a"], "extra": 0}', reference)
    assert row["exact_match"] is False
    assert row["field_accuracy"] == pytest.approx(2 / 4)


def test_json_missing_object_scores_zero():
    row = score_example("I cannot answer that.<|im_end|>", '{"a": 1}', EOS)
    assert row == {"exact_match": False, "field_accuracy": 0.0, "json_valid": False}


def test_text_reference_uses_normalized_equality():
    assert score_example("  東京　タワー \n<|im_end|>", "東京 タワー", EOS)["exact_match"] is True
    wrong = score_example("大阪<|im_end|>", "東京", EOS)
    assert wrong == {"exact_match": False, "field_accuracy": 0.0, "json_valid": False}


def test_case_is_part_of_the_answer():
    # Unlike duplicate detection, scoring does not case-fold: "sapporo" is not the catalogue spelling.
    assert score_example('{"city": "sapporo"}', '{"city": "Sapporo"}')["exact_match"] is False
    assert score_example("tokyo", "Tokyo")["exact_match"] is False


def test_demo_answers_score_with_the_json_match_metric():
    ref = '{"name": "佐藤花子", "item": "towel", "qty": 12, "city": "Sapporo", "lang": "ja"}'
    wrapped = 'Sure! ```json\n{"lang": "ja", "city": "Sapporo", "qty": 12, "item": "towel", "name": "佐藤花子"}\n``` done {"x": 1}'
    assert score_example(wrapped, ref) == {"exact_match": True, "field_accuracy": 1.0, "json_valid": True}
    assert score_example('{"name": "佐藤花子", "item": "towel", "qty": "12", "city": "札幌", "lang": "ja"}', ref) == {
        "exact_match": False,
        "field_accuracy": 0.6,
        "json_valid": True,
    }
    assert (
        score_example('{"name": "佐藤花子", "item": "towel", "qty": 12, "city": "Sapporo", "lang": "ja", "x": 1}', ref)[
            "exact_match"
        ]
        is False
    )
    assert score_example("佐藤花子さんがタオルを12枚", ref) == {
        "exact_match": False,
        "field_accuracy": 0.0,
        "json_valid": False,
    }
    assert score_example('{"name": broken', ref) == {"exact_match": False, "field_accuracy": 0.0, "json_valid": False}


def test_json_match_metric_averages(loaded):
    result = loaded["metrics"]["json_match"].compute(
        predictions=['{"a": 1, "b": 2}<|im_end|>', '{"a": 1, "b": 3}<|im_end|>', "no json"],
        references=['{"a": 1, "b": 2}', '{"a": 1, "b": 2}', '{"a": 1, "b": 2}'],
        eos_token=EOS,
    )
    assert result == pytest.approx({"exact_match": 1 / 3, "field_accuracy": (1 + 0.5 + 0) / 3, "json_valid": 2 / 3})


# --- rouge_l ----------------------------------------------------------------------------------


def test_tokenizer_splits_cjk_by_character_and_other_text_by_word():
    tokens = CjkAwareTokenizer().tokenize("東京 Tower、２０２４年です!")
    assert tokens == ["東", "京", "tower", "2024", "年", "で", "す"]


def test_default_rouge_tokenizer_drops_japanese():
    # why the module carries its own tokenizer
    default = rouge_scorer.RougeScorer(["rougeL"]).score("東京は日本の首都だ", "東京は日本の首都だ")
    assert default["rougeL"].fmeasure == 0.0


def test_rouge_l_japanese_identical_and_partial(loaded):
    metric = loaded["metrics"]["rouge_l"]
    same = metric.compute(
        predictions=["東京は日本の首都だ。<|im_end|>"], references=["東京は日本の首都だ。"], eos_token=EOS
    )
    assert same["rougeL"] == pytest.approx(1.0)
    # 10 vs 9 characters, common subsequence of 8: F1 = 2*8 / (10 + 9)
    partial = metric.compute(predictions=["東京は日本の首都です"], references=["東京は日本の首都だ"])
    assert partial["rougeL"] == pytest.approx(16 / 19)
    unrelated = metric.compute(predictions=["りんご"], references=["東京"])
    assert unrelated["rougeL"] == 0.0


def test_rouge_l_english_words():
    assert rouge_l_f1("the cat sat", "The cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l_f1("the cat<|im_end|>dog dog", "the cat", EOS) == pytest.approx(1.0)


# --- sacre ------------------------------------------------------------------------------------


def test_bleu_tokenizer_choice():
    assert bleu_tokenizer_for(["The capital is Tokyo.", "東京です"]) == "char"
    assert bleu_tokenizer_for(["The capital is Tokyo."]) == "intl"


def test_sacre_perfect_and_disjoint(loaded):
    metric = loaded["metrics"]["sacre"]
    sentence = "The quick brown fox jumps over the lazy dog ."
    perfect = metric.compute(predictions=[sentence + EOS], references=[sentence], eos_token=EOS)
    assert perfect == pytest.approx({"bleu": 1.0, "chrf": 1.0})
    disjoint = metric.compute(predictions=["123 456"], references=[sentence])
    assert disjoint == pytest.approx({"bleu": 0.0, "chrf": 0.0})


def test_sacre_japanese_partial_overlap_scores_with_char_tokens(loaded):
    metric = loaded["metrics"]["sacre"]
    preds, refs = ["東京は日本の首都です。"], ["東京は日本の首都だ。"]
    auto = metric.compute(predictions=preds, references=refs)
    assert 0.3 < auto["bleu"] < 1.0 and 0.3 < auto["chrf"] < 1.0
    # the whole sentence is one "word" under intl: BLEU collapses to 0
    assert metric.compute(predictions=preds, references=refs, bleu_tokenize="intl")["bleu"] == 0.0


# --- eos_stop ---------------------------------------------------------------------------------


def test_eos_stop_counts_marker(loaded):
    metric = loaded["metrics"]["eos_stop"]
    preds = [
        '{"a": 1}<|im_end|>',
        '{"a": 1}<|im_end|><|endoftext|><|endoftext|>',  # batch padding after the marker
        '{"a": 1} and on and on',  # ran into max_new_tokens
        "ok<|endoftext|>",
    ]
    assert metric.compute(predictions=preds, eos_token=EOS) == {"eos_stop_rate": 0.5}
    assert metric.compute(predictions=preds, eos_token=[EOS, "<|endoftext|>"]) == {"eos_stop_rate": 0.75}


def test_eos_stop_explicit_flags_and_missing_marker():
    assert stopped_flags(["a", "b"], stopped=[1, 0]) == [True, False]
    with pytest.raises(ValueError, match="eos_token"):
        stopped_flags(["a<|im_end|>"], eos_token=None)
    with pytest.raises(ValueError, match="2 predictions"):
        stopped_flags(["a", "b"], stopped=[True])


# --- the combined suite -----------------------------------------------------------------------

PREDICTIONS = [
    '{"name": "佐藤", "age": 30}<|im_end|><|endoftext|>',
    '{"name": "佐藤", "age": 31}<|im_end|>',
    '{"name": "鈴木", "age": 30, "name2": "x"} and it keeps going without end',
    "東京は日本の首都です。<|im_end|>",
]
REFERENCES = [
    '{"age": 30, "name": "佐藤"}',
    '{"name": "佐藤", "age": 30}',
    '{"name": "佐藤", "age": 30}',
    "東京は日本の首都です。",
]


def test_modules_are_evaluate_metrics_with_info(loaded):
    for name, metric in loaded["metrics"].items():
        assert isinstance(metric, evaluate.Metric)
        assert metric.name == name
        assert metric.description and metric.citation
        assert "predictions" in metric.features


def test_combined_suite_returns_every_key_offline(loaded):
    suite = loaded["suite"]
    results = suite.compute(predictions=PREDICTIONS, references=REFERENCES, eos_token=EOS)
    assert set(results) == set(SCORE_KEYS)
    assert results["exact_match"] == pytest.approx(2 / 4)
    assert results["field_accuracy"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert results["json_valid"] == pytest.approx(3 / 4)
    assert results["eos_stop_rate"] == pytest.approx(3 / 4)
    # combine hands the same inputs and keywords to each module: results equal the single modules'
    for name in ("rouge_l", "sacre"):
        alone = loaded["metrics"][name].compute(predictions=PREDICTIONS, references=REFERENCES, eos_token=EOS)
        assert {k: results[k] for k in alone} == pytest.approx(alone)


def test_score_generations_flat_stable_keys(loaded):
    scores = score_generations(PREDICTIONS, REFERENCES, EOS, suite=loaded["suite"])
    assert tuple(scores) == SCORE_KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())
    assert scores["exact_match"] == pytest.approx(0.5)
    perfect = score_generations([r + EOS for r in REFERENCES], REFERENCES, EOS, suite=loaded["suite"])
    assert perfect == pytest.approx({k: 1.0 for k in SCORE_KEYS} | {"json_valid": 0.75})
    # the caller's own stop verdicts replace the marker search
    flagged = score_generations(PREDICTIONS, REFERENCES, EOS, stopped=[True] * 4, suite=loaded["suite"])
    assert flagged["eos_stop_rate"] == 1.0


def test_score_generations_rejects_bad_inputs(loaded):
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_generations(["a", "b"], ["a"], EOS, suite=loaded["suite"])
    with pytest.raises(ValueError, match="no generations"):
        score_generations([], [], EOS, suite=loaded["suite"])
    partial_suite = evaluate.combine([loaded["metrics"]["json_match"]])
    with pytest.raises(ValueError, match="did not produce"):
        score_generations(["a"], ["a"], EOS, suite=partial_suite)


def test_per_example_scores_average_to_corpus_scores(loaded):
    rows = per_example_scores(PREDICTIONS, REFERENCES, EOS)
    assert [r["exact_match"] for r in rows] == [True, False, False, True]
    assert [r["field_accuracy"] for r in rows] == [1.0, 0.5, 0.5, 1.0]
    assert [r["stopped"] for r in rows] == [True, True, False, True]
    corpus = score_generations(PREDICTIONS, REFERENCES, EOS, suite=loaded["suite"])
    for key, corpus_key in (("field_accuracy", "field_accuracy"), ("rougeL", "rougeL"), ("stopped", "eos_stop_rate")):
        assert sum(float(r[key]) for r in rows) / len(rows) == pytest.approx(corpus[corpus_key])


def test_unknown_metric_name_is_refused():
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        load_metric("rouge")
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("_text")


def test_cold_cache_load_with_hub_unreachable(tmp_path):
    """A fresh machine: empty HF cache, offline flags, and an endpoint nothing listens on."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": DEAD_ENDPOINT,
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    code = (
        "import json; from ftflow.tasks.evaluate.metrics import score_generations; "
        f"print(json.dumps(score_generations({PREDICTIONS!r}, {REFERENCES!r}, {EOS!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert list((tmp_path / "hf" / "modules" / "evaluate_modules" / "metrics").glob("json_match/*/_text.py"))


def test_hub_metric_cannot_load_here(loaded):
    # the reason the project ships its own modules: a Hub name needs the network
    with pytest.raises((AssertionError, ConnectionError, FileNotFoundError)):
        evaluate.load("rouge")
