"""Token lengths of canonical rows: counted with a tokenizer's chat template, or estimated without one."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ftflow.tasks.data.rows import conversation

TokenLength = Callable[[list[dict]], list[int]]

TOKEN_BATCH_ROWS = 2048


def estimate_token_lengths(rows: list[dict]) -> list[int]:
    """Tokenizer-free estimate: ~4 ASCII characters or 1 other character per token, +4 per turn."""
    out = []
    for row in rows:
        msgs = conversation(row)
        texts = [m["content"] for m in msgs]
        if "chosen" in row:
            texts.append(max(row["chosen"], row["rejected"], key=len))
        total = 4 * (len(texts) + 1)
        for text in texts:
            ascii_chars = len(text.encode("ascii", "ignore"))
            total += ascii_chars // 4 + (len(text) - ascii_chars)
        out.append(total)
    return out


@contextmanager
def rust_parallelism() -> Iterator[None]:
    """Let the Rust tokenizer use every core for one batch call, whatever TOKENIZERS_PARALLELISM says.

    The CLI sets it to false so that a process forked after tokenizing cannot deadlock on the Rust thread pool,
    which also made validation's batch encode single-threaded (x2.5 slower on 2 cores; bench/bench_validation.py).
    Unset, the library parallelises and, if the process forks meanwhile, turns parallelism off in the child
    itself: an explicit "true" would not (the child hangs). The setting is put back before returning."""
    saved = os.environ.pop("TOKENIZERS_PARALLELISM", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def chat_token_lengths(tokenizer: Any) -> TokenLength:
    """A batched `token_length` for run_quality: tokens after the tokenizer's chat template.

    A preference pair counts as its longer completion (prompt + chosen or prompt + rejected),
    which is what DPO's max_length has to hold."""
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def lengths(rows: list[dict]) -> list[int]:
        conversations, owner = [], []
        for i, row in enumerate(rows):
            if "messages" in row:
                conversations.append(row["messages"])
                owner.append(i)
            else:
                for completion in (row["chosen"], row["rejected"]):
                    conversations.append([*row["prompt"], {"role": "assistant", "content": completion}])
                    owner.append(i)
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # Skips offsets and attention masks: only the count is needed.
            with rust_parallelism():
                encoded = backend.encode_batch_fast(texts, add_special_tokens=False)
            counts = [len(e) for e in encoded]
        else:
            counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        out = [0] * len(rows)
        for i, n in zip(owner, counts):
            out[i] = max(out[i], n)
        return out

    return lengths


def measure_token_lengths(rows: list[dict], token_length: TokenLength) -> list[int]:
    """`token_length` over `rows` in batches, refusing a function that loses or invents rows."""
    out: list[int] = []
    for start in range(0, len(rows), TOKEN_BATCH_ROWS):
        batch = rows[start : start + TOKEN_BATCH_ROWS]
        got = list(token_length(batch))
        if len(got) != len(batch):
            raise ValueError(f"token_length returned {len(got)} lengths for {len(batch)} rows")
        out += map(int, got)
    return out


def nearest_rank(values: Sequence[int], q: float) -> int:
    """The nearest-rank q-quantile (0 < q <= 1): the smallest value with at least q of all values at or below it.

    The one percentile definition for token-length stats: always an observed length, never an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
