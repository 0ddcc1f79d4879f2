#!/usr/bin/env bash
# The torch floor (pyproject: torch >= 2.4) checked in a throwaway venv: torch from the wheels in
# $1 (a directory with torch 2.4.x and its dependencies, e.g. made once with
#   pip download "torch==2.4.1" -d DIR        # 0.8 GB, plus 2.5 GB of nvidia-* CUDA libraries
# ), then scripts/floor_smoke.py (import + one op per domain against the reference) and the
# kernel test files, on the leankernels build installed in the current environment (its _C does
# not link libtorch, so the same build serves every torch).
#   bash scripts/torch_floor.sh /path/to/wheelhouse
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: torch_floor.sh WHEELHOUSE}
PY=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
VENV=$TMP/venv
"$PY" -m venv "$VENV"
PIP_CONSTRAINT="" "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" torch numpy pytest hypothesis
# the installed package, copied away from this environment's site-packages (and its newer torch)
PKG=$(cd /tmp && "$PY" -c "import leankernels, os; print(os.path.dirname(leankernels.__file__))")
COPY=$TMP/pkg
mkdir -p "$COPY"
cp -r "$PKG" "$COPY/"
export PYTHONPATH="$COPY"
(cd /tmp && "$VENV/bin/python" "$OLDPWD/scripts/floor_smoke.py")
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_gemm.py tests/test_routing.py \
  tests/test_mla.py tests/test_compat_deep_gemm.py tests/test_compat_flash_mla.py tests/test_nn.py tests/test_hostile_inputs.py \
  tests/test_linear.py tests/test_train_kernels.py tests/test_train.py tests/test_distributed.py
