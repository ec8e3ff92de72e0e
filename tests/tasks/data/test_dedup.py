"""Duplicates: the folded text they are judged on, exact repeats, MinHash estimates, near pairs across two lists."""

from __future__ import annotations

from ftflow.tasks.data.dedup import exact_duplicates, fold, jaccard, minhash_signatures, near_pairs, normalized_views

JA_LONG = (
    "昨日は朝から雨が降っていたので、駅前の図書館に行って歴史の本を三冊借りました。"
    "午後には雨がやんだので、公園を散歩しながら桜の写真をたくさん撮りました。"
    "夜は家族と一緒に近所の食堂で天ぷらとお蕎麦を食べて、とても楽しい一日になりました。"
)


def test_fold_ignores_case_width_and_spacing():
    assert fold("  Ｈｅｌｌｏ\u3000 WORLD\n\tＳtraße ") == "hello world strasse"


def test_normalized_views_key_on_roles_but_judge_near_duplicates_without_the_system_turn():
    row = {
        "messages": [
            {"role": "system", "content": "Be Brief."},
            {"role": "user", "content": "HI  there"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    whole, talk = normalized_views(row)
    assert whole == "system\x1fbe brief.\x1euser\x1fhi there\x1eassistant\x1fhello."
    assert talk == "hi there hello."


def test_exact_duplicates_point_at_the_first_copy():
    assert exact_duplicates(["a", "b", "a", "c", "b", "a"]) == {2: 0, 4: 1, 5: 0}
    assert exact_duplicates([]) == {}


def test_minhash_signature_agreement_estimates_jaccard():
    a = fold(JA_LONG)
    b = fold(JA_LONG.replace("公園", "川沿い"))
    sig = minhash_signatures([a, b, a])
    assert (sig[0] == sig[2]).all()
    assert abs((sig[0] == sig[1]).mean() - jaccard(a, b)) < 0.15


def test_near_pairs_finds_close_texts_across_the_lists_only():
    edited = JA_LONG.replace("三冊", "四冊")
    other = "The quarterly report shows revenue grew by four percent while costs stayed flat."
    pairs = near_pairs([other, JA_LONG], [edited, JA_LONG], threshold=0.9)
    assert [(i, j) for i, j, _ in pairs] == [(1, 0), (1, 1)]
    assert 0.9 <= pairs[0][2] < 1.0 and pairs[1][2] == 1.0
    assert near_pairs([], [JA_LONG], 0.9) == []
