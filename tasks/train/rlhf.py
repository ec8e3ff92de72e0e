"""RLHF as the seed chapter draws it (`alignment: rlhf`): a reward model trained on the preference pairs, then
online RL of the SFT adapter against it.

- Reward model: the same base (quantized as configured), a LoRA and a one-logit sequence-classification head,
  trained with TRL's RewardTrainer (Bradley-Terry on chosen vs rejected). Its held-out pair accuracy is logged.
- Policy: TRL's GRPO or RLOO trainer from the SFT adapter. TRL 1.x has no PPO trainer; both of these sample a
  group of completions per prompt and use the group as the baseline, so no value model is trained. TRL keeps a
  frozen copy of the SFT adapter as the KL reference, on the same base weights.
- Reward: the reward model's score, plus `rlhf.verifiable_weight` times the task's own metric of the completion
  against the reference answer (exact JSON match on the demo), a reward that cannot be gamed.

Rewards, KL and completion lengths go to MLflow per step under `rlhf/`, the reward model's losses under `reward/`.
Three weight sets are held during RL: the quantized base (shared by policy and reference adapters), and the
reward model's own base (transformers cannot put a classification head and a causal-LM head on one instance).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from ftflow.configs.schema import Quantization
from ftflow.tasks.stages import StageContext
from ftflow.tasks.train.trainer import (
    TrainResult,
    _fit,
    _record,
    common_args,
    reset_peak_memory,
    step_stream,
    trainable_model,
)


@dataclass
class RewardResult:
    adapter_dir: str
    pair_accuracy: float  # held-out pairs whose chosen answer scores above the rejected one
    n_pairs: int
    wall_s: float
    history: list[dict[str, float]]


def _reward_base(ctx: StageContext):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, set_seed

    from ftflow.tasks.train.model import load_base_model

    class OneScore:
        """The classification head a reward model needs: one logit, the scalar reward."""

        @staticmethod
        def from_pretrained(path, **kwargs):
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)

    cfg = ctx.cfg
    set_seed(cfg.seed)  # the new score head and LoRA weights, as in trainer.trainable_model
    model = load_base_model(ctx.model.path, cfg.model, cfg.quantization, OneScore)
    if cfg.quantization.mode != Quantization.none:
        model = prepare_model_for_kbit_training(model)
    lora = cfg.lora
    # SEQ_CLS marks the new `score` head as trained and saved with the adapter.
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.resolved_alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, peft_config)


def reward_scores(model, tokenizer, conversations: list[list[dict]], max_length: int) -> list[float]:
    """The reward model's score of each whole conversation (prompt + answer)."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
    return [float(x) for x in logits[:, 0].float().cpu()]


def pair_accuracy(model, tokenizer, pairs: list[dict], max_length: int) -> float:
    if not pairs:
        return float("nan")
    chosen = reward_scores(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_length)
    rejected = reward_scores(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_length)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def train_reward_model(ctx: StageContext, pairs: list[dict], heldout_pairs: list[dict]) -> tuple[RewardResult, Any]:
    """(result, the trained reward model in eval mode) from the formatted preference pairs."""
    import trl
    from datasets import Dataset

    from ftflow.tasks.train.model import keep_trainable_fp32, load_tokenizer, pick_device

    cfg, rc = ctx.cfg, ctx.cfg.rlhf.reward
    tokenizer = load_tokenizer(ctx.model.path, cfg.model)
    model = _reward_base(ctx)
    model.config.pad_token_id = tokenizer.pad_token_id
    device = pick_device(cfg.model)
    out = ctx.work_dir / "reward"
    args = trl.RewardConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=rc.max_steps,
        learning_rate=rc.learning_rate,
        per_device_train_batch_size=rc.per_device_batch_size,
        max_length=rc.max_length,
        logging_steps=max(1, min(5, rc.max_steps)),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    stream = step_stream(ctx, "reward", rc.max_steps)
    with keep_trainable_fp32(model, device):
        trainer = trl.RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]),
            processing_class=tokenizer,
            callbacks=[stream],
        )
    # On GPU TRL casts a quantized model's trainable weights to bf16 (QLoRA's recipe; on CPU the block above undid
    # it); LoRA layers cast their input, a plain linear head does not, so the head follows the hidden states' dtype.
    hidden = model.get_input_embeddings().weight.dtype
    for name, param in model.named_parameters():
        if ".score." in name and param.requires_grad:
            param.data = param.data.to(hidden)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    model.eval()
    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir))
    accuracy = pair_accuracy(model, tokenizer, heldout_pairs, rc.max_length)
    result = RewardResult(str(adapter_dir), accuracy, len(heldout_pairs), wall, stream.history)
    if ctx.run is not None:
        ctx.run.log_metrics(
            {
                "reward/heldout_pair_accuracy": accuracy,
                "reward/heldout_pairs": len(heldout_pairs),
                "reward/wall_s": wall,
            }
        )
    ctx.log(f"reward model: held-out pair accuracy {accuracy:.3f} on {len(heldout_pairs)} pairs")
    return result, model


def reward_functions(ctx: StageContext, reward_model, tokenizer) -> tuple[list[Callable], list[float]]:
    """(reward functions, weights) for TRL's online trainers: the reward model, and the task metric if weighted."""
    from ftflow.tasks.evaluate.metrics import per_example_scores
    from ftflow.tasks.evaluate.registry import get

    max_length = ctx.cfg.rlhf.reward.max_length

    def reward_model_score(prompts, completions, **kwargs) -> list[float]:
        return reward_scores(reward_model, tokenizer, [p + c for p, c in zip(prompts, completions)], max_length)

    funcs, weights = [reward_model_score], [1.0]
    if ctx.cfg.rlhf.verifiable_weight > 0:
        metric = get(ctx.cfg.eval.resolved_primary_metric)
        column = metric.column if metric.source == "generation" and metric.per_example else "exact_match"

        def task_metric(prompts, completions, reference, **kwargs) -> list[float]:
            texts = [c[-1]["content"] for c in completions]
            rows = per_example_scores(texts, list(reference), None, stopped=[True] * len(texts))
            return [float(row[column]) for row in rows]

        funcs.append(task_metric)
        weights.append(ctx.cfg.rlhf.verifiable_weight)
    return funcs, weights


def _online_trainer(kind: str):
    import trl

    return (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)


def train_policy(ctx: StageContext, examples: list[dict], sft_adapter: str, reward_model) -> TrainResult:
    """Online RL of the SFT adapter on the SFT prompts, rewarded by `reward_model` (and the task metric)."""
    from datasets import Dataset

    from ftflow.tasks.train.model import keep_trainable_fp32, load_tokenizer, pick_device, trainable_parameters

    cfg, section = ctx.cfg, ctx.cfg.rlhf
    tokenizer = load_tokenizer(ctx.model.path, cfg.model)
    model = trainable_model(cfg, ctx.model.path, sft_adapter, section.gradient_checkpointing)
    counted = trainable_parameters(model)
    device = pick_device(cfg.model)
    out_dir = ctx.work_dir / "rlhf"
    config_class, trainer_class = _online_trainer(section.trainer)
    accepted = {f.name for f in dataclasses.fields(config_class)}
    shared = {k: v for k, v in common_args(section, out_dir / "checkpoints", cfg.seed, device).items() if k in accepted}
    # The reference answers reach the task-metric reward as a dataset column.
    shared["remove_unused_columns"] = False
    funcs, weights = reward_functions(ctx, reward_model, tokenizer)
    args = config_class(
        **shared,
        num_generations=section.num_generations,
        max_completion_length=section.max_completion_length,
        beta=section.beta,
        reward_weights=weights,
        **section.extra,
    )
    stream = step_stream(ctx, "rlhf", section.max_steps)
    rows = [{"prompt": ex["prompt"], "reference": ex["completion"][-1]["content"]} for ex in examples]
    with keep_trainable_fp32(model, device):
        trainer = trainer_class(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[stream, *ctx.callbacks],
        )
    result = _fit(trainer, model, stream.history, out_dir, counted)
    result.kind = "rlhf"
    if trainer.is_world_process_zero():
        _record(ctx, "rlhf", result)
    return result


def train_rlhf(ctx: StageContext, examples: list[dict], pairs: list[dict], sft_adapter: str) -> TrainResult:
    """Reward model, then the policy; the reward model's figures join the policy's result metrics."""
    from ftflow.tasks.train.model import pick_device

    # One peak for the stage: the reward model stays loaded while the policy trains.
    reset_peak_memory(pick_device(ctx.cfg.model))
    train_pairs, heldout_pairs = _split_pairs(ctx, pairs)
    reward, reward_model = train_reward_model(ctx, train_pairs, heldout_pairs)
    result = train_policy(ctx, examples, sft_adapter, reward_model)
    rewards = [h["reward"] for h in result.history if "reward" in h]
    result.metrics.update(
        {
            "reward_pair_accuracy": reward.pair_accuracy,
            "reward_wall_s": reward.wall_s,
            "reward_step_variance": step_variance(rewards),
            "models_held": 2.0,  # the policy's base (with its SFT reference adapter) and the reward model's base
        }
    )
    result.wall_s += reward.wall_s
    if ctx.run is not None:
        ctx.run.log_metrics({f"rlhf/{k}": v for k, v in result.metrics.items() if k.startswith(("reward_", "models"))})
    return result


def step_variance(values: list[float]) -> float:
    """Variance of the step-to-step change of the mean reward: how jumpy training was (the seed's "stability")."""
    deltas = [b - a for a, b in zip(values, values[1:])]
    if len(deltas) < 2:
        return float("nan")
    mean = sum(deltas) / len(deltas)
    return sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)


def _split_pairs(ctx: StageContext, pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded 20 % of the pairs kept from the reward model's training, for its pair accuracy."""
    import random

    held = set(random.Random(ctx.cfg.seed).sample(range(len(pairs)), max(1, len(pairs) // 5)))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
