#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (if missing), then leankernels from this checkout
# with the test extras. Builds the CUDA kernels when nvcc is on PATH (sm_90a + sm_80/sm_89 +
# PTX), the CPU kernels always. Safe to re-run.
#   LEANKERNELS_CUDA=OFF bash scripts/setup.sh   # force a CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned: this version has a local CPU wheel here; an unpinned torch pulls several GB of CUDA.
  "$PY" -m pip install -q "torch==2.13.0"
fi
ARGS=()
if [ "${LEANKERNELS_CUDA:-ON}" = "OFF" ]; then
  ARGS+=(--config-settings=cmake.define.LEANKERNELS_CUDA=OFF)
fi
"$PY" -m pip install -q "${ARGS[@]}" ".[test]"
