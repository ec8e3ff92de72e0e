"""The promotion gate, the registry calls it makes, and the champion lookup.

The gate moves the `champion` alias only when the candidate is better than every baseline (base zero-shot,
base few-shot) and the current champion (re-scored on the same held-out prompts) with confidence: the lower
bound of the paired 95 % interval of the improvement on `eval.primary_metric`, in that metric's direction,
must clear `registry.min_improvement` (McNemar's exact test for 0/1 metrics, a paired bootstrap otherwise;
tasks/evaluate/stats.py). A guard (EOS-stop rate, preference accuracy) refuses when its interval lies wholly
below `-registry.guard_tolerance`. Otherwise the version gets `challenger`. The decision records the metric,
its direction, n, every interval, the held-out exclusions and the validation scores the candidate was chosen by.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks.errors import PipelineError
from ftflow.tasks.evaluate import registry as metrics
from ftflow.tasks.evaluate import stats
from ftflow.tasks.registry.downloads import download_dir
from ftflow.tasks.registry.packaging import package_model  # noqa: F401  (moved; callers import it from here)

if TYPE_CHECKING:
    from ftflow.tasks.evaluate.evaluation import VariantResult

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAMPION, CHALLENGER = "champion", "challenger"
BASELINES = ("base", "base_fewshot")


class RegistryError(PipelineError):
    pass


@dataclass
class Decision:
    promote: bool
    candidate: str  # the variant (sft, dpo) put forward
    metric: str
    direction: str
    n: int
    comparisons: list[stats.Interval]  # the primary metric against each baseline and the champion
    guards: list[stats.Interval] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # one per rule, passed or failed, for the record
    failures: list[str] = field(default_factory=list)  # the rules that refused
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> corpus metrics
    exclusions: dict[str, Any] = field(default_factory=dict)  # held-out rows dropped before scoring, by reason
    selection: dict[str, Any] = field(default_factory=dict)  # validation scores the candidate was chosen by

    def summary(self) -> str:
        """`PROMOTE sft: heldout_chrf +0.142 [0.101, 0.188] vs base, ... (n=40, higher is better)`"""
        verdict = "PROMOTE" if self.promote else "REFUSE"
        intervals = ", ".join(c.line() for c in self.comparisons) or "nothing to compare with"
        line = f"{verdict} {self.candidate}: {self.metric} {intervals} (n={self.n}, {self.direction} is better)"
        if self.failures:
            line += "; " + "; ".join(self.failures)
        excluded = exclusion_line(self.exclusions)
        return line + (f"; {excluded}" if excluded else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "candidate": self.candidate,
            "metric": self.metric,
            "direction": self.direction,
            "n": self.n,
            "summary": self.summary(),
            "comparisons": [c.as_dict() for c in self.comparisons],
            "guards": [g.as_dict() for g in self.guards],
            "reasons": self.reasons,
            "failures": self.failures,
            "scores": self.scores,
            "heldout_exclusions": self.exclusions,
            "selection": self.selection,
        }


def exclusion_line(accounting: dict[str, Any]) -> str:
    """`held-out: 38 of 40 scored (dropped: exact_duplicate 1, too_long 1)`, or "" when nothing was dropped."""
    dropped = {k: v for k, v in (accounting.get("dropped") or {}).items() if v}
    if not dropped:
        return ""
    reasons = ", ".join(f"{k} {v}" for k, v in dropped.items())
    return f"held-out: {accounting.get('kept', '?')} of {accounting.get('in', '?')} scored (dropped: {reasons})"


def _interval(
    metric: metrics.Metric, candidate: VariantResult, other: VariantResult, against: str, seed: int
) -> Optional[stats.Interval]:
    """Paired when both sides have per-example scores on the same examples; None when the other has no score."""
    name = metric.name
    mine = candidate.per_example.get(name)
    if not mine:
        return None
    theirs = other.per_example.get(name)
    if theirs and len(theirs) == len(mine):
        return stats.compare(
            metric,
            stats.Scores(mine, candidate.weights.get(name)),
            stats.Scores(theirs, other.weights.get(name)),
            against,
            seed=seed,
        )
    recorded = other.metrics.get(name)
    if recorded is None or math.isnan(recorded):
        return None
    return stats.bootstrap_vs_value(
        metric, stats.Scores(mine, candidate.weights.get(name)), recorded, against, stats.Resampling(seed=seed)
    )


def decide(
    candidate: str,
    results: dict[str, VariantResult],
    cfg: PipelineConfig,
    champion: Optional[VariantResult] = None,
    exclusions: Optional[dict[str, Any]] = None,
    selection: Optional[dict[str, Any]] = None,
) -> Decision:
    """Pure decision from per-example scores: every rule is named with its interval, each failed one refuses.

    `results` holds the candidate and the baselines (and the champion when it was re-scored on these prompts);
    `champion` overrides with what is known of a champion that could not be re-scored (its recorded metrics)."""
    metric = metrics.get(cfg.eval.resolved_primary_metric)
    margin, tol, seed = cfg.registry.min_improvement, cfg.registry.guard_tolerance, cfg.seed
    mine = results[candidate]
    others = {name: results[name] for name in BASELINES if name in results}
    champ = champion if champion is not None else results.get("champion")
    if champ is not None:
        others["champion"] = champ
    n = len(mine.per_example.get(metric.name, []))
    decision = Decision(
        True,
        candidate,
        metric.name,
        metric.direction,
        n,
        [],
        exclusions=dict(exclusions or {}),
        selection=dict(selection or {}),
        scores={name: dict(r.metrics) for name, r in {candidate: mine, **others}.items()},
    )

    def refuse(reason: str) -> None:
        decision.promote = False
        decision.failures.append(reason)
        decision.reasons.append(reason)

    if not n:
        refuse(f"candidate has no per-example {metric.name}")
        return decision
    for against, other in others.items():
        interval = _interval(metric, mine, other, against, seed)
        if interval is None:
            decision.reasons.append(f"{against} has no {metric.name}: not compared")
            continue
        decision.comparisons.append(interval)
        if interval.low > margin:
            decision.reasons.append(f"{metric.name} {interval.line()}: lower bound clears {margin}")
        else:
            refuse(f"lower bound {interval.low:.3f} does not clear {margin} vs {against}")
    if not decision.comparisons:
        refuse(f"no baseline has {metric.name}: nothing to compare with")

    # Guards hold against the champion; on a first run, against the base model where it has the metric.
    reference = ("champion", champ) if champ is not None else ("base", results.get("base"))
    for guard_name in cfg.eval.resolved_guards:
        guard = metrics.get(guard_name)
        if reference[1] is None:
            continue
        interval = _interval(guard, mine, reference[1], reference[0], seed)
        if interval is None:
            decision.reasons.append(f"guard {guard_name}: not compared (no scores for {candidate} or {reference[0]})")
            continue
        decision.guards.append(interval)
        if interval.high < -tol:
            refuse(f"guard {guard_name} regressed: {interval.line()} lies wholly below -{tol}")
        else:
            decision.reasons.append(f"guard {guard_name} {interval.line()}: within tolerance {tol}")
    return decision


def recorded(name: str, metrics_: dict[str, float]) -> VariantResult:
    """A champion known only by its recorded eval/ metrics (trained on another base or template)."""
    from ftflow.tasks.evaluate.evaluation import VariantResult

    return VariantResult(name, dict(metrics_))


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
        raise RegistryError(
            f"registry.registry_uri: model registry at {where} cannot be reached "
            f"({type(err).__name__}); nothing was registered"
        ) from None


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="LoRA adapters promoted by the ftflow gate.")
        except MlflowException:
            pass  # a concurrent creator won the race


def register_candidate(
    client, name: str, run_id: str, source: Optional[str] = None, model_id: Optional[str] = None
) -> str:
    """Idempotent: a retried task finds the version it already created for this run.

    `source`/`model_id`: the run's LoggedModel (MLflow 3), so the version links to it in the UI; without
    them the version points at the run's `registry_model` artifact folder."""
    ensure_registered_model(client, name)
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return str(mv.version)
    from ftflow.tasks.registry.packaging import use_tracking_uri

    # MLflow's registry resolves a models:/<model_id> source through the process-wide tracking URI, not this
    # client's (a TODO in its SqlAlchemyStore): with a recipe's own store the LoggedModel is "not found".
    with use_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(
            name,
            source=source or f"runs:/{run_id}/registry_model",
            run_id=run_id,
            tags={"ftflow.run_id": run_id},
            model_id=model_id,
        )
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
        local = client.download_artifacts(version.run_id, "registry_model/artifacts/adapter", download_dir("champion-"))
    except Exception:
        return None
    return local if Path(local, "adapter_config.json").exists() else None


def champion_recorded_metrics(client, version) -> dict[str, float]:
    metrics = client.get_run(version.run_id).data.metrics
    return {k[len("eval/") :]: v for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1}


def apply_decision(client, name: str, version: str, decision: Decision, run_id: str) -> str:
    alias = CHAMPION if decision.promote else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    tags = {
        "ftflow.gate": decision.summary(),
        "ftflow.gate.candidate": decision.candidate,
        "ftflow.gate.metric": decision.metric,
        "ftflow.gate.direction": decision.direction,
        "ftflow.gate.n": str(decision.n),
        "ftflow.gate.intervals": "; ".join(c.line() for c in decision.comparisons),
        "ftflow.gate_scores": json.dumps(decision.scores, default=float),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    return alias
