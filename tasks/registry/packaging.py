"""The adapter as an MLflow 3 pyfunc model: packaged folder, LoggedModel, version description.

`package_model` writes the pyfunc folder that the gate logs under the run's `registry_model/`
(kept for its callers). `log_packaged_model` logs the same model as an MLflow 3 LoggedModel, so it
shows under the experiment's "Logged models" with the run's metrics linked by `model_id`, a
signature, an input example and pinned requirements. `describe_version` writes the readable text a
registry version carries.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ftflow.configs.schema import PipelineConfig

if TYPE_CHECKING:
    from ftflow.tasks.registry.card import CardFacts

# Models from Code: MLflow copies this file into the model and runs it at load (see pyfunc_model.py).
MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
# The MLflow 3 UI opens an experiment with this tag in its model-training ("Machine learning") view
# rather than the GenAI one; the values are the UI's ExperimentKind enum (mlflow/server/js).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# What loading the packaged model imports; pinned to the versions that produced it.
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "gguf",
    "pydantic",
    "pyyaml",
    "pandas",
)
INPUT_EXAMPLE_PROMPT = "Extract the order as JSON:\nKen ordered 3 lamps in Osaka."
LOGGED_MODEL_NAME = "registry_model"
# One lock for MLflow's process-wide state: the tracking URI, and models-from-code loading, which swaps
# sys.modules["dbutils"] for a mock and back without a lock of its own. Two gates packaging at once
# (sweep arms run in threads) would leave the mock in sys.modules for the rest of the process.
_MLFLOW_LOCK = threading.RLock()


@dataclass
class RunSettings:
    """What reloading a trained adapter needs from the run's config: the base model, its quantization,
    generation settings, the system prompt. Read section by section, so a run logged under an older
    config schema (a renamed key, a cross-field rule added since) still loads: unknown keys are dropped
    and a section that no longer validates falls back to its defaults."""

    model: Any
    quantization: Any
    eval: Any
    system_prompt: Optional[str] = None
    max_length: int = 256
    seed: int = 42

    @classmethod
    def from_config_dict(cls, raw: dict[str, Any]) -> "RunSettings":
        from pydantic import ValidationError

        from ftflow.configs.schema import EvalConfig, ModelConfig, QuantizationConfig

        def section(model_cls, name):
            given = raw.get(name) or {}
            try:
                return model_cls.model_validate({k: v for k, v in given.items() if k in model_cls.model_fields})
            except ValidationError:
                return model_cls()

        data, sft = raw.get("data") or {}, raw.get("sft") or {}
        return cls(
            section(ModelConfig, "model"),
            section(QuantizationConfig, "quantization"),
            section(EvalConfig, "eval"),
            data.get("system_prompt"),
            int(sft.get("max_length", 256)),
            int(raw.get("seed", 42)),
        )


def adapter_method(adapter_dir: str | Path) -> str:
    """Which fine-tuning method produced the folder; `ftflow export` picks its path by this."""
    config = Path(adapter_dir, "adapter_config.json")
    if not config.exists():
        # No adapter config: the folder holds full weights (a full fine-tune).
        return "full"
    peft_type = str(json.loads(config.read_text()).get("peft_type", "LORA")).lower()
    return {"lora": "lora", "prompt_tuning": "prompt_tuning"}.get(peft_type, peft_type)


def pinned_requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
        # A local build tag (torch 2.13.0+cpu) is not on PyPI; the public version is.
        pins.append(f"{package}=={version.split('+')[0]}")
    return pins


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # One unnamed string column: `predict(["..."])` and a one-column frame both satisfy it.
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))


def input_example() -> list[str]:
    return [INPUT_EXAMPLE_PROMPT]


def _model_config(cfg: PipelineConfig, adapter_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    from ftflow.tasks.tracking import redact_config_dict

    return {
        "pipeline_config": redact_config_dict(cfg.model_dump(mode="json")),
        "method": adapter_method(adapter_dir),
        **meta,
    }


def _python_model_class():
    """The PythonModel class the packaged model runs (importing it needs mlflow.pyfunc)."""
    from ftflow.tasks.registry.pyfunc_model import LoraAdapterModel

    return LoraAdapterModel


def package_model(cfg: PipelineConfig, adapter_dir: str, meta: dict[str, Any], out_dir: Path) -> Path:
    """A pyfunc folder: adapter files and the resolved config; loading it needs the `ftflow` package installed."""
    import mlflow.pyfunc

    target = Path(out_dir) / "model"
    if target.exists():
        shutil.rmtree(target)
    with _MLFLOW_LOCK:
        mlflow.pyfunc.save_model(
            str(target),
            python_model=str(MODEL_CODE),
            artifacts={"adapter": adapter_dir},
            model_config=_model_config(cfg, adapter_dir, meta),
            signature=model_signature(),
            pip_requirements=pinned_requirements(),
        )
    return target


@contextmanager
def use_tracking_uri(uri: str):
    """MLflow's model logging and loading read the process-wide tracking URI: set it for the block, then put
    back exactly what was there (an unset global stays unset, so MLFLOW_TRACKING_URI keeps working)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _MLFLOW_LOCK:
        previous, env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # None clears the global and the environment variable
            if env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env


@dataclass
class LoggedModelRef:
    model_id: str
    model_uri: str  # models:/<model_id>, the source a registry version should point at


def tag_experiment_kind(client, experiment_id: str) -> None:
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def log_packaged_model(
    cfg: PipelineConfig, adapter_dir: str, meta: dict[str, Any], run_id: str, client=None
) -> LoggedModelRef:
    """Log the packaged adapter as an MLflow 3 LoggedModel of `run_id`, with the run's step-0 metrics linked.

    `mlflow.pyfunc.log_model` is `Model.log(flavor=mlflow.pyfunc)` without a `run_id` argument: it
    logs to the thread's active run. The pipeline addresses runs by id (Prefect runs tasks in worker
    threads, MLflow's active run is per thread), so this calls `Model.log` with the run id itself, into
    a LoggedModel created in the run's experiment. MLflow validates the input example by loading the
    model and predicting once, so a model that cannot load fails here, not at serving time."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from ftflow.tasks.tracking import client as tracking_client
    from ftflow.tasks.tracking import tracking_uri

    client = client or tracking_client(cfg)
    config = _model_config(cfg, adapter_dir, meta)
    run = client.get_run(run_id)
    tag_experiment_kind(client, run.info.experiment_id)
    # Idempotent like register_candidate: a retried gate task finds the model it already logged.
    for output in run.outputs.model_outputs if run.outputs else []:
        existing = client.get_logged_model(output.model_id)
        if existing.name == LOGGED_MODEL_NAME and "READY" in str(existing.status):
            return LoggedModelRef(existing.model_id, f"models:/{existing.model_id}")
    # Created here so it lands in the run's experiment: Model.log would create it in the fluent
    # "active" experiment, which is the Default one in a process that never called set_experiment.
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        model_type=f"{config['method']}-adapter",
        params={k: str(v) for k, v in run.data.params.items()},
        tags={
            "ftflow.method": config["method"],
            "ftflow.stage": str(meta.get("stage", "")),
            "ftflow.template_fingerprint": str(meta.get("template_fingerprint", "")),
            "ftflow.base_model": str(meta.get("base_model", cfg.model.name_or_path)),
        },
    )
    with use_tracking_uri(tracking_uri(cfg)):
        info = Model.log(
            artifact_path=None,
            name=LOGGED_MODEL_NAME,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run_id,  # links the model as the run's output and its step-0 metrics by model_id
            model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={"adapter": adapter_dir},
            model_config=config,
            signature=model_signature(),
            input_example=input_example(),
            pip_requirements=pinned_requirements(),
        )
    return LoggedModelRef(info.model_id, f"models:/{info.model_id}")


def describe_version(facts: "CardFacts") -> str:
    """The registry version's description: gate decision, scores, data digests, the run. Markdown."""
    primary = facts.primary_metric
    lines = [
        f"**{'LoRA' if facts.method in ('lora', 'qlora') else facts.method} adapter** ({facts.stage}) on `{facts.base_model}`"
        + (f", r={facts.lora.get('r')}, alpha={facts.lora.get('alpha')}" if facts.method in ("lora", "qlora") else "")
        + ".",
        "",
        f"**Gate:** {facts.gate_summary or 'not gated'}",
        "",
    ]
    scores = [(row["model"], row.get(primary)) for row in facts.heldout]
    if scores:
        lines.append(
            f"**Held-out {primary}:** "
            + ", ".join(
                f"{model} {value:.3f}" if isinstance(value, (int, float)) else f"{model} -" for model, value in scores
            )
        )
        lines.append("")
    if facts.datasets:
        lines.append("**Data:** " + ", ".join(f"{d['name']} `{d['digest']}`" for d in facts.datasets))
        lines.append("")
    lines.append(f"**Run:** [{facts.run_id}]({facts.run_url})" if facts.run_url else f"**Run:** `{facts.run_id}`")
    return "\n".join(lines)


def document_version(
    client,
    name: str,
    version: str,
    run_id: str,
    run_url: Optional[str] = None,
    stage: Optional[str] = None,
) -> str:
    """Give a registered version its description and its model card (logged to the run as model_card/README.md)."""
    from ftflow.tasks.registry.card import CardSubject, build_card, gather_facts

    facts = gather_facts(client, run_id, CardSubject(name, str(version), run_url, stage=stage))
    client.update_model_version(name, str(version), description=describe_version(facts))
    card = build_card(facts)
    client.log_text(run_id, card, "model_card/README.md")
    return card
