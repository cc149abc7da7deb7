#!/usr/bin/env bash
# Download (here, where pip can reach the registry) the wheels that benchmarks/gpu_run.sh installs on a GPU
# machine which has torch/transformers/peft/accelerate/pyarrow/pandas/xxhash but neither trl nor datasets.
# Usage: bash benchmarks/fetch_wheels.sh [DEST]   (DEST defaults to .whl in the repository root)
# Keep DEST out of git (e.g. `echo /.whl/ >> .git/info/exclude`) and carry it to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
# Versions as in the development venv (trl pinned by pyproject: >=1.16,<1.17).
PKGS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PKGS[@]}"
ls -la "$DEST"
