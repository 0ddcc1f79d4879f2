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
    with pytest.raises(ValueError, match=r"b\[1\]"):
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
