"""leankernels.compat.deep_gemm: DeepGEMM's FP8 GEMM API, checked against leankernels.reference."""
from __future__ import annotations

import pytest
import torch

from leankernels import reference as ref
from leankernels.compat import deep_gemm as dg

from conftest import DEVICES, gemm_diff, poison, randn


def _cast_spec(x, rows, use_ue8m0):
    """DeepGEMM's cast, written blockwise: sf = max(amax, 1e-4)/448 (UE8M0: next power of two),
    codes = e4m3(x * (1/sf))."""
    m, n = x.shape
    codes = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    sf = torch.empty(-(-m // rows), -(-n // 128))
    for i in range(0, m, rows):
        for j in range(0, n, 128):
            blk = x[i:i + rows, j:j + 128].float()
            amax = blk.abs().amax(dim=1 if rows == 1 else None).clamp(min=1e-4)
            s = amax / 448.0
            if use_ue8m0:
                s = torch.exp2(torch.ceil(torch.log2(s)))
            if rows == 1:
                sf[i:i + rows, j // 128] = s
                codes[i:i + rows, j:j + 128] = (blk * (1.0 / s[:, None])).to(torch.float8_e4m3fn)
            else:
                sf[i // rows, j // 128] = s
                codes[i:i + rows, j:j + 128] = (blk * (1.0 / s)).to(torch.float8_e4m3fn)
    return codes, sf


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(5, 256), (130, 300)])
def test_casts_match_deep_gemm_formula(shape, use_ue8m0):
    x = randn(*shape, seed=1, dtype=torch.bfloat16, scale=3.0)
    for fn, rows in ((dg.per_token_cast_to_fp8, 1), (dg.per_block_cast_to_fp8, 128)):
        q, s = fn(x, use_ue8m0)
        wq, ws = _cast_spec(x, rows, use_ue8m0)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert torch.equal(s, ws)
        assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))


def test_packed_ue8m0_scales():
    x = randn(3, 640, seed=2)
    q, packed = dg.per_token_cast_to_fp8(x, True, use_packed_ue8m0=True)
    _, sf = dg.per_token_cast_to_fp8(x, True)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2)      # 5 groups padded to 8
    exps = packed.view(torch.uint8).reshape(3, 8)[:, :5].int()
    assert torch.equal((exps << 23).view(torch.float32), sf)


def _spec_gemm(a, sa, b, sb):
    return ref.fp8_gemm(a, sa, b, sb, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row", "mn_major", "packed_ue8m0"])
def test_fp8_gemm_nt(device, layout):
    M, N, K = 37, 256, 384
    x = randn(M, K, seed=3, device=device)
    w = randn(N, K, seed=4, device=device)
    a, sa = dg.per_token_cast_to_fp8(x, layout == "packed_ue8m0")
    b, sb = dg.per_block_cast_to_fp8(w, layout == "packed_ue8m0")
    want = _spec_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    if layout == "mn_major":
        sa_in = dg.get_mn_major_tma_aligned_tensor(sa)
        assert sa_in.stride(0) == 1 and torch.equal(sa_in, sa)
    elif layout == "packed_ue8m0":
        sa_in = dg.per_token_cast_to_fp8(x, True, use_packed_ue8m0=True)[1]
    else:
        sa_in = sa
    d = poison(torch.empty(M, N, dtype=torch.bfloat16, device=device))
    assert dg.fp8_gemm_nt((a, sa_in), (b, sb), d) is None
    torch.testing.assert_close(d.float().cpu(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)
    assert gemm_diff(d.float().cpu(), x.cpu() @ w.cpu().T) < 1e-3
    # fp32 accumulate form: d = c + a @ b.T
    c = randn(M, N, seed=5, device=device)
    d32 = poison(torch.empty(M, N, device=device))
    dg.fp8_gemm_nt((a, sa_in), (b, sb), d32, c=c)
    torch.testing.assert_close(d32.cpu(), want + c.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_m_grouped_contiguous_with_padding_rows(device):
    E, N, K = 3, 128, 256
    sizes = [40, 0, 70]                       # DeepGEMM pads each expert to 128 rows with -1
    m_indices = torch.cat([torch.cat([torch.full((n,), e), torch.full((dg.align(n, 128) - n,), -1)])
                           for e, n in enumerate(sizes)]).int()
    m_indices = torch.cat([torch.full((5,), -1), m_indices]).int()   # and a leading pad
    M = m_indices.numel()
    x = randn(M, K, seed=6, device=device)
    w = randn(E, N, K, seed=7, device=device)
    a, sa = dg.per_token_cast_to_fp8(x, False)
    bs = [dg.per_block_cast_to_fp8(w[e], False) for e in range(E)]
    b, sb = torch.stack([q for q, _ in bs]), torch.stack([s for _, s in bs])
    d = poison(torch.empty(M, N, dtype=torch.bfloat16, device=device))
    dg.m_grouped_fp8_gemm_nt_contiguous((a, dg.get_mn_major_tma_aligned_tensor(sa)), (b, sb), d,
                                        m_indices.to(device))
    for r in torch.nonzero(m_indices >= 0).flatten().tolist():
        e = int(m_indices[r])
        want = _spec_gemm(a[r:r + 1].cpu(), sa[r:r + 1].cpu(), b[e].cpu(), sb[e].cpu())
        torch.testing.assert_close(d[r:r + 1].float().cpu(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_m_grouped_contiguous_rejects_unsorted_rows():
    E, N, K = 2, 128, 128
    a, sa = dg.per_token_cast_to_fp8(randn(4, K, seed=8), False)
    b, sb = dg.per_block_cast_to_fp8(randn(N, K, seed=9), False)
    b, sb = torch.stack([b, b]), torch.stack([sb, sb])
    d = torch.empty(4, N, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="m_indices"):
        dg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, torch.tensor([1, 0, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="m_indices"):
        dg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), d, torch.tensor([0, 0, 2, -1], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_m_grouped_masked(device):
    E, Mmax, N, K = 4, 24, 256, 128
    x = randn(E, Mmax, K, seed=10, device=device)
    w = randn(E, N, K, seed=11, device=device)
    qa = [dg.per_token_cast_to_fp8(x[e], False) for e in range(E)]
    a, sa = torch.stack([q for q, _ in qa]), torch.stack([s for _, s in qa])
    qb = [dg.per_block_cast_to_fp8(w[e], False) for e in range(E)]
    b, sb = torch.stack([q for q, _ in qb]), torch.stack([s for _, s in qb])
    masked_m = torch.tensor([24, 0, 7, 13], dtype=torch.int32, device=device)
    d = poison(torch.empty(E, Mmax, N, dtype=torch.bfloat16, device=device))
    dg.m_grouped_fp8_gemm_nt_masked((a, dg.get_mn_major_tma_aligned_tensor(sa)), (b, sb), d, masked_m, expected_m=12)
    for e in range(E):
        m = int(masked_m[e])
        want = _spec_gemm(a[e, :m].cpu(), sa[e, :m].cpu(), b[e].cpu(), sb[e].cpu())
        torch.testing.assert_close(d[e, :m].float().cpu(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)
        assert torch.isnan(d[e, m:].float()).all()          # rows past masked_m untouched


def test_legacy_names_and_errors():
    a, sa = dg.per_token_cast_to_fp8(randn(8, 256, seed=12), False)
    b, sb = dg.per_block_cast_to_fp8(randn(128, 256, seed=13), False)
    d1 = torch.empty(8, 128, dtype=torch.bfloat16)
    d2 = torch.empty(8, 128, dtype=torch.bfloat16)
    dg.fp8_gemm_nt((a, sa), (b, sb), d1)
    dg.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), d2)
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError, match="recipe"):
        dg.fp8_gemm_nt((a, sa), (b, sb), d1, recipe=(1, 1, 128))
    with pytest.raises(ValueError, match=r"b\[1\].*recipe=\(1, 1, 128\)"):
        dg.fp8_gemm_nt((a, sa), (b, torch.ones(128, 2)), d1)
    with pytest.raises(TypeError, match="a must be"):
        dg.fp8_gemm_nt(a, (b, sb), d1)
    with pytest.raises(ValueError, match="d must"):
        dg.fp8_gemm_nt((a, sa), (b, sb), torch.empty(8, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="d must be float32"):
        dg.fp8_gemm_nt((a, sa), (b, sb), d1, c=torch.zeros(8, 128))
    with pytest.raises(ValueError, match="expected_m"):
        dg.m_grouped_fp8_gemm_nt_masked((a[None], sa[None]), (b[None], sb[None]), d1[None],
                                        torch.tensor([8], dtype=torch.int32), expected_m=-1)


# ------------------------------------------------------- training: k-grouped (wgrad) GEMMs
# DeepGEMM's test logic (tests/test_fp8.py::test_k_grouped_gemm_contiguous and
# generate_k_grouped_contiguous): a [K, m], b [K, n] bf16, groups of K rows; per-channel casts
# (128 rows per scale, per group); c random * 32, d = c accumulated; one random group emptied;
# calc_diff(d, c + a_g.T @ b_g) < 0.001.
def _cast_groups(x, ks):
    """Per-group per_channel_cast_to_fp8 (DeepGEMM's k_grouped_per_channel_cast_to_fp8): codes
    [K, mn] and scales [sum ceil(k/128), mn]; works for any k (no 128 alignment needed here)."""
    qs, sfs, p = [], [], 0
    for k in ks:
        q, sf = dg.per_channel_cast_to_fp8(x[p:p + k])
        qs.append(q)
        sfs.append(sf)
        p += k
    return torch.cat(qs), torch.cat(sfs)


def _k_grouped_case(ks, m, n, seed, device):
    a = randn(sum(ks), m, seed=seed, dtype=torch.bfloat16, device=device)
    b = randn(sum(ks), n, seed=seed + 1, dtype=torch.bfloat16, device=device)
    c = randn(len(ks), m, n, seed=seed + 2, device=device) * 32
    ref_d, p = torch.empty_like(c), 0
    for i, k in enumerate(ks):
        ref_d[i] = c[i] + a[p:p + k].double().T.matmul(b[p:p + k].double()).float()
        p += k
    return a, b, c, ref_d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks", [[128, 256, 384], [256, 0, 128, 512], [100, 1, 255, 0, 129]])
@pytest.mark.parametrize("layout", ["tn", "nt"])
def test_k_grouped_fp8_gemm_contiguous(device, ks, layout):
    m, n = 72, 136
    a, b, c, ref_d = _k_grouped_case(ks, m, n, seed=sum(ks) + len(layout), device=device)
    (qa, sa), (qb, sb) = _cast_groups(a, ks), _cast_groups(b, ks)
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device)
    d = c.clone()
    if layout == "tn":
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), d, ks, ks_tensor, c=d)  # c aliases d, as in DeepGEMM
    else:  # K-major: each group's [m, k] block flattened, scales transposed
        starts = [sum(ks[:i]) for i in range(len(ks))]
        flat = [torch.cat([q[p:p + k].T.reshape(-1) for p, k in zip(starts, ks)]) for q in (qa, qb)]
        dg.k_grouped_fp8_gemm_nt_contiguous((flat[0], sa.T), (flat[1], sb.T), d, ks, ks_tensor, c=c)
    assert gemm_diff(d, ref_d) < 1e-3
    for i, k in enumerate(ks):
        if k == 0:
            assert torch.equal(d[i], c[i])  # an empty group leaves c
    d2 = poison(torch.empty_like(c))
    dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), d2, ks, ks_tensor)  # c=None: d = a.T @ b
    assert gemm_diff(d2 + c, ref_d) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_first_release_wgrad_names(device):
    """wgrad_gemm_fp8_fp8_fp32_nt / k_grouped_wgrad_gemm_fp8_fp8_fp32_nt: out += lhs @ rhs.T with
    1x128 scales along k on both (scales [m, kb] or DeepGEMM's transposed [kb, m])."""
    m, n, k = 40, 72, 300
    x, y = randn(m, k, seed=31, device=device), randn(n, k, seed=32, device=device)
    (qa, sa), (qb, sb) = dg.per_token_cast_to_fp8(x), dg.per_token_cast_to_fp8(y)
    out = randn(m, n, seed=33, device=device)
    want = out.double() + x.double() @ y.double().T
    dg.wgrad_gemm_fp8_fp8_fp32_nt((qa, sa), (qb, sb.T.contiguous()), out)
    assert gemm_diff(out, want) < 1e-3
    # k-grouped: batches of [m, k_i] blocks, flattened; scales [sum ceil(k_i/128), m]
    batch_sizes = [200, 0, 57, 256]
    xs = [randn(m, k, seed=40 + i, device=device) for i, k in enumerate(batch_sizes)]
    ys = [randn(n, k, seed=50 + i, device=device) for i, k in enumerate(batch_sizes)]
    ca, cb = [dg.per_token_cast_to_fp8(t) for t in xs], [dg.per_token_cast_to_fp8(t) for t in ys]
    lhs = (torch.cat([q.reshape(-1) for q, _ in ca]), torch.cat([s.T for _, s in ca]))
    rhs = (torch.cat([q.reshape(-1) for q, _ in cb]), torch.cat([s.T for _, s in cb]))
    out = randn(len(batch_sizes), m, n, seed=34, device=device)
    want = torch.stack([out[i].double() + xs[i].double() @ ys[i].double().T for i in range(len(batch_sizes))])
    dg.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes)
    assert gemm_diff(out, want) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_nt_1d1d_recipe(device):
    """recipe (1, 1, 128): per-row b scales, accumulate into c (DeepGEMM's SM100 1D1D form)."""
    m, n, k = 33, 200, 384
    x, w = randn(m, k, seed=35, device=device), randn(n, k, seed=36, device=device)
    (qa, sa), (qb, sb) = dg.per_token_cast_to_fp8(x), dg.per_token_cast_to_fp8(w)
    c = randn(m, n, seed=37, device=device)
    d = poison(torch.empty(m, n, device=device))
    dg.fp8_gemm_nt((qa, sa), (qb, sb), d, c=c, recipe=(1, 1, 128))
    want = ref.dequantize_fp8(qa.cpu(), sa.cpu()).double() @ ref.dequantize_fp8(qb.cpu(), sb.cpu()).double().T
    assert gemm_diff(d.cpu() - c.cpu(), want) < (1e-9 if device == "cpu" else 1e-5)
    assert gemm_diff(d, c + x @ w.T) < 1e-3
    d16 = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    dg.fp8_gemm_nt((qa, sa), (qb, sb), d16, recipe=(1, 1, 128))
    assert gemm_diff(d16.float().cpu(), want) < 1e-5


def test_k_grouped_shim_errors():
    ks = [128, 128]
    (qa, sa), (qb, sb) = dg.per_channel_cast_to_fp8(randn(256, 8, seed=38)), dg.per_channel_cast_to_fp8(randn(256, 16, seed=39))
    kt = torch.tensor(ks, dtype=torch.int32)
    d = torch.empty(2, 8, 16)
    with pytest.raises(TypeError, match="ks must be"):
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), d, kt, kt)
    with pytest.raises(ValueError, match="recipe"):
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), d, ks, kt, recipe=(1, 128, 128))
    with pytest.raises(ValueError, match="sum\\(ks\\)"):
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), d, [128, 64], kt)
    with pytest.raises(ValueError, match=r"a\[1\] must have shape"):
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa[:1]), (qb, sb), d, ks, kt)
    with pytest.raises(ValueError, match="d must have shape"):
        dg.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), torch.empty(2, 8, 8), ks, kt)
    with pytest.raises(ValueError, match="recipe \\(1, 1, 128\\) needs per-row b scales"):
        a, s = dg.per_token_cast_to_fp8(randn(4, 256, seed=40))
        dg.fp8_gemm_nt((a, s), dg.per_block_cast_to_fp8(randn(130, 256, seed=41)), torch.empty(4, 130),
                       recipe=(1, 1, 128))


# ---- DeepGEMM's test_fp8_fp4.py logic for the other layouts (tests/generators.py upstream): bf16
# randn operands, the reference a.float() @ b.float().T (+ c) on the UNQUANTIZED inputs, operands
# cast per 1x128 (a) / 128x128 (b), an MN-major operand stored as x.T.contiguous().T, and the alias
# call passing (x.T, sf.T) to fp8_gemm_{nn,tn,tt}; calc_diff below 1e-3 (the legacy recipe's bound).
def _cast_with_major(x, mn_major, per_block):
    q, sf = (dg.per_block_cast_to_fp8 if per_block else dg.per_token_cast_to_fp8)(x, use_ue8m0=False)
    return (q.T.contiguous().T, sf) if mn_major else (q, sf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(1, 576, 512), (128, 256, 640), (200, 384, 300)])
@pytest.mark.parametrize("major_a,major_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_layouts_follow_upstream_logic(device, m, n, k, major_a, major_b, accumulate):
    g = torch.Generator().manual_seed(m * 7 + n + k)
    a = torch.randn(m, k, generator=g).bfloat16().to(device)
    b = torch.randn(n, k, generator=g).bfloat16().to(device)
    out_dtype = torch.float32 if accumulate else torch.bfloat16
    c = (torch.randn(m, n, generator=g) * 32).to(device) if accumulate else None
    ref_d = (a.float() @ b.float().t() + (c if accumulate else 0)).to(out_dtype)
    qa, qb = _cast_with_major(a, major_a, False), _cast_with_major(b, major_b, True)
    layout = ("t" if major_a else "n") + ("n" if major_b else "t")
    for alias in (False, True):
        x, y = qa, qb
        if alias:
            x = (x[0].T, x[1].T) if major_a else x
            y = (y[0].T, y[1].T) if major_b else y
            assert x[0].is_contiguous() and y[0].is_contiguous()
        d = poison(torch.empty(m, n, dtype=out_dtype, device=device))
        getattr(dg, f"fp8_gemm_{layout if alias else 'nt'}")(x, y, d, c=c)
        diff = float(dg.calc_diff(d, ref_d))
        assert diff < 1e-3, (m, n, k, layout, accumulate, alias, diff)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("major_b", [False, True])
def test_m_grouped_contiguous_layouts_follow_upstream_logic(device, major_b):
    """generate_m_grouped_contiguous: per-group sizes 0.7-1.3x the expected m, each padded to
    get_m(k)_alignment_for_contiguous_layout() rows of zeros tagged -1; the nn alias gets b.mT."""
    num_groups, expected_m, n, k = 3, 96, 256, 384
    g = torch.Generator().manual_seed(31 + major_b)
    sizes = [int(expected_m * (0.7 + 0.6 * torch.rand((), generator=g).item())) for _ in range(num_groups)]
    alignment = dg.get_m_alignment_for_contiguous_layout()
    assert alignment == dg.get_mk_alignment_for_contiguous_layout() == 128
    aligned = [dg.align(s, alignment) for s in sizes]
    m = sum(aligned)
    a = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(num_groups, n, k, generator=g).bfloat16()
    m_indices = torch.empty(m, dtype=torch.int32)
    ref_d = torch.empty(m, n, dtype=torch.bfloat16)
    start = 0
    for i, (s, al) in enumerate(zip(sizes, aligned)):
        m_indices[start:start + s], m_indices[start + s:start + al] = i, -1
        a[start + s:start + al] = 0
        ref_d[start:start + al] = a[start:start + al] @ b[i].t()
        start += al
    qa = dg.per_token_cast_to_fp8(a.to(device), use_ue8m0=False)
    qbs = [dg.per_block_cast_to_fp8(b[i].to(device), use_ue8m0=False) for i in range(num_groups)]
    qb = (torch.stack([q for q, _ in qbs]), torch.stack([s for _, s in qbs]))
    if major_b:
        qb = (qb[0].mT.contiguous().mT, qb[1])
    for alias in (False, True):
        y = (qb[0].mT, qb[1].mT) if (alias and major_b) else qb
        d = poison(torch.empty(m, n, dtype=torch.bfloat16, device=device))
        fn = dg.m_grouped_fp8_gemm_nn_contiguous if (alias and major_b) else dg.m_grouped_fp8_gemm_nt_contiguous
        fn(qa, y, d, m_indices.to(device))
        valid = m_indices >= 0
        diff = float(dg.calc_diff(d.cpu()[valid], ref_d[valid]))
        assert diff < 1e-3, (major_b, alias, diff)


def test_num_sms_and_calc_diff():
    before = dg.get_num_sms()
    assert isinstance(before, int) and before >= 1
    try:
        dg.set_num_sms(1)
        assert dg.get_num_sms() == 1
        with pytest.raises(ValueError, match="num_sms"):
            dg.set_num_sms(0)
    finally:
        dg.set_num_sms(before)
    x = torch.randn(64, 64)
    assert float(dg.calc_diff(x, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(dg.calc_diff(torch.zeros(3), torch.zeros(3))) == 0.0
    assert float(dg.calc_diff(x, -x)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="b must be a 2-D"):
        dg.fp8_gemm_nn(dg.per_token_cast_to_fp8(x, False), (torch.zeros(2, 64, 64, dtype=torch.float8_e4m3fn),
                                                            torch.ones(1, 1, 1)), torch.empty(64, 64))
