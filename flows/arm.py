"""One arm of a rank sweep as its own flow run (sweep.fan_out=deployment): the `arm` deployment in prefect.yaml.

Wiring only. The parameters are references, never data: the URI and sha256 of the inputs the sweep stored
once (config, formatted data, evaluation sets, the base model's and the champion's scores), the arm's
overrides, and the sweep's MLflow parent run. The arm checks the digest, trains and evaluates in a child run
of that parent, and leaves its outcome beside the inputs for the sweep to collect. A retry of the same flow
run resumes its child run, and with it training from the last checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from ftflow import steps
from ftflow.configs.schema import PipelineConfig
from ftflow.sweep import open_arm_run, train_arm
from ftflow.tasks.evaluate import sweeps


@flow(name="sweep-arm", retries=1, retry_delay_seconds=5)
def arm_flow(inputs_uri: str, digest: str, overrides: list[str], parent_run_id: str) -> dict[str, Any]:
    """Train and evaluate one sweep arm from stored inputs; returns the arm's outcome (validation score first).

    Args:
        inputs_uri: Where the sweep stored the arms' inputs (a path, an fsspec URL or prefect-block://...).
        digest: sha256 of those inputs; anything else at the URI is refused.
        overrides: This arm's key.sub=value edits, e.g. lora.r=8 and lora.alpha=16.
        parent_run_id: The sweep's MLflow run; the arm's run is its child.
    """
    inputs = sweeps.get_inputs(inputs_uri, digest)
    cfg = sweeps.config_with(PipelineConfig.model_validate(inputs.config), list(overrides))
    run = open_arm_run(cfg, parent_run_id)
    ctx = steps.context(cfg, inputs.model, run)
    try:
        outcome = train_arm(ctx, inputs.train_set, inputs.sets, inputs.baselines)
    except Exception as err:
        # FAILED before Prefect retries: the retry resumes this run instead of finding it still RUNNING.
        steps.fail(run, err, [], label=f"Sweep arm {' '.join(overrides)}")
        raise
    sweeps.put_outcome(sweeps.outcome_uri(inputs_uri, flow_run.get_id()), outcome)
    return {k: v for k, v in outcome.items() if k not in ("trained", "results")}
