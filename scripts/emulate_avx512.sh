#!/usr/bin/env bash
# The avx512 and avx512bf16 CPU paths on a machine without AVX-512 (.ci/run calls it): builds a
# test-only module whose AVX-512 levels run on SIMDe's AVX2 versions of the intrinsics
# (-DLEANKERNELS_EMULATE_AVX512=ON, csrc/cpu/avx512_emu.h) and runs the CPU kernel test files
# (scripts/kernel_tests.sh) with each of those paths forced. It checks the kernels' logic (indexing,
# masks, tails, lane orders, rounding), not their speed or GCC's AVX-512 code generation.
#
#   bash scripts/emulate_avx512.sh           # skips (exit 0) where this CPU runs avx512bf16 natively:
#                                             the normal CI run tests those paths there
#   EMU_FORCE=1 bash scripts/emulate_avx512.sh   # run anyway (to check the emulation itself)
#   EMU_PATHS="avx512bf16" ...               # only these paths (default: avx512bf16 avx512)
#   EMU_PYTEST_ARGS="-k gemm" ...            # extra pytest args
#   EMU_SANITIZE=1 ...                       # the same, built and run under ASan + UBSan by
#                                             scripts/sanitize.sh (SAN_EMULATE=1; .ci/run's way)
#
# Needs an AVX2 CPU and SIMDe's headers (Debian's libsimde-dev; installed here with apt-get
# when missing and possible). Without either it skips loudly (exit 0): the check fills a gap,
# it is not the only test of these paths. Build dir: $EMU_BUILD_DIR (default build-emu/); the
# tests import a temporary copy of python/leankernels holding the emulated _C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
BUILD_DIR=${EMU_BUILD_DIR:-build-emu}
t_start=$(date +%s)

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
if [ "${EMU_FORCE:-0}" != 1 ] && [[ " $flags " == *" avx512_bf16 "* ]] && [[ " $flags " == *" avx512bw "* ]]; then
  echo "== emulate_avx512: SKIPPED: this CPU runs the avx512 paths natively (the runs above tested them)"
  exit 0
fi
if [[ " $flags " != *" avx2 "* ]] || [[ " $flags " != *" fma "* ]] || [[ " $flags " != *" f16c "* ]]; then
  echo "== emulate_avx512: SKIPPED: the emulation build needs an AVX2+FMA+F16C CPU"
  exit 0
fi
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libsimde-dev >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1) || true
  fi
  if [ ! -f /usr/include/simde/x86/avx512.h ]; then
    echo "== emulate_avx512: SKIPPED: SIMDe's headers (Debian's libsimde-dev) are not installed and could not be"
    exit 0
  fi
fi

if [ "${EMU_SANITIZE:-0}" = 1 ]; then
  # the kernel test files on each emulated path, sanitized (memory errors in the AVX-512 tails
  # and masks, too: the emulated masked loads and stores touch only the bytes they select)
  SAN_EMULATE=1 SAN_FULL=none SAN_PATHS="${EMU_PATHS:-avx512bf16 avx512}" SAN_PYTEST_ARGS="${EMU_PYTEST_ARGS:-}" \
    bash "$ROOT/scripts/sanitize.sh"
  echo "== emulate_avx512 (sanitized): done in $(( $(date +%s) - t_start )) s"
  exit 0
fi

"$PY" -c "import pybind11" 2>/dev/null || "$PY" -m pip install -q "pybind11>=2.12"
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
t0=$(date +%s)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DLEANKERNELS_CUDA=OFF -DLEANKERNELS_EMULATE_AVX512=ON \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
echo "== emulate_avx512: build done in $(( $(date +%s) - t0 )) s"
so=$(ls "$BUILD_DIR"/_C*.so)

source "$ROOT/scripts/stage_package.sh"
stage_package "$so" emu  # STAGE

# The emulated module is the one imported, and it offers the emulated paths.
(cd /tmp && PYTHONPATH="$STAGE/pkg" "$PY" -c "
import leankernels as lk
assert lk.__file__.startswith('$STAGE/pkg/'), lk.__file__
assert 'emulated' in lk._C.build_info()['cpu_tune'], lk._C.build_info()['cpu_tune']
assert {'avx512', 'avx512bf16'} <= set(lk.cpu_paths()), lk.cpu_paths()
print('emulate_avx512: testing', lk._C.__file__, lk.cpu_paths())
")

source "$ROOT/scripts/kernel_tests.sh"  # KERNEL_TESTS
read -r -a KERNEL_FILES <<<"$(echo $KERNEL_TESTS)"
read -r -a EXTRA <<<"${EMU_PYTEST_ARGS:-}"
read -r -a PATHS <<<"${EMU_PATHS:-avx512bf16 avx512}"
SUMMARY=()
for path in "${PATHS[@]}"; do
  t0=$(date +%s)
  echo "== emulate_avx512: CPU path $path (emulated)"
  PYTHONPATH="$STAGE/pkg" LEANKERNELS_CPU="$path" "$PY" -m pytest -q -x -p no:cacheprovider "${KERNEL_FILES[@]}" "${EXTRA[@]}"
  SUMMARY+=("$(printf '%-11s passed in %4s s' "$path" "$(( $(date +%s) - t0 ))")")
done
echo "== emulate_avx512 summary"
printf '   %s\n' "${SUMMARY[@]}"
echo "== emulate_avx512: done in $(( $(date +%s) - t_start )) s"
