"""Log and describe the registry model of `backend: openai`: a pointer to the API's `ft:` model, not weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.registry.packaging import (
    LoggedModelRef,
    model_signature,
    tag_experiment_kind,
    use_tracking_uri,
)

if TYPE_CHECKING:
    from ftflow.tasks.registry.gate import Decision

MODEL_CODE = Path(__file__).resolve().with_name("api_model_code.py")
LOGGED_MODEL_NAME = "registry_model"


def requirements() -> list[str]:
    from importlib import metadata

    return [f"{p}=={metadata.version(p)}" for p in ("mlflow", "openai")]


def log_api_model(cfg: PipelineConfig, tuned_model: str, run_id: str, client) -> LoggedModelRef:
    """An MLflow 3 LoggedModel of `run_id` that answers through `tuned_model`; no input example, because
    validating one would call the paid API at logging time."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from ftflow.tasks.tracking import tracking_uri

    run = client.get_run(run_id)
    tag_experiment_kind(client, run.info.experiment_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        model_type="openai-fine-tuned",
        tags={"ftflow.method": "openai", "ftflow.base_model": cfg.openai.model, "openai.fine_tuned_model": tuned_model},
    )
    with use_tracking_uri(tracking_uri(cfg)):
        info = Model.log(
            artifact_path=None,
            name=LOGGED_MODEL_NAME,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            model_config={
                "fine_tuned_model": tuned_model,
                "base_model": cfg.openai.model,
                "base_url": cfg.openai.base_url,
                "key_env": cfg.openai.key_env,
                "max_new_tokens": cfg.openai.max_new_tokens,
                "system_prompt": cfg.data.system_prompt,
            },
            signature=model_signature(),
            pip_requirements=requirements(),
        )
    return LoggedModelRef(info.model_id, f"models:/{info.model_id}")


def describe(decision: "Decision", tuned_model: str, run_id: str) -> str:
    """The registry version's description, in the shape of the local versions'."""
    scores = ", ".join(f"{name} {m.get(decision.metric, float('nan')):.3f}" for name, m in decision.scores.items())
    return "\n".join(
        [
            f"**OpenAI fine-tuned model** `{tuned_model}`.",
            "",
            f"**Gate:** {decision.summary()}",
            "",
            f"**Held-out {decision.metric}:** {scores}",
            "",
            f"Run: `{run_id}`",
        ]
    )
