#!/usr/bin/env bash
# The avx512 and avx512bf16 CPU paths on a machine without AVX-512 (.ci/run calls it): a test-only
# module whose AVX-512 levels run on SIMDe's AVX2 versions of the intrinsics
# (-DLEANKERNELS_EMULATE_AVX512=ON, csrc/cpu/avx512_emu.h), built and run under ASan + UBSan by
# scripts/sanitize.sh (SAN_EMULATE=1, build-san-emu/): the CPU kernel test files
# (scripts/kernel_tests.sh) with each of those paths forced. It checks the kernels' logic
# (indexing, masks, tails, lane orders, rounding) and memory accesses (the emulated masked loads
# and stores touch only the bytes they select), not their speed or GCC's AVX-512 code generation.
#
#   bash scripts/emulate_avx512.sh           # skips (exit 0) where this CPU runs avx512bf16 natively:
#                                             the normal CI run tests those paths there
#   EMU_FORCE=1 bash scripts/emulate_avx512.sh   # run anyway (to check the emulation itself)
#   EMU_PATHS="avx512bf16" ...               # only these paths (default: avx512bf16 avx512)
#   EMU_PYTEST_ARGS="-k gemm" ...            # extra pytest args
#
# Needs an AVX2 CPU and SIMDe's headers (Debian's libsimde-dev; installed here with apt-get
# when missing and possible). Without either it skips loudly (exit 0): the check fills a gap,
# it is not the only test of these paths.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
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

SAN_EMULATE=1 SAN_FULL=none SAN_PATHS="${EMU_PATHS:-avx512bf16 avx512}" SAN_PYTEST_ARGS="${EMU_PYTEST_ARGS:-}" \
  bash "$ROOT/scripts/sanitize.sh"
echo "== emulate_avx512: done in $(( $(date +%s) - t_start )) s"
