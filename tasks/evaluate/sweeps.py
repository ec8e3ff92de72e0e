"""Rank-sweep arithmetic: arms and their configs, the comparison table, the best arm, the chart.

Arms are ranked on the validation split (each arm's candidate's primary metric there, in the metric's direction);
the held-out columns are reported, never used to pick: the best arm then meets the gate on held-out.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    return config_with(cfg, arm_overrides(r, alpha))


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


def arm_overrides(r: int, alpha: int) -> list[str]:
    return [f"lora.r={r}", f"lora.alpha={alpha}"]


def config_with(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """`cfg` with an arm's overrides; the gate runs once, on the best arm, from the parent flow."""
    return config_from_dict(
        apply_overrides(cfg.model_dump(mode="json"), [*overrides, "registry.enabled=false"]),
        f"sweep arm {' '.join(overrides)}",
    )


# ---------------------------------------------------------------- fan-out: inputs by reference

BLOCK_SCHEME = "prefect-block://"
INPUTS = "sweep-inputs"
OUTCOMES = "sweep-outcomes"


@dataclass
class ArmInputs:
    """Everything an arm reads, stored once for all arms: the parent's resolved config (as JSON), the base model,
    the formatted train set, the evaluation sets, and the scores no arm changes (base, few-shot, champion)."""

    config: dict[str, Any]
    model: Any
    train_set: Any
    sets: Any
    baselines: Any


def store_root(sweep: SweepConfig, output_dir: str) -> str:
    if sweep.store_block:
        return f"{BLOCK_SCHEME}{sweep.store_block}"
    if sweep.store and "://" in sweep.store:
        return sweep.store.rstrip("/")
    return str(Path(sweep.store or Path(output_dir) / "shared").resolve())


def _block_and_key(uri: str) -> tuple[Any, str]:
    """A `prefect-block://<block-type>/<name>/<key>` URI: the loaded filesystem block and the key inside it."""
    from prefect.blocks.core import Block

    block_type, name, key = uri[len(BLOCK_SCHEME) :].split("/", 2)
    return Block.load(f"{block_type}/{name}"), key


def write_bytes(uri: str, data: bytes) -> None:
    if uri.startswith(BLOCK_SCHEME):
        block, key = _block_and_key(uri)
        block.write_path(key, data)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    # Written aside, then moved: a reader never sees half a file under its final name.
    fs.pipe_file(path + ".part", data)
    fs.mv(path + ".part", path)


def read_bytes(uri: str) -> bytes:
    if uri.startswith(BLOCK_SCHEME):
        block, key = _block_and_key(uri)
        return block.read_path(key)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    if uri.startswith(BLOCK_SCHEME):
        try:
            read_bytes(uri)
            return True
        except (FileNotFoundError, ValueError, OSError):
            return False
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def put_inputs(root: str, inputs: ArmInputs) -> tuple[str, str]:
    """Store `inputs` under their own sha256 (once: the same content is not written twice); (URI, digest)."""
    import hashlib
    import pickle

    data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(data).hexdigest()
    uri = f"{root}/{INPUTS}/{digest}.pkl"
    if not exists(uri):
        write_bytes(uri, data)
    return uri, digest


def get_inputs(uri: str, digest: str) -> ArmInputs:
    """The stored inputs, after their sha256 matched `digest`: a torn, stale or swapped file is refused
    before anything is unpickled."""
    import hashlib
    import pickle

    from ftflow.tasks.errors import PipelineError

    try:
        data = read_bytes(uri)
    except (FileNotFoundError, OSError) as err:
        raise PipelineError(f"sweep arm inputs {uri}: cannot be read ({type(err).__name__}: {err})") from None
    found = hashlib.sha256(data).hexdigest()
    if found != digest:
        raise PipelineError(f"sweep arm inputs {uri}: sha256 is {found}, expected {digest}; not used")
    return pickle.loads(data)


def outcome_uri(inputs_uri: str, flow_run_id: str) -> str:
    """Where the arm of flow run `flow_run_id` leaves its outcome: beside the inputs, in the same store."""
    root = inputs_uri.rsplit(f"/{INPUTS}/", 1)[0]
    return f"{root}/{OUTCOMES}/{flow_run_id}.pkl"


def put_outcome(uri: str, outcome: dict[str, Any]) -> None:
    import pickle

    write_bytes(uri, pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))


def get_outcome(uri: str) -> Optional[dict[str, Any]]:
    import pickle

    return pickle.loads(read_bytes(uri)) if exists(uri) else None
