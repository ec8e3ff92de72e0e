"""Seeded free-text demo task (`data.demo.task: free_text`): multi-turn, English / Japanese, scored by chrF.

Each conversation has 2 or 3 user turns (Japanese: 2) in one language, each one of two tasks with a house style the
answer follows exactly, so a small model can learn it from a few hundred rows and a base model cannot guess it:

  rewrite politely   "Rewrite politely: Send the invoice by Friday."
                     → "Could you please send the invoice by Friday? Thank you."
                     「丁寧に言い換えて:金曜日までに請求書を送って。」
                     → 「恐れ入りますが、請求書を金曜日までに送っていただけますか。」
  one-line summary   "Summarize in one sentence: Mia Chen works at the bakery in Osaka. On Tuesday, Mia fixed
                     the old printer. Everyone was pleased."  → "In short: Mia Chen fixed the old printer on Tuesday."
                     → Japanese: 「要するに、佐藤さんは火曜日に古いプリンターを直しました。」

The style is a function of the input (frames stripped, slots reordered into one fixed sentence), so the
reference is the only right answer and chrF / ROUGE-L against it measure how well the style was learned.
Earlier assistant turns hold their references too, so training on every assistant turn sees 2-3 answers
per row. Preference pairs reject with a realistic slip (no rewrite, an extra sentence, a wrong slot, the
other language, the house phrase missing). Held-out conversations are drawn first and no training row
reuses one of their user turns. Defects are injected at `defect_rate` per kind like the extraction task,
with one more: `repetition` (an answer looping on itself), which the repetition check must catch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftflow.configs.schema import DemoDataConfig
from ftflow.tasks.data import demo_defects
from ftflow.tasks.data.demo import FILLER, OVERLONG_CHARS
from ftflow.tasks.data.demo_defects import defect_count, interleave

SFT_DEFECTS = ("duplicate", "near_duplicate", "empty_answer", "overlong", "broken_role_order", "repetition")
PREFERENCE_DEFECTS = demo_defects.PREFERENCE_DEFECTS

# (English verb, Japanese te-form): the polite Japanese form is always te-form + いただけますか.
VERBS = (
    ("send", "送って"),
    ("check", "確認して"),
    ("print", "印刷して"),
    ("update", "更新して"),
    ("review", "見直して"),
    ("share", "共有して"),
    ("translate", "翻訳して"),
    ("copy", "コピーして"),
    ("submit", "提出して"),
    ("prepare", "準備して"),
)
OBJECTS = (
    ("the invoice", "請求書"),
    ("the meeting notes", "会議のメモ"),
    ("the new schedule", "新しい予定表"),
    ("the sales report", "売上報告書"),
    ("the contract", "契約書"),
    ("the photos", "写真"),
    ("the price list", "価格表"),
    ("the slides", "スライド"),
    ("the receipt", "領収書"),
    ("the shipping label", "配送ラベル"),
    ("the survey results", "アンケート結果"),
    ("the budget", "予算案"),
)
DEADLINES = (
    ("by Friday", "金曜日"),
    ("by Monday", "月曜日"),
    ("by tomorrow", "明日"),
    ("by noon", "正午"),
    ("by 5 pm", "午後5時"),
    ("by the end of the week", "今週末"),
    ("by Wednesday", "水曜日"),
)
# Blunt frames around the request; the polite answer never keeps them.
EN_FRAMES = ("{Request}.", "I need you to {request}.", "{Request}, okay?", "{Request} right away.")
JA_FRAMES = ("{obj}を{time}までに{verb}。", "{time}までに{obj}を{verb}。", "{obj}、{time}までに{verb}。")

EN_FIRST = ("Mia", "Noah", "Lena", "Omar", "Sara", "Theo", "Ines", "Jonas", "Rita", "Victor", "Hana", "Paul")
EN_LAST = ("Chen", "Novak", "Silva", "Baker", "Okafor", "Rossi", "Meyer", "Khan", "Larsen", "Moreau")
JA_NAMES = ("佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "山本", "中村", "小林", "加藤", "吉田", "山田")
PLACES = (
    ("bakery", "パン屋"),
    ("library", "図書館"),
    ("hotel", "ホテル"),
    ("clinic", "診療所"),
    ("bookstore", "書店"),
    ("factory", "工場"),
    ("museum", "博物館"),
    ("post office", "郵便局"),
)
CITIES = (
    ("Osaka", "大阪"),
    ("Kyoto", "京都"),
    ("Sapporo", "札幌"),
    ("Nagoya", "名古屋"),
    ("Kobe", "神戸"),
    ("Sendai", "仙台"),
    ("Fukuoka", "福岡"),
)
DAYS = (
    ("Monday", "月曜日"),
    ("Tuesday", "火曜日"),
    ("Wednesday", "水曜日"),
    ("Thursday", "木曜日"),
    ("Friday", "金曜日"),
    ("Saturday", "土曜日"),
)
# (English deed, Japanese object, Japanese past verb)
EVENTS = (
    ("fixed the old printer", "古いプリンター", "直しました"),
    ("organized a team lunch", "チームの昼食会", "企画しました"),
    ("finished the quarterly report", "四半期報告書", "仕上げました"),
    ("found a billing error", "請求の誤り", "見つけました"),
    ("cleaned the storage room", "倉庫", "掃除しました"),
    ("moved the servers", "サーバー", "移設しました"),
    ("planned the spring sale", "春のセール", "計画しました"),
    ("repaired the front door", "正面のドア", "修理しました"),
    ("painted the waiting room", "待合室", "塗り直しました"),
)
AFTERMATH = (
    ("Everyone was pleased.", "皆喜びました。"),
    ("It took most of the afternoon.", "半日かかりました。"),
    ("The manager thanked them.", "店長が感謝しました。"),
    ("Nobody had expected it.", "誰も予想しませんでした。"),
)

# SmolLM2's tokenizer spends 2-3 tokens per Japanese character, so the Japanese side is terser and its
# conversations have 2 turns (English: 2 or 3), which keeps every row within a 384-token window.
ASK = {
    ("polite", "en"): "Rewrite politely: ",
    ("polite", "ja"): "丁寧に言い換えて:",
    ("summary", "en"): "Summarize in one sentence: ",
    ("summary", "ja"): "一文で要約:",
}
TURNS = {"en": (2, 3), "ja": (2,)}


@dataclass(frozen=True)
class Turn:
    task: str  # "polite" | "summary"
    lang: str
    slots: tuple  # the drawn slot indexes, so a slip can swap one
    text: str  # what the user wrote after the instruction
    answer: str  # the reference in the house style

    @property
    def prompt(self) -> str:
        return ASK[(self.task, self.lang)] + self.text


def polite_turn(rng: random.Random, lang: str) -> Turn:
    v, o, d, f = rng.randrange(len(VERBS)), rng.randrange(len(OBJECTS)), rng.randrange(len(DEADLINES)), rng.randrange(4)
    return _polite(lang, (v, o, d, f))


def _polite(lang: str, slots: tuple) -> Turn:
    v, o, d, f = slots
    if lang == "en":
        request = f"{VERBS[v][0]} {OBJECTS[o][0]} {DEADLINES[d][0]}"
        frame = EN_FRAMES[f % len(EN_FRAMES)]
        text = frame.format(Request=request[0].upper() + request[1:], request=request)
        return Turn("polite", lang, slots, text, f"Could you please {request}? Thank you.")
    obj, time, verb = OBJECTS[o][1], DEADLINES[d][1], VERBS[v][1]
    text = JA_FRAMES[f % len(JA_FRAMES)].format(obj=obj, time=time, verb=verb)
    return Turn("polite", lang, slots, text, f"恐れ入りますが、{obj}を{time}までに{verb}いただけますか。")


def summary_turn(rng: random.Random, lang: str) -> Turn:
    slots = (
        rng.randrange(len(EN_FIRST)),
        rng.randrange(len(EN_LAST)),
        rng.randrange(len(JA_NAMES)),
        rng.randrange(len(PLACES)),
        rng.randrange(len(CITIES)),
        rng.randrange(len(DAYS)),
        rng.randrange(len(EVENTS)),
        rng.randrange(len(AFTERMATH)),
    )
    return _summary(lang, slots)


def _summary(lang: str, slots: tuple) -> Turn:
    first, last, ja_name, place, city, day, event, after = slots
    if lang == "en":
        name = f"{EN_FIRST[first]} {EN_LAST[last]}"
        text = (
            f"{name} works at the {PLACES[place][0]} in {CITIES[city][0]}. On {DAYS[day][0]}, "
            f"{EN_FIRST[first]} {EVENTS[event][0]}. {AFTERMATH[after][0]}"
        )
        return Turn("summary", lang, slots, text, f"In short: {name} {EVENTS[event][0]} on {DAYS[day][0]}.")
    name = JA_NAMES[ja_name]
    _, obj, verb = EVENTS[event]
    text = (
        f"{name}さんは{CITIES[city][1]}の{PLACES[place][1]}勤務。{DAYS[day][1]}に{obj}を{verb}。{AFTERMATH[after][1]}"
    )
    return Turn("summary", lang, slots, text, f"要するに、{name}さんは{DAYS[day][1]}に{obj}を{verb}。")


def draw_turn(rng: random.Random, lang: str) -> Turn:
    return polite_turn(rng, lang) if rng.random() < 0.5 else summary_turn(rng, lang)


def conversation(turns: list[Turn]) -> list[dict[str, str]]:
    out = []
    for t in turns:
        out += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]
    return out


# --- rejected answers: slips a half-trained model makes -------------------------------------------


def _echo(t: Turn, rng: random.Random) -> str:
    return t.text  # no rewrite / no summary: the input handed back


def _other_language(t: Turn, rng: random.Random) -> str:
    other = "ja" if t.lang == "en" else "en"
    return (_polite if t.task == "polite" else _summary)(other, t.slots).answer


def _wrong_slot(t: Turn, rng: random.Random) -> str:
    slots = list(t.slots)
    if t.task == "polite":
        which = rng.choice((1, 2))  # the object or the deadline
        size = len(OBJECTS) if which == 1 else len(DEADLINES)
    else:
        which = 5  # the day
        size = len(DAYS)
    slots[which] = (slots[which] + rng.randrange(1, size)) % size
    return (_polite if t.task == "polite" else _summary)(t.lang, tuple(slots)).answer


def _off_style(t: Turn, rng: random.Random) -> str:
    if t.task == "polite":
        return (
            t.answer.replace("Could you please ", "Please ").replace("? Thank you.", ".")
            if t.lang == "en"
            else t.answer.replace("恐れ入りますが、", "").replace("いただけますか。", "ください。")
        )
    if t.lang == "en":
        return t.answer.replace("In short: ", "Summary: ") + " " + AFTERMATH[t.slots[7]][0]
    return t.answer.replace("要するに、", "まとめ:") + AFTERMATH[t.slots[7]][1]


MISTAKES: dict[str, Callable[[Turn, random.Random], str]] = {
    "echo": _echo,
    "other_language": _other_language,
    "wrong_slot": _wrong_slot,
    "off_style": _off_style,
}


# --- sampling ----------------------------------------------------------------------------------


def _conversations(rng: random.Random, count: int, taken: set[str]) -> list[list[Turn]]:
    """`count` conversations, half English, of TURNS turns; no user turn repeats one in `taken` (which grows)."""
    langs = ["en" if i % 2 == 0 else "ja" for i in range(count)]
    rng.shuffle(langs)
    out = []
    for lang in langs:
        turns: list[Turn] = []
        want = rng.choice(TURNS[lang])
        for _ in range(10_000):
            t = draw_turn(rng, lang)
            if t.prompt in taken:
                continue
            taken.add(t.prompt)
            turns.append(t)
            if len(turns) == want:
                break
        else:  # pragma: no cover - only with absurd sizes; the turn space is ~10^5 per language
            raise ValueError(f"cannot draw {count} distinct free-text conversations")
        out.append(turns)
    return out


def _pair(turns: list[Turn], rng: random.Random) -> tuple[dict[str, Any], str]:
    kind = rng.choice(sorted(MISTAKES))
    final = turns[-1]
    rejected = MISTAKES[kind](final, rng)
    if rejected == final.answer:  # a slip that happens to be right is no slip
        kind, rejected = "echo", final.text
    prompt = conversation(turns[:-1]) + [{"role": "user", "content": final.prompt}]
    return {"prompt": prompt, "chosen": final.answer, "rejected": rejected}, kind


def _overlong(turns: list[Turn], rng: random.Random) -> dict[str, Any]:
    filler: list[str] = []
    while sum(len(s) for s in filler) < OVERLONG_CHARS:
        filler.append(rng.choice(FILLER[turns[0].lang]))
    messages = conversation(turns)
    messages[0] = {**messages[0], "content": messages[0]["content"] + "\n" + " ".join(filler)}
    return {"messages": messages}


def _broken_roles(turns: list[Turn], variant: int) -> dict[str, Any]:
    messages = conversation(turns)
    if variant % 2:
        return {"messages": messages[:-1]}  # ends on a user turn
    return {"messages": [messages[1], messages[0], *messages[2:]]}  # assistant first


def _near_duplicate(row: dict[str, Any]) -> dict[str, Any]:
    messages = [dict(m) for m in row["messages"]]
    text = messages[0]["content"]
    messages[0]["content"] = ("  ".join(text.split(" ")) if " " in text else text.replace("、", "、 ")).lower() + " \n"
    return {"messages": messages}


def _looping(turns: list[Turn]) -> dict[str, Any]:
    # The final exchange alone: three copies of a Japanese answer in a whole conversation would be too long
    # and dropped for that first, hiding the loop from the check it is there for.
    messages = conversation(turns[-1:])
    answer = messages[-1]["content"]
    messages[-1] = {**messages[-1], "content": "\n".join([answer] * 3)}
    return {"messages": messages}


def generate_free_text(cfg: DemoDataConfig, out_dir: Path) -> dict[str, Any]:
    """Write sft.jsonl, preference.jsonl, heldout.jsonl, heldout_preference.jsonl and manifest.json
    (the same files and manifest layout as the extraction task); same config, byte-identical files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    heldout_rng = random.Random(f"ftflow-free-text-heldout-{cfg.seed}")
    heldout = _conversations(heldout_rng, cfg.n_heldout, taken)
    heldout_pairs = [_pair(turns, heldout_rng)[0] for turns in heldout]

    rng = random.Random(f"ftflow-free-text-train-{cfg.seed}")
    n_dup = defect_count(cfg.defect_rate, cfg.n_sft)
    n_pref_defect = defect_count(cfg.defect_rate, cfg.n_preference)
    fresh_needed = 4 * n_dup  # empty answers, over-long rows, broken role orders and loops are new conversations
    train = _conversations(rng, cfg.n_sft + cfg.n_preference + fresh_needed, taken)
    sft_convs, pref_convs = train[: cfg.n_sft], train[cfg.n_sft : cfg.n_sft + cfg.n_preference]
    fresh = iter(train[cfg.n_sft + cfg.n_preference :])

    sft_clean = [{"messages": conversation(turns)} for turns in sft_convs]
    extras = demo_defects.copies(rng, sft_clean, n_dup, _near_duplicate)
    extras += demo_defects.empty_answers({"messages": conversation(next(fresh))} for _ in range(n_dup))
    extras += [("overlong", _overlong(next(fresh), rng), None) for _ in range(n_dup)]
    extras += [("broken_role_order", _broken_roles(next(fresh), k), None) for k in range(n_dup)]
    extras += [("repetition", _looping(next(fresh)), None) for _ in range(n_dup)]
    sft_rows, sft_defects = interleave(rng, sft_clean, extras)
    pref_rows, pref_defects, mistakes = demo_defects.preference_rows(rng, pref_convs, _pair, n_pref_defect)

    def lang_counts(convs: list[list[Turn]]) -> dict[str, int]:
        return {lang: sum(c[0].lang == lang for c in convs) for lang in ("en", "ja")}

    manifest = {
        "task": "free text: polite rewriting and one-sentence summaries, 2-3 turns (en/ja)",
        "seed": cfg.seed,
        "defect_rate": cfg.defect_rate,
        "counts": demo_defects.counts(cfg, sft_rows, pref_rows),
        "turns": {"sft_clean": sum(len(c) for c in sft_convs), "heldout": sum(len(c) for c in heldout)},
        "languages": {
            "sft_clean": lang_counts(sft_convs),
            "preference_clean": lang_counts(pref_convs),
            "heldout": lang_counts(heldout),
        },
        "rejected_mistakes": dict(sorted(mistakes.items())),
        "defects": demo_defects.defect_lines(sft_defects, SFT_DEFECTS, pref_defects),
    }
    files = {
        "sft": sft_rows,
        "preference": pref_rows,
        "heldout": [{"messages": conversation(turns)} for turns in heldout],
        "heldout_preference": heldout_pairs,
    }
    return demo_defects.write_files(out_dir, files, manifest)
