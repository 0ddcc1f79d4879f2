#!/usr/bin/env bash
# The arm64 build, checked on an x86-64 machine: every CPU kernel source (and the pybind11
# bindings, syntax only) cross-compiled for aarch64 with the release flags, and the C++ check of
# the CPU GEMMs and quantization (tests/cpp/cpu_kernels_check.cpp: the neon and generic levels
# against the numerics contract, hostile inputs included) run under qemu-aarch64, as the ARMv8.0 baseline
# (cortex-a53: a release binary must not need more) and as qemu's newest CPU (max). No arm64
# torch exists here, so the Python suite cannot run; what this checks is that the arm64 build
# compiles without warnings and computes right. Not checked: speed (emulated).
# Installs Debian's g++-aarch64-linux-gnu and qemu-user when missing; skips loudly without them.
#   bash scripts/arm64_check.sh        (ARM64_QUICK=1: fewer shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=aarch64-linux-gnu-g++
SYSROOT=/usr/aarch64-linux-gnu
need=()
command -v "$CXX" >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  echo "arm64_check: installing ${need[*]}"
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } || true
fi
if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  echo "arm64_check: SKIPPED, no $CXX or qemu-aarch64 (install g++-aarch64-linux-gnu and qemu-user)"
  exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# lk_cpu's flags (CMakeLists.txt), warnings as errors
flags=(-std=c++17 -O3 -fno-math-errno -Wall -Wextra -Wno-unused-parameter -Werror -fopenmp -fPIC -Icsrc)
echo "== $CXX $($CXX -dumpversion): csrc/cpu/*.cpp"
objs=()
for f in csrc/cpu/*.cpp; do
  o="$out/$(basename "$f" .cpp).o"
  "$CXX" "${flags[@]}" -c "$f" -o "$o" &
  objs+=("$o")
done
wait_all() { local rc=0; for j in $(jobs -p); do wait "$j" || rc=1; done; return $rc; }
wait_all
if python -c "import pybind11" 2>/dev/null; then
  echo "== bindings (syntax only, the host's Python headers)"
  pyinc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  pbinc=$(python -c "import pybind11; print(pybind11.get_include())")
  for f in csrc/bindings/*.cpp; do
    "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror -fopenmp -Icsrc -I"$pyinc" -I"$pbinc" \
      -DLK_CUDA_ARCHS='""' -DLK_NVCC_VERSION='""' -DLK_CPU_TUNE='"runtime dispatch"' "$f" &
  done
  wait_all
else
  echo "== bindings: skipped (no pybind11 here)"
fi
"$CXX" "${flags[@]}" tests/cpp/cpu_kernels_check.cpp "${objs[@]}" -o "$out/cpu_kernels_check"
for cpu in cortex-a53 max; do
  echo "== qemu-aarch64 -cpu $cpu: tests/cpp/cpu_kernels_check.cpp"
  LK_CHECK_QUICK=${ARM64_QUICK:-} OMP_NUM_THREADS=2 timeout 900 qemu-aarch64 -cpu "$cpu" -L "$SYSROOT" "$out/cpu_kernels_check" |
    grep -Ev "^  ok " || { echo "arm64_check: FAILED on $cpu"; exit 1; }
done
echo "arm64_check: ok"
