#!/usr/bin/env bash
# Run on a machine with PyPI: downloads the two wheels bench/gpu_check.sh installs on the offline GPU machine
# into .whl/ (git-ignored; about 44 MB, under the 64 MiB that travels with the code).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
# Linux x86_64 CUDA-machine wheels for CPython 3.11 (bitsandbytes is one manylinux wheel with the CUDA kernels inside).
"$PY" -m pip download --no-deps --only-binary=:all: --dest .whl \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --python-version 3.11 \
  "bitsandbytes==0.50.2" "trl==1.16.0"
ls -l .whl
