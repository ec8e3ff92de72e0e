"""Hyperparameter search on Optuna: the study, a trial's overrides, and the pruning callback.

A trial is a sweep arm with more knobs: its config is the recipe plus the trial's overrides, it trains in a
child MLflow run and is scored on the validation split by the primary metric (the study's objective, in the
metric's direction). While it trains, the same metric on the validation rows is reported to the pruner every
`search.eval_every` steps; a trial the pruner stops raises `Pruned`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import optuna
from transformers import TrainerCallback

from ftflow.configs.schema import PipelineConfig, SearchConfig
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.evaluate import registry

if TYPE_CHECKING:
    from ftflow.tasks.stages import StageContext


class Pruned(PipelineError, optuna.TrialPruned):
    """The pruner stopped the trial: Optuna records it PRUNED, and as a PipelineError no task retries it."""


def storage_url(cfg: PipelineConfig) -> str:
    # Not MLflow's own SQLite file: both keep their schema revision in a table named alembic_version.
    if cfg.search.storage:
        return cfg.search.storage
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'optuna.db'}"


def pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_steps)
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=search.min_resource)
    return optuna.pruners.NopPruner()


def study(cfg: PipelineConfig, name: str) -> optuna.Study:
    """Create or continue the study `name` in the configured storage; trials on other workers share it."""
    metric = registry.get(cfg.eval.resolved_primary_metric)
    made = optuna.create_study(
        storage=storage_url(cfg),
        study_name=name,
        direction="maximize" if metric.sign > 0 else "minimize",
        pruner=pruner(cfg.search),
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        load_if_exists=True,
    )
    for params in cfg.search.enqueue:
        made.enqueue_trial(params, skip_if_exists=True)
    return made


def overrides(trial: optuna.Trial, search: SearchConfig) -> list[str]:
    """The trial's key.sub=value edits of the recipe, one per dimension of the space that is set."""
    space, out = search.space, []
    if space.r:
        r = trial.suggest_categorical("r", space.r)
        out.append(f"lora.r={r}")
        if space.alpha_multiplier:
            mult = trial.suggest_categorical("alpha_multiplier", space.alpha_multiplier)
            out.append(f"lora.alpha={max(1, round(mult * r))}")
    if space.learning_rate is not None:
        lr = space.learning_rate
        out.append(f"sft.learning_rate={trial.suggest_float('learning_rate', lr.low, lr.high, log=lr.log)}")
    if space.max_steps:
        out.append(f"sft.max_steps={trial.suggest_categorical('max_steps', space.max_steps)}")
    if space.dpo_beta is not None:
        beta = space.dpo_beta
        out.append(f"dpo.beta={trial.suggest_float('dpo_beta', beta.low, beta.high, log=beta.log)}")
    if space.dpo_loss_type:
        kinds = [k.value for k in space.dpo_loss_type]
        out.append(f"dpo.loss_type={trial.suggest_categorical('dpo_loss_type', kinds)}")
    return out


class PruningCallback(TrainerCallback):
    """Every `every` steps: the primary metric of the adapter being trained on the validation rows, reported to
    the trial; when the pruner says so, `Pruned` stops training. Steps count on across SFT and then DPO."""

    def __init__(self, trial: optuna.Trial, ctx: StageContext, validation: list[dict], every: int):
        self.trial, self.ctx, self.validation, self.every = trial, ctx, validation, every
        self.offset = self.last = 0
        self.reported: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.offset = self.last

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.last = self.offset + state.global_step
        if state.global_step % self.every:
            return
        value = validation_value(self.ctx, self.validation, model, processing_class)
        self.reported.append((self.last, value))
        if self.ctx.run is not None:
            self.ctx.run.log_metrics(
                {f"search/validation_{self.ctx.cfg.eval.resolved_primary_metric}": value}, self.last
            )
        self.trial.report(value, self.last)
        if self.trial.should_prune():
            raise Pruned(
                f"trial {self.trial.number} pruned at step {self.last}: "
                f"validation {self.ctx.cfg.eval.resolved_primary_metric}={value:.4g}"
            )


def validation_value(ctx: StageContext, validation: list[dict], model, tokenizer) -> float:
    """The primary metric of the adapter in training ("default") on the validation rows, the model left as found."""
    from dataclasses import replace

    from ftflow.tasks.evaluate.evaluation import Scoring, score_variants

    metric = registry.get(ctx.cfg.eval.resolved_primary_metric)
    examples = validation[: ctx.cfg.eval.validation_max_examples]
    was_training = model.training
    model.eval()
    try:
        scored = score_variants(
            replace(ctx, progress=None),
            model,
            tokenizer,
            ["default"],
            Scoring(examples, sources=frozenset({metric.source})),
        )
    finally:
        model.train(was_training)
    return float(scored["default"].metrics[metric.name])


def outcome_of(study: optuna.Study, outcomes: dict[int, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The best completed trial's outcome, when this process ran it (it holds the adapters and results the gate needs)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.number in outcomes]
    if not done:
        return None
    best = (max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min)(done, key=lambda t: t.value)
    return outcomes[best.number]
