"""Rank-sweep arithmetic: arms and their configs, the comparison table, the best arm, the chart.

Arms are ranked on the validation split (each arm's candidate's primary metric there, in the metric's direction);
the held-out columns are reported, never used to pick: the best arm then meets the gate on held-out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ftflow.configs.loader import apply_overrides, config_from_dict
from ftflow.configs.schema import PipelineConfig, SweepConfig
from ftflow.tasks.evaluate import registry


def arms(sweep: SweepConfig) -> list[tuple[int, int]]:
    if sweep.alphas is not None:
        if len(sweep.alphas) != len(sweep.ranks):
            raise ValueError(f"sweep.alphas has {len(sweep.alphas)} values for {len(sweep.ranks)} ranks")
        return list(zip(sweep.ranks, sweep.alphas))
    return [(r, max(1, round(sweep.alpha_multiplier * r))) for r in sweep.ranks]


def validation_key(primary: str) -> str:
    return f"validation_{primary}"


def best_arm(outcomes: list[dict[str, Any]], primary: str) -> Optional[dict[str, Any]]:
    """Best validation score of the primary metric in its direction; a tie goes to the smaller r (fewer parameters,
    less to overfit). Held-out scores play no part."""
    metric = registry.get(primary)
    ok = [o for o in outcomes if o["status"] == "FINISHED" and primary in o.get("validation", {})]
    if not ok:
        return None
    return max(ok, key=lambda o: (round(o["validation"][primary] * metric.sign, 9), -o["r"]))


def comparison(outcomes: list[dict[str, Any]], cfg: PipelineConfig) -> list[dict[str, Any]]:
    primary = cfg.eval.resolved_primary_metric
    keys = registry.table_metrics(cfg.eval.task.value, primary)
    keys = [k for k in keys if any(k in o.get("metrics", {}) for o in outcomes)] or keys
    rows = []
    for o in outcomes:
        row = {
            "r": o["r"],
            "alpha": o["alpha"],
            "status": o["status"],
            "run_id": o["run_id"],
            "trainable_params": o.get("trainable_params"),
            "wall_s": o.get("wall_s"),
            "peak_memory_mb": o.get("peak_memory_mb"),
            "candidate": o.get("candidate"),
            validation_key(primary): o.get("validation", {}).get(primary),
        }
        row.update({k: o["metrics"].get(k) for k in keys})
        rows.append(row)
    return rows


def table_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(rows)


def markdown(rows: list[dict[str, Any]]) -> str:
    headers = [h for h in rows[0] if h != "run_id"]

    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(r[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], primary: str, path: Path) -> Path:
    """Primary metric (the column `primary` of the rows), trainable parameters and wall time against rank."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "FINISHED"]
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(
        axes, (primary, "trainable_params", "wall_s"), (primary, "trainable parameters", "wall time (s)")
    ):
        xs = [r["r"] for r in done if r.get(key) is not None]
        ys = [r[key] for r in done if r.get(key) is not None]
        ax.plot(xs, ys, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("LoRA rank r")
        ax.set_title(label)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def arm_config(cfg: PipelineConfig, r: int, alpha: int) -> PipelineConfig:
    # The gate runs once, on the best arm, from the parent flow.
    return config_from_dict(
        apply_overrides(cfg.model_dump(mode="json"), [f"lora.r={r}", f"lora.alpha={alpha}", "registry.enabled=false"]),
        f"sweep arm r={r}",
    )


def outcome(cfg: PipelineConfig, run_id: str, status: str, **fields: Any) -> dict[str, Any]:
    """One arm as the comparison and best_arm read it: `metrics` held-out (reported), `validation` (ranked on)."""
    return {
        "r": cfg.lora.r,
        "alpha": cfg.lora.resolved_alpha,
        "run_id": run_id,
        "status": status,
        "metrics": {},
        "validation": {},
        **fields,
    }
