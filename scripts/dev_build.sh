#!/usr/bin/env bash
# Fast developer build without pip: configures build-dev/ (or $BUILD_DIR) and drops the
# extension into python/leankernels/ so `PYTHONPATH=python pytest` uses it.
#   CUDA=OFF bash scripts/dev_build.sh    # CPU-only, seconds
#   bash scripts/dev_build.sh             # with CUDA when nvcc is found (minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-dev}
CUDA=${CUDA:-ON}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLEANKERNELS_CUDA="$CUDA" \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
# Replace atomically: overwriting a loaded .so in place crashes the processes using it.
for so in "$BUILD_DIR"/_C*.so; do
  cp "$so" "python/leankernels/.$(basename "$so").tmp"
  mv -f "python/leankernels/.$(basename "$so").tmp" "python/leankernels/$(basename "$so")"
done
