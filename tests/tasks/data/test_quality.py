"""The quality run: each reason fires on a crafted row and not on clean ones beside it, in check order."""

from __future__ import annotations

import pytest

from ftflow.configs.schema import QualityConfig
from ftflow.tasks.data.dedup import fold, jaccard
from ftflow.tasks.data.quality import REASONS, check_leakage, run_quality
from ftflow.tasks.data.rows import Record

EN = [
    (
        "How do I reset the password of my office laptop?",
        "Open the settings page, choose security, then follow the reset wizard.",
    ),
    (
        "Which train goes from the harbor to the museum district?",
        "Take the blue line northbound and change at the central station.",
    ),
    (
        "Could you explain what a budget forecast usually contains?",
        "It lists expected income and spending per month, with the assumptions behind them.",
    ),
    (
        "Why does my sourdough bread come out flat every time?",
        "The starter is probably too weak; feed it twice a day before baking again.",
    ),
]
JA = [
    ("東京から大阪まで新幹線でどのくらいかかりますか？", "のぞみを使うと、だいたい二時間半で到着します。"),
    (
        "梅雨の時期に洗濯物を早く乾かす方法を教えてください。",
        "除湿機と扇風機を一緒に使うと、部屋の中でもよく乾きます。",
    ),
]
JA_LONG = (
    "昨日は朝から雨が降っていたので、駅前の図書館に行って歴史の本を三冊借りました。"
    "午後には雨がやんだので、公園を散歩しながら桜の写真をたくさん撮りました。"
    "夜は家族と一緒に近所の食堂で天ぷらとお蕎麦を食べて、とても楽しい一日になりました。"
)


def sft(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}


def records(rows: list[dict], source: str = "train.jsonl") -> list[Record]:
    return [Record(row=r, source=source, line=i + 1) for i, r in enumerate(rows)]


def quarter_chars(rows: list[dict]) -> list[int]:
    """A tokenizer stand-in: one token per 4 characters of content, plus 2 per message."""
    out = []
    for row in rows:
        texts = [m["content"] for m in (row.get("messages") or row["prompt"])]
        texts += [row[k] for k in ("chosen", "rejected") if k in row]
        out.append(sum(len(t) for t in texts) // 4 + 2 * len(texts))
    return out


CFG = QualityConfig(min_tokens=8, max_tokens=200)


def clean_rows() -> list[dict]:
    return [sft(u, a) for u, a in EN + JA]


def run(rows: list[dict], cfg: QualityConfig = CFG, kind: str = "sft"):
    return run_quality(records(rows), kind, cfg, token_length=quarter_chars)


def reason_by_line(result) -> dict[int, str]:
    return {d.line: d.reason for d in result.dropped}


def test_clean_rows_are_all_kept_with_their_token_lengths():
    rows = clean_rows()
    result = run(rows)
    assert result.dropped == [] and result.reasons == {}
    assert [r.line for r in result.kept] == list(range(1, len(rows) + 1))
    assert result.token_lengths == quarter_chars(rows)
    assert result.stats["languages"] == {"en": len(EN), "ja": len(JA)}
    assert result.stats["token_length_source"] == "tokenizer"
    assert result.kept_ratio == 1.0 and set(result.stats["timings_s"]) >= {"token_length", "near_duplicate", "language"}


BAD_ROWS = {
    "malformed": {
        "messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Forty-two is the answer here."}]
    },
    "empty_content": sft("Please describe the harbor at night in detail.", "  \n\t "),
    "role_order": {
        "messages": [
            {"role": "assistant", "content": "Hello, how can I help you today?"},
            {"role": "user", "content": "Tell me about the history of the old castle."},
        ]
    },
    "too_short": sft("Hi", "Yo"),
    "too_long": sft(
        "Write a very long essay about rivers and their ecosystems.", "Rivers carry water and sediment. " * 40
    ),
    "language": sft(
        "Pouvez-vous m'expliquer comment fonctionne la bibliothèque municipale ?",
        "Bien sûr. La bibliothèque ouvre à neuf heures et les livres sont prêtés pour trois semaines.",
    ),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_reason_fires_on_its_row_and_spares_the_clean_ones(reason: str):
    rows = clean_rows() + [BAD_ROWS[reason]]
    result = run(rows)
    assert reason_by_line(result) == {len(rows): reason}
    assert len(result.kept) == len(rows) - 1
    assert result.reasons == {reason: 1}
    assert result.dropped[0].row is rows[-1] and result.dropped[0].source == "train.jsonl"


@pytest.mark.parametrize(
    "messages, detail",
    [
        (
            [("user", "Tell me about the history of the old castle."), ("user", "And about the bridge next to it?")],
            "message 2: expected 'assistant'",
        ),
        (
            [
                ("user", "Tell me about the history of the old castle."),
                ("assistant", "It was built in 1602."),
                ("user", "And later?"),
            ],
            "end with an assistant",
        ),
        (
            [
                ("user", "Tell me about the history of the old castle."),
                ("system", "Be brief."),
                ("assistant", "Built in 1602."),
            ],
            "got 'system'",
        ),
        (
            [
                ("system", "Be brief and polite."),
                ("user", "Tell me about the castle history."),
                ("tool", "castle.db: 1602"),
            ],
            "got 'tool'",
        ),
    ],
)
def test_role_order_rejects_each_broken_conversation_with_a_precise_detail(messages, detail):
    bad = {"messages": [{"role": r, "content": c} for r, c in messages]}
    result = run(clean_rows() + [bad])
    assert [d.reason for d in result.dropped] == ["role_order"]
    assert detail in result.dropped[0].detail


def test_role_order_accepts_a_leading_system_turn_and_multi_turn():
    row = {
        "messages": [
            {"role": "system", "content": "You answer questions about trains."},
            {"role": "user", "content": "Which train goes from the harbor to the airport?"},
            {"role": "assistant", "content": "The red line runs from the harbor straight to the airport."},
            {"role": "user", "content": "How often does that train leave the harbor station?"},
            {"role": "assistant", "content": "Every twelve minutes during the day, every half hour at night."},
        ]
    }
    assert run(clean_rows() + [row]).dropped == []


def test_too_long_detail_names_the_length_and_the_limit():
    result = run(clean_rows() + [BAD_ROWS["too_long"]])
    n = quarter_chars([BAD_ROWS["too_long"]])[0]
    assert result.dropped[0].detail == f"token length {n} > max_tokens 200"


def test_a_row_is_dropped_for_its_first_reason_only():
    empty_and_disordered = {
        "messages": [{"role": "assistant", "content": ""}, {"role": "user", "content": "What now?"}]
    }
    long_and_duplicate = sft(EN[0][0], EN[0][1] + " Also." * 300)
    french = BAD_ROWS["language"]
    rows = clean_rows() + [empty_and_disordered, long_and_duplicate, long_and_duplicate, french, french]
    result = run(rows)
    n = len(clean_rows())
    # The second French row is a duplicate of the first, which passed the checks before
    # exact_duplicate and only later failed the language check.
    assert reason_by_line(result) == {
        n + 1: "empty_content",
        n + 2: "too_long",
        n + 3: "too_long",
        n + 4: "language",
        n + 5: "exact_duplicate",
    }


def test_exact_duplicate_after_normalization_keeps_the_first():
    original = sft("What is the capital of Japan and why?", "Tokyo has been the capital since 1868.")
    variant = sft("  WHAT is the capital of   Japan and why？ ", "Ｔｏｋｙｏ has been the capital since １８６８.")
    different = sft("What is the capital of France and why?", "Paris has been the capital for centuries.")
    result = run(clean_rows() + [original, variant, different])
    n = len(clean_rows())
    assert reason_by_line(result) == {n + 2: "exact_duplicate"}
    assert result.dropped[0].detail == f"same text as train.jsonl:{n + 1}"


def test_japanese_near_duplicate_is_dropped_and_a_different_japanese_text_is_kept():
    edited = JA_LONG.replace("三冊", "四冊")
    assert 0.9 <= jaccard(fold(JA_LONG), fold(edited)) < 1.0
    rows = clean_rows() + [
        sft("昨日は何をしましたか？", JA_LONG),
        sft("昨日は何をしましたか？", edited),
        sft(
            "昨日は何をしましたか？", JA_LONG.replace("桜", "紅葉").replace("天ぷら", "焼き魚").replace("歴史", "科学")
        ),
    ]
    result = run(rows, QualityConfig(min_tokens=8, max_tokens=400))
    n = len(clean_rows())
    assert reason_by_line(result) == {n + 2: "near_duplicate"}
    assert f"near-duplicate of train.jsonl:{n + 1}" in result.dropped[0].detail


def test_english_near_duplicate_is_dropped_but_a_similar_below_threshold_row_is_kept():
    base = (
        "The quarterly report shows revenue grew by four percent while costs stayed flat, "
        "mainly thanks to the new subscription plan launched in the spring."
    )
    near = base.replace("four", "five")
    far = base.replace("revenue grew by four percent", "headcount fell sharply").replace("spring", "autumn")
    assert jaccard(fold(base), fold(far)) < 0.9
    rows = clean_rows() + [
        sft("Summarize the report.", base),
        sft("Summarize the report.", near),
        sft("Summarize the report.", far),
    ]
    result = run(rows)
    assert [d.reason for d in result.dropped] == ["near_duplicate"] and result.dropped[0].line == len(clean_rows()) + 2


def test_a_shared_system_prompt_does_not_make_short_rows_near_duplicates():
    system = "You are a meticulous assistant for a logistics company. " * 20
    rows = [sft(u, a, system=system) for u, a in EN + JA]
    assert run(rows, QualityConfig(min_tokens=8, max_tokens=2000)).dropped == []


def test_language_check_can_be_disabled_or_narrowed():
    rows = clean_rows() + [BAD_ROWS["language"]]
    assert run(rows, QualityConfig(min_tokens=8, max_tokens=200, languages=[])).dropped == []
    only_ja = run(rows, QualityConfig(min_tokens=8, max_tokens=200, languages=["ja"]))
    assert sorted(reason_by_line(only_ja)) == [1, 2, 3, 4, len(rows)]


def test_unknown_language_code_is_a_config_error():
    with pytest.raises(ValueError, match="quality.languages"):
        run(clean_rows(), QualityConfig(languages=["en", "klingon"]))


@pytest.mark.parametrize("mode", ["flag", "drop", "off"])
def test_pii_flag_drop_off(mode: str):
    rows = clean_rows() + [
        sft(
            "How can customers reach our support team quickly?",
            "Tell them to mail support@example.com or call 03-1234-5678.",
        )
    ]
    result = run(rows, QualityConfig(min_tokens=8, max_tokens=200, pii=mode))
    last = len(rows)
    if mode == "drop":
        assert reason_by_line(result) == {last: "pii"} and "email" in result.dropped[0].detail
        assert result.flags == {}
    else:
        assert result.dropped == [] and len(result.kept) == last
        assert result.flags == ({"pii": 1} if mode == "flag" else {})
        assert result.kept[-1].flags == (["pii"] if mode == "flag" else [])
        assert all(r.flags == [] for r in result.kept[:-1])
    assert result.stats["pii_kinds"] == ({} if mode == "off" else {"email": 1, "phone": 1})


def test_flagging_does_not_mutate_the_input_records():
    recs = records(
        clean_rows() + [sft("Where should invoices be sent this month?", "Send them to billing@example.com as usual.")]
    )
    result = run_quality(recs, "sft", CFG, token_length=quarter_chars)
    assert result.kept[-1].flags == ["pii"] and recs[-1].flags == []


PAIRS = [
    pair("Which city is the capital of Japan?", "Tokyo is the capital of Japan.", "Osaka."),
    pair(
        "Give me a short greeting for a business email.",
        "Good morning, I hope this message finds you well.",
        "Yo what's up",
    ),
    pair("How many legs does a spider have?", "Eight.", "A spider has six legs, like every other insect."),
]


def test_preference_pairs_checks_and_stats():
    rows = PAIRS + [
        pair("Name a primary color for the flag design.", "Red is a primary color.", "Red is a primary color."),
        pair("Name a primary color for the flag design.", "Blue is a primary colour.", "  BLUE is a primary colour. "),
        pair("Which city is the capital of Japan?", "The capital of Japan is Tokyo.", "Kyoto, of course."),
        {
            "prompt": [
                {"role": "user", "content": "Finish the sentence about the weather."},
                {"role": "assistant", "content": "The weather today is"},
            ],
            "chosen": "sunny and warm.",
            "rejected": "banana",
        },
        pair("Describe the lake near the village in spring.", "", "It is cold and full of fish all year long."),
    ]
    result = run(rows, kind="preference")
    assert reason_by_line(result) == {
        4: "chosen_equals_rejected",
        5: "chosen_equals_rejected",
        7: "role_order",
        8: "empty_content",
    }
    assert "after normalization" in result.dropped[1].detail
    assert [r.line for r in result.kept] == [1, 2, 3, 6]
    # A second pair for the same prompt is legitimate DPO data: flagged, counted, kept.
    assert result.kept[-1].flags == ["duplicate_prompt"] and result.flags == {"duplicate_prompt": 1}
    assert result.stats["duplicate_prompt_share"] == pytest.approx(1 / 4)
    # chosen is longer than rejected in pairs 1, 2 and 6, shorter in pair 3
    assert result.stats["length_bias"] == pytest.approx(3 / 4)
    assert result.token_lengths == quarter_chars([rows[i - 1] for i in (1, 2, 3, 6)])


def test_every_input_row_ends_up_exactly_once_in_kept_or_dropped():
    rows = (
        clean_rows() + list(BAD_ROWS.values()) + [clean_rows()[0], BAD_ROWS["language"], "not a row", {"messages": []}]
    )
    result = run(rows, QualityConfig(min_tokens=8, max_tokens=200, pii="drop"))
    lines = [r.line for r in result.kept] + [d.line for d in result.dropped]
    assert sorted(lines) == list(range(1, len(rows) + 1))
    assert len(result.kept) + len(result.dropped) == result.counts_in == len(rows)
    assert [r.line for r in result.kept] == sorted(r.line for r in result.kept)
    assert [d.line for d in result.dropped] == sorted(d.line for d in result.dropped)
    assert set(result.reasons) <= set(REASONS) and sum(result.reasons.values()) == len(result.dropped)
    assert len(result.token_lengths) == len(result.kept)


def test_decisions_do_not_depend_on_how_rows_are_batched_for_the_tokenizer_thread(monkeypatch):
    """Token length, repetition and language run batch by batch with the tokenizer a batch ahead; cutting the
    rows into batches of 3 (dropped rows and duplicates straddling the cuts) must give the same result."""
    import ftflow.tasks.data.quality as quality

    looping = sft("Are you sure?", "Sure.\nSure.\nSure.\nSure.")
    rows = clean_rows() + list(BAD_ROWS.values()) + [looping] + clean_rows() + [BAD_ROWS["language"], "not a row"]
    cfg = QualityConfig(min_tokens=8, max_tokens=200, pii="drop")
    whole = run(rows, cfg)
    monkeypatch.setattr(quality, "TOKEN_BATCH_ROWS", 3)
    cut = run(rows, cfg)
    assert [(d.line, d.reason, d.detail) for d in cut.dropped] == [(d.line, d.reason, d.detail) for d in whole.dropped]
    assert [r.line for r in cut.kept] == [r.line for r in whole.kept] and cut.token_lengths == whole.token_lengths
    assert cut.stats["languages"] == whole.stats["languages"]
    assert {"too_long", "repetition", "exact_duplicate", "language"} <= set(cut.reasons)


def test_without_a_tokenizer_the_estimate_is_used_and_said_so():
    result = run_quality(records(clean_rows()), "sft", CFG)
    assert result.stats["token_length_source"].startswith("estimate")
    assert len(result.token_lengths) == len(result.kept) == len(clean_rows()) and min(result.token_lengths) > 8


def test_a_token_length_function_returning_the_wrong_count_is_refused():
    with pytest.raises(ValueError, match="lengths for"):
        run_quality(records(clean_rows()), "sft", CFG, token_length=lambda rows: [10])


def test_leakage_finds_exact_and_near_prompt_copies_only():
    prompt = "Explain how the quarterly budget forecast is prepared and who signs it off at the end."
    train = records([sft(prompt, "Finance drafts it."), sft(EN[1][0], EN[1][1]), sft(JA_LONG, "はい。")], "train.jsonl")
    heldout = records(
        [
            sft(
                "  EXPLAIN how the quarterly budget forecast is prepared and who signs it off at the end. ",
                "Other answer.",
            ),
            sft(JA_LONG.replace("三冊", "四冊"), "いいえ。"),
            sft(EN[2][0], EN[2][1]),
        ],
        "heldout.jsonl",
    )
    hits = check_leakage(train, heldout, threshold=0.9)
    assert [(h["train_line"], h["heldout_line"], h["kind"]) for h in hits] == [(1, 1, "exact"), (3, 2, "near")]
    assert hits[0]["similarity"] == 1.0 and 0.9 <= hits[1]["similarity"] < 1.0
    assert hits[1]["train_source"] == "train.jsonl" and hits[1]["heldout_source"] == "heldout.jsonl"
    assert check_leakage(train, records([sft(EN[3][0], EN[3][1])]), threshold=0.9) == []


def test_leakage_compares_prompts_not_answers_and_works_for_pairs():
    train = records([pair("Which city is the capital of Japan?", "Tokyo.", "Osaka.")])
    same_prompt = records([pair("which city is the capital of japan?", "It is Tokyo.", "Nagoya.")])
    same_answers = records([pair("Name the largest city in Japan.", "Tokyo.", "Osaka.")])
    assert [h["kind"] for h in check_leakage(train, same_prompt, 0.9)] == ["exact"]
    assert check_leakage(train, same_answers, 0.9) == []
