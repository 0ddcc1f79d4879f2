#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (if missing), then leankernels from this checkout
# with the test extras. Builds the CUDA kernels when nvcc is on PATH (sm_90a + sm_80/sm_89 +
# PTX), the CPU kernels always. Safe to re-run:
#   - progress: pip runs verbose and the build's progress lines ("[12/40] Building ...") are
#     shown; the full log is kept in build/setup.log and its tail printed on failure;
#   - a re-run on an unchanged checkout (same files, same python, same CUDA setting and nvcc)
#     skips the install in a second (stamp: build/setup.stamp); FORCE=1 reinstalls anyway;
#   - a changed checkout rebuilds incrementally in build/{wheel_tag} (pyproject's build-dir):
#     the build runs without pip's build isolation (its build tools are installed into this
#     environment first), because an isolated build gets new temporary paths each time and
#     recompiles every file.
#   LEANKERNELS_CUDA=OFF bash scripts/setup.sh   # force a CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned: this version has a local CPU wheel here; an unpinned torch pulls several GB of CUDA.
  echo "== installing torch==2.13.0 (no torch found)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
ARGS=()
if [ "${LEANKERNELS_CUDA:-ON}" = "OFF" ]; then
  ARGS+=(--config-settings=cmake.define.LEANKERNELS_CUDA=OFF)
fi
mkdir -p build

# What the installed build depends on: every tracked or untracked (not ignored) file, the
# interpreter, the CUDA setting and the nvcc found.
source_hash() {
  {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z -co --exclude-standard -- . ':!build' | xargs -0 sha256sum 2>/dev/null
    else
      find CMakeLists.txt pyproject.toml csrc python scripts -type f -print0 | sort -z | xargs -0 sha256sum
    fi
    "$PY" -c "import sys; print(sys.executable, sys.version)"
    echo "cuda=${LEANKERNELS_CUDA:-ON} nvcc=$(command -v nvcc || true) $(nvcc --version 2>/dev/null | tail -1)"
  } | sha256sum | cut -c1-16
}
STAMP=build/setup.stamp
HASH=$(source_hash)
if [ "${FORCE:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] &&
   (cd /tmp && "$PY" -c "import leankernels, leankernels._C" 2>/dev/null); then
  echo "== leankernels is installed from this checkout as it is now (stamp $HASH): nothing to build (FORCE=1 reinstalls)"
  exit 0
fi
rm -f "$STAMP"

# The build tools, once, in this environment (pip --no-build-isolation does not fetch them).
TOOLS=("scikit-build-core>=0.10" "pybind11>=2.12" "ninja")
cmake_ok=$("$PY" - <<'PYEOF' 2>/dev/null || echo 0
import re, shutil, subprocess
exe = shutil.which("cmake")
v = re.search(r"(\d+)\.(\d+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout) if exe else None
print(int(v is not None and (int(v[1]), int(v[2])) >= (3, 24)))
PYEOF
)
[ "$cmake_ok" = "1" ] || TOOLS+=("cmake>=3.24")
if ! "$PY" -c "import scikit_build_core, pybind11, ninja" 2>/dev/null || [ "$cmake_ok" != "1" ]; then
  echo "== installing the build tools: ${TOOLS[*]}"
  "$PY" -m pip install -q "${TOOLS[@]}"
fi

# Named explicitly: a build dir first configured by an isolated build caches a pybind11 path
# that no longer exists.
ARGS+=("--config-settings=cmake.define.pybind11_DIR=$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')")

LOG=build/setup.log
echo "== building and installing leankernels (full log: $LOG; progress below)"
set +e
"$PY" -m pip install -v --no-build-isolation "${ARGS[@]}" ".[test]" 2>&1 | tee "$LOG" |
  grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\] |^\s*\*\*\* |^Successfully installed|^ERROR|error:' |
  sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\] [A-Za-z]+ [A-Za-z+]+ object) .*\/(csrc\/[^ ]+\.o)$/  \1 \2/'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "== pip install failed (exit $status); the last 60 lines of $LOG:"
  tail -60 "$LOG"
  exit "$status"
fi
echo "$HASH" > "$STAMP"
echo "== leankernels installed (stamp $HASH)"
