"""Open the MLflow run page of the demo's registered run in headless Chromium and save a screenshot.

    make demo
    python bench/run_page_screenshot.py --tracking-uri sqlite:///mlflow.db --out docs/run-page.png
Needs Debian's chromium (apt-get install chromium); only for the README's picture, never for CI.
The run is the source of `models:/<model-name>@<alias>` (default: the newest version when the alias is unset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

# The helpers live with the sweep's screenshot script; run as `python bench/...`, bench/ is on sys.path.
from sweep_compare_screenshot import mlflow_ui, screenshot


def registered_run(client: MlflowClient, name: str, alias: str):
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
        if not versions:
            raise SystemExit(f"no registered model {name!r} in this store: run `make demo` first") from None
        mv = versions[0]
        print(f"{name} has no @{alias}; using its newest version v{mv.version}")
    return mv, client.get_run(mv.run_id)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--model-name", default="ftflow-demo-adapter")
    p.add_argument("--alias", default="champion")
    p.add_argument("--run-id", default=None, help="default: the run behind models:/<model-name>@<alias>")
    p.add_argument("--out", default="docs/run-page.png")
    p.add_argument("--budget-ms", type=int, default=30000, help="virtual time for the single-page app to render")
    args = p.parse_args()

    client = MlflowClient(args.tracking_uri)
    if args.run_id:
        run = client.get_run(args.run_id)
    else:
        mv, run = registered_run(client, args.model_name, args.alias)
        print(f"models:/{mv.name}/{mv.version} from run {mv.run_id}")
    exp_id = run.info.experiment_id
    models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    if not models:
        raise SystemExit(f"run {run.info.run_id} has no logged model: the page would show 'Logged models: -'")
    for m in models:
        print(f"logged model {m.name} ({m.model_id}), {len(m.metrics or [])} linked metrics")

    with mlflow_ui(args.tracking_uri) as base:
        # MLflow 3.17's sidebar switch (GenAI / Model training) is global and outranks the experiment's
        # mlflow.experimentKind tag; the query parameter is what clicking "Model training" sets.
        url = f"{base}/#/experiments/{exp_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        # Tall enough that the "Logged models" table below metrics and parameters is in the picture.
        out = screenshot(url, Path(args.out), window_size="1600,2300", budget_ms=args.budget_ms)
        print(f"screenshot: {out} ({out.stat().st_size} bytes) of {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
