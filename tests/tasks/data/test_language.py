"""Language identification: the vectorized scores equal py3langid's, and script beats n-grams for Japanese."""

from __future__ import annotations

import pytest

from ftflow.tasks.data.language import DETECTABLE_LANGUAGES, _language_bytes, detect_languages, language_text

EN = [
    (
        "How do I reset the password of my office laptop?",
        "Open the settings page, choose security, then follow the reset wizard.",
    ),
    (
        "Which train goes from the harbor to the museum district?",
        "Take the blue line northbound and change at the central station.",
    ),
]
JA = [
    ("東京から大阪まで新幹線でどのくらいかかりますか？", "のぞみを使うと、だいたい二時間半で到着します。"),
    (
        "梅雨の時期に洗濯物を早く乾かす方法を教えてください。",
        "除湿機と扇風機を一緒に使うと、部屋の中でもよく乾きます。",
    ),
]
FRENCH = "Bien sûr. La bibliothèque ouvre à neuf heures et les livres sont prêtés pour trois semaines."


def test_detects_japanese_and_english_and_says_und_for_too_little_text():
    detected = detect_languages(
        [
            EN[0][0] + " " + EN[0][1],
            JA[0][0] + JA[0][1],
            '{"name": "田中太郎", "city": "大阪"} 大阪に住んでいます',
            "ok",
        ]
    )
    assert [lang for lang, _ in detected] == ["en", "ja", "ja", "und"]


def test_vectorized_language_scores_match_py3langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ident.set_languages(list(DETECTABLE_LANGUAGES))
    texts = [u + " " + a for u, a in EN + JA] + [FRENCH, "Wie spät ist es? Ich muss um acht Uhr am Bahnhof sein."]
    for text, (lang, p) in zip(texts, detect_languages(texts)):
        ref_lang, ref_p = ident.classify(_language_bytes(text))
        assert lang == ref_lang and p == pytest.approx(ref_p, abs=1e-3)


def test_kanji_heavy_japanese_is_not_taken_for_chinese():
    text = '注文をJSONで抽出:\n注文番号7537:鈴木大輔様、椅子×１０、大阪店。\n{"name": "鈴木大輔", "item": "chair"}'
    assert detect_languages([text], ("en", "ja", "zh"))[0][0] == "ja"
    assert detect_languages(["这是一个关于订单的中文句子，我们需要检测语言类型。"], ("en", "ja", "zh"))[0][0] == "zh"


def test_language_text_skips_the_system_turn_and_the_rejected_answer():
    pair = {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital?"}],
        "chosen": "Tokyo.",
        "rejected": "東京",
    }
    assert language_text(pair) == "Capital?\nTokyo."
