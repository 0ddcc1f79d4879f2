#!/usr/bin/env bash
# Sanitizer job (.ci/run calls it): builds the CPU module with ASan + UBSan and runs the CPU
# test suite under the preloaded runtimes: all of it on the first CPU kernel path (the best this
# machine runs), then the kernel test files (scripts/kernel_tests.sh) on each other path.
# Fails on the first pytest failure, or on any sanitizer report ("runtime error:" from UBSan,
# "ERROR: AddressSanitizer" from ASan) in the logs, even from a run that pytest passed.
#
#   bash scripts/sanitize.sh                     # everything (CI)
#   SAN_PATHS="avx2 generic" bash scripts/sanitize.sh   # only these LEANKERNELS_CPU paths
#   SAN_FULL=all ...                             # the whole suite on every path (SAN_FULL=first:
#                                                  the default above; none: the kernel files only)
#   SAN_PYTEST_ARGS="-k routing" bash scripts/sanitize.sh  # extra pytest args (a subset)
#   SAN_SKIP_BUILD=1 ...                         # reuse $SAN_BUILD_DIR as it is
#   SAN_EMULATE=1 SAN_PATHS="avx512bf16 avx512" ...  # the test-only AVX-512 emulation build
#                                                  (scripts/emulate_avx512.sh) sanitized, in build-san-emu/
#
# Build: $SAN_BUILD_DIR (default build-san/), never the normal build dirs: RelWithDebInfo,
# -DLEANKERNELS_CUDA=OFF -DLEANKERNELS_SANITIZE=ON (lk_cpu and _C at -O1 -g
# -fsanitize=address,undefined -fno-omit-frame-pointer, no LTO). The tests import a temporary
# copy of python/leankernels holding the sanitized _C (PYTHONPATH points there), so neither the
# pip-installed package nor python/leankernels/_C*.so of a dev build is touched.
#
# Skipped, and why (nothing else is):
#   tests/test_sass.py   runs nvcc, and nvcc crashes with libasan preloaded (LD_PRELOAD is
#                        inherited by every child process). The normal CI run covers it.
#   tests/test_readme.py runs the README's code blocks, each in a fresh interpreter (~1 min
#                        per CPU path before the sanitizers' slowdown); they call the ops the
#                        kernel tests cover. The normal CI run covers it.
#   tests/test_cli.py::test_info_reports_build_and_device
#                        asserts that a machine with nvcc on PATH built the CUDA kernels
#                        (`info --check`); this build is CPU-only on purpose. `info` itself
#                        runs below under the sanitizers instead.
#   tests/test_train.py::test_train_job_runs, tests/test_cli.py::test_demo_quick_passes_its_checks,
#   tests/test_bench_runner.py::test_quick_bench_* and ::test_plot (their quick_run fixture)
#                        end-to-end drivers (157 s, 58 s and 105 s of a ~720 s sanitized run on
#                        a 2-core Zen 1 VM): the training loop, the demo and the bench runner's
#                        quick mode. The kernels they call run sanitized in the kernel files
#                        (test_train_kernels, test_nn, test_gemm, ...) and in the rest of
#                        test_train / test_cli / test_bench_runner; the drivers themselves run
#                        unsanitized in the main suite, and CI runs `train --quick --check` and
#                        `bench --quick` on top.
# NOTES: the whole suite once, the kernel files per path: the CPU paths differ only in the
# kernels (cpu/variants.h), and the rest of the suite (the bench runner's quick mode alone is
# ~165 s of a ~355 s run on a 2-core VM) drives those kernels through the same ops. Five full
# runs made this job ~2100 s of a ~3000 s CI run; tests/test_gemm_cpu_paths.py, which switches
# paths itself, runs in the full run only.
# CUDA tests skip by themselves (CPU-only build). tests/test_hostile_inputs.py runs each case
# in a child process; the children inherit LD_PRELOAD and the options (a child without the
# preload could not even import the sanitized module), so a report there aborts the child,
# which fails that case.
#
# Where reports go: ASan writes them to $LOG_ROOT/<path>/asan.<pid>. GCC's UBSan ignores
# log_path when it runs next to ASan (its flags are not parsed as a plugin), so its
# "runtime error:" lines go to the stderr of the process that hit them; halt_on_error +
# abort_on_error then abort that process (pytest itself, or a child whose test fails and
# shows the stderr), and the pytest output, kept in $LOG_ROOT/<path>/pytest.log, is grepped too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
EMU=${SAN_EMULATE:-0}
BUILD_DIR=${SAN_BUILD_DIR:-$([ "$EMU" = 1 ] && echo build-san-emu || echo build-san)}
LOG_ROOT=${SAN_LOG_DIR:-$ROOT/$BUILD_DIR/logs}
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - $1 )); }

# Build tools (CI's pip install built in an isolated environment; this build needs them here).
"$PY" -c "import pybind11" 2>/dev/null || "$PY" -m pip install -q "pybind11>=2.12"

# ------------------------------------------------------------------------------ build
if [ "${SAN_SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  GEN=()
  if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DLEANKERNELS_CUDA=OFF -DLEANKERNELS_SANITIZE=ON -DLEANKERNELS_EMULATE_AVX512=$([ "$EMU" = 1 ] && echo ON || echo OFF) \
    -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
  cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
  echo "== sanitize: build done in $(elapsed "$t0") s"
fi
so=$(ls "$BUILD_DIR"/_C*.so)

# ------------------------------------------------------------------------------ runtimes
# The runtimes of the compiler that built the module (gcc: libasan.so + libubsan.so).
CXX_BIN=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD_DIR/CMakeCache.txt")
ASAN_LIB=$("${CXX_BIN:-g++}" -print-file-name=libasan.so)
UBSAN_LIB=$("${CXX_BIN:-g++}" -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  if [ ! -f "$lib" ]; then
    echo "sanitize: cannot find $lib with ${CXX_BIN:-g++} -print-file-name (gcc's runtimes are required)" >&2
    exit 2
  fi
done

# ------------------------------------------------------------------------------ staging
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/lk-san.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/pkg"
cp -r python/leankernels "$STAGE/pkg/"
find "$STAGE/pkg" \( -name '_C*.so' -o -name '__pycache__' -o -name '.*.tmp' \) -prune -exec rm -rf {} +
cp "$so" "$STAGE/pkg/leankernels/"

rm -rf "$LOG_ROOT"
mkdir -p "$LOG_ROOT"

# Runs "$@" with the runtimes preloaded and reports logged under $LOG_ROOT/$1.
san() {
  local tag=$1
  shift
  mkdir -p "$LOG_ROOT/$tag"
  env PYTHONPATH="$STAGE/pkg" \
    LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$LOG_ROOT/$tag/asan" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$LOG_ROOT/$tag/ubsan" \
    "$@"
}

# Sanitizer reports in the logs of one run (report files and the pytest output): 0 = none.
REPORT_RE='runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer'
reports() {
  { grep -l -E "$REPORT_RE" "$LOG_ROOT/$1"/* 2>/dev/null || true; } | wc -l
}

# The sanitized module is the one imported, and the build's facts (`info` without --check:
# --check fails by design when nvcc is on PATH and the build is CPU-only).
san setup "$PY" -c "
import sys, leankernels
assert leankernels.__file__.startswith('$STAGE/pkg/'), leankernels.__file__
print('sanitize: testing', leankernels._C.__file__)
assert ('emulated' in leankernels.build_info()['cpu_tune']) == ('$EMU' == '1'), leankernels.build_info()['cpu_tune']
"
(cd /tmp && san setup "$PY" -m leankernels info)
if [ "$(reports setup)" != 0 ]; then
  echo "sanitize: reports while importing leankernels:" >&2
  cat "$LOG_ROOT"/setup/* >&2
  exit 1
fi

# ------------------------------------------------------------------------------ CPU paths
if [ -n "${SAN_PATHS:-}" ]; then
  read -r -a PATHS <<<"$SAN_PATHS"
else
  # (an error here fails the job; only a build without cpu_paths falls back)
  listed=$(san setup "$PY" -c "import leankernels as lk; print(' '.join(lk.cpu_paths()) if hasattr(lk, 'cpu_paths') else '')")
  read -r -a PATHS <<<"$listed"
  if [ "${#PATHS[@]}" = 0 ]; then
    echo "sanitize: leankernels.cpu_paths() does not exist in this build; one run on the default CPU path"
    PATHS=(default)
  fi
fi
echo "sanitize: CPU paths: ${PATHS[*]}"

# ------------------------------------------------------------------------------ test runs
SKIP=(--ignore=tests/test_sass.py --ignore=tests/test_readme.py --deselect tests/test_cli.py::test_info_reports_build_and_device
      --deselect tests/test_train.py::test_train_job_runs --deselect tests/test_cli.py::test_demo_quick_passes_its_checks
      --deselect tests/test_bench_runner.py::test_quick_bench_every_case_has_ratio_and_passes
      --deselect tests/test_bench_runner.py::test_quick_bench_json_is_complete
      --deselect tests/test_bench_runner.py::test_quick_bench_markdown --deselect tests/test_bench_runner.py::test_plot)
read -r -a EXTRA <<<"${SAN_PYTEST_ARGS:-}"
source "$ROOT/scripts/kernel_tests.sh"  # KERNEL_TESTS
read -r -a KERNEL_FILES <<<"$(echo $KERNEL_TESTS)"
SUMMARY=()
status=0
first=1
for path in "${PATHS[@]}"; do
  files=(tests)
  if { [ "$first" = 0 ] && [ "${SAN_FULL:-first}" != all ]; } || [ "${SAN_FULL:-first}" = none ]; then
    files=("${KERNEL_FILES[@]}")
  fi
  first=0
  t0=$(date +%s)
  out="$LOG_ROOT/$path/pytest.log"
  mkdir -p "$LOG_ROOT/$path"
  cpu_env=()
  if [ "$path" != default ]; then cpu_env=(LEANKERNELS_CPU="$path"); fi
  echo "== sanitize: CPU path $path"
  set +e
  san "$path" env "${cpu_env[@]}" "$PY" -m pytest -q -x -p no:cacheprovider --durations=5 "${files[@]}" "${SKIP[@]}" "${EXTRA[@]}" \
    2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  n=$(reports "$path")
  last=$(tail -1 "$out" | tr -s '=' ' ')  # pytest's summary line
  what=$([ "${files[0]}" = tests ] && echo "suite " || echo "kernels")
  SUMMARY+=("$(printf '%-11s %s pytest rc %-3s sanitizer reports %-3s %4s s  %s' "$path" "$what" "$rc" "$n" "$(elapsed "$t0")" "$last")")
  if [ "$n" != 0 ]; then
    echo "sanitize: $n log(s) with sanitizer reports on path $path:" >&2
    grep -l -E "$REPORT_RE" "$LOG_ROOT/$path"/* | while read -r f; do
      echo "---- $f" >&2
      head -60 "$f" >&2
    done
  fi
  if [ "$rc" != 0 ] || [ "$n" != 0 ]; then
    status=1
    break  # like pytest -x: stop at the first failing path
  fi
done

echo "== sanitize summary (logs: $LOG_ROOT)"
printf '   %s\n' "${SUMMARY[@]}"
echo "   skipped: tests/test_sass.py (nvcc crashes under libasan), tests/test_readme.py (README blocks; covered by the normal run), test_cli.py::test_info_reports_build_and_device (asserts a CUDA build), the train job, demo and bench quick-run drivers (end to end; run unsanitized above)"
if [ "$status" != 0 ]; then
  echo "== sanitize: FAILED in $(elapsed "$t_start") s"
else
  echo "== sanitize: clean on ${#PATHS[@]} CPU path(s) in $(elapsed "$t_start") s"
fi
exit "$status"
