"""Import + one op per domain against the reference, for checking a torch version (the floor).

    python scripts/floor_smoke.py      # exit 0 and one line per domain when all agree
"""
import sys

import torch

import leankernels as lk
from leankernels import reference as ref

torch.manual_seed(0)
ok = True


def check(name, got, want, tol):
    global ok
    err = (got.float() - want.float()).abs().max().item()
    good = err <= tol
    ok &= good
    print(f"{name:8s} max |diff| {err:.2e} (<= {tol:g}) {'ok' if good else 'FAIL'}")


x = torch.randn(40, 300)
q, s = lk.quantize_fp8(x)
rq, rs = ref.quantize_fp8(x, (1, 128))
check("quant", q.float(), rq.float(), 0)
b, sb = lk.quantize_fp8(torch.randn(200, 300), block=(128, 128))
check("gemm", lk.fp8_gemm(q, s, b, sb, torch.float32), ref.fp8_gemm(q, s, b, sb, torch.float32), 1e-3)
logits = torch.randn(40, 16)
w, ids = lk.route(logits, top_k=4, score="sigmoid", n_group=4, topk_group=2)
rw, rids = ref.route(logits, 4, score="sigmoid", n_group=4, topk_group=2)
check("route", ids, rids, 0)
p = lk.plan(ids, 16)
y = lk.unpermute(lk.permute(x, p), p, w)
check("routing", y, (x.unsqueeze(1) * w.unsqueeze(-1)).sum(1), 1e-4)
cache = lk.LatentCache(num_blocks=4, block_size=16)
kv = torch.randn(20, 576).bfloat16()
lk.mla_append(cache.kv, kv[:, :512], kv[:, 512:], torch.arange(20))
qm = torch.randn(1, 1, 8, 576).bfloat16()
bt = torch.tensor([[0, 1]], dtype=torch.int32)
sl = torch.tensor([20], dtype=torch.int32)
out, lse = lk.mla_decode(qm, cache.kv, bt, sl, softmax_scale=0.05)
rout, rlse = ref.mla_decode(qm.float(), cache.kv, bt, sl, 0.05)
check("mla", out, rout, 2e-2)
print(f"torch {torch.__version__}, leankernels {lk.__version__}: {'all ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
