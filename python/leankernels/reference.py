"""Readable pure-PyTorch reference of every leankernels op: the specification.

Tests compare the C++ and CUDA kernels against these functions. They favour clarity over
speed, run on any device, and follow ../DESIGN.md's semantics to the bit where it says so.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-4
GROUP = 128


# ------------------------------------------------------------------------------------ quant
def fp8_scale(amax: torch.Tensor, scale_fmt: str = "fp32") -> torch.Tensor:
    """max(amax, 1e-4) / 448 in fp32; "ue8m0" rounds up to a power of two. NaN/Inf pass through."""
    s = amax.float().clamp_min(SCALE_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
        up = torch.where(mant == 0.5, s, torch.ldexp(torch.ones_like(s), exp))
        s = torch.where(torch.isfinite(s), up, s)
    return s


def quantize_fp8(x: torch.Tensor, block=(1, 128), scale_fmt: str = "fp32"):
    """Block-scaled e4m3 quantization.

    block (1, 128): x [..., K] -> (q [..., K] e4m3, scale [..., ceil(K/128)] fp32).
    block (128, 128): x [(E,) N, K] -> (q, scale [(E,) ceil(N/128), ceil(K/128)]).
    q = e4m3(clamp(x / scale, -448, 448)), round to nearest even. A group holding NaN gets a
    NaN scale and NaN codes; a group holding +-Inf gets scale Inf, so its finite values
    become 0 and its infinities NaN (Inf/Inf).
    """
    block = tuple(block)
    K = x.shape[-1]
    G = math.ceil(K / GROUP)
    xf = x.float()
    if block == (1, GROUP):
        xp = F.pad(xf, (0, G * GROUP - K))
        g = xp.reshape(*x.shape[:-1], G, GROUP)
        scale = fp8_scale(g.abs().amax(dim=-1) if K else g.new_zeros(g.shape[:-1]), scale_fmt)
        q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.reshape(*x.shape[:-1], G * GROUP)[..., :K], scale
    if block == (GROUP, GROUP):
        N = x.shape[-2]
        Nb = math.ceil(N / GROUP)
        lead = x.shape[:-2]
        xp = F.pad(xf, (0, G * GROUP - K, 0, Nb * GROUP - N))
        g = xp.reshape(*lead, Nb, GROUP, G, GROUP)
        amax = g.abs().amax(dim=(-3, -1)) if g.numel() else g.new_zeros((*lead, Nb, G))
        scale = fp8_scale(amax, scale_fmt)
        q = (g / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.reshape(*lead, Nb * GROUP, G * GROUP)[..., :N, :K], scale
    raise ValueError(f"block must be (1, 128) or (128, 128); got {block}")


def expand_scale(scale: torch.Tensor, shape, block=(1, 128)) -> torch.Tensor:
    """Broadcast a block scale tensor to the full element shape it describes."""
    block = tuple(block)
    K = shape[-1]
    s = scale.repeat_interleave(GROUP, dim=-1)[..., :K]
    if block == (GROUP, GROUP):
        s = s.repeat_interleave(GROUP, dim=-2)[..., : shape[-2], :]
    return s


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    """x_fp8.float() * scale broadcast over its block, in fp32."""
    return x_fp8.float() * expand_scale(scale.float(), x_fp8.shape, block)


# ------------------------------------------------------------------------------------- gemm
def _fp8_gemm_rows(a, a_scale, b, b_scale) -> torch.Tensor:
    """fp32 [M, N] = a @ b.T with block scales applied per 128-wide K step (the numerics contract).

    a [M, K] e4m3 with a_scale [M, ceil(K/128)]; b [N, K] e4m3 with b_scale [ceil(N/128), ceil(K/128)].
    For each K block kb: acc += (a_blk.float() @ b_blk.float().T) * (a_scale[:, kb] * b_scale[nb, kb]),
    where the block product is an fp32 sum of exact e4m3 x e4m3 products.
    """
    M, K = a.shape
    N = b.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    bs_rows = b_scale.float().repeat_interleave(GROUP, dim=0)[:N]  # [N, ceil(K/128)]
    for kb in range(math.ceil(K / GROUP)):
        k0, k1 = kb * GROUP, min(K, (kb + 1) * GROUP)
        blk = a[:, k0:k1].float() @ b[:, k0:k1].float().T
        acc += blk * (a_scale[:, kb].float()[:, None] * bs_rows[:, kb][None, :])
    return acc


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """out [M, N] = a @ b.T, FP8 block-scaled (1x128 for a, 128x128 for b), fp32 accumulate."""
    return _fp8_gemm_rows(a, a_scale, b, b_scale).to(out_dtype)


def fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Contiguous grouped GEMM: rows r in [offs[e-1], offs[e]) of a use expert e's b[e].

    a [M_total, K], a_scale [M_total, ceil(K/128)], b [E, N, K], b_scale [E, ceil(N/128), ceil(K/128)],
    offs int32 [E] cumulative END offsets (offs[-1] <= M_total). Rows past offs[-1] are not
    written: they keep the contents of `out` (uninitialised memory when out is None).
    """
    M, E, N = a.shape[0], b.shape[0], b.shape[1]
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    ends = [int(v) for v in offs.tolist()]
    start = 0
    for e in range(E):
        end = ends[e]
        if end > start:
            out[start:end] = _fp8_gemm_rows(a[start:end], a_scale[start:end], b[e], b_scale[e]).to(out.dtype)
        start = max(start, end)
    return out


def fp8_grouped_gemm_masked(a, a_scale, b, b_scale, masked_m, out_dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Masked grouped GEMM: out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T (block-scaled).

    a [E, M_max, K], a_scale [E, M_max, ceil(K/128)], masked_m int32 [E]. Rows at or past
    masked_m[e] (clamped to [0, M_max]) are not written.
    """
    E, M_max = a.shape[0], a.shape[1]
    N = b.shape[1]
    if out is None:
        out = torch.empty(E, M_max, N, dtype=out_dtype, device=a.device)
    for e in range(E):
        m = min(max(int(masked_m[e]), 0), M_max)
        if m:
            out[e, :m] = _fp8_gemm_rows(a[e, :m], a_scale[e, :m], b[e], b_scale[e]).to(out.dtype)
    return out
