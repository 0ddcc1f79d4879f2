#!/usr/bin/env bash
# The installed leankernels on emulated older x86-64 CPUs (Debian's qemu-user, installed here if
# missing): each must import, pick the expected CPU path and match the reference on a grouped
# GEMM and a quantization. A kernel built for a newer CPU than the one emulated dies with SIGILL.
set -euo pipefail
# the interpreter binary itself (qemu-user runs ELF files, not pyenv-style shim scripts)
PY=$("${PYTHON:-python}" -c "import sys; print(sys.executable)")
if ! command -v qemu-x86_64 >/dev/null; then
  apt-get install -y -q qemu-user >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q qemu-user >/dev/null; }
fi
smoke=$(mktemp --suffix=.py)
trap 'rm -f "$smoke"' EXIT
cat > "$smoke" <<'PYEOF'
import sys
import torch
import leankernels as lk
from leankernels import reference as ref
want_path = sys.argv[1]
assert lk.cpu_path() == want_path, (lk.cpu_path(), lk.cpu_paths())
g = torch.Generator().manual_seed(0)
x, w = torch.randn(5, 300, generator=g), torch.randn(3, 40, 300, generator=g) * 0.05
a, sa = lk.quantize_fp8(x)
ra, rsa = ref.quantize_fp8(x)
assert torch.equal(a.view(torch.uint8), ra.view(torch.uint8)) and torch.equal(sa, rsa)
b, sb = lk.quantize_fp8(w, (128, 128))
for counts in ([1, 0, 4], [0, 5, 0]):
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).int()
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
# 40 rows take the row-tiled kernel on every level (the lines above: the decode kernel)
x2 = torch.randn(40, 300, generator=g)
a2, sa2 = lk.quantize_fp8(x2)
got = lk.fp8_gemm(a2, sa2, b[1], sb[1], out_dtype=torch.float32)
torch.testing.assert_close(got, ref.fp8_gemm(a2, sa2, b[1], sb[1], torch.float32), rtol=1e-4, atol=1e-4)
print(f"qemu smoke: path {lk.cpu_path()} ok")
PYEOF
cd /tmp
for spec in Haswell:avx2 Nehalem:generic; do
  cpu=${spec%%:*} path=${spec##*:}
  echo "== qemu-x86_64 -cpu $cpu (expects the $path path)"
  timeout 900 qemu-x86_64 -cpu "$cpu" "$PY" "$smoke" "$path" 2>&1 | grep -v "TCG doesn.t support"
done
