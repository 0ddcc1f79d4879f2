"""Demo section: a DeepSeek-V3 MoE routing step (gate, plan, permute, unpermute) for a batch."""
from __future__ import annotations

import torch

import leankernels as lk
from leankernels import reference as ref

from .._bench.timing import wall_time

E, N_GROUP, TOPK_GROUP, TOP_K, SCALE, HIDDEN = 256, 8, 4, 8, 2.5, 7168


def _time(fn, device: str, reps: int) -> float:
    """Best of reps wall-clock runs: on a shared 2-core CPU the median mostly measures neighbours."""
    return wall_time(fn, device, reps, stat=min)


def run(device: str, quick: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    T = 256 if quick else 4096
    T_moe = 64 if quick else (4096 if device == "cuda" else 512)
    reps = 3 if quick else 7
    gate_w = torch.randn(E, HIDDEN, generator=g).mul_(HIDDEN ** -0.5)
    bias = torch.randn(E, generator=g).mul_(0.05).to(device)
    x = torch.randn(T, HIDDEN, generator=g).to(torch.bfloat16)
    logits = (x.float() @ gate_w.T).to(device)
    rows = []

    # 1. the gate: sigmoid scores, bias for selection, top-2-sum group scores, top-4 groups, top-8
    w, ids = lk.route(logits, TOP_K, "sigmoid", bias, N_GROUP, TOPK_GROUP, True, SCALE)
    w_ref, ids_ref = ref.route(logits.cpu(), TOP_K, "sigmoid", bias.cpu(), N_GROUP, TOPK_GROUP, True, SCALE)
    exact = torch.equal(ids.cpu(), ids_ref) and torch.allclose(w.cpu(), w_ref, rtol=1e-6, atol=0)
    t_ours = _time(lambda: lk.route(logits, TOP_K, "sigmoid", bias, N_GROUP, TOPK_GROUP, True, SCALE), device, reps)
    t_eager = _time(lambda: ref.deepseek_v3_gate(logits, TOP_K, bias, N_GROUP, TOPK_GROUP, SCALE), device, reps)
    load = torch.bincount(ids.flatten().long().cpu(), minlength=E)
    rows.append({
        "what": f"route: DeepSeek-V3 gate, T={T}, {E} experts, {N_GROUP} groups/top-{TOPK_GROUP}, top-{TOP_K}",
        "ours": f"{t_ours * 1e3:.3f} ms",
        "baseline": f"eager PyTorch gate {t_eager * 1e3:.3f} ms",
        "ratio": f"{t_eager / t_ours:.1f}x",
        "detail": f"ids exact, weights bitwise vs reference; expert load min/max {int(load.min())}/{int(load.max())}",
        "check": bool(exact),
    })

    # 2. plan: expert-sorted layout, no host sync
    p = lk.plan(ids, E, 1)
    plan_ok = all(torch.equal(a.cpu(), b) for a, b in zip(p, ref.plan(ids.cpu(), E, 1)))
    t_plan = _time(lambda: lk.plan(ids, E, 1), device, reps)
    t_plan_ref = _time(lambda: ref.plan(ids, E, 1), device, reps)
    rows.append({
        "what": f"plan: {T}x{TOP_K} (token, expert) pairs -> {E} segments",
        "ours": f"{t_plan * 1e3:.3f} ms",
        "baseline": f"eager reference {t_plan_ref * 1e3:.3f} ms",
        "ratio": f"{t_plan_ref / t_plan:.1f}x",
        "detail": f"R = {p.row_token.shape[0]} rows (static bound), stable token order",
        "check": bool(plan_ok),
    })

    # 3. permute (+FP8) and unpermute of hidden states, H = 7168 bf16
    xs = x[:T_moe].to(device)
    pm = lk.plan(ids[:T_moe], E, 1)
    wm = w[:T_moe]
    a, a_scale = lk.permute(xs, pm, quantize=True)
    q_ref, s_ref = ref.quantize_fp8(ref.permute(xs.cpu(), pm.row_token.cpu()))
    fp8_ok = torch.equal(a.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(a_scale.cpu(), s_ref)
    y = lk.permute(xs, pm)
    out = lk.unpermute(y, pm, wm)
    want = ref.unpermute(ref.permute(xs.cpu(), pm.row_token.cpu()), pm.token_row.cpu(), wm.cpu())
    comb_ok = torch.allclose(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)
    rt, tr = pm.row_token.long(), pm.token_row.long()
    vr = (rt >= 0)[:, None]
    wv = (wm * (tr >= 0)).unsqueeze(-1)
    zero = torch.zeros((), dtype=xs.dtype, device=device)

    def torch_layer():
        yy = torch.where(vr, xs.index_select(0, rt.clamp_min(0)), zero)
        rows_ = yy.index_select(0, tr.clamp_min(0).flatten()).view(T_moe, TOP_K, HIDDEN).float()
        return (rows_ * wv).sum(1).to(xs.dtype)

    t_pu = _time(lambda: lk.unpermute(lk.permute(xs, pm), pm, wm), device, reps)
    t_pu_ref = _time(torch_layer, device, reps)
    moved = (2 * pm.row_token.shape[0] + pm.row_token.shape[0] + T_moe) * HIDDEN * 2
    rows.append({
        "what": f"permute + unpermute: T={T_moe}, top-{TOP_K}, H={HIDDEN} bf16",
        "ours": f"{t_pu * 1e3:.2f} ms ({moved / t_pu / 1e9:.1f} GB/s)",
        "baseline": f"torch index_select + gather-sum {t_pu_ref * 1e3:.2f} ms",
        "ratio": f"{t_pu_ref / t_pu:.1f}x",
        "detail": "permute(quantize=True) bytes == quantize_fp8(gathered rows)",
        "check": bool(fp8_ok and comb_ok),
    })

    # 4. aux-loss-free balancing step
    nb = lk.update_bias(bias, p.counts, 1e-3)
    rows.append({
        "what": "update_bias: bias += 1e-3 * sign(mean(counts) - counts)",
        "ours": f"{int((nb > bias).sum())} experts up, {int((nb < bias).sum())} down",
        "check": bool(torch.equal(nb.cpu(), ref.update_bias(bias.cpu(), p.counts.cpu(), 1e-3))),
    })
    return rows
