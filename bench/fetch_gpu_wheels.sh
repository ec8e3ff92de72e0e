#!/usr/bin/env bash
# Run here, on a machine with PyPI: downloads the wheels bench/gpu_check.sh installs on the offline GPU machine
# into .whl/ (git-ignored). Default: exactly bitsandbytes 0.50.2 (~43 MB) and trl 1.16.0 (~1 MB), under the
# 64 MiB that may travel with the code.
#   bash bench/fetch_gpu_wheels.sh                       # bitsandbytes + trl
#   bash bench/fetch_gpu_wheels.sh --with-project-deps   # + datasets and pydantic (and their small deps), which
#                                                        #   tests/bench/test_gpu_path.py needs and the image lacks
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# The GPU image runs CPython 3.12 on x86-64 Linux; pip matches manylinux tags exactly, so several are named.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheels=("bitsandbytes==0.50.2" "trl==1.16.0")
if [[ "${1:-}" == "--with-project-deps" ]]; then
  # Versions as in this project's venv; the image already has pyarrow, pandas, fsspec, xxhash, requests, tqdm, pyyaml.
  wheels+=("datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
           "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5")
fi
mkdir -p .whl
"$PY" -m pip download --no-deps "${TARGET[@]}" --dest .whl "${wheels[@]}"
ls -l .whl
du -sh .whl
