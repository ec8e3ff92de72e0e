"""Per-stage peak memory: compare-methods trains every arm in one process, so each stage's peak starts afresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftflow.tasks.train.trainer import peak_memory_mb, reset_peak_memory

MB = 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS resets on Linux only")
def test_a_stage_after_a_bigger_one_reports_its_own_peak():
    reset_peak_memory("cpu")
    before = peak_memory_mb("cpu")
    ballast = bytearray(400 * MB)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident, not just reserved
    big_stage = peak_memory_mb("cpu")
    del ballast
    reset_peak_memory("cpu")
    small_stage = peak_memory_mb("cpu")
    assert big_stage - before > 380
    # Without the reset the second stage would report the first one's 400 MB as its own (ru_maxrss did).
    assert small_stage < big_stage - 300


# --- padding-free SFT and fp32 trainable weights on CPU ---------------------------------------------------

CONVERSATIONS = [
    [
        {"role": "user", "content": "Extract the city: I live in Paris."},
        {"role": "assistant", "content": '{"city": "Paris"}'},
    ],
    [
        {"role": "user", "content": "Extract the city and the item: a lamp, delivered to Tokyo by Friday please."},
        {"role": "assistant", "content": '{"city": "Tokyo", "item": "lamp"}'},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Extract the city: Osaka."},
        {"role": "assistant", "content": '{"city": "Osaka"}'},
    ],
]


def _tokenized_rows(model_dir: str) -> list[dict]:
    """Rows as the formatting stage hands them to SFT: prompt/completion plus input_ids and assistant_masks."""
    from transformers import AutoTokenizer

    from ftflow.tasks.data.formatting import Window, tokenized_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for messages in CONVERSATIONS:
        tokens, _ = tokenized_example(tokenizer, messages, Window(max_length=256))
        rows.append({"prompt": messages[:-1], "completion": messages[-1:], **tokens})
    return rows


@pytest.fixture(scope="module")
def padding_free_run(tmp_path_factory, tiny_model_dir):
    """A real 2-step QLoRA SFT on pre-tokenized rows; the trainer and its weights' dtypes are recorded at build."""
    import trl

    from ftflow.configs.loader import load_config
    from ftflow.tasks.stages import StageContext, resolve_model
    from ftflow.tasks.train.trainer import train

    seen: list[dict] = []

    class RecordingSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append({"trainer": self, "dtypes_at_build": trainable_dtypes(self.model)})

    out = tmp_path_factory.mktemp("padding-free")
    cfg = load_config(
        "tiny",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            "sft.max_steps=2",
            "sft.per_device_batch_size=3",
            "sft.save_steps=1000",
            "sft.padding_free=true",
            "lora.r=4",
        ],
    )
    rows = _tokenized_rows(tiny_model_dir)
    ctx = StageContext(cfg, resolve_model(cfg), None, out, lambda line: None, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", RecordingSFTTrainer)
        result = train(ctx, "sft", rows)
    return {"result": result, "rows": rows, **seen[0]}


def trainable_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def test_sft_on_formatted_rows_runs_padding_free(padding_free_run):
    trainer = padding_free_run["trainer"]
    assert trainer.args.padding_free and trainer.padding_free
    batch = trainer.data_collator([dict(r) for r in trainer.train_dataset])
    lengths = [len(r["input_ids"]) for r in padding_free_run["rows"]]
    # One sequence of the rows' real tokens, no attention mask, positions restarting at every row.
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected)
    assert padding_free_run["result"].global_step == 2


def test_padding_free_rows_do_not_attend_to_each_other(padding_free_run):
    """Each row's logits in the packed sequence equal its logits alone, and the loss equals the padded batch's."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = padding_free_run["trainer"]
    model = trainer.model.eval()  # no dropout: the same weights must give the same numbers
    rows = [dict(r) for r in trainer.train_dataset]
    packed = trainer.data_collator(rows)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            # A row that could see its predecessors would differ by far more than float32 rounding.
            assert torch.allclose(logits[start : start + n], alone, atol=1e-4), f"row at {start} attends across"
            start += n
        padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(rows)
        assert padded["input_ids"].shape[1] * len(rows) > packed["input_ids"].shape[1]  # there was padding to save
        loss_packed = trainer.compute_loss(model, dict(packed))
        loss_padded = trainer.compute_loss(model, dict(padded))
    assert float(loss_packed) == pytest.approx(float(loss_padded), abs=1e-5)


def test_trainable_weights_stay_fp32_on_cpu(padding_free_run):
    # TRL casts a quantized model's trainable weights to bf16 when it builds the trainer ...
    assert padding_free_run["dtypes_at_build"] == {torch.bfloat16}
    # ... and train() puts them back to fp32 before the optimizer exists: CPUs compute the 4-bit layers in fp32.
    assert trainable_dtypes(padding_free_run["trainer"].model) == {torch.float32}
    optimizer = padding_free_run["trainer"].optimizer
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}


def test_padding_free_needs_every_row_tokenized_and_within_the_window():
    from ftflow.configs.schema import PipelineConfig
    from ftflow.tasks.train.trainer import padding_free_fits

    def cfg(method=None, **sft):
        sections = {"sft": {"max_length": 16, **sft}, "quality": {"max_tokens": 16}, "method": method}
        return PipelineConfig.model_validate(sections)

    fits = [{"input_ids": [1] * 16}, {"input_ids": [1] * 3}]
    assert padding_free_fits(cfg(padding_free=True), fits)
    assert not padding_free_fits(cfg(padding_free=True), fits + [{"input_ids": [1] * 17}])  # TRL must truncate
    assert not padding_free_fits(cfg(padding_free=True), fits + [{"prompt": [], "completion": []}])  # length unknown
    assert not padding_free_fits(cfg(), fits)  # off by default: no faster with sdpa on CPU
    # peft ignores position ids for prompt learning: its virtual tokens would lead one packed sequence, not each row.
    assert not padding_free_fits(cfg(method="prompt_tuning", padding_free=True), fits)


def test_sft_batches_are_grouped_by_length(padding_free_run):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = padding_free_run["trainer"]
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    # The lengths it groups by are the rows' real token counts, as the formatting stage tokenized them.
    assert sorted(sampler.lengths) == sorted(len(r["input_ids"]) for r in padding_free_run["rows"])


def test_group_by_length_can_be_switched_off():
    from ftflow.configs.schema import PipelineConfig
    from ftflow.tasks.train.trainer import _kind_specific

    rows = [{"input_ids": [1] * 4}]
    on = _kind_specific("sft", PipelineConfig.model_validate({}), rows)[2]
    off = _kind_specific("sft", PipelineConfig.model_validate({"sft": {"group_by_length": False}}), rows)[2]
    assert on["train_sampling_strategy"] == "group_by_length"
    assert "train_sampling_strategy" not in off  # transformers' default: shuffled


# --- TRL's fused LM head: only labelled positions on a CPU ---------------------------------------------------


def _fused_loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_fused_lm_head_scores_only_labelled_positions_on_a_cpu_with_the_same_loss_and_gradients(
    tiny_model_dir, monkeypatch
):
    """Prompt and padding positions (label -100) are not projected onto the vocabulary; the loss and every
    gradient equal those of scoring every position, which is what TRL does on a CPU by itself."""
    import trl.trainer.utils as fused_head
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ftflow.tasks.train.trainer import score_labelled_positions_only

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(model)
    input_ids = torch.randint(5, 200, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # the prompt
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    projected: list[int] = []
    apply = fused_head._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        projected.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(fused_head._ChunkedLogProbFunction, "apply", spy)
    assert score_labelled_positions_only() and score_labelled_positions_only()  # idempotent
    compact = fused_head._use_triton
    monkeypatch.setattr(fused_head, "_use_triton", compact.original)
    every_loss, every_grads = _fused_loss_and_grads(model, batch)
    monkeypatch.setattr(fused_head, "_use_triton", compact)
    labelled_loss, labelled_grads = _fused_loss_and_grads(model, batch)

    labelled = int((labels[:, 1:] != -100).sum())
    assert projected == [3 * 11, labelled] and labelled == 6 + 6 + 2
    torch.testing.assert_close(labelled_loss, every_loss)
    assert every_grads.keys() == labelled_grads.keys() and len(every_grads) > 10
    for name, grad in every_grads.items():
        torch.testing.assert_close(labelled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_turns_the_labelled_only_head_on(padding_free_run):
    import trl.trainer.utils as fused_head

    assert getattr(fused_head._use_triton, "ftflow_cpu", False)
    assert not fused_head._use_triton.original(torch.device("cpu"))
    assert fused_head._use_triton(torch.device("cpu"))


def test_a_new_adapter_starts_from_the_config_seed_whatever_ran_before(tiny_model_dir):
    """A sweep trains its arms one after another in one process: each arm's LoRA weights must not depend on how
    much of the global generators the arms before it used."""
    from ftflow.configs.loader import load_config
    from ftflow.tasks.train.trainer import trainable_model

    cfg = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "lora.r=4"])

    def fresh_lora() -> dict[str, torch.Tensor]:
        model = trainable_model(cfg, tiny_model_dir)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first = fresh_lora()
    torch.rand(1000)  # what an earlier arm's training would have drawn
    second = fresh_lora()
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "lora.r=4", "seed=8"])
    assert not all(
        torch.equal(first[n], p) for n, p in trainable_model(other, tiny_model_dir).named_parameters() if n in first
    )
