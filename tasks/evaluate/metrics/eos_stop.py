"""EOS-stop rate: the share of generations that ended their turn before `max_new_tokens`.

A model that never learned to emit its end-of-turn token runs on to the generation budget, so this
is a guard metric for SFT data that lost its EOS. `generate` stops a sequence at the end-of-turn
token; a generation that hit the budget instead does not contain it.

Inputs, chosen so the module works alone and under `evaluate.combine`:
- `predictions`: generations decoded with special tokens kept (`skip_special_tokens=False`), e.g.
  '{"a": 1}<|im_end|>'. The only feature: `references` is accepted and ignored, because
  `EvaluationModule.compute` keeps just the declared features as inputs.
- `eos_token`: the end-of-turn marker, or a list of them when the model stops on several
  (`<|im_end|>`, `<|endoftext|>`). A prediction counts as stopped when it contains one. The text
  metrics take the same keyword and cut predictions there, so one `combine(...).compute(
  predictions=..., references=..., eos_token=...)` call feeds all of them: in evaluate 0.4.6
  `CombinedEvaluations.compute` passes every keyword to every module and `EvaluationModule.compute`
  forwards the ones that are not features to `_compute`.
- `stopped` (optional list of bool): the caller's own per-example verdict, e.g. from token ids
  (last generated id in the eos ids, or fewer new tokens than the budget). It wins over `eos_token`
  for this metric; use it when generations were decoded without special tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import datasets
import evaluate

from ._text import EosMarker, eos_markers, has_eos

_DESCRIPTION = """\
Share of generations that contain the end-of-turn marker, i.e. that stopped on their own before the
generation budget.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generations decoded with special tokens kept.
    eos_token (str or list of str): end-of-turn marker(s).
    stopped (list of bool, optional): per-example verdicts that replace the marker search.
Returns:
    eos_stop_rate: float in [0, 1].
"""

_CITATION = """\
@misc{ftflow_eos_stop, title={ftflow eos_stop metric}, note={share of generations ending with the end-of-turn token}}
"""


def stopped_flags(
    predictions: Sequence[str], eos_token: EosMarker = None, stopped: Optional[Sequence[bool]] = None
) -> list[bool]:
    """Per-example "ended its turn" verdicts: the caller's `stopped`, else a search for the marker."""
    if stopped is not None:
        if len(stopped) != len(predictions):
            raise ValueError(f"stopped has {len(stopped)} entries for {len(predictions)} predictions")
        return [bool(s) for s in stopped]
    if not eos_markers(eos_token):
        raise ValueError("eos_stop needs eos_token (the end-of-turn marker) or a stopped list")
    return [has_eos(p, eos_token) for p in predictions]


class EosStop(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions: list[str],
        eos_token: EosMarker = None,
        stopped: Optional[Sequence[bool]] = None,
        **_other_metrics_kwargs: Any,
    ) -> dict[str, float]:
        # **_other_metrics_kwargs: evaluate.combine forwards every keyword to every module.
        flags = stopped_flags(predictions, eos_token, stopped)
        return {"eos_stop_rate": sum(flags) / max(len(flags), 1)}
