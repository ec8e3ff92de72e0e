#!/usr/bin/env bash
# One short GPU check for a CUDA machine without network: 8B-shaped QLoRA / LoRA / full fine-tuning memory and
# speed (bench/gpu_check.py), then the project's own SFT and DPO on CUDA (tests/bench/test_gpu_path.py).
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run    # here: the same path on CPU with a tiny model
# The machine is expected to have torch, transformers, peft and accelerate. bitsandbytes and trl come from wheels
# in .whl/ (bench/fetch_gpu_wheels.sh puts them there on a machine with PyPI), installed without deps or index.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[[ " $* " == *" --dry-run "* ]] && dry=1
if [[ $dry == 1 && -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
WHEELS=${WHEELS:-.whl}
status=0

# A dry run here uses the project's venv, which has them already; the wheels are built for the GPU image's Python.
if [[ $dry == 0 ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  # Into a folder of their own, first on PYTHONPATH: the image's packages stay as they are. --no-deps: what they
  # need (torch, transformers, accelerate, ...) must already be there.
  site=${SITE:-/tmp/ftflow-site}
  if "$PY" -m pip install --quiet --no-deps --no-index --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: wheel install failed; continuing with what is importable"
  fi
fi
"$PY" - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "pydantic", "yaml", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:13} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"  {name:13} missing ({type(err).__name__})")
PY

"$PY" bench/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json" "$@" || status=1

# The project is not pip-installed there: a shim folder maps the import root `ftflow` onto flows/, configs/, tasks/.
if ! "$PY" -c "import ftflow.tasks.train.model" 2>/dev/null; then
  shim=$(mktemp -d)/shim
  mkdir -p "$shim/ftflow"
  ln -s "$PWD"/flows/*.py "$shim/ftflow/"
  ln -s "$PWD/configs" "$shim/ftflow/configs"
  ln -s "$PWD/tasks" "$shim/ftflow/tasks"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ $dry == 1 ]]; then
  echo "gpu_check: dry run, tests/bench/test_gpu_path.py needs CUDA: not run"
elif "$PY" -c "import trl" 2>/dev/null; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/bench/test_gpu_path.py || status=1
  else
    "$PY" tests/bench/test_gpu_path.py || status=1
  fi
else
  echo "gpu_check: trl is not importable: tests/bench/test_gpu_path.py not run"
fi
exit $status
