#!/usr/bin/env bash
# torch at both ends of what pyproject allows, each checked in a throwaway venv on the leankernels
# build installed in the current environment (its _C does not link libtorch, so the same build
# serves every torch):
#   bash scripts/torch_floor.sh WHEELHOUSE   # the floor (torch >= 2.4): torch from the wheels in
#       WHEELHOUSE (torch 2.4.x and its dependencies, e.g. made once with
#       `pip download "torch==2.4.1" -d DIR`: 0.8 GB, plus 2.5 GB of nvidia-* CUDA libraries),
#       then scripts/floor_smoke.py (import + one op per domain against the reference) and the
#       kernel, training and distributed test files;
#   bash scripts/torch_floor.sh --newest WHEELHOUSE   # the newest torch and transformers: what
#       `pip download torch transformers numpy pytest pytest-benchmark hypothesis -d DIR` resolves
#       from the configured index (what a new user's `pip install leankernels` gets), then
#       floor_smoke.py and the whole suite. The main environment keeps the torch it has, so
#       without this a new torch release would reach users untested.
set -euo pipefail
cd "$(dirname "$0")/.."
NEWEST=0
if [ "${1:-}" = "--newest" ]; then NEWEST=1; shift; fi
WHEELS=${1:?usage: torch_floor.sh [--newest] WHEELHOUSE}
PY=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
VENV=$TMP/venv
"$PY" -m venv "$VENV"
if [ $NEWEST = 1 ]; then
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" torch transformers numpy pytest pytest-benchmark hypothesis
  TESTS=(tests)
else
  PIP_CONSTRAINT="" "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" torch numpy pytest hypothesis
  TESTS=(tests/test_quant.py tests/test_gemm.py tests/test_routing.py tests/test_mla.py tests/test_compat_deep_gemm.py
         tests/test_compat_flash_mla.py tests/test_nn.py tests/test_hostile_inputs.py tests/test_linear.py
         tests/test_train_kernels.py tests/test_train.py tests/test_distributed.py)
fi
"$VENV/bin/python" -c "import torch; print('== torch', torch.__version__, 'in', '$VENV')"
# the installed package, copied away from this environment's site-packages (and its torch)
PKG=$(cd /tmp && "$PY" -c "import leankernels, os; print(os.path.dirname(leankernels.__file__))")
COPY=$TMP/pkg
mkdir -p "$COPY"
cp -r "$PKG" "$COPY/"
export PYTHONPATH="$COPY"
(cd /tmp && "$VENV/bin/python" "$OLDPWD/scripts/floor_smoke.py")
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
