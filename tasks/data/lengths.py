"""Token lengths of canonical rows: counted with a tokenizer's chat template, or estimated without one."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from ftflow.tasks.data.rows import conversation

TokenLength = Callable[[list[dict]], list[int]]

TOKEN_BATCH_ROWS = 2048
# Batches rendered and queued for counting before the caller takes the first: with some in hand, neither
# thread waits on the other when one batch runs long (x1.06 over one ahead, bench/bench_validation.py).
BATCHES_AHEAD = 3
# Pieces between special tokens whose counts are kept across batches; then a fresh table, so that a long run
# of unique answers cannot grow memory without end (about 2 bytes a character for most text).
PIECE_CACHE_CHARS = 16_000_000


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


@dataclass
class Rendered:
    texts: list[str]  # one per conversation: a pair renders twice (prompt + chosen, prompt + rejected)
    owner: list[int]  # the row each text belongs to
    rows: int


class ChatTokenLengths:
    """A batched `token_length` for run_quality: tokens after the tokenizer's chat template.

    A preference pair counts as its longer completion (prompt + chosen or prompt + rejected),
    which is what DPO's max_length has to hold. Calling it renders then counts; `measure_ahead` calls the
    two halves on different threads, since only counting releases the GIL."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = _unpadded(getattr(tokenizer, "backend_tokenizer", None))
        self.direct = _direct_template(tokenizer)
        self.splitter = _special_splitter(self.backend)
        self.pieces: dict[str, int] = {}
        self.piece_chars = 0
        self.piece_lock = threading.Lock()  # one table, whichever thread counts

    def render(self, rows: list[dict]) -> Rendered:
        conversations, owner = [], []
        for i, row in enumerate(rows):
            if "messages" in row:
                conversations.append(row["messages"])
                owner.append(i)
            else:
                for completion in (row["chosen"], row["rejected"]):
                    conversations.append([*row["prompt"], {"role": "assistant", "content": completion}])
                    owner.append(i)
        return Rendered(self._texts(conversations), owner, len(rows))

    def _texts(self, conversations: list[list[dict]]) -> list[str]:
        """The tokenizer's own chat template over each conversation, as apply_chat_template renders it.

        Conversations of plain {"role", "content"} turns skip apply_chat_template's copying and checking of
        every message (render of 100k rows 2.5 -> 1.5 s, bench/bench_validation.py) and go straight
        to the same compiled template. Each batch checks one of them against apply_chat_template, and any
        difference sends this and every later batch back to it."""
        texts: list[Optional[str]] = [None] * len(conversations)
        if self.direct is not None:
            plain = [i for i, c in enumerate(conversations) if all(len(m) == 2 for m in c)]
            for i in plain:
                texts[i] = self.direct(conversations[i])
            # A batch of one, since apply_chat_template refuses a lone empty conversation that a batch renders.
            checked = self.tokenizer.apply_chat_template([conversations[plain[0]]], tokenize=False) if plain else []
            if checked and texts[plain[0]] != checked[0]:
                self.direct = None
                texts = [None] * len(conversations)
        rest = [i for i, text in enumerate(texts) if text is None]
        if rest:
            for i, text in zip(
                rest, self.tokenizer.apply_chat_template([conversations[i] for i in rest], tokenize=False)
            ):
                texts[i] = text
        return texts  # type: ignore[return-value]

    def count(self, rendered: Rendered) -> list[int]:
        if self.backend is not None and hasattr(self.backend, "encode_batch_fast"):
            with self.piece_lock:
                counts = self._by_pieces(rendered.texts) if self.splitter is not None else None
            if counts is None:
                counts = self._encoded(rendered.texts)
        else:
            counts = [len(ids) for ids in self.tokenizer(rendered.texts, add_special_tokens=False)["input_ids"]]
        out = [0] * rendered.rows
        for i, n in zip(rendered.owner, counts):
            out[i] = max(out[i], n)
        return out

    def _encoded(self, texts: list[str]) -> list[int]:
        # Skips offsets and attention masks: only the count is needed.
        with rust_parallelism():
            return [len(e) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _by_pieces(self, texts: list[str]) -> Optional[list[int]]:
        """Counts as one special token each plus the pieces between them, each distinct piece encoded once.

        The tokenizer itself splits a text at its special tokens before normalizing and pre-tokenizing the
        pieces one by one, so the counts add up; a system prompt, a repeated turn or a duplicate row is then
        encoded once for the whole run (x0.70 count time on the bench's 100k rows, bench/bench_validation.py).
        Each batch checks its first text against encoding it whole, and any difference sends this and every
        later batch back to whole texts. None then."""
        split = [self.splitter.split(text) for text in texts]  # type: ignore[union-attr]
        known = self.pieces
        if self.piece_chars > PIECE_CACHE_CHARS:
            known.clear()
            self.piece_chars = 0
        new = list(dict.fromkeys(piece for pieces in split for piece in pieces if piece not in known))
        if new:
            known.update(zip(new, self._encoded(new)))
            self.piece_chars += sum(map(len, new))
        counts = [len(pieces) - 1 + sum(map(known.__getitem__, pieces)) for pieces in split]
        if counts and counts[0] != self._encoded(texts[:1])[0]:
            self.splitter = None
            known.clear()
            return None
        return counts

    def __call__(self, rows: list[dict]) -> list[int]:
        return self.count(self.render(rows))


def _unpadded(backend: Any) -> Any:
    """The Rust tokenizer without the padding or truncation a tokenizer.json may carry: encoding through it
    directly (unlike transformers' __call__, which sets both per call) would otherwise count padded or cut rows."""
    if backend is None or (getattr(backend, "padding", None) is None and getattr(backend, "truncation", None) is None):
        return backend
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())  # the caller's tokenizer keeps its settings
    copy.no_padding()
    copy.no_truncation()
    return copy


def _special_splitter(backend: Any) -> Optional[re.Pattern[str]]:
    """A pattern that splits text where the tokenizer splits it first: at its added tokens, longest first.

    None where the pieces would not count independently: an added token that swallows the spaces beside it,
    matches only whole words or after normalization, or a Metaspace pre-tokenizer that marks only the text's
    first piece (prepend_scheme "first", as in Llama-2 and Mistral tokenizers)."""
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return None
    added = list(backend.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
        return None
    if '"prepend_scheme":"first"' in json.dumps(
        json.loads(backend.to_str()).get("pre_tokenizer"), separators=(",", ":")
    ):
        return None
    return re.compile("|".join(re.escape(t.content) for t in sorted(added, key=lambda t: -len(t.content))))


def remembered_attribute_checks(environment: Any) -> Any:
    """An overlay of a Jinja sandbox (same filters, globals, extensions) that remembers each attribute verdict.

    jinja2's sandbox judges an attribute by the object's type and the attribute's name alone
    (`is_internal_attribute`, and `modifies_known_mutable` in the immutable sandbox), and asks again at every
    access: chat templates read `loop.first` once per turn, a fifth of rendering 100k rows
    (bench/bench_validation.py). The verdict per (type, name) is the sandbox's own, so nothing unsafe passes."""
    overlay = environment.overlay()
    judge = overlay.is_safe_attribute
    verdicts: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = judge(obj, attr, value)
        return verdict

    overlay.is_safe_attribute = is_safe_attribute
    return overlay


def _direct_template(tokenizer: Any) -> Optional[Callable[[list[dict]], str]]:
    """The tokenizer's chat template compiled as apply_chat_template compiles it (transformers' cached
    sandboxed compile, in an overlay that remembers its attribute checks), with the variables
    apply_chat_template passes; None where that is not available."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        source = tokenizer.get_chat_template()
        template = remembered_attribute_checks(_compile_jinja_template(source).environment).from_string(source)
        context = {**tokenizer.special_tokens_map, "tools": None, "documents": None, "add_generation_prompt": False}
    except Exception:  # a private helper of transformers: when it moves, rendering takes the public path
        return None
    return lambda messages: template.render(messages=messages, **context)


def chat_token_lengths(tokenizer: Any) -> ChatTokenLengths:
    return ChatTokenLengths(tokenizer)


def _timed(count: Callable[[Any], list[int]], prepared: Any) -> tuple[list[int], float]:
    since = time.perf_counter()
    return count(prepared), time.perf_counter() - since


def measure_ahead(batches: Sequence[list[dict]], token_length: TokenLength) -> Iterator[tuple[list[int], float]]:
    """Each batch's token lengths and the seconds spent on them, in order, refusing a function that loses or
    invents rows.

    With a `ChatTokenLengths`, a worker thread counts batches with the Rust tokenizer (which releases the GIL
    and uses every core) while the caller checks an earlier one and this thread renders up to BATCHES_AHEAD
    after it: x1.19 on validation of 100k rows with one ahead (bench/bench_validation.py). Rendering stays on
    the caller's thread because Jinja holds the GIL, so in the worker it would stall the caller's checks and
    leave the cores idle."""
    render = getattr(token_length, "render", None)
    count = token_length.count if render is not None else token_length  # type: ignore[attr-defined]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-length")
    try:
        pending: deque[tuple[int, Any, float]] = deque()
        for batch in [*batches, *([None] * BATCHES_AHEAD)]:
            if batch is not None:
                since = time.perf_counter()
                prepared = render(batch) if render is not None else batch
                pending.append((len(batch), pool.submit(_timed, count, prepared), time.perf_counter() - since))
            if len(pending) > BATCHES_AHEAD or (batch is None and pending):
                expected, future, render_s = pending.popleft()
                got, count_s = future.result()
                if len(got) != expected:
                    raise ValueError(f"token_length returned {len(got)} lengths for {expected} rows")
                yield list(map(int, got)), render_s + count_s
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def nearest_rank(values: Sequence[int], q: float) -> int:
    """The nearest-rank q-quantile (0 < q <= 1): the smallest value with at least q of all values at or below it.

    The one percentile definition for token-length stats: always an observed length, never an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
