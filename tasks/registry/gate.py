"""The adapter as an MLflow pyfunc model, the registry, and the promotion gate.

The gate moves the `champion` alias only when the candidate beats the current champion (re-scored on
the same held-out prompts) by a margin, beats the few-shot prompt of the base model, and keeps its
guard metrics (EOS-stop rate, preference accuracy) within tolerance. Otherwise it sets `challenger`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAMPION, CHALLENGER = "champion", "challenger"
GUARDS = ("eos_stop_rate", "preference_accuracy")


class RegistryError(PipelineError):
    pass


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    candidate: dict[str, float]
    compared_with: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        return ("PROMOTE: " if self.promote else "REFUSE: ") + "; ".join(self.reasons)


def decide(candidate: dict[str, float], baselines: dict[str, dict[str, float]],
           champion: Optional[dict[str, float]], cfg: PipelineConfig) -> Decision:
    """Pure decision: every rule that fails is named, with both scores."""
    primary = cfg.eval.primary_metric
    margin, tol = cfg.registry.min_improvement, cfg.registry.guard_tolerance
    score = candidate.get(primary)
    reasons: list[str] = []
    ok = score is not None
    if score is None:
        reasons.append(f"candidate has no {primary}")
    compared = dict(baselines)
    for name, metrics in baselines.items():
        base = metrics.get(primary)
        if base is None or score is None:
            continue
        if score > base:
            reasons.append(f"{primary} {score:.3f} > {name} {base:.3f}")
        else:
            ok = False
            reasons.append(f"{primary} {score:.3f} does not beat {name} {base:.3f}")
    if champion is not None and score is not None:
        compared["champion"] = champion
        best = champion.get(primary, float("-inf"))
        if score >= best + margin and score > best:
            reasons.append(f"{primary} {score:.3f} beats champion {best:.3f} by >= {margin}")
        else:
            ok = False
            reasons.append(f"{primary} {score:.3f} does not beat champion {best:.3f} by margin {margin}")
        for guard in GUARDS:
            if guard in candidate and guard in champion and candidate[guard] < champion[guard] - tol:
                ok = False
                reasons.append(f"guard {guard} regressed: {candidate[guard]:.3f} < champion {champion[guard]:.3f} - {tol}")
    elif "base" in baselines and "eos_stop_rate" in candidate:
        base_eos = baselines["base"].get("eos_stop_rate")
        if base_eos is not None and candidate["eos_stop_rate"] < base_eos - tol:
            ok = False
            reasons.append(f"guard eos_stop_rate regressed: {candidate['eos_stop_rate']:.3f} < base {base_eos:.3f} - {tol}")
    return Decision(ok, reasons, candidate, compared)


def _python_model_class():
    # Built lazily so importing this module does not import mlflow.pyfunc.
    import mlflow.pyfunc

    class LoraAdapterModel(mlflow.pyfunc.PythonModel):
        """Base model + LoRA adapter; input: a `prompt` column (or list of strings); output: the answers."""

        def load_context(self, context):
            from ftflow.configs.schema import PipelineConfig as Cfg
            from ftflow.tasks.evaluate.evaluation import check_template
            from ftflow.tasks.train.model import load_base_model, load_tokenizer, offline_env, resolve_model_path
            from peft import PeftModel

            offline_env()
            cfg = Cfg.model_validate(context.model_config["pipeline_config"])
            path = resolve_model_path(cfg.model)
            self.tokenizer = load_tokenizer(path, cfg.model)
            adapter = context.artifacts["adapter"]
            # The template the adapter was trained under must be the one serving it.
            check_template(adapter, context.model_config["template_fingerprint"], self.tokenizer)
            self.model = PeftModel.from_pretrained(load_base_model(path, cfg.model, cfg.quantization), adapter)
            self.model.eval()
            self.cfg = cfg
            self.eos = context.model_config["eos_token"]

        def predict(self, context, model_input, params=None):
            from ftflow.tasks.evaluate.evaluation import generate

            prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
            messages = [[{"role": "user", "content": str(p)}] for p in prompts]
            if self.cfg.data.system_prompt:
                messages = [[{"role": "system", "content": self.cfg.data.system_prompt}, *m] for m in messages]
            return [g["answer"] for g in generate(self.model, self.tokenizer, messages, self.cfg.eval, self.eos)]

    return LoraAdapterModel


def package_model(cfg: PipelineConfig, adapter_dir: str, meta: dict[str, Any], out_dir: Path) -> Path:
    """A pyfunc folder: adapter files and the resolved config; loading it needs the `ftflow` package installed."""
    import mlflow.pyfunc

    from ftflow.tasks.tracking import redact_config_dict

    target = out_dir / "model"
    if target.exists():
        shutil.rmtree(target)
    mlflow.pyfunc.save_model(
        str(target),
        python_model=_python_model_class()(),
        artifacts={"adapter": adapter_dir},
        model_config={"pipeline_config": redact_config_dict(cfg.model_dump(mode="json")), **meta},
        pip_requirements=["transformers", "peft", "bitsandbytes", "torch", "accelerate", "gguf", "pydantic", "pyyaml"],
    )
    return target


def registry_client(cfg: PipelineConfig):
    from mlflow import MlflowClient

    from ftflow.tasks.tracking import tracking_uri

    uri = tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=cfg.registry.registry_uri or uri)


def check_reachable(client, cfg: PipelineConfig) -> None:
    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # connection errors surface as several exception types across MLflow versions
        from ftflow.tasks.tracking import redact_text

        where = redact_text(str(client._registry_uri))
        raise RegistryError(f"registry.registry_uri: model registry at {where} cannot be reached "
                            f"({type(err).__name__}); nothing was registered") from None


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="LoRA adapters promoted by the ftflow gate.")
        except MlflowException:
            pass  # a concurrent creator won the race


def register_candidate(client, name: str, run_id: str, artifact_path: str = "registry_model") -> str:
    """Idempotent: a retried task finds the version it already created for this run."""
    ensure_registered_model(client, name)
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return str(mv.version)
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                     tags={"ftflow.run_id": run_id})
    return str(mv.version)


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_adapter(client, version) -> Optional[str]:
    """Download the champion's adapter so it can be re-scored on this run's held-out prompts."""
    try:
        local = client.download_artifacts(version.run_id, "registry_model/artifacts/adapter",
                                          tempfile.mkdtemp(prefix="champion-"))
    except Exception:
        return None
    return local if Path(local, "adapter_config.json").exists() else None


def champion_recorded_metrics(client, version) -> dict[str, float]:
    metrics = client.get_run(version.run_id).data.metrics
    return {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1}


def apply_decision(client, name: str, version: str, decision: Decision, run_id: str) -> str:
    alias = CHAMPION if decision.promote else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "ftflow.gate", decision.summary()[:5000])
    client.set_model_version_tag(name, version, "ftflow.gate_scores", json.dumps(
        {"candidate": decision.candidate, **decision.compared_with}, default=float)[:5000])
    return alias
