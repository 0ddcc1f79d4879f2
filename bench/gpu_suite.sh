#!/usr/bin/env bash
# One-command GPU suite, for a machine with a CUDA GPU, nvcc, torch and no network:
#
#   bash bench/gpu_suite.sh OUTDIR
#
# 1. builds and installs the package from this checkout (pip, no build isolation, no deps;
#    CUDA code for this GPU's architecture only, all cores),
# 2. runs the CUDA tests (pytest -k cuda/graph; SUITE_TESTS=all runs the whole suite),
# 3. runs the full bench on the GPU (ceilings, every case, JSON + markdown + roofline plot).
#
# Writes to OUTDIR: suite.log (everything), gpu.txt (nvidia-smi), tests.log, bench.json,
# bench.md (table, with device/driver/torch/date/command), roofline.png, summary.txt.
# Everything is time-boxed to fit SUITE_SECONDS (default 530 s, under 9 minutes on one H100):
# a step that runs out of time is stopped and reported, and the bench starts no new case once
# its share is spent, so the table always lands. Knobs (environment): PYTHON (default python3),
# SUITE_SECONDS, BUILD_TIMEOUT (default 300), TEST_TIMEOUT (default 120), SUITE_TESTS=cuda|all,
# SUITE_ARCHS (CMake arch list; default from nvidia-smi, e.g. 90a-real on an H100).
# Dry run of the script itself on a machine without a GPU: SUITE_DEVICE=cpu SUITE_QUICK=1.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SUITE_SECONDS=${SUITE_SECONDS:-530}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
SUITE_TESTS=${SUITE_TESTS:-cuda}
SUITE_DEVICE=${SUITE_DEVICE:-cuda}
QUICK=(); [ "${SUITE_QUICK:-0}" = 1 ] && QUICK=(--quick)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/suite.log") 2>&1

T0=$SECONDS
STATUS=()
note() { echo "[suite $(( SECONDS - T0 ))s] $*"; }
left() { echo $(( SUITE_SECONDS - (SECONDS - T0) )); }
record() { STATUS+=("$1"); note "$1"; }

note "leankernels GPU suite in $ROOT -> $OUT ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
nvidia-smi > "$OUT/gpu.txt" 2>&1 || { echo "nvidia-smi failed: no GPU?"; }
head -n 15 "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

# ------------------------------------------------------------------------ 1. build + install
ARCHS=${SUITE_ARCHS:-}
if [ -z "$ARCHS" ]; then
  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  case "$CC" in
    90) ARCHS="90a-real" ;;          # Hopper: sm_90a machine code for everything
    "") ARCHS="80-real;89-real;89-virtual" ;;
    *) ARCHS="${CC}-real" ;;
  esac
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
note "build: pip install --no-build-isolation --no-deps . (CUDA archs $ARCHS, $CMAKE_BUILD_PARALLEL_LEVEL jobs, limit ${BUILD_TIMEOUT}s)"
unset PYTHONPATH
BUILT=0
if timeout "$BUILD_TIMEOUT" "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -q \
     -C "cmake.define.LEANKERNELS_CUDA_ARCHS=$ARCHS" -C build-dir=build/gpu-suite . ; then
  BUILT=1; record "build: ok (pip install) in $(( SECONDS - T0 ))s"
else
  note "pip install failed (rc $?); trying a plain CMake build into python/leankernels (PYTHONPATH=python)"
  if timeout "$(( BUILD_TIMEOUT / 2 ))" bash -c 'set -e
       cmake -S . -B build-gpu-suite -G Ninja -DCMAKE_BUILD_TYPE=Release -DLEANKERNELS_CUDA=ON \
         -DLEANKERNELS_CUDA_ARCHS="$1" -Dpybind11_DIR="$("$2" -c "import pybind11; print(pybind11.get_cmake_dir())")" \
         -DPython_EXECUTABLE="$(command -v "$2")"
       cmake --build build-gpu-suite -j "$CMAKE_BUILD_PARALLEL_LEVEL"
       cp build-gpu-suite/_C*.so python/leankernels/' _ "$ARCHS" "$PY"; then
    export PYTHONPATH="$ROOT/python"; BUILT=1; record "build: ok (CMake fallback)"
  else
    record "build: FAILED"
  fi
fi
if [ "$BUILT" = 1 ]; then
  ( cd /tmp && "$PY" -c "import leankernels, torch; i = leankernels.build_info(); print('leankernels', leankernels.__version__, 'from', leankernels.__file__); print(i); import sys; cpu = sys.argv[1] == 'cpu'; assert cpu or i['cuda'], 'built without CUDA kernels'; assert cpu or leankernels.cuda_available(), 'no usable CUDA device'" "$SUITE_DEVICE" ) \
    || { record "import check: FAILED (no CUDA in the build, or no GPU)"; BUILT=0; }
fi

# ------------------------------------------------------------------------ 2. CUDA tests
if [ "$BUILT" = 1 ]; then
  T=$(( $(left) - 150 )); [ "$T" -gt "$TEST_TIMEOUT" ] && T=$TEST_TIMEOUT; [ "$T" -lt 30 ] && T=30
  if [ "$SUITE_TESTS" = all ]; then SEL=(); else SEL=(-k "cuda or CUDA or graph"); fi
  note "tests: pytest ${SEL[*]:-all} (limit ${T}s)"
  timeout "$T" "$PY" -m pytest -q -ra -p no:cacheprovider "${SEL[@]}" tests > "$OUT/tests.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/tests.log"
  case $rc in
    0) record "tests: passed ($(tail -n 1 "$OUT/tests.log"))" ;;
    5) record "tests: none selected" ;;
    124) record "tests: TIMED OUT after ${T}s" ;;
    *) record "tests: FAILED rc=$rc ($(tail -n 1 "$OUT/tests.log"))" ;;
  esac
fi

# ------------------------------------------------------------------------ 3. full bench
if [ "$BUILT" = 1 ]; then
  T=$(( $(left) - 20 )); [ "$T" -lt 60 ] && T=60
  CASES_S=$(( T - 45 )); [ "$CASES_S" -lt 20 ] && CASES_S=20
  if ( cd /tmp && "$PY" -m leankernels bench --help ) >/dev/null 2>&1; then
    BENCH=("$PY" -m leankernels bench)
  else
    BENCH=("$PY" -m leankernels._bench.cli)   # CLI not wired into __main__ in this checkout
  fi
  PLOT=(--plot "$OUT/roofline.png")
  "$PY" -c "import matplotlib" 2>/dev/null || { PLOT=(); note "matplotlib missing: no roofline plot"; }
  note "bench: ${BENCH[*]} --device $SUITE_DEVICE ${QUICK[*]} (limit ${T}s, no new case after ${CASES_S}s)"
  timeout "$T" "${BENCH[@]}" --device "$SUITE_DEVICE" "${QUICK[@]}" --no-progress --max-seconds "$CASES_S" \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" "${PLOT[@]}"
  rc=$?
  case $rc in
    0) record "bench: ok" ;;
    124) record "bench: TIMED OUT after ${T}s (partial JSON kept)" ;;
    *) record "bench: rc=$rc (a failed check or error: see PROBLEMS above)" ;;
  esac
  if [ -s "$OUT/bench.json" ] && { [ ! -s "$OUT/bench.md" ] || { [ ${#PLOT[@]} -gt 0 ] && [ ! -s "$OUT/roofline.png" ]; }; }; then
    note "rendering the table and plot from the (partial) JSON"
    "$PY" -m leankernels._bench.report "$OUT/bench.json" --markdown "$OUT/bench.md" "${PLOT[@]}" >/dev/null \
      || note "rendering failed"
  fi
fi

{
  echo "leankernels GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), $(( SECONDS - T0 ))s"
  head -n 12 "$OUT/gpu.txt" 2>/dev/null | grep -E "Driver|H100|H200|A100|NVIDIA" || true
  printf '%s\n' "${STATUS[@]}"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
# exit non-zero when any step failed
printf '%s\n' "${STATUS[@]}" | grep -qE "FAILED|TIMED OUT" && exit 1
[ "$BUILT" = 1 ] || exit 1
exit 0
