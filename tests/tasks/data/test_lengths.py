"""Token lengths: the chat-template count, batching that refuses lost rows, and the one percentile."""

from __future__ import annotations

import pytest

from ftflow.tasks.data.lengths import (
    chat_token_lengths,
    estimate_token_lengths,
    measure_ahead,
    nearest_rank,
    remembered_attribute_checks,
)


def sft(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}


def smol_tokenizer():
    from ftflow.configs.schema import ModelConfig
    from ftflow.tasks.train.model import load_tokenizer, offline_env, resolve_model_path

    offline_env()
    return load_tokenizer(resolve_model_path(ModelConfig()), ModelConfig())


def test_chat_token_lengths_counts_the_templated_conversation():
    tokenizer = smol_tokenizer()
    lengths = chat_token_lengths(tokenizer)
    row = sft(
        "How do I reset the password of my office laptop?",
        "Open the settings page, choose security, then follow the reset wizard.",
        system="Be brief.",
    )
    p = pair("Which city is the capital of Japan?", "Tokyo is the capital of Japan, and has been since 1868.", "Osaka.")
    expected_sft = len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
    longer = p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]
    expected_pair = len(tokenizer.apply_chat_template(longer, tokenize=True, return_dict=True)["input_ids"])
    assert lengths([row, p]) == [expected_sft, expected_pair]


def test_plain_turns_render_straight_through_the_template_exactly_as_apply_chat_template_does():
    """Plain {"role", "content"} turns skip apply_chat_template's per-message copying; any other message (here a
    None-valued key, which apply_chat_template drops and this template would print) still goes through it."""
    tokenizer = smol_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if m.name is defined %}({{ m.name }}){% endif %}: "
        "{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    )
    lengths = chat_token_lengths(tokenizer)
    assert lengths.direct is not None
    with_none = {"messages": [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": "Yo"}]}
    named = {"messages": [{"role": "user", "content": "Hi", "name": "Ann"}, {"role": "assistant", "content": "Yo"}]}
    rows = [sft("Hello", "World", system="Be brief."), with_none, pair("Capital of Japan?", "Tokyo.", "Osaka."), named]
    conversations = [
        rows[0]["messages"],
        with_none["messages"],
        [*rows[2]["prompt"], {"role": "assistant", "content": "Tokyo."}],
        [*rows[2]["prompt"], {"role": "assistant", "content": "Osaka."}],
        named["messages"],
    ]
    rendered = lengths.render(rows)
    assert rendered.texts == tokenizer.apply_chat_template(conversations, tokenize=False)
    assert rendered.texts[1] == "user: Hi<|im_end|>\nassistant: Yo<|im_end|>\n"
    assert rendered.texts[4].startswith("user(Ann): Hi")
    assert lengths.direct is not None


def test_a_direct_render_that_differs_from_apply_chat_template_is_dropped_for_good():
    tokenizer = smol_tokenizer()
    lengths = chat_token_lengths(tokenizer)
    lengths.direct = lambda messages: "not what the template renders"  # a transformers change that broke the path
    rows = [sft("Hello", "World"), sft("Bonjour", "Le monde")]
    assert lengths.render(rows).texts == tokenizer.apply_chat_template([r["messages"] for r in rows], tokenize=False)
    assert lengths.direct is None


def test_remembered_attribute_checks_give_the_sandbox_verdicts_and_leave_it_untouched():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    sandbox = ImmutableSandboxedEnvironment()
    sandbox.filters["shout"] = str.upper
    overlay = remembered_attribute_checks(sandbox)
    turns = overlay.from_string("{% for m in messages %}{{ loop.first }}:{{ m['content'] | shout }} {% endfor %}")
    for _ in range(2):  # the second time from the remembered verdicts
        assert turns.render(messages=[{"content": "a"}, {"content": "b"}]) == "True:A False:B "
    for unsafe in ("{{ xs.append(1) }}", "{{ xs.__class__.__mro__ }}"):
        for _ in range(2):
            with pytest.raises(SecurityError):
                overlay.from_string(unsafe).render(xs=[])
    for _ in range(2):  # an internal attribute reads as undefined, as in the sandbox itself
        assert overlay.from_string("{{ f.__globals__ }}").render(f=nearest_rank) == ""
    assert "is_safe_attribute" not in vars(sandbox)  # transformers' cached environment stays as it was


def test_padding_or_truncation_in_the_tokenizer_file_does_not_change_the_count():
    """Some tokenizer.json files carry padding or truncation; the count goes past transformers' __call__ (which
    turns both off per call), so it must not inherit them, and the caller's tokenizer keeps its settings."""
    rows = [sft("Hi", "Hello there, how can I help?"), sft("A much longer question " * 20, "And an answer " * 30)]
    expected = chat_token_lengths(smol_tokenizer())(rows)
    tokenizer = smol_tokenizer()
    tokenizer.backend_tokenizer.enable_padding(length=700)
    tokenizer.backend_tokenizer.enable_truncation(max_length=16)
    assert expected[1] > 16 and chat_token_lengths(tokenizer)(rows) == expected
    assert tokenizer.backend_tokenizer.padding["length"] == 700 and tokenizer.backend_tokenizer.truncation


def test_batch_encoding_runs_parallel_and_puts_the_setting_back(monkeypatch):
    import os

    from ftflow.tasks.data.lengths import rust_parallelism

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with rust_parallelism():
        # Unset, not "true": the tokenizers library then protects a child forked meanwhile by itself.
        assert "TOKENIZERS_PARALLELISM" not in os.environ
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with rust_parallelism():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_estimate_counts_a_quarter_token_per_ascii_char_one_per_other_char_and_the_longer_answer():
    assert estimate_token_lengths([sft("abcdefgh", "日本")]) == [4 * 3 + 2 + 2]
    assert estimate_token_lengths([pair("abcd", "x" * 40, "y")]) == [4 * 3 + 1 + 10]


def test_measure_ahead_keeps_the_order_and_refuses_a_wrong_count():
    batches = [[sft("q", "a")] * n for n in (5, 1, 3)]
    got = [lengths for lengths, _ in measure_ahead(batches, lambda rows: [len(rows)] * len(rows))]
    assert got == [[5] * 5, [1], [3] * 3]
    with pytest.raises(ValueError, match="returned 1 lengths for 10 rows"):
        list(measure_ahead([[sft("q", "a")] * 10], lambda batch: [1]))


def test_measure_ahead_renders_here_and_counts_in_a_worker_batches_ahead():
    """Jinja holds the GIL, so it stays on the caller's thread; the Rust count runs in the worker while the
    caller works on an earlier batch, and the worker is gone once the batches are done."""
    import threading

    from ftflow.tasks.data.lengths import BATCHES_AHEAD, ChatTokenLengths

    tokenizer = smol_tokenizer()
    events: list[tuple[str, str, int]] = []

    class Recording(ChatTokenLengths):
        def render(self, rows):
            events.append(("render", threading.current_thread().name, len(rows)))
            return super().render(rows)

        def count(self, rendered):
            events.append(("count", threading.current_thread().name, rendered.rows))
            return super().count(rendered)

    sizes = list(range(2, BATCHES_AHEAD + 4))
    batches = [[sft("How are you?", "Fine, thanks.")] * n for n in sizes]
    measured = measure_ahead(batches, Recording(tokenizer))
    first, _ = next(measured)
    # When the first batch is handed over, it has been counted and the next BATCHES_AHEAD are already rendered
    # and submitted (the one after is not rendered yet: the caller's checks on the first run meanwhile).
    assert [n for kind, _, n in events if kind == "render"] == sizes[: BATCHES_AHEAD + 1]
    assert [n for kind, _, n in events if kind == "count"][:1] == [2]
    rest = [lengths for lengths, _ in measured]
    assert [first, *rest] == [chat_token_lengths(tokenizer)(b) for b in batches]
    assert {name for kind, name, _ in events if kind == "render"} == {threading.current_thread().name}
    assert {name.split("_")[0] for kind, name, _ in events if kind == "count"} == {"token-length"}
    assert not any(t.name.startswith("token-length") for t in threading.enumerate())


def test_a_failing_count_stops_the_worker_and_reaches_the_caller():
    import threading

    def broken(rows):
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        list(measure_ahead([[sft("q", "a")]] * 4, broken))
    assert not any(t.name.startswith("token-length") for t in threading.enumerate())


def test_nearest_rank_is_always_an_observed_value():
    assert nearest_rank([10, 30, 20, 40], 0.95) == 40
    assert nearest_rank(list(range(20, 30)), 0.95) == 29 and nearest_rank(list(range(20, 30)), 0.5) == 24
    assert nearest_rank(list(range(1, 21)), 0.95) == 19  # 95% of 20 values lie at or below the 19th
    assert nearest_rank([5], 0.5) == 5


def whole_counts(lengths, rows: list[dict]) -> list[int]:
    """The reference: every rendered text encoded whole, the longer side of a pair kept."""
    rendered = lengths.render(rows)
    out = [0] * rendered.rows
    for i, n in zip(rendered.owner, lengths._encoded(rendered.texts)):
        out[i] = max(out[i], n)
    return out


def varied_rows() -> list[dict]:
    multi = {
        "messages": [
            {"role": "system", "content": "Answer in the user's language."},
            {"role": "user", "content": "東京の天気は？"},
            {"role": "assistant", "content": "晴れです。"},
            {"role": "user", "content": "And tomorrow?  \n\n"},
            {"role": "assistant", "content": " Rain, then <|im_end|> sun.<|endoftext|>"},
        ]
    }
    return [
        sft("How do I reset my password?", "Open settings, then security."),
        sft("How do I reset my password?", "Open settings, then security."),  # a duplicate row
        sft("", "Nothing was asked.", system="Be brief."),
        sft("Tabs\tand  spaces ", "\n\nleading newlines", system="Be brief."),
        multi,
        pair("Which city is the capital of Japan?", "Tokyo.", "Osaka, a city that is not the capital."),
    ]


def test_pieces_between_special_tokens_count_as_the_whole_text_does_and_repeats_are_encoded_once():
    """The tokenizer splits at its special tokens before anything else, so a text's count is one per special
    token plus its pieces' counts; a piece met before (the injected system prompt, a duplicate row) is not
    encoded again, in this batch or a later one."""
    lengths = chat_token_lengths(smol_tokenizer())
    assert lengths.splitter is not None
    rows = varied_rows()
    expected = whole_counts(lengths, rows)
    encoded: list[str] = []
    whole = lengths._encoded

    def spy(texts):
        encoded.extend(texts)
        return whole(texts)

    lengths._encoded = spy
    assert lengths(rows) == expected
    default_system = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    pieces = [p for p in encoded if "<|im_start|>" not in p]
    assert pieces.count(default_system) == 1 and pieces.count("user\nHow do I reset my password?") == 1
    assert len(pieces) == len(set(pieces))
    encoded.clear()
    assert lengths(rows[:2]) == expected[:2]
    assert [p for p in encoded if "<|im_start|>" not in p] == []  # every piece known: only the batch's check


def test_a_metaspace_tokenizer_that_marks_only_the_first_piece_is_counted_whole():
    """With prepend_scheme "first" (Llama-2, Mistral) a piece alone gets a "▁" it does not get after a special
    token, so counting pieces one by one would be wrong: such a tokenizer counts whole texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["hello world, this is a test of the tokenizer"] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    lengths = chat_token_lengths(tokenizer)
    assert lengths.splitter is None
    rows = [sft("hello world", "this is a test"), sft("hello", "world")]
    expected = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    ]
    assert lengths(rows) == expected
    # The same rows counted piece by piece would have been wrong, which is why the guard exists.
    import re

    lengths.splitter = re.compile("<s>|</s>")
    assert lengths._by_pieces(lengths.render(rows).texts) is None and lengths.splitter is None


def test_a_piece_count_that_differs_from_the_whole_text_is_dropped_for_good():
    lengths = chat_token_lengths(smol_tokenizer())
    rows = varied_rows()
    expected = whole_counts(lengths, rows)
    lengths.pieces["user\nHow do I reset my password?"] = 999  # a count that no longer adds up
    assert lengths(rows) == expected
    assert lengths.splitter is None and lengths(rows[::-1]) == expected[::-1]


def test_the_piece_table_starts_afresh_past_its_size(monkeypatch):
    import ftflow.tasks.data.lengths as lengths_module

    monkeypatch.setattr(lengths_module, "PIECE_CACHE_CHARS", 50)
    lengths = chat_token_lengths(smol_tokenizer())
    rows = varied_rows()
    expected = whole_counts(lengths, rows)
    assert lengths(rows[:3]) == expected[:3] and lengths.piece_chars > 50
    assert lengths(rows[4:5]) == expected[4:5]
    # Only the last batch's pieces are left; counts stay right either way.
    assert set(lengths.pieces) == set(lengths.splitter.split(lengths.render(rows[4:5]).texts[0]))
    assert lengths(rows) == expected
