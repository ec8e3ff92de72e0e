"""`ftflow` command line: run a recipe, validate a data file, run a sweep, list recipes."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def quiet_env() -> None:
    # Nothing in the demo may wait on a model hub; Prefect's ephemeral API needs no server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftflow", description="Orchestrated LLM fine-tuning: validate → SFT → DPO → evaluate → gate.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="One pipeline run from a YAML recipe, with key.sub=value overrides.")
    run.add_argument("recipe", nargs="?", default="demo", help="Recipe file or shipped recipe name (default: demo).")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lora.r=8 sft.max_steps=10")
    run.add_argument("--resume", metavar="RUN_ID", default=None,
                     help="Continue an interrupted run: same MLflow run, training resumes from its last checkpoint.")

    sweep = sub.add_parser("sweep", help="LoRA rank sweep (sweep.ranks), one MLflow child run per arm.")
    sweep.add_argument("recipe", nargs="?", default="sweep")
    sweep.add_argument("overrides", nargs="*")

    val = sub.add_parser("validate", help="Validate a data file without training; non-zero exit when a contract fails.")
    val.add_argument("file")
    val.add_argument("--kind", choices=["sft", "preference"], default="sft")
    val.add_argument("--format", default="auto", help="auto, openai, alpaca, sharegpt, prompt_completion, preference, hh")
    val.add_argument("--recipe", default="demo", help="Recipe whose quality thresholds and tokenizer apply.")
    val.add_argument("--out", default=None, help="Folder for the report and quarantine file.")
    val.add_argument("overrides", nargs="*")

    sub.add_parser("recipes", help="List the shipped recipes.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_env()
    parser = _parser()
    # key=value overrides may come after options too (`validate FILE --kind sft quality.pii=drop`).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    from ftflow.configs.loader import ConfigError, list_recipes, load_config
    from ftflow.tasks.errors import PipelineError

    try:
        if args.command == "recipes":
            print("\n".join(list_recipes()))
            return 0
        if args.command == "validate":
            from ftflow.validate import validate_file

            cfg = load_config(args.recipe, [f"data.format={args.format}", *args.overrides])
            return 0 if validate_file(cfg, args.file, args.kind, args.out) else 1
        cfg = load_config(args.recipe, args.overrides)
        if args.command == "run":
            from ftflow.pipeline import pipeline_flow

            pipeline_flow(config=cfg, resume_run_id=args.resume)
        else:
            from ftflow.sweep import sweep_flow

            sweep_flow(config=cfg)
        return 0
    except (ConfigError, PipelineError) as err:
        print(f"ftflow: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
