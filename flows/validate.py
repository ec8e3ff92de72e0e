"""Standalone data validation: the same checks and contracts as the pipeline, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ftflow.configs.schema import PipelineConfig
from ftflow.tasks import stages
from ftflow.tasks.errors import ContractError


def validate_file(
    cfg: PipelineConfig, path: str, kind: Literal["sft", "preference"], out: Optional[str] = None
) -> bool:
    """Print the report; True when the contract passed. Fatal input problems raise DataError."""
    from ftflow.tasks.data.quality import chat_token_lengths
    from ftflow.tasks.data.report import print_report
    from ftflow.tasks.train.model import load_tokenizer

    measure = None

    def token_length(rows):
        # The tokenizer is needed only once the file has parsed: a malformed file fails at once, without
        # resolving (perhaps converting) the model first.
        nonlocal measure
        if measure is None:
            measure = chat_token_lengths(load_tokenizer(stages.resolve_model(cfg).path, cfg.model))
        return measure(rows)

    out_dir = Path(out or Path(cfg.output_dir) / "validate" / Path(path).stem)
    try:
        _, report, files = stages.validate_split(path, kind, cfg, token_length, out_dir)
        passed = True
    except ContractError as err:
        import json

        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        files = {"quarantine": out_dir / "quarantine.jsonl", "json": out_dir / "report.json"}
        passed = False
        print(f"contract failed: {err}")
    print(print_report(report))
    print(f"report: {files['json']}\nquarantine: {files['quarantine']}")
    return passed


validate_task = task(name="validate-file", cache_policy=NO_CACHE)(validate_file)


@flow(name="validate-data")
def validate_flow(
    path: str, kind: Literal["sft", "preference"] = "sft", config: PipelineConfig = PipelineConfig()
) -> bool:
    """Validate one data file against the quality checks and the GX contracts in data_contracts/.

    Args:
        path: The data file (jsonl, json, parquet, csv) or saved HF dataset folder, as the worker sees it.
        kind: sft rows or preference pairs.
        config: Quality thresholds, input format and the tokenizer's model.
    """
    passed = validate_task(config, path, kind)
    report_path = Path(config.output_dir) / "validate" / Path(path).stem / "report.md"
    if report_path.exists():
        create_markdown_artifact(report_path.read_text(encoding="utf-8"), key="validation-report")
    if not passed:
        raise ContractError(f"{path}: data contract failed; see {report_path}")
    return passed
