"""The seed chapter's table 1 (full FT, LoRA, QLoRA, API FT, prompt tuning), measured: one row per method on the
same validated data, steps, seed and held-out prompts.

Columns: trainable parameters, peak memory, seconds per optimizer step, wall time of the arm (training and
scoring), CPU seconds (the local arms' cost), and the held-out primary metric of the arm's candidate with the
paired interval of its improvement over the base model. The API row is an estimate unless it ran.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import Alignment, Method, PipelineConfig, Quantization
from ftflow.tasks.evaluate import registry, stats


def arm_config(cfg: PipelineConfig, method: Method, alignment: Optional[Alignment] = None) -> PipelineConfig:
    """`cfg` trained by `method` (and `alignment`, default the recipe's): QLoRA keeps the recipe's 4/8-bit base
    (4bit if it had none); the others need 16/32-bit weights. The gate runs on no arm: a comparison registers
    nothing."""
    mode = cfg.quantization.mode
    if method == Method.qlora:
        mode = mode if mode != Quantization.none else Quantization.four_bit
    else:
        mode = Quantization.none
    # Table 2's stability is the variance of the step-to-step change, so the alignment stages log every step.
    edits = [f"method={method.value}", f"quantization.mode={mode.value}", "registry.enabled=false"]
    edits += ["dpo.logging_steps=1", "rlhf.logging_steps=1"]
    if alignment is not None:
        edits.append(f"alignment={alignment.value}")
    lr = cfg.compare.learning_rates.get(method)
    if lr is not None:
        ratio = lr / cfg.sft.learning_rate
        edits += [f"sft.learning_rate={lr}", f"dpo.learning_rate={cfg.dpo.learning_rate * ratio}"]
    return config_from_dict(apply_overrides(cfg.model_dump(mode="json"), edits), f"compare-methods arm {method.value}")


@dataclass
class MethodRow:
    method: str
    status: str  # FINISHED, FAILED, or "not run" (the API row without run_api)
    run_id: str = ""
    trainable_params: Optional[int] = None
    total_params: Optional[int] = None
    peak_memory_mb: Optional[float] = None
    s_per_step: Optional[float] = None
    wall_s: Optional[float] = None
    cpu_s: Optional[float] = None
    metric: str = ""
    value: Optional[float] = None
    interval: Optional[stats.Interval] = None  # the improvement over the base model
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = self.interval.as_dict() if self.interval else None
        return out


def interval_vs(metric: registry.Metric, mine, other, against: str, seed: int) -> Optional[stats.Interval]:
    """Paired interval of `mine` over `other` on the primary metric, when both have per-example scores."""
    a, b = mine.per_example.get(metric.name), other.per_example.get(metric.name)
    if not a or not b or len(a) != len(b):
        return None
    return stats.compare(
        metric,
        stats.Scores(a, mine.weights.get(metric.name)),
        stats.Scores(b, other.weights.get(metric.name)),
        against,
        seed=seed,
    )


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(rows: list[MethodRow], metric: str) -> str:
    """Markdown, readable in a terminal."""
    head = (
        f"| method | status | trainable params | peak memory MB | s/step | wall s | cost | held-out {metric} "
        f"| vs base (95% CI) | note |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cost = f"{_fmt(r.cpu_s)} CPU s" if r.cpu_s is not None else "-"
        share = f" ({r.trainable_params / r.total_params:.2%})" if r.trainable_params and r.total_params else ""
        vs_base = r.interval.line().replace(" vs base", "") if r.interval else "-"
        lines.append(
            f"| {r.method} | {r.status} | {_fmt(r.trainable_params)}{share} | {_fmt(r.peak_memory_mb, 0)} "
            f"| {_fmt(r.s_per_step, 2)} | {_fmt(r.wall_s)} | {cost} | {_fmt(r.value, 3)} | {vs_base} | {r.note} |"
        )
    return "\n".join(lines)


def qlora_claim(results: dict[str, Any], metric: registry.Metric, seed: int) -> str:
    """The QLoRA paper's claim on this task: QLoRA's held-out metric lies within the interval of 16/32-bit LoRA's,
    i.e. the paired interval of (QLoRA - LoRA) contains 0."""
    if "qlora" not in results or "lora" not in results:
        return "QLoRA vs LoRA: not compared (both arms must finish)"
    interval = interval_vs(metric, results["qlora"], results["lora"], "lora", seed)
    if interval is None:
        return f"QLoRA vs LoRA: not compared (no per-example {metric.name})"
    holds = interval.low <= 0.0 <= interval.high
    verdict = "holds" if holds else ("QLoRA better" if interval.low > 0 else "does not hold: QLoRA worse")
    return f"QLoRA vs LoRA on {metric.name}: {interval.line()} (n={interval.n}): {verdict}"


@dataclass
class Arm:
    """One finished (or failed) arm: its table row, its scored variants and what training produced."""

    row: MethodRow
    results: Optional[dict[str, Any]] = None
    trained: Any = None  # stages.Trained


# Per step, the number whose jumps measure stability: GRPO/RLOO's mean reward, DPO's reward margin.
STABILITY_KEY = {"rlhf": "reward", "dpo": "rewards/margins"}
# Weight sets held while aligning: DPO's reference is a frozen adapter copy on the policy's base; RLHF adds the
# reward model's own base.
MODELS_HELD = {"dpo": 1, "rlhf": 2}


def alignment_rows(arms: dict[str, Arm], metric: registry.Metric, seed: int) -> list[dict[str, Any]]:
    """The seed's table 2, measured: per alignment, its stage's cost and what it bought on held-out."""
    from ftflow.tasks.train.rlhf import step_variance

    rows = []
    for alignment, arm in arms.items():
        aligned = arm.trained.by_kind.get(alignment) if arm.trained is not None else None
        if aligned is None or arm.results is None:
            rows.append({"alignment": alignment, "status": arm.row.status, "note": arm.row.note})
            continue
        mine, base = arm.results[alignment], arm.results["base"]
        interval = interval_vs(metric, mine, base, "base", seed)
        stability = [h[STABILITY_KEY[alignment]] for h in aligned.history if STABILITY_KEY[alignment] in h]
        rows.append(
            {
                "alignment": alignment,
                "status": "FINISHED",
                "run_id": arm.row.run_id,
                "peak_memory_mb": aligned.peak_memory_mb,
                "wall_s": aligned.wall_s,
                "models_held": MODELS_HELD[alignment],
                "preference_accuracy": mine.metrics.get("preference_accuracy"),
                "metric": metric.name,
                "value": mine.metrics.get(metric.name),
                "interval": interval.as_dict() if interval else None,
                "interval_line": interval.line().replace(" vs base", "") if interval else "-",
                "step_variance": step_variance(stability),
                "reward_pair_accuracy": aligned.metrics.get("reward_pair_accuracy"),
            }
        )
    return rows


def alignment_table(rows: list[dict[str, Any]], metric: str) -> str:
    head = (
        f"| alignment | status | peak memory MB | wall s (stage) | models held | held-out preference acc. "
        f"| held-out {metric} | vs base (95% CI) | step-to-step variance | reward model pair acc. |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['alignment']} | {r['status']} | {_fmt(r.get('peak_memory_mb'), 0)} | {_fmt(r.get('wall_s'))} "
            f"| {_fmt(r.get('models_held'))} | {_fmt(r.get('preference_accuracy'), 3)} | {_fmt(r.get('value'), 3)} "
            f"| {r.get('interval_line', '-')} | {_fmt(r.get('step_variance'), 4)} "
            f"| {_fmt(r.get('reward_pair_accuracy'), 3)} |"
        )
    return "\n".join(lines)
