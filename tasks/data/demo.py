"""Seeded demo task: bilingual (en/ja) order extraction to a fixed-schema JSON object.

A sentence such as "佐藤花子様より札幌店でタオルを１２枚ご注文いただきました。" must become
{"name": "佐藤花子", "item": "towel", "qty": 12, "city": "Sapporo", "lang": "ja"}.
The prompt never spells out the schema, and the answer normalizes what a base model cannot guess:
fixed key names and order, catalog item names in English singular, romanized city names, honorifics
stripped, full-width digits turned into an int, and decoy numbers (dates, prices, order numbers)
ignored. A LoRA learns these conventions from a few hundred rows; zero-shot a base model cannot.

Outputs (see `generate_demo`): SFT rows, preference pairs whose rejected side is a realistic
mistake, a held-out split disjoint from training by construction, and defects injected on purpose
at `defect_rate` per kind, with their 1-based line numbers in a manifest so a test can check that
validation catches exactly them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftflow.configs.schema import DemoDataConfig, DemoTask
from ftflow.tasks.data import demo_defects
from ftflow.tasks.data.demo_defects import defect_count, interleave

KEYS = ("name", "item", "qty", "city", "lang")
INSTRUCTION = {"en": "Extract the order as JSON:\n", "ja": "注文をJSONで抽出:\n"}
SFT_DEFECTS = ("duplicate", "near_duplicate", "empty_answer", "overlong", "broken_role_order")
PREFERENCE_DEFECTS = demo_defects.PREFERENCE_DEFECTS

EN_FIRST = (
    "Alice",
    "Brian",
    "Chloe",
    "Daniel",
    "Emma",
    "Felix",
    "Grace",
    "Henry",
    "Isla",
    "Jack",
    "Katie",
    "Liam",
    "Maya",
    "Noah",
    "Olivia",
    "Peter",
    "Quinn",
    "Rosa",
    "Samuel",
    "Tara",
)
EN_LAST = (
    "Brown",
    "Carter",
    "Diaz",
    "Evans",
    "Fischer",
    "Garcia",
    "Hughes",
    "Kim",
    "Lopez",
    "Miller",
    "Novak",
    "Okafor",
    "Patel",
    "Reed",
    "Walsh",
)
JA_FAMILY = (
    "佐藤",
    "鈴木",
    "高橋",
    "田中",
    "伊藤",
    "渡辺",
    "山本",
    "中村",
    "小林",
    "加藤",
    "吉田",
    "山田",
    "佐々木",
    "松本",
    "井上",
    "木村",
)
JA_GIVEN = ("健", "花子", "翔太", "美咲", "大輔", "陽菜", "蓮", "結衣", "拓也", "愛", "直樹", "由美")
JA_HONORIFIC = ("さん", "様")

# (catalog name, English plural, Japanese word, Japanese counter)
ITEMS = (
    ("notebook", "notebooks", "ノート", "冊"),
    ("pen", "pens", "ボールペン", "本"),
    ("umbrella", "umbrellas", "傘", "本"),
    ("mug", "mugs", "マグカップ", "個"),
    ("battery", "batteries", "電池", "個"),
    ("towel", "towels", "タオル", "枚"),
    ("shirt", "shirts", "シャツ", "枚"),
    ("chair", "chairs", "椅子", "脚"),
    ("lamp", "lamps", "ランプ", "台"),
    ("keyboard", "keyboards", "キーボード", "台"),
    ("backpack", "backpacks", "リュック", "個"),
    ("cable", "cables", "ケーブル", "本"),
    ("apple", "apples", "りんご", "個"),
    ("candle", "candles", "ろうそく", "本"),
    ("plate", "plates", "皿", "枚"),
    ("bicycle", "bicycles", "自転車", "台"),
    ("watch", "watches", "腕時計", "個"),
    ("teapot", "teapots", "急須", "個"),
)
# (romanized name, Japanese name)
CITIES = (
    ("Tokyo", "東京"),
    ("Osaka", "大阪"),
    ("Kyoto", "京都"),
    ("Nagoya", "名古屋"),
    ("Sapporo", "札幌"),
    ("Fukuoka", "福岡"),
    ("Sendai", "仙台"),
    ("Kobe", "神戸"),
    ("Yokohama", "横浜"),
    ("Hiroshima", "広島"),
    ("Nara", "奈良"),
    ("Naha", "那覇"),
    ("Boston", "ボストン"),
    ("Seattle", "シアトル"),
    ("Chicago", "シカゴ"),
    ("Toronto", "トロント"),
    ("London", "ロンドン"),
    ("Sydney", "シドニー"),
    ("Paris", "パリ"),
    ("Berlin", "ベルリン"),
)
EN_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Several templates carry a decoy number (date, price, order number) so "the only number" is not the qty.
EN_TEMPLATES = (
    "{name} ordered {qty} {items} for delivery to {city}.",
    "Please send {qty} {items} to {name} in {city}.",
    "{name} from {city} wants {qty} {items}.",
    "New order: {qty} x {item}, customer {name}, ship to {city}.",
    "Ship {qty} {items} to {city} for {name} by {month} {day}.",
    "{name} placed order #{num} for {qty} {items}, delivering to {city}.",
    "Could you deliver {qty} {items} to {city}? The customer is {name}.",
    "In {city}, {name} bought {qty} {items} at ${price} each.",
    "{city} branch: {name} needs {qty} {items} before {month} {day}.",
    "Order from {name}: {qty} {items}, pickup at the {city} store.",
)
JA_TEMPLATES = (
    "{name}{hon}が{item}を{qty}{counter}注文しました。配送先は{city}です。",
    "{name}{hon}より{city}店で{item}を{qty}{counter}ご注文いただきました。",
    "{item}を{qty}{counter}、{city}の{name}{hon}へ送ってください。",
    "注文番号{num}:{name}{hon}、{item}×{qty}、{city}店。",
    "{name}{hon}は{month}月{day}日までに{item}{qty}{counter}を{city}に届けてほしいそうです。",
    "{city}在住の{name}{hon}が{item}を{qty}{counter}購入しました。",
    "{name}{hon}から{city}への配送で{item}{qty}{counter}の注文です。",
    "{city}支店:{name}{hon}が{item}を{qty}{counter}必要としています。",
    "{item}{qty}{counter}(1つ{price}円)を{name}{hon}が{city}で注文。",
)
# Realistic surrounding text for over-long rows (a pasted e-mail thread around the order).
FILLER = {
    "en": (
        "Thanks again for your help last week with the invoice question.",
        "Our warehouse team has asked that all orders include a contact name.",
        "Please note that the loading dock closes early on Fridays.",
        "We are still reviewing the quarterly supplier survey and will reply soon.",
        "If anything is unclear, feel free to call the front desk during office hours.",
        "The previous shipment arrived in good condition, and everyone was happy with it.",
    ),
    "ja": (
        "先週は請求書の件でご対応いただきありがとうございました。",
        "倉庫チームより、すべての注文に担当者名を記載するよう依頼がありました。",
        "金曜日は搬入口が早く閉まりますのでご注意ください。",
        "四半期の取引先アンケートは現在確認中で、近日中にご返信いたします。",
        "ご不明な点があれば、営業時間内に受付までお電話ください。",
        "前回の配送品は良好な状態で届き、皆とても満足しております。",
    ),
}
OVERLONG_CHARS = 3000


@dataclass(frozen=True)
class Example:
    lang: str
    name: str
    item: str
    qty: int
    city: str
    template: int
    sentence: str

    @property
    def answer(self) -> dict[str, Any]:
        return {"name": self.name, "item": self.item, "qty": self.qty, "city": self.city, "lang": self.lang}

    @property
    def prompt(self) -> str:
        return INSTRUCTION[self.lang] + self.sentence


def render_answer(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _full_width(digits: str) -> str:
    return digits.translate(str.maketrans("0123456789", "０１２３４５６７８９"))


def make_example(rng: random.Random, lang: str) -> Example:
    item, plural, item_ja, counter = rng.choice(ITEMS)
    city, city_ja = rng.choice(CITIES)
    qty = rng.randint(1, 20)
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    decoys = dict(month=month, day=day, num=rng.randint(1000, 9999), price=rng.choice((120, 300, 450, 980, 1500, 2400)))
    template = rng.randrange(len(EN_TEMPLATES) if lang == "en" else len(JA_TEMPLATES))
    if lang == "en":
        name = f"{rng.choice(EN_FIRST)} {rng.choice(EN_LAST)}"
        sentence = EN_TEMPLATES[template].format(
            name=name,
            qty=qty,
            item=item,
            items=item if qty == 1 else plural,
            city=city,
            **{**decoys, "month": EN_MONTHS[month - 1]},
        )
    else:
        name = rng.choice(JA_FAMILY) + rng.choice(JA_GIVEN)
        # Japanese text mixes half- and full-width digits; the answer is always an int.
        qty_text = _full_width(str(qty)) if rng.random() < 0.5 else str(qty)
        sentence = JA_TEMPLATES[template].format(
            name=name,
            hon=rng.choice(JA_HONORIFIC),
            qty=qty_text,
            counter=counter,
            item=item_ja,
            city=city_ja,
            **decoys,
        )
    return Example(lang, name, item, qty, city, template, sentence)


def sft_row(ex: Example) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": render_answer(ex.answer)}]
    }


# --- rejected answers: the mistakes a half-trained model really makes ---------------------------


def _wrong_qty(ex: Example, rng: random.Random) -> str:
    decoys = [
        int(n) for n in re.findall(r"\d+", ex.sentence.translate(str.maketrans("０１２３４５６７８９", "0123456789")))
    ]
    decoys = [n for n in decoys if n != ex.qty]
    qty = rng.choice(decoys) if decoys and rng.random() < 0.6 else max(1, ex.qty + rng.choice((-2, -1, 1, 2)))
    if qty == ex.qty:
        qty += 1
    return render_answer({**ex.answer, "qty": qty})


def _swapped_name_city(ex: Example, rng: random.Random) -> str:
    return render_answer({**ex.answer, "name": ex.city, "city": ex.name})


def _missing_key(ex: Example, rng: random.Random) -> str:
    drop = rng.choice(("item", "city", "lang"))
    return render_answer({k: v for k, v in ex.answer.items() if k != drop})


def _prose(ex: Example, rng: random.Random) -> str:
    if ex.lang == "ja":
        return f"{ex.name}さんの注文は{ex.item}が{ex.qty}個で、配送先は{ex.city}です。"
    return f"The customer {ex.name} ordered {ex.qty} {ex.item} to be delivered to {ex.city}."


def _unnormalized(ex: Example, rng: random.Random) -> str:
    # Copying the surface form instead of the catalog / romanized value.
    if ex.lang == "ja":
        item_ja = next(i[2] for i in ITEMS if i[0] == ex.item)
        city_ja = next(c[1] for c in CITIES if c[0] == ex.city)
        return render_answer({**ex.answer, "item": item_ja, "city": city_ja})
    plural = next(i[1] for i in ITEMS if i[0] == ex.item)
    return render_answer({**ex.answer, "item": plural if ex.qty > 1 else ex.item.capitalize()})


def _wrong_keys(ex: Example, rng: random.Random) -> str:
    a = ex.answer
    return render_answer(
        {"customer": a["name"], "product": a["item"], "quantity": a["qty"], "city": a["city"], "lang": a["lang"]}
    )


def _qty_as_string(ex: Example, rng: random.Random) -> str:
    return render_answer({**ex.answer, "qty": str(ex.qty)})


MISTAKES: dict[str, Callable[[Example, random.Random], str]] = {
    "wrong_qty": _wrong_qty,
    "swapped_name_city": _swapped_name_city,
    "missing_key": _missing_key,
    "prose": _prose,
    "unnormalized_value": _unnormalized,
    "wrong_keys": _wrong_keys,
    "qty_as_string": _qty_as_string,
}


def preference_pair(ex: Example, rng: random.Random) -> tuple[dict[str, Any], str]:
    kind = rng.choice(sorted(MISTAKES))
    pair = {
        "prompt": [{"role": "user", "content": ex.prompt}],
        "chosen": render_answer(ex.answer),
        "rejected": MISTAKES[kind](ex, rng),
    }
    return pair, kind


# --- sampling ----------------------------------------------------------------------------------


def _unique_examples(rng: random.Random, count: int, taken: set, banned_pairs: set) -> list[Example]:
    """`count` examples, half en / half ja, none sharing a sentence or (name, item, city, template) with `taken`."""
    out: list[Example] = []
    langs = ["en" if i % 2 == 0 else "ja" for i in range(count)]
    rng.shuffle(langs)
    for lang in langs:
        for _ in range(10_000):
            ex = make_example(rng, lang)
            key = (ex.name, ex.item, ex.city, ex.template)
            if ex.sentence in taken or key in taken or (ex.name, ex.city) in banned_pairs:
                continue
            taken.update((ex.sentence, key))
            out.append(ex)
            break
        else:  # only reachable with absurd sizes; the combination space is ~10^6
            raise ValueError(f"cannot draw {count} distinct demo examples")
    return out


def _overlong(ex: Example, rng: random.Random) -> dict[str, Any]:
    lines: list[str] = []
    while sum(len(s) for s in lines) < OVERLONG_CHARS:
        lines.append(rng.choice(FILLER[ex.lang]))
    lines.insert(rng.randrange(len(lines)), ex.sentence)
    sep = "" if ex.lang == "ja" else " "
    user = INSTRUCTION[ex.lang] + sep.join(lines)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": render_answer(ex.answer)}]}


def _broken_roles(ex: Example, variant: int) -> dict[str, Any]:
    user = {"role": "user", "content": ex.prompt}
    assistant = {"role": "assistant", "content": render_answer(ex.answer)}
    shapes = ([assistant, user], [user, dict(user), assistant], [user, assistant, dict(user)])
    return {"messages": shapes[variant % len(shapes)]}


def _near_duplicate(row: dict[str, Any]) -> dict[str, Any]:
    # Same content, different case and whitespace: exact dedup misses it, normalized dedup must not.
    user, assistant = row["messages"]
    text = user["content"]
    text = "  ".join(text.split(" ")) if " " in text else text.replace("、", "、 ")
    text = text.lower() + " \n"
    return {"messages": [{**user, "content": text}, dict(assistant)]}


def _lang_counts(examples: list[Example]) -> dict[str, int]:
    return {lang: sum(e.lang == lang for e in examples) for lang in ("en", "ja")}


def generate_demo(cfg: DemoDataConfig, out_dir: Path) -> dict[str, Any]:
    """The task `cfg.task` names: this module's extraction task, or demo_free_text.py's free-text one.

    Write sft.jsonl, preference.jsonl, heldout.jsonl, heldout_preference.jsonl and manifest.json.

    Same config, byte-identical files. Held-out rows are drawn first from their own stream, and no
    training row reuses a held-out sentence or (name, city) pair, so the split is disjoint whatever
    n_sft is.
    """
    if cfg.task == DemoTask.free_text:
        from ftflow.tasks.data.demo_free_text import generate_free_text

        return generate_free_text(cfg, out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set = set()

    heldout_rng = random.Random(f"ftflow-demo-heldout-{cfg.seed}")
    heldout = _unique_examples(heldout_rng, cfg.n_heldout, taken, set())
    heldout_pairs = [preference_pair(ex, heldout_rng)[0] for ex in heldout]
    banned = {(ex.name, ex.city) for ex in heldout}

    rng = random.Random(f"ftflow-demo-train-{cfg.seed}")
    n_dup = defect_count(cfg.defect_rate, cfg.n_sft)
    n_pref_defect = defect_count(cfg.defect_rate, cfg.n_preference)
    fresh_needed = 3 * n_dup  # empty answers, over-long rows and broken role orders are new examples
    train = _unique_examples(rng, cfg.n_sft + cfg.n_preference + fresh_needed, taken, banned)
    sft_examples, pref_examples = train[: cfg.n_sft], train[cfg.n_sft : cfg.n_sft + cfg.n_preference]
    fresh = iter(train[cfg.n_sft + cfg.n_preference :])

    sft_clean = [sft_row(ex) for ex in sft_examples]
    sft_extras = demo_defects.copies(rng, sft_clean, n_dup, _near_duplicate)
    sft_extras += demo_defects.empty_answers(sft_row(next(fresh)) for _ in range(n_dup))
    sft_extras += [("overlong", _overlong(next(fresh), rng), None) for _ in range(n_dup)]
    sft_extras += [("broken_role_order", _broken_roles(next(fresh), k), None) for k in range(n_dup)]
    sft_rows, sft_defects = interleave(rng, sft_clean, sft_extras)
    pref_rows, pref_defects, mistakes = demo_defects.preference_rows(rng, pref_examples, preference_pair, n_pref_defect)

    manifest = {
        "task": "order extraction to JSON (en/ja)",
        "keys": list(KEYS),
        "seed": cfg.seed,
        "defect_rate": cfg.defect_rate,
        "counts": demo_defects.counts(cfg, sft_rows, pref_rows),
        "languages": {
            "sft_clean": _lang_counts(sft_examples),
            "preference_clean": _lang_counts(pref_examples),
            "heldout": _lang_counts(heldout),
        },
        "rejected_mistakes": dict(sorted(mistakes.items())),
        "defects": demo_defects.defect_lines(sft_defects, SFT_DEFECTS, pref_defects),
    }
    files = {
        "sft": sft_rows,
        "preference": pref_rows,
        "heldout": [sft_row(ex) for ex in heldout],
        "heldout_preference": heldout_pairs,
    }
    return demo_defects.write_files(out_dir, files, manifest)
