"""Expert gating and token routing: kernels against leankernels.reference (routing section)."""
from __future__ import annotations

import pytest
import torch

import leankernels
from leankernels import reference as ref
from leankernels.routing import RoutePlan

from conftest import DEVICES, gemm_diff, randn, requires_cuda, seeded

# (name, E, n_group, topk_group, top_k, score, bias, scale)
CONFIGS = [
    ("deepseek_v3", 256, 8, 4, 8, "sigmoid", True, 2.5),
    ("mixtral", 8, 1, 1, 2, "softmax", False, 1.0),
    ("qwen3_moe", 128, 1, 1, 8, "softmax", False, 1.0),
    ("deepseek_v2", 160, 8, 3, 6, "softmax", False, 16.0),   # 20 experts per group
    ("kimi_k2", 384, 1, 1, 8, "sigmoid", True, 2.827),
    ("e1024_g64", 1024, 16, 4, 32, "sigmoid", True, 1.0),   # 64 experts per group, top-32
    ("e1024_g128_nobias", 1024, 8, 2, 16, "sigmoid", False, 1.0),
    ("e96_g3", 96, 3, 2, 5, "softmax", True, 1.0),          # not a power of two
    ("e60_g30", 60, 30, 7, 9, "sigmoid", True, 1.0),        # 2 experts per group
]


def _logits(T, E, seed, dtype=torch.float32, device="cpu"):
    return randn(T, E, seed=seed, dtype=dtype, device=device, scale=2.0)


def _bias(E, seed, device="cpu"):
    return randn(E, seed=seed + 1000, device=device, scale=0.05)


def _assert_route(got, want):
    (w, ids), (w_ref, ids_ref) = got, want
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-6, atol=0, equal_nan=True)


def _route_both(logits, top_k, score, bias, n_group, topk_group, renormalize=True, scale=1.0):
    got = leankernels.route(logits, top_k, score=score, bias=bias, n_group=n_group, topk_group=topk_group,
                            renormalize=renormalize, scale=scale)
    want = ref.route(logits.cpu(), top_k, score, None if bias is None else bias.cpu(), n_group, topk_group,
                     renormalize, scale)
    return got, want


# ------------------------------------------------------------------------------------ route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_route_matches_reference(device, dtype, cfg):
    _, E, n_group, topk_group, top_k, score, has_bias, scale = cfg
    T = 193
    logits = _logits(T, E, seed=E + top_k, dtype=dtype, device=device)
    bias = _bias(E, seed=E, device=device) if has_bias else None
    _assert_route(*_route_both(logits, top_k, score, bias, n_group, topk_group, scale=scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_no_renormalize_fp16_strided(device, score):
    wide = _logits(64, 300, seed=3, dtype=torch.float16, device=device)
    logits = wide[:, 10:266]  # row stride 300, not contiguous
    bias = _bias(256, seed=3, device=device)
    _assert_route(*_route_both(logits, 8, score, bias, 8, 4, renormalize=False, scale=0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1])
def test_route_tiny_batches(device, T):
    logits = _logits(T, 256, seed=5, device=device)
    bias = _bias(256, seed=5, device=device)
    got = leankernels.route(logits, 8, "sigmoid", bias, 8, 4, True, 2.5)
    assert got[0].shape == (T, 8) and got[1].shape == (T, 8)
    _assert_route(got, ref.route(logits.cpu(), 8, "sigmoid", bias.cpu(), 8, 4, True, 2.5))


@pytest.mark.parametrize("device", DEVICES)
def test_route_deepseek_v3_weights_and_order(device):
    logits = _logits(128, 256, seed=7, device=device)
    bias = _bias(256, seed=7, device=device)
    w, ids = leankernels.route(logits, 8, "sigmoid", bias, 8, 4, True, 2.5)
    w, ids = w.cpu(), ids.cpu().long()
    torch.testing.assert_close(w.sum(-1), torch.full((128,), 2.5), rtol=1e-5, atol=0)
    sel = ref.route_scores(logits.cpu(), "sigmoid") + bias.cpu()
    chosen = sel.gather(1, ids)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all(), "ids must come sorted by descending selection score"
    assert all(len(set(r.tolist())) <= 4 for r in ids // 32), "experts must come from at most topk_group=4 groups"


@pytest.mark.parametrize("device", DEVICES)
def test_route_agrees_with_published_deepseek_gate(device):
    """The published fp32 Gate differs only by the fp32-vs-correctly-rounded sigmoid (1 ulp)."""
    logits = _logits(512, 256, seed=11, device=device)
    bias = _bias(256, seed=11, device=device)
    w, ids = leankernels.route(logits, 8, "sigmoid", bias, 8, 4, True, 2.5)
    w_ds, ids_ds = ref.deepseek_v3_gate(logits.cpu(), 8, bias.cpu(), 8, 4, 2.5)
    same = (ids.cpu().long() == ids_ds).all(-1)
    assert same.float().mean() >= 0.99
    torch.testing.assert_close(w.cpu()[same], w_ds[same], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_route_all_tokens_to_one_expert(device):
    logits = _logits(100, 160, seed=13, device=device)
    logits[:, 37] = 50.0
    w, ids = leankernels.route(logits, 6, "softmax", None, 8, 3)
    assert (ids[:, 0] == 37).all()
    _assert_route((w, ids), ref.route(logits.cpu(), 6, "softmax", None, 8, 3))
    p = leankernels.plan(ids, 160)
    assert int(p.counts[37]) == 100


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_ties_go_to_lower_index(device, score):
    E = 256
    logits = torch.zeros(4, E, device=device)
    w, ids = leankernels.route(logits, 8, score, None, 8, 4)
    assert torch.equal(ids.cpu(), torch.arange(8, dtype=torch.int32).expand(4, 8))
    w, ids = leankernels.route(logits, 8, score, torch.zeros(E, device=device), 8, 4)
    assert torch.equal(ids.cpu(), torch.arange(8, dtype=torch.int32).expand(4, 8))
    # many ties: logits on a coarse grid, groups tie too
    g = seeded(17)
    coarse = torch.randint(-2, 3, (200, E), generator=g).float().to(device)
    _assert_route(*_route_both(coarse, 8, score, None, 8, 4))
    _assert_route(*_route_both(coarse, 8, score, torch.zeros(E, device=device), 8, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_nan_logits(device, score):
    """NaN logits rank as -inf; a token short of non-NaN candidates gets NaN weights."""
    E = 64
    logits = _logits(6, E, seed=19, device=device)
    logits[0, 5] = float("nan")
    logits[1, ::2] = float("nan")      # half NaN: still 32 candidates
    logits[2, :] = float("nan")        # all NaN
    logits[3, :60] = float("nan")      # 4 candidates for top-8
    logits[4, 7] = 1e4                 # huge but finite
    logits[5, :] = -float("inf")       # softmax undefined: NaN
    got = leankernels.route(logits, 8, score, None, 4, 4)
    want = ref.route(logits.cpu(), 8, score, None, 4, 4)
    _assert_route(got, want)
    w, ids = got[0].cpu(), got[1].cpu()
    assert 5 not in ids[0].tolist() and torch.isfinite(w[0]).all()
    assert (ids[1] % 2 == 1).all() and torch.isfinite(w[1]).all()
    assert torch.equal(ids[2], torch.arange(8, dtype=torch.int32)) and torch.isnan(w[2]).all()
    assert set(ids[3, :4].tolist()) == {60, 61, 62, 63} and torch.isnan(w[3]).all()
    assert ids[4, 0] == 7
    # with bias and groups
    bias = _bias(E, seed=19, device=device)
    _assert_route(*_route_both(logits, 8, score, bias, 8, 3))


# ------------------------------------------------------------------------------------- plan
def _check_plan_invariants(p: RoutePlan, ids: torch.Tensor, E: int, align: int):
    counts, offs, row_token, token_row = (t.cpu().long() for t in p)
    ids = ids.cpu().long()
    T, K = ids.shape
    valid = (ids >= 0) & (ids < E)
    assert row_token.shape[0] == ref.plan_rows(T, K, E, align)
    assert counts.sum() == valid.sum()
    padded = torch.diff(offs, prepend=torch.zeros(1, dtype=torch.long))
    assert (padded >= counts).all() and (padded % align == 0).all() and (padded - counts < align).all()
    assert offs[-1] <= row_token.shape[0]
    assert torch.equal(token_row == -1, ~valid)
    tr = token_row[valid]
    assert tr.unique().numel() == tr.numel()
    assert torch.equal(row_token[tr], torch.arange(T).unsqueeze(1).expand(T, K)[valid])
    starts = offs - padded
    e = ids[valid]
    assert ((tr >= starts[e]) & (tr < starts[e] + counts[e])).all()
    # stable: within an expert rows follow the flat (token, k) order
    flat = torch.arange(T * K).view(T, K)[valid]
    order = torch.argsort(tr)
    assert (torch.diff(e[order] * (T * K) + flat[order]) > 0).all()
    assert (row_token >= -1).all() and (row_token < T).all()
    assert int((row_token >= 0).sum()) == int(valid.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,align", [(8, 1), (160, 1), (256, 8), (1024, 1), (384, 128)])
def test_plan_matches_reference(device, E, align):
    T, K = 301, 8
    g = seeded(E + align)
    ids = torch.randint(-3, E + 2, (T, K), generator=g, dtype=torch.int32)  # some dropped, some >= E
    p = leankernels.plan(ids.to(device), E, align)
    assert isinstance(p, RoutePlan)
    want = ref.plan(ids, E, align)
    for got_t, want_t in zip(p, want):
        assert got_t.dtype == torch.int32
        assert torch.equal(got_t.cpu(), want_t)
    _check_plan_invariants(p, ids, E, align)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_edge_cases(device):
    # T = 0
    p = leankernels.plan(torch.empty(0, 8, dtype=torch.int32, device=device), 16, 4)
    assert p.row_token.numel() == 0 and torch.equal(p.offs.cpu(), torch.zeros(16, dtype=torch.int32))
    # everything dropped
    ids = torch.full((5, 2), -1, dtype=torch.int32, device=device)
    p = leankernels.plan(ids, 4)
    assert (p.counts == 0).all() and (p.token_row == -1).all() and (p.row_token == -1).all()
    # all tokens to one expert, int64 ids, large T for several GPU chunks
    ids = torch.full((3000, 4), 2, dtype=torch.int64, device=device)
    p = leankernels.plan(ids, 5, 16)
    _check_plan_invariants(p, ids, 5, 16)
    assert int(p.counts[2]) == 12000 and int(p.offs[-1]) == 12000
    ids = torch.randint(0, 7, (20000, 8), generator=seeded(23), dtype=torch.int32)
    p = leankernels.plan(ids.to(device), 7, 4)
    for got_t, want_t in zip(p, ref.plan(ids, 7, 4)):
        assert torch.equal(got_t.cpu(), want_t)


# -------------------------------------------------------------------------- permute/unpermute
def _routed(T, E, K, device, seed, align=1, drop=True):
    logits = _logits(T, E, seed=seed, device=device)
    w, ids = leankernels.route(logits, K, "sigmoid", _bias(E, seed, device), 1, 1, True, 1.0)
    if drop:  # expert parallelism: this rank owns experts [0, E - 3)
        ids = torch.where(ids >= E - 3, torch.full_like(ids, -1), ids)
    return w, ids, leankernels.plan(ids, E, align)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [256, 300])
def test_permute_matches_reference(device, dtype, H):
    T = 67
    w, ids, p = _routed(T, 16, 4, device, seed=H, align=8)
    wide = randn(T, H + 8, seed=29, dtype=dtype, device=device)
    for x in (wide[:, :H].contiguous(), wide[:, 8:]):  # contiguous and row-strided
        out = leankernels.permute(x, p)
        assert out.dtype == dtype and out.shape == (p.row_token.shape[0], H)
        assert torch.equal(out.cpu(), ref.permute(x.cpu(), p.row_token.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [128, 300, 7168 // 8, 2048])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_permute_quantize_equals_quantize_fp8(device, dtype, H, scale_fmt):
    T = 45  # T * H below 2^16 (H <= 896): each token quantized into its first row; 2048: via scratch
    w, ids, p = _routed(T, 12, 3, device, seed=31, align=4)
    x = randn(T, H + 5, seed=37, dtype=dtype, device=device, scale=3.0)[:, 5:]  # row-strided
    x[3, 5] = 1e-6  # a tiny row group somewhere, to exercise the scale floor
    q, s = leankernels.permute(x, p, quantize=True, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    q_ref, s_ref = ref.quantize_fp8(ref.permute(x.cpu(), p.row_token.cpu()), (1, 128), scale_fmt)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.cpu(), s_ref)
    q2, s2 = leankernels.quantize_fp8(leankernels.permute(x, p), scale_fmt=scale_fmt)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 6])
def test_permute_quantize_any_x_strides(device, T):
    """x with a column stride (a transpose), a zero row stride (expand) or rows further apart than
    H: the same codes and scales as the contiguous copy (the CPU fast path reads x's strides)."""
    H = 300
    _, _, p = _routed(T, 8, 2, device, seed=41, align=2)
    base = randn(T, H, seed=43, dtype=torch.bfloat16, device=device, scale=2.0)
    xs = {"transposed": base.t().contiguous().t(), "expanded": base[:1].expand(T, H),
          "row-strided": torch.cat([base, base[:, :50]], 1)[:, :H]}
    for name, x in xs.items():
        q, s = leankernels.permute(x, p, quantize=True)
        q_ref, s_ref = ref.quantize_fp8(ref.permute(x.contiguous().cpu(), p.row_token.cpu()), (1, 128))
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)), name
        assert torch.equal(s.cpu(), s_ref), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [256, 300])
def test_unpermute_matches_reference(device, dtype, H):
    T = 53
    w, ids, p = _routed(T, 16, 4, device, seed=41, align=8)
    y = randn(p.row_token.shape[0], H, seed=43, dtype=dtype, device=device)
    out = leankernels.unpermute(y, p, w)
    assert out.dtype == dtype and out.shape == (T, H)
    want = ref.unpermute(y.cpu(), p.token_row.cpu(), w.cpu())
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=tol, atol=tol)
    # tokens with every id dropped come back as zeros
    nowhere = (p.token_row.cpu() < 0).all(-1)
    assert (out.cpu()[nowhere] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [7168, 7200, 17])
def test_unpermute_cpu_paths_exact(dtype, H):
    """The CPU combine on every CPU path (register sums on the AVX-512 levels: column blocks of
    128 and 32, then a tail; avx2: 64 and 16; generic: sums in L1) against fp32 sums in k order (torch.addcmul; the kernel's fused
    multiply-adds may differ in the last fp32 bit), one rounding to the output dtype; Inf and
    NaN inputs give the same non-finite pattern."""
    T, K = 3, 8
    w, ids, p = _routed(T, 32, K, "cpu", seed=H, align=1, drop=False)
    y = randn(p.row_token.shape[0], H, seed=H + 1, dtype=dtype)
    y[p.token_row[1, 2], 5] = float("inf")
    y[p.token_row[2, 0], H - 1] = float("nan")
    acc = torch.zeros(T, H)
    for k in range(K):
        acc = torch.addcmul(acc, w[:, k:k + 1], y[p.token_row[:, k].long()].float())
    want = acc.to(dtype)
    old = leankernels.cpu_path()
    try:
        for path in leankernels.cpu_paths():
            leankernels.set_cpu_path(path)
            got = leankernels.unpermute(y, p, w)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), path
            fin = want.isfinite()
            torch.testing.assert_close(got[fin].float(), want[fin].float(), rtol=2e-6 if dtype == torch.float32 else 8e-3,
                                       atol=1e-6)
            assert gemm_diff(got[fin].float(), want[fin].float()) < 1e-9, path
    finally:
        leankernels.set_cpu_path(old)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_unpermute_roundtrip(device):
    """Unpermute of the permuted rows with weights summing to 1 gives x back (fp32)."""
    T, E, K, H = 40, 32, 4, 192
    w, ids, p = _routed(T, E, K, device, seed=47, align=1, drop=False)
    x = randn(T, H, seed=53, device=device)
    torch.testing.assert_close(leankernels.unpermute(leankernels.permute(x, p), p, w), x, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- update_bias
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cdtype", [torch.int32, torch.int64])
def test_update_bias(device, cdtype):
    E = 256
    bias = _bias(E, seed=59, device=device)
    counts = torch.randint(0, 100, (E,), generator=seeded(59)).to(cdtype).to(device)
    counts[:4] = int(counts.sum()) // E  # some experts exactly... near the mean
    got = leankernels.update_bias(bias, counts, 1e-3)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), ref.update_bias(bias.cpu(), counts.cpu(), 1e-3))
    balanced = torch.full((E,), 7, dtype=cdtype, device=device)
    assert torch.equal(leankernels.update_bias(bias, balanced, 0.1), bias)


@pytest.mark.parametrize("device", DEVICES)
def test_update_bias_huge_counts(device):
    # Issue 16: sum(counts) and E * counts_e overflowed int64 (undefined behaviour) for counts
    # near 2**62. The sign is now exact for any int64 counts. First case: mean = 0.75 * 2**62,
    # so expert 0 goes up and the others down (int64 wrap-around gave expert 0 the wrong sign).
    bias = torch.zeros(4, device=device)
    big = 2**62
    for counts, sign in (([0, big, big, big], [1, -1, -1, -1]),
                         ([big, big], [0, 0]),
                         ([2**63 - 1, 2**63 - 1, 2**63 - 2], [-1, -1, 1]),
                         ([-big, big, big, 0], [1, -1, -1, 1])):
        c = torch.tensor(counts, dtype=torch.int64, device=device)
        b = bias[: len(counts)]
        want = torch.tensor(sign, dtype=torch.float32) * 0.5
        got = leankernels.update_bias(b, c, 0.5)
        assert torch.equal(got.cpu(), want), (counts, got)
        assert torch.equal(got.cpu(), ref.update_bias(b.cpu(), c.cpu(), 0.5))
    # int32 counts at their extremes: sum and E * count overflow int32, stay exact
    c = torch.tensor([2**31 - 1] * 3 + [0], dtype=torch.int32, device=device)
    got = leankernels.update_bias(bias, c, 0.5)
    assert torch.equal(got.cpu(), torch.tensor([-0.5, -0.5, -0.5, 0.5]))


# --------------------------------------------------------------------- torch integration
def _sample_args(device):
    logits = _logits(24, 64, seed=61, device=device)
    bias = _bias(64, seed=61, device=device)
    w, ids = leankernels.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
    p = leankernels.plan(ids, 64, 4)
    x = randn(24, 256, seed=67, dtype=torch.bfloat16, device=device)
    y = leankernels.permute(x, p)
    return logits, bias, w, ids, p, x, y


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from leankernels import _ops
    logits, bias, w, ids, p, x, y = _sample_args(device)
    torch.library.opcheck(_ops.route, (logits, 4, True, bias, 4, 2, True, 2.5))
    torch.library.opcheck(_ops.route, (logits.bfloat16(), 4, False, None, 1, 1, False, 1.0))
    torch.library.opcheck(_ops.plan, (ids, 64, 4))
    torch.library.opcheck(_ops.permute, (x, p.row_token, p.token_row))
    torch.library.opcheck(_ops.permute_fp8, (x, p.row_token, False))
    torch.library.opcheck(_ops.unpermute, (y, p.token_row, w))
    torch.library.opcheck(_ops.update_bias, (bias, p.counts, 1e-3))


def _moe_routing(logits, bias, x):
    w, ids = leankernels.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
    p = leankernels.plan(ids, 64, 4)
    q, s = leankernels.permute(x, p, quantize=True)
    y = leankernels.permute(x, p)
    return leankernels.unpermute(y, p, w), q, s, leankernels.update_bias(bias, p.counts, 1e-3)


def test_torch_compile_fullgraph():
    logits, bias, w, ids, p, x, y = _sample_args("cpu")
    eager = _moe_routing(logits, bias, x)
    compiled = torch.compile(_moe_routing, fullgraph=True, dynamic=False)(logits, bias, x)
    for a, b in zip(eager, compiled):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@requires_cuda
def test_cuda_graph_capture_and_replay():
    logits, bias, _, _, _, x, _ = _sample_args("cuda")
    static_logits, static_x = logits.clone(), x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _moe_routing(static_logits, bias, static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _moe_routing(static_logits, bias, static_x)
    for seed in (71, 73):
        static_logits.copy_(_logits(24, 64, seed=seed, device="cuda"))
        static_x.copy_(randn(24, 256, seed=seed, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        want = _moe_routing(static_logits.clone(), bias, static_x.clone())
        for a, b in zip(outs, want):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@requires_cuda
def test_cuda_deterministic_and_matches_cpu_large():
    """T=4096 DeepSeek-V3 gate and T=16384 plan: bitwise equal run to run and to the CPU kernel."""
    logits = _logits(4096, 256, seed=79, dtype=torch.bfloat16, device="cuda")
    bias = _bias(256, seed=79, device="cuda")
    a = leankernels.route(logits, 8, "sigmoid", bias, 8, 4, True, 2.5)
    b = leankernels.route(logits, 8, "sigmoid", bias, 8, 4, True, 2.5)
    c = leankernels.route(logits.cpu(), 8, "sigmoid", bias.cpu(), 8, 4, True, 2.5)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert torch.equal(a[1].cpu(), c[1]) and torch.equal(a[0].cpu(), c[0])
    ids = torch.randint(-1, 256, (16384, 8), generator=seeded(83), dtype=torch.int32)
    p1, p2 = leankernels.plan(ids.cuda(), 256, 128), leankernels.plan(ids.cuda(), 256, 128)
    p3 = leankernels.plan(ids, 256, 128)
    for t1, t2, t3 in zip(p1, p2, p3):
        assert torch.equal(t1, t2) and torch.equal(t1.cpu(), t3)


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("device", DEVICES)
def test_moe_layer_end_to_end(device):
    """route -> plan -> permute(quantize) -> fp8_grouped_gemm -> unpermute vs a plain MoE layer."""
    if not hasattr(leankernels, "fp8_grouped_gemm"):
        pytest.skip("leankernels.fp8_grouped_gemm is not in this build (merged from the gemm branch)")
    T, E, H, N, K = 96, 16, 256, 384, 4
    x = randn(T, H, seed=89, dtype=torch.bfloat16, device=device)
    gate_w = randn(E, H, seed=97, device=device, scale=0.05)
    bias = _bias(E, seed=89, device=device)
    experts = randn(E, N, H, seed=101, dtype=torch.bfloat16, device=device, scale=0.05)
    logits = x.float() @ gate_w.T
    w, ids = leankernels.route(logits, K, "sigmoid", bias, 4, 2, True, 2.5)
    p = leankernels.plan(ids, E, 1)
    a, a_scale = leankernels.permute(x, p, quantize=True)
    b, b_scale = leankernels.quantize_fp8(experts, block=(128, 128))
    y = leankernels.fp8_grouped_gemm(a, a_scale, b, b_scale, p.offs, out_dtype=torch.bfloat16)
    out = leankernels.unpermute(y, p, w)
    # plain PyTorch MoE layer on the same routing decision
    want = torch.zeros(T, N, dtype=torch.float32)
    wq = ref.dequantize_fp8(b.cpu(), b_scale.cpu(), (128, 128))
    xq = ref.dequantize_fp8(*ref.quantize_fp8(x.cpu()))
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            want[t] += float(w[t, k]) * (xq[t] @ wq[e].T)
    assert gemm_diff(out.float().cpu(), want) < 1e-4
    plain = torch.zeros(T, N, dtype=torch.float32)
    for t in range(T):
        for k in range(K):
            plain[t] += float(w[t, k]) * (x[t].float().cpu() @ experts[int(ids[t, k])].float().cpu().T)
    assert gemm_diff(out.float().cpu(), plain) < 2e-3


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    logits = _logits(4, 64, seed=103)
    with pytest.raises(ValueError, match="top_k"):
        leankernels.route(logits, 65)
    with pytest.raises(ValueError, match="top_k"):
        leankernels.route(logits, 33)
    with pytest.raises(ValueError, match="top_k"):
        leankernels.route(logits, 0)
    with pytest.raises(ValueError, match="topk_group"):
        leankernels.route(logits, 4, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="n_group"):
        leankernels.route(logits, 4, n_group=5)
    with pytest.raises(ValueError, match="top_k"):
        leankernels.route(logits, 20, n_group=8, topk_group=2)
    with pytest.raises(ValueError, match="score"):
        leankernels.route(logits, 4, score="relu")
    with pytest.raises(TypeError, match="logits"):
        leankernels.route(logits.int(), 4)
    with pytest.raises(ValueError, match="logits"):
        leankernels.route(logits[0], 4)
    with pytest.raises(TypeError, match="logits"):
        leankernels.route(logits.tolist(), 4)
    with pytest.raises(ValueError, match="bias"):
        leankernels.route(logits, 4, bias=torch.zeros(63))
    with pytest.raises(TypeError, match="bias"):
        leankernels.route(logits, 4, bias=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias"):
        leankernels.route(logits, 4, bias=torch.zeros(64, device="meta"))
    with pytest.raises(ValueError, match="bias"):
        leankernels.route(logits, 4, bias=torch.zeros(64), n_group=64, topk_group=8)
    with pytest.raises(TypeError, match="top_k"):
        leankernels.route(logits, 4.0)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="ids"):
        leankernels.plan(ids.float(), 8)
    with pytest.raises(ValueError, match="ids"):
        leankernels.plan(ids[0], 8)
    with pytest.raises(ValueError, match="num_experts"):
        leankernels.plan(ids, 0)
    with pytest.raises(ValueError, match="align"):
        leankernels.plan(ids, 8, align=0)
    p = leankernels.plan(ids, 8)
    x = randn(4, 128, seed=107)
    with pytest.raises(ValueError, match="x"):
        leankernels.permute(x[:3], p)
    with pytest.raises(TypeError, match="x"):
        leankernels.permute(x.int(), p)
    with pytest.raises(TypeError, match="plan"):
        leankernels.permute(x, p.row_token)
    with pytest.raises(ValueError, match="scale_fmt"):
        leankernels.permute(x, p, quantize=True, scale_fmt="e5m2")
    y = randn(p.row_token.shape[0], 128, seed=109)
    w = torch.rand(4, 2)
    with pytest.raises(ValueError, match="y"):
        leankernels.unpermute(y[:-1], p, w)
    with pytest.raises(ValueError, match="weights"):
        leankernels.unpermute(y, p, w[:, :1])
    with pytest.raises(TypeError, match="weights"):
        leankernels.unpermute(y, p, w.int())
    with pytest.raises(TypeError, match="bias"):
        leankernels.update_bias(torch.zeros(8, dtype=torch.float64), p.counts)
    with pytest.raises(TypeError, match="counts"):
        leankernels.update_bias(torch.zeros(8), p.counts.float())
    with pytest.raises(ValueError, match="counts"):
        leankernels.update_bias(torch.zeros(7), p.counts)


@requires_cuda
def test_bad_inputs_mixed_devices():
    logits = _logits(4, 64, seed=113, device="cuda")
    with pytest.raises(ValueError, match="bias"):
        leankernels.route(logits, 4, bias=torch.zeros(64))
    p = leankernels.plan(torch.zeros(4, 2, dtype=torch.int32, device="cuda"), 8)
    with pytest.raises(ValueError, match="row_token|x"):
        leankernels.permute(randn(4, 128, seed=1), p)
    with pytest.raises(ValueError, match="logits"):
        leankernels.route(_logits(2, 20000, seed=1, device="cuda"), 4)
    with pytest.raises(ValueError, match="num_experts"):
        leankernels.plan(torch.zeros(4, 2, dtype=torch.int32, device="cuda"), 20000)


# ------------------------------------------------------------------------------ gate_logits
# The router's x @ W^T at decode sizes (leankernels.nn.MoE, <= 16 tokens on the CPU): fp32
# sums in a fixed order, compared with the float64 product (F.linear's own error is of the same
# size, ~1e-7 relative to sum |x * w|).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,E", [(1, 2048, 64), (3, 100, 7), (16, 7168, 256), (2, 63, 1), (5, 1, 3)])
def test_gate_logits_matches_float64(dtype, T, H, E):
    from leankernels import _ops
    x = randn(T, H, seed=T * 31 + H, dtype=dtype)
    w = randn(E, H, seed=E + 5)
    want = x.double() @ w.double().T
    bound = (x.double().abs() @ w.double().abs().T) * 2.0**-21 + 1e-30
    for fn in (_ops.gate_logits_impl, _ops.gate_logits):
        got = fn(x, w)
        assert got.dtype == torch.float32 and got.shape == (T, E)
        assert torch.all((got.double() - want).abs() <= bound)
    wide = randn(T, H + 37, seed=3, dtype=dtype)[:, :H]  # row stride > H
    xs = wide.clone()
    torch.testing.assert_close(_ops.gate_logits(wide, w), _ops.gate_logits(xs, w), rtol=0, atol=0)


def test_gate_logits_edges_and_errors():
    from leankernels import _ops
    w = randn(8, 64, seed=1)
    assert _ops.gate_logits(torch.empty(0, 64), w).shape == (0, 8)
    assert _ops.gate_logits(randn(2, 64, seed=2), w[:0]).shape == (2, 0)
    with pytest.raises(ValueError, match="hidden size"):
        _ops.gate_logits(randn(2, 65, seed=2), w)
    with pytest.raises(TypeError, match="weight"):
        _ops.gate_logits(randn(2, 64, seed=2), w.double())
    with pytest.raises(TypeError, match="x"):
        _ops.gate_logits(randn(2, 64, seed=2).int(), w)
    with pytest.raises(ValueError, match="x"):
        _ops.gate_logits(randn(2, 2, 64, seed=2), w)
    torch.library.opcheck(_ops.gate_logits, (randn(3, 200, seed=4, dtype=torch.bfloat16), randn(9, 200, seed=5)))
