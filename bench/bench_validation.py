"""Time the full row-level validation (ftflow.tasks.data.quality.run_quality) on synthetic SFT rows.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_validation.py            # 100,000 rows
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_validation.py --rows 20000 --no-tokenizer

Rows are seeded synthetic chat rows, English and Japanese, with planted defects (duplicates,
near-duplicates, empty turns, bad role order, over-long rows, other languages, PII). Token lengths
come from the real SmolLM2 tokenizer through its chat template. Prints one figure per line: rows/s
overall, seconds per check (so the slowest is visible), and ratios against baselines measured in the
same run: plain json.loads of the same rows, and exact-dedup only. Goal: >= 10,000 rows/s on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftflow.configs.schema import QualityConfig  # noqa: E402
from ftflow.tasks.data.dedup import fold  # noqa: E402
from ftflow.tasks.data.quality import chat_token_lengths, run_quality  # noqa: E402
from ftflow.tasks.data.rows import Record  # noqa: E402

EN_NOUNS = (
    "river city garden report engine customer window market budget teacher library signal harbor "
    "forest painter kitchen bridge ticket museum planet circuit letter village student contract "
    "recipe battery mountain journal island network doctor season factory pattern puzzle orchard "
    "lantern tunnel compass blanket mirror violin meadow castle summary invoice schedule"
).split()
EN_VERBS = (
    "describes explains repairs measures builds compares follows improves reviews protects carries "
    "collects prepares answers visits opens closes checks counts draws"
).split()
EN_ADJS = (
    "quiet bright careful ancient modern narrow simple heavy gentle rapid hidden useful honest "
    "crowded empty golden silent distant fresh broken"
).split()
EN_QUESTIONS = (
    "How does the {a} {n} work?",
    "Can you explain why the {n} {v} the {n2}?",
    "What is the best way to describe a {a} {n}?",
    "Write a short note about the {n} near the {n2}.",
    "Why would a {n} need a {a} {n2}?",
    "Summarize the story of the {a} {n}.",
)
EN_SENTENCES = (
    "The {a} {n} {v} the {n2} every morning.",
    "A {n} usually {v} a {a} {n2} near the {n3}.",
    "In the end, the {n} {v} the {a} {n2}.",
    "Nobody expected the {a} {n} to be so {a2}.",
    "Each {n} {v} its own {n2} before the {n3} opens.",
    "The {n2} is {a} because the {n} {v} it.",
)
JA_NOUNS = (
    "東京 大阪 先生 学生 会社 電車 図書館 天気 料理 友達 家族 公園 病院 会議 資料 予算 地図 音楽 映画 "
    "季節 桜 海 山 駅 お茶 手紙 時計 新聞 部屋 庭 市場 工場 研究 計画 説明 報告 注文 荷物 旅行 写真"
).split()
JA_VERBS = (
    "確認しました 説明します 準備しています 見つけました 作りました 送りました 調べています 考えています "
    "書きました 読みました 使っています 選びました 話しました 届けます 直しました"
).split()
JA_QUESTIONS = (
    "{n}について教えてください。",
    "{n}と{n2}の違いは何ですか？",
    "{n}の{n2}を簡単に説明してください。",
    "どうして{n}は{n2}が必要なのですか？",
    "{n}で{n2}を使う方法を教えてください。",
)
JA_SENTENCES = (
    "{n}は{n2}で{v}。",
    "昨日、{n}の{n2}を{v}。",
    "{n}のために{n2}を{v}。",
    "まず{n}を見て、それから{n2}を{v}。",
    "{n}と{n2}はとても大切です。",
    "今日は{n}が{n2}より静かでした。",
)
OTHER_LANGUAGE_ROWS = (
    (
        "Pouvez-vous m'expliquer comment fonctionne la bibliothèque municipale ?",
        "Bien sûr. La bibliothèque ouvre à neuf heures et les livres sont prêtés pour trois semaines.",
    ),
    (
        "Wie komme ich am schnellsten zum Bahnhof, wenn es regnet?",
        "Am besten nehmen Sie die Straßenbahn, sie fährt alle zehn Minuten direkt bis zum Hauptbahnhof.",
    ),
    (
        "¿Cuál es la mejor manera de preparar una tortilla de patatas?",
        "Primero se fríen las patatas con cebolla, después se mezclan con los huevos y se cuaja a fuego lento.",
    ),
)
SYSTEM_PROMPTS = ("You are a concise assistant.", "あなたは丁寧なアシスタントです。", "Answer in the user's language.")
PII_SNIPPETS = (
    "contact me at taro.yamada@example.co.jp",
    "電話は090-1234-5678までお願いします",
    "card 4111 1111 1111 1111",
    "call +1 415 555 0100",
)


def _fill(template: str, rng: random.Random, japanese: bool) -> str:
    if japanese:
        return template.format(n=rng.choice(JA_NOUNS), n2=rng.choice(JA_NOUNS), v=rng.choice(JA_VERBS))
    return template.format(
        n=rng.choice(EN_NOUNS),
        n2=rng.choice(EN_NOUNS),
        n3=rng.choice(EN_NOUNS),
        v=rng.choice(EN_VERBS),
        a=rng.choice(EN_ADJS),
        a2=rng.choice(EN_ADJS),
    )


def _clean_row(rng: random.Random) -> dict:
    japanese = rng.random() < 0.4
    questions, sentences = (JA_QUESTIONS, JA_SENTENCES) if japanese else (EN_QUESTIONS, EN_SENTENCES)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.1 else 1):
        messages.append({"role": "user", "content": _fill(rng.choice(questions), rng, japanese)})
        answer = ("" if japanese else " ").join(
            _fill(rng.choice(sentences), rng, japanese) for _ in range(rng.randint(2, 7))
        )
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """n SFT rows; about 12% carry a planted defect."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for _ in range(n):
        roll = rng.random()
        if rows and roll < 0.03:  # exact duplicate, sometimes with case/whitespace changes
            row = json.loads(json.dumps(rng.choice(rows)))
            if rng.random() < 0.5:
                row["messages"][-1]["content"] = "  " + row["messages"][-1]["content"].upper() + " "
        elif rows and roll < 0.05:  # near duplicate: one appended word
            row = json.loads(json.dumps(rng.choice(rows)))
            row["messages"][-1]["content"] += " Thanks!"
        elif roll < 0.055:
            row = _clean_row(rng)
            row["messages"][-1]["content"] = " \n "
        elif roll < 0.06:
            row = _clean_row(rng)
            row["messages"].reverse()
        elif roll < 0.065:  # far beyond 512 tokens
            row = _clean_row(rng)
            row["messages"][-1]["content"] = " ".join([row["messages"][-1]["content"]] * 40)
        elif roll < 0.075:
            question, answer = rng.choice(OTHER_LANGUAGE_ROWS)
            row = {
                "messages": [
                    {"role": "user", "content": f"{question} ({rng.randint(1, 10**9)})"},
                    {"role": "assistant", "content": answer},
                ]
            }
        elif roll < 0.085:
            row = _clean_row(rng)
            row["messages"][-1]["content"] += " " + rng.choice(PII_SNIPPETS)
        else:
            row = _clean_row(rng)
        rows.append(row)
    return rows


def decisions_digest(result) -> str:
    """A digest of everything validation decided (not how fast): kept lines and flags, dropped lines with
    reason and detail, token lengths and the stats other than timings. A speed change must leave it equal."""
    stats = {k: v for k, v in result.stats.items() if k not in ("timings_s", "seconds", "rows_per_s")}
    decided = [
        [(r.line, r.flags) for r in result.kept],
        [(d.line, d.reason, d.detail) for d in result.dropped],
        result.token_lengths,
        stats,
    ]
    return hashlib.sha256(json.dumps(decided, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tokenizer", action="store_true", help="use the character estimate instead of SmolLM2")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = synthetic_rows(args.rows, args.seed)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    cfg = QualityConfig(min_tokens=40)  # above SmolLM2's injected default system prompt, so too_short can fire

    token_length = None
    if not args.no_tokenizer:
        from ftflow.configs.schema import ModelConfig
        from ftflow.tasks.train.model import load_tokenizer, offline_env, resolve_model_path

        offline_env()
        tokenizer = load_tokenizer(resolve_model_path(ModelConfig()), ModelConfig())
        token_length = chat_token_lengths(tokenizer)
        token_length(rows[:64])  # warm up the Rust tokenizer's thread pool

    started = time.perf_counter()
    parsed = [json.loads(line) for line in lines]
    json_s = time.perf_counter() - started
    records = [Record(row=r, source="bench.jsonl", line=i + 1) for i, r in enumerate(parsed)]

    started = time.perf_counter()
    seen: set[str] = set()
    for r in parsed:
        seen.add(fold("\n".join(m["content"] for m in r["messages"])))
    exact_only_s = time.perf_counter() - started

    # One-time per process costs (importing scipy/datasketch, unpacking py3langid's model) are
    # measured apart, so the throughput figure is the steady state a large run sees.
    started = time.perf_counter()
    run_quality(records[:500], "sft", cfg, token_length=token_length)
    cold_start_s = time.perf_counter() - started

    load_before = os.getloadavg()[0]
    cpu_started = time.process_time()
    started = time.perf_counter()
    result = run_quality(records, "sft", cfg, token_length=token_length)
    total_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    assert len(result.kept) + len(result.dropped) == len(records)

    print(f"cpu_count {os.cpu_count()}")
    print(f"load_average_1min_before {load_before:.2f} (other processes share these cores; figures drift with it)")
    print(f"rows {len(records)}")
    print(f"token_length_source {result.stats['token_length_source'].split(' ')[0]}")
    print(f"validation_rows_per_s {len(records) / total_s:.0f}")
    print(f"validation_s {total_s:.3f}")
    print(f"validation_process_cpu_s {cpu_s:.3f}")
    # The ceiling for this code on these cores: its CPU time spread over every core with none idle.
    cores = len(os.sched_getaffinity(0))
    print(f"rows_per_s_if_all_{cores}_cores_were_busy {len(records) / (cpu_s / cores):.0f}")
    timings = result.stats["timings_s"]
    # The tokenizer counts in a thread while repetition and language run, so their timings overlap.
    print(
        f"sum_of_check_s {sum(timings.values()):.3f} (overlap with the wall time: {sum(timings.values()) - total_s:.3f})"
    )
    for check, seconds in sorted(timings.items(), key=lambda kv: -kv[1]):
        print(f"check_s.{check} {seconds:.3f} ({seconds / total_s:.0%})")
    print(f"cold_start_s {cold_start_s:.3f} (first call on 500 rows: imports and language model load)")
    print(f"baseline_json_loads_s {json_s:.3f}")
    print(f"ratio_validation_vs_json_loads {total_s / json_s:.1f}")
    print(f"baseline_exact_dedup_only_s {exact_only_s:.3f}")
    print(f"ratio_validation_vs_exact_dedup_only {total_s / exact_only_s:.1f}")
    if token_length is not None:
        # The floor for exact counts: the template and the Rust tokenizer alone, on every row at once, no check.
        # A fresh counter, so that no piece is known from the run above.
        fresh = chat_token_lengths(tokenizer)
        started = time.perf_counter()
        rendered = fresh.render(parsed)
        render_s = time.perf_counter() - started
        started = time.perf_counter()
        whole = fresh._encoded(rendered.texts)
        whole_s = time.perf_counter() - started
        started = time.perf_counter()
        by_pieces = fresh._by_pieces(rendered.texts)
        count_s = time.perf_counter() - started
        assert by_pieces is None or by_pieces == whole, "piece counts differ from whole-text counts"
        print(f"baseline_chat_template_render_only_s {render_s:.3f}")
        print(
            f"baseline_token_count_whole_texts_s {whole_s:.3f} ({len(records) / whole_s:.0f} rows/s: every "
            f"rendered text encoded whole, on every core, nothing else)"
        )
        print(
            f"baseline_token_count_only_s {count_s:.3f} ({len(records) / count_s:.0f} rows/s: the count as "
            f"validation makes it, each distinct piece between special tokens encoded once"
            + ("" if by_pieces is not None else "; this tokenizer's pieces do not add up, so whole texts")
            + ")"
        )
        print(f"ratio_token_count_pieces_vs_whole {count_s / whole_s:.2f}")
        print(f"ratio_validation_vs_token_count_only {total_s / count_s:.2f}")
    print(f"goal_10k_rows_per_s {'met' if len(records) / total_s >= 10_000 else 'NOT met'}")
    print(f"kept {len(result.kept)} ({result.kept_ratio:.1%})")
    print(f"decisions_sha256 {decisions_digest(result)} (equal across commits = the same rows kept and dropped, why)")
    for reason, count in result.reasons.items():
        print(f"dropped.{reason} {count}")
    for flag, count in result.flags.items():
        print(f"flagged.{flag} {count}")
    print(f"languages {json.dumps(result.stats['languages'], sort_keys=True)}")


if __name__ == "__main__":
    main()
