"""Rank-sweep arithmetic: arms from the config, the comparison table, the best arm, the chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ftflow.configs.schema import SweepConfig

TABLE_METRICS = ("heldout_exact", "heldout_field_accuracy", "eos_stop_rate", "heldout_loss", "preference_accuracy")


def arms(sweep: SweepConfig) -> list[tuple[int, int]]:
    if sweep.alphas is not None:
        if len(sweep.alphas) != len(sweep.ranks):
            raise ValueError(f"sweep.alphas has {len(sweep.alphas)} values for {len(sweep.ranks)} ranks")
        return list(zip(sweep.ranks, sweep.alphas))
    return [(r, max(1, round(sweep.alpha_multiplier * r))) for r in sweep.ranks]


def best_arm(outcomes: list[dict[str, Any]], primary: str) -> Optional[dict[str, Any]]:
    """Highest primary metric; a tie goes to the smaller r (fewer parameters, less to overfit)."""
    ok = [o for o in outcomes if o["status"] == "FINISHED" and primary in o["metrics"]]
    if not ok:
        return None
    return max(ok, key=lambda o: (round(o["metrics"][primary], 9), -o["r"]))


def comparison(outcomes: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    keys = (primary, *[m for m in TABLE_METRICS if m != primary])
    rows = []
    for o in outcomes:
        row = {"r": o["r"], "alpha": o["alpha"], "status": o["status"], "run_id": o["run_id"],
               "trainable_params": o.get("trainable_params"), "wall_s": o.get("wall_s"),
               "peak_memory_mb": o.get("peak_memory_mb")}
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
    """Primary metric, trainable parameters and wall time against rank, side by side."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "FINISHED"]
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, (primary, "trainable_params", "wall_s"),
                              (primary, "trainable parameters", "wall time (s)")):
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
