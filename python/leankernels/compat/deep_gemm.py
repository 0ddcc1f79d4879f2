"""Drop-in for DeepGEMM's FP8 GEMM Python API (deepseek-ai/DeepGEMM), on any device.

    from leankernels.compat import deep_gemm          # instead of: import deep_gemm

    x_fp8, x_sf = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False)     # 1x128 activations
    w_fp8, w_sf = deep_gemm.per_block_cast_to_fp8(w, use_ue8m0=False)     # 128x128 weights
    d = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    deep_gemm.fp8_gemm_nt((x_fp8, x_sf), (w_fp8, w_sf), d)               # d = x @ w.T
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_sf), (b, b_sf), d, m_indices)
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a, a_sf), (b, b_sf), d, masked_m, expected_m)
    deep_gemm.fp8_gemm_nn / fp8_gemm_tn / fp8_gemm_tt, m_grouped_fp8_gemm_nn_contiguous  # other layouts
    deep_gemm.calc_diff(d, ref), deep_gemm.set_num_sms(n) / get_num_sms()              # test helpers

Same signatures as DeepGEMM (operands as ``(tensor, scale)`` tuples, the output ``d`` passed in
and written in place, nothing returned), backed by leankernels.fp8_gemm / fp8_grouped_gemm /
fp8_grouped_gemm_masked, so the code runs on the CPU and on any sm_80+ GPU.

Scales (the SM90 recipe ``(1, 128, 128)``: 1x128 groups for ``a``, 128x128 blocks for ``b``):

* fp32 scales in any strides: row-major ``[M, ceil(K/128)]``, or DeepGEMM's MN-major
  TMA-aligned layout (``get_mn_major_tma_aligned_tensor``: a transposed view whose M stride is
  1), grouped ones with a leading expert dim;
* packed UE8M0 scales (SM100 style): int32 tensors holding 4 exponent bytes each along K,
  ``[M, ceil(ceil(K/128)/4)]``; they are unpacked to fp32 powers of two;
* ``b``'s scales must be 128x128 blocks ``[(E,) ceil(N/128), ceil(K/128)]``: the SM100 1D1D
  recipe with per-row ``b`` scales ``(1, 1, 128)`` is not supported (ValueError).

``recipe`` may be None or ``(1, 128, 128)``; ``compiled_dims`` and ``disable_ue8m0_cast`` are
accepted and have no effect (scales are used exactly as given: fp32 scales are not rounded to
UE8M0). ``expected_m`` is a scheduling hint in DeepGEMM and is only validated here.

Contiguous layout restriction: DeepGEMM takes ``m_indices`` (expert of each row, -1 = padding);
leankernels' grouped GEMM takes cumulative row offsets. They are converted on the device
without a host sync (cummax + searchsorted), which requires the rows to be sorted by expert
(non-decreasing ``m_indices`` once -1 padding rows are skipped), as DeepGEMM's aligned layout
has them. Padding rows (-1) are computed with the preceding expert's weights (the first
expert's for leading ones); as in DeepGEMM their output rows are unspecified: don't read them.
Unsorted indices raise ValueError on the CPU (and on CUDA with LEANKERNELS_DEBUG=1); the
per-expert alignment of DeepGEMM (128 rows) is not required.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ..gemm import fp8_gemm, fp8_grouped_gemm, fp8_grouped_gemm_masked

GRAN = 128
_FP8 = torch.float8_e4m3fn
_OUT = (torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------ utilities
def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def get_mk_alignment_for_contiguous_layout() -> int:
    """DeepGEMM's per-expert row alignment of the contiguous layout (128). leankernels does not
    need it, but code that pads with it keeps working."""
    return GRAN


def get_m_alignment_for_contiguous_layout() -> int:
    """DeepGEMM's first-release name of get_mk_alignment_for_contiguous_layout (128)."""
    return GRAN


_num_sms: Optional[int] = None


def set_num_sms(num_sms: int) -> None:
    """DeepGEMM's SM budget for its persistent kernels. leankernels' GEMMs size their grids
    from the shapes, so the value is only validated (0 < num_sms <= the device's SMs on CUDA)
    and returned by get_num_sms; it does not limit the kernels."""
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms must be an int >= 1; got {num_sms!r}")
    if torch.cuda.is_available() and num_sms > _device_sms():
        raise ValueError(f"num_sms = {num_sms} exceeds this GPU's {_device_sms()} SMs")
    global _num_sms
    _num_sms = num_sms


def get_num_sms() -> int:
    """The value given to set_num_sms, else the current GPU's SM count (132, an H100's, without
    CUDA, as leankernels.compat.flash_mla assumes)."""
    return _num_sms if _num_sms is not None else _device_sms()


def _device_sms() -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's accuracy metric (deep_gemm.testing.calc_diff): ``1 - 2*sum(x*y) / sum(x^2+y^2)``
    in float64 (0 when both are all zeros); its tests pass GEMMs below 1e-3."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return torch.zeros((), dtype=torch.float64)
    return 1 - 2 * (x * y).sum() / denominator


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up to a multiple of 16 bytes' worth of elements (TMA alignment)."""
    return align(x, 16 // element_size)


def get_mn_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """fp32 scales ``[(E,) M, K']`` as DeepGEMM's MN-major TMA-aligned layout: same values, the
    M dim contiguous and padded to 16 bytes (a transposed view of ``[(E,) K', M_aligned]``)."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    E, m, k = x.shape
    ma = get_tma_aligned_size(m, x.element_size())
    buf = torch.empty(E, k, ma, dtype=x.dtype, device=x.device)
    out = buf[:, :, :m].transpose(1, 2)
    out.copy_(x)
    return out[0] if squeeze else out


get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor   # DeepGEMM's earlier name


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values up to a power of two (UE8M0), exactly, via the exponent bits."""
    bits = x.abs().float().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales ``[..., 4n]`` -> int32 ``[..., n]``, 4 exponent bytes each."""
    if x.dtype != torch.float32 or x.shape[-1] % 4:
        raise ValueError("x must be fp32 with a last dim that is a multiple of 4")
    return (x.contiguous().view(torch.int32) >> 23).to(torch.uint8).view(torch.int32)


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GRAN,
                          use_packed_ue8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's test utility: ``[m, n]`` -> (float8_e4m3fn ``[m, n]``, fp32 ``[m, ceil(n/gran_k)]``).

    Per row and gran_k columns: sf = max(amax, 1e-4) / 448 (rounded up to a power of two with
    use_ue8m0), codes = e4m3(x * (1 / sf)). use_packed_ue8m0 returns the scales packed into
    int32 (padded with 1.0 to a multiple of 4 groups).
    """
    _checks.tensor("x", x, (torch.float32, torch.bfloat16, torch.float16), dim=2)
    gran_k = _gran(gran_k)
    m, n = x.shape
    pn = align(n, gran_k)
    xp = torch.zeros(m, pn, dtype=x.dtype, device=x.device)
    xp[:, :n] = x
    xv = xp.view(m, pn // gran_k, gran_k)
    sf = xv.abs().float().amax(dim=2).clamp(1e-4) / 448.0
    if use_ue8m0 or use_packed_ue8m0:
        sf = ceil_to_ue8m0(sf)
    x_fp8 = (xv * (1.0 / sf.unsqueeze(2))).to(_FP8).view(m, pn)[:, :n].contiguous()
    if use_packed_ue8m0:
        g = sf.shape[-1]
        if g % 4:
            sf = torch.nn.functional.pad(sf, (0, align(g, 4) - g), value=1.0)
        return x_fp8, pack_ue8m0_to_int(sf)
    return x_fp8, sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GRAN) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's test utility: ``[m, n]`` -> (float8_e4m3fn ``[m, n]``, fp32
    ``[ceil(m/gran_k), ceil(n/gran_k)]``), one scale per gran_k x gran_k block (zero padded)."""
    _checks.tensor("x", x, (torch.float32, torch.bfloat16, torch.float16), dim=2)
    gran_k = _gran(gran_k)
    m, n = x.shape
    xp = torch.zeros(align(m, gran_k), align(n, gran_k), dtype=x.dtype, device=x.device)
    xp[:m, :n] = x
    xv = xp.view(-1, gran_k, xp.shape[1] // gran_k, gran_k)
    sf = xv.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4) / 448.0
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    x_fp8 = (xv * (1.0 / sf)).to(_FP8).view_as(xp)[:m, :n].contiguous()
    return x_fp8, sf.view(xv.shape[0], xv.shape[2])


# ------------------------------------------------------------------------------- operands
def _gran(gran_k) -> int:
    if isinstance(gran_k, bool) or not isinstance(gran_k, int) or gran_k < 1:
        raise ValueError(f"gran_k must be an int >= 1; got {gran_k!r}")
    return gran_k


def _recipe(recipe) -> None:
    if recipe is not None and (not isinstance(recipe, (tuple, list)) or tuple(recipe) != (1, GRAN, GRAN)):
        raise ValueError(f"recipe must be None or (1, 128, 128) (1x128 a scales, 128x128 b blocks); got {recipe!r}")


def _scales(name: str, sf: torch.Tensor, lead: tuple, kb: int) -> torch.Tensor:
    """fp32 scales of shape lead + (kb,) (any strides), or packed UE8M0 int32 lead + (ceil(kb/4),)."""
    _checks.tensor(name, sf, (torch.float32, torch.int32))
    if sf.dtype == torch.int32:
        _checks.shape(name, sf, (*lead, ceil_div(kb, 4)))
        exps = sf.contiguous().view(torch.uint8).reshape(*lead, -1)[..., :kb].to(torch.int32)
        return (exps << 23).view(torch.float32)
    _checks.shape(name, sf, (*lead, kb))
    return sf


def _pair(name: str, t):
    if not isinstance(t, (tuple, list)) or len(t) != 2:
        raise TypeError(f"{name} must be a (tensor, scale) tuple, as in DeepGEMM; got {type(t).__name__}")
    x, sf = t
    _checks.tensor(f"{name}[0]", x, (_FP8,))
    return x, sf


def _a_b(a, b, a_dims: int, b_dims: int):
    a, sa = _pair("a", a)
    b, sb = _pair("b", b)
    _checks.tensor("a[0]", a, (_FP8,), a_dims)
    _checks.tensor("b[0]", b, (_FP8,), b_dims)
    K = a.shape[-1]
    if b.shape[-1] != K:
        raise ValueError(f"b[0] has K = {b.shape[-1]} but a[0] has K = {K} (NT layout: both K-major)")
    kb = ceil_div(K, GRAN)
    sa = _scales("a[1]", sa, tuple(a.shape[:-1]), kb)
    N = b.shape[-2]
    if isinstance(sb, torch.Tensor) and sb.dim() == b.dim() and sb.shape[-2] == N and N != ceil_div(N, GRAN):
        raise ValueError("b[1] has one scale per row of b (the SM100 (1, 1, 128) recipe): pass recipe=(1, 1, 128) "
                         "to fp8_gemm_nt, or 128x128 weight blocks: b[1] of shape [(E,) ceil(N/128), ceil(K/128)] "
                         "(per_block_cast_to_fp8)")
    sb = _scales("b[1]", sb, (*b.shape[:-2], ceil_div(N, GRAN)), kb)
    return a, sa, b, sb, N


def _out(d: torch.Tensor, shape: tuple, device) -> torch.Tensor:
    _checks.tensor("d", d, _OUT)
    _checks.shape("d", d, shape)
    if d.device != device:
        raise ValueError(f"d is on {d.device} but a is on {device}; all tensors must share one device")
    return d


def _debug(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _checks.debug()


# ------------------------------------------------------------------------------ the GEMMs
def fp8_gemm_nt(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: Optional[torch.Tensor] = None, recipe: Optional[Tuple[int, int, int]] = None,
                compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b.T`` (``+ c``): a = (float8_e4m3fn ``[M, K]``, scales ``[M, ceil(K/128)]``),
    b = (float8_e4m3fn ``[N, K]``, scales ``[ceil(N/128), ceil(K/128)]``), d ``[M, N]`` bf16
    or fp32, written in place. c (optional, fp32 ``[M, N]``, d must then be fp32) is added
    (DeepGEMM's accumulate form; c may be d itself)."""
    _recipe(recipe)
    a, sa, b, sb, N = _a_b(a, b, 2, 2)
    d = _out(d, (a.shape[0], N), a.device)
    if c is not None:
        _checks.tensor("c", c, (torch.float32,))
        _checks.shape("c", c, tuple(d.shape))
        if d.dtype != torch.float32:
            raise TypeError("d must be float32 when c is given (fp32 accumulation, as in DeepGEMM)")
    y = fp8_gemm(a, sa, b, sb, torch.float32 if (c is not None or d.dtype == torch.float32) else torch.bfloat16)
    if c is not None:
        y = y + c
    d.copy_(y)


def _m_indices_to_offs(m_indices: torch.Tensor, E: int) -> torch.Tensor:
    eff = torch.cummax(m_indices, dim=0).values                     # -1 padding -> previous expert
    experts = torch.arange(E, dtype=eff.dtype, device=eff.device)
    return torch.searchsorted(eff.contiguous(), experts, right=True).to(torch.int32)


def m_grouped_fp8_gemm_nt_contiguous(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, m_indices: torch.Tensor,
                                     recipe: Optional[Tuple[int, int, int]] = None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False) -> None:
    """Grouped GEMM, contiguous layout: ``d[r] = a[r] @ b[m_indices[r]].T``.

    a = (``[M, K]``, ``[M, ceil(K/128)]``), b = (``[E, N, K]``, ``[E, ceil(N/128), ceil(K/128)]``),
    d ``[M, N]`` bf16/fp32, m_indices int32 ``[M]`` (expert per row, -1 = padding row), rows
    sorted by expert (see the module notes: no host sync, padding rows unspecified).
    """
    _recipe(recipe)
    a, sa, b, sb, N = _a_b(a, b, 2, 3)
    E, M = b.shape[0], a.shape[0]
    d = _out(d, (M, N), a.device)
    _checks.tensor("m_indices", m_indices, (torch.int32, torch.int64), dim=1)
    _checks.shape("m_indices", m_indices, (M,))
    _checks.same_device(a=a, m_indices=m_indices)
    if _debug(m_indices):
        mi = m_indices.cpu()
        if bool(((mi < -1) | (mi >= E)).any()):
            raise ValueError(f"m_indices values must lie in [-1, {E}) (expert id, -1 = padding)")
        valid = mi[mi >= 0]
        if bool((valid[1:] < valid[:-1]).any()):
            raise ValueError("m_indices must be sorted by expert (non-decreasing, -1 padding rows anywhere); "
                             "leankernels converts them to group offsets on the device")
    offs = _m_indices_to_offs(m_indices, E)
    if d.is_contiguous():
        fp8_grouped_gemm(a, sa, b, sb, offs, out=d)
    else:
        d.copy_(fp8_grouped_gemm(a, sa, b, sb, offs, d.dtype))


def m_grouped_fp8_gemm_nt_masked(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor],
                                 d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                 recipe: Optional[Tuple[int, int, int]] = None, compiled_dims: str = "nk",
                                 disable_ue8m0_cast: bool = False) -> None:
    """Grouped GEMM, masked layout: ``d[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T``.

    a = (``[E, M_max, K]``, ``[E, M_max, ceil(K/128)]``), b = (``[E, N, K]``,
    ``[E, ceil(N/128), ceil(K/128)]``), d ``[E, M_max, N]``, masked_m int32 ``[E]`` on the
    device (read there: no host sync; CUDA-graph safe). Rows past masked_m[e] are not written.
    expected_m: DeepGEMM's scheduling hint (an int >= 0); validated, otherwise unused.
    """
    _recipe(recipe)
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m must be an int >= 0; got {expected_m!r}")
    a, sa, b, sb, N = _a_b(a, b, 3, 3)
    d = _out(d, (a.shape[0], a.shape[1], N), a.device)
    if isinstance(masked_m, torch.Tensor) and masked_m.dtype == torch.int32 and masked_m.numel() and _debug(masked_m):
        # leankernels.fp8_grouped_gemm_masked reads masked_m on the host only with
        # LEANKERNELS_DEBUG=1; this shim keeps checking CPU values, like its m_indices.
        mm = masked_m.cpu()
        if int(mm.min()) < 0 or int(mm.max()) > a.shape[1]:
            raise ValueError(f"masked_m values must lie in [0, M_max={a.shape[1]}]; got {mm.tolist()}")
    if d.is_contiguous():
        fp8_grouped_gemm_masked(a, sa, b, sb, masked_m, out=d)
    else:
        tmp = d.contiguous()
        fp8_grouped_gemm_masked(a, sa, b, sb, masked_m, out=tmp)
        d.copy_(tmp)


# The other layouts: DeepGEMM's nn / tn / tt take the transposed operand as a K-by-MN tensor
# (MN-major), its scales transposed the same way, and are views onto the NT GEMM. The letter
# pairs name a then b: "n" = as stored for NT (a [M, K], b [N, K]), "t" = transposed
# (a [K, M] with scales [ceil(K/128), M]; b [K, N] with scales [ceil(K/128), ceil(N/128)]).
def _t(name: str, t):
    x, sf = _pair(name, t)
    if x.dim() != 2 or not isinstance(sf, torch.Tensor) or sf.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (tensor, scale) pair; got {tuple(x.shape)}")
    return x.t(), sf.t()


def fp8_gemm_nn(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: Optional[torch.Tensor] = None, recipe: Optional[Tuple[int, int, int]] = None,
                compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b`` (``+ c``): a = (``[M, K]``, ``[M, ceil(K/128)]``), b = (``[K, N]``,
    ``[ceil(K/128), ceil(N/128)]``); otherwise as fp8_gemm_nt."""
    fp8_gemm_nt(a, _t("b", b), d, c=c, recipe=recipe, compiled_dims=compiled_dims,
                disable_ue8m0_cast=disable_ue8m0_cast)


def fp8_gemm_tn(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: Optional[torch.Tensor] = None, recipe: Optional[Tuple[int, int, int]] = None,
                compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = a.T @ b`` (``+ c``): a = (``[K, M]``, ``[ceil(K/128), M]``), b = (``[K, N]``,
    ``[ceil(K/128), ceil(N/128)]``); otherwise as fp8_gemm_nt."""
    fp8_gemm_nt(_t("a", a), _t("b", b), d, c=c, recipe=recipe, compiled_dims=compiled_dims,
                disable_ue8m0_cast=disable_ue8m0_cast)


def fp8_gemm_tt(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: Optional[torch.Tensor] = None, recipe: Optional[Tuple[int, int, int]] = None,
                compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = a.T @ b.T`` (``+ c``): a = (``[K, M]``, ``[ceil(K/128), M]``), b = (``[N, K]``,
    ``[ceil(N/128), ceil(K/128)]``); otherwise as fp8_gemm_nt."""
    fp8_gemm_nt(_t("a", a), b, d, c=c, recipe=recipe, compiled_dims=compiled_dims,
                disable_ue8m0_cast=disable_ue8m0_cast)


def m_grouped_fp8_gemm_nn_contiguous(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, m_indices: torch.Tensor,
                                     recipe: Optional[Tuple[int, int, int]] = None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False) -> None:
    """m_grouped_fp8_gemm_nt_contiguous with b stored N-major: b = (``[E, K, N]``,
    ``[E, ceil(K/128), ceil(N/128)]``), ``d[r] = a[r] @ b[m_indices[r]]``."""
    bx, bsf = _pair("b", b)
    if bx.dim() != 3 or not isinstance(bsf, torch.Tensor) or bsf.dim() != 3:
        raise ValueError(f"b must be a 3-D (tensor, scale) pair [E, K, N]; got {tuple(bx.shape)}")
    m_grouped_fp8_gemm_nt_contiguous(a, (bx.transpose(1, 2), bsf.transpose(1, 2)), d, m_indices, recipe=recipe,
                                     compiled_dims=compiled_dims, disable_ue8m0_cast=disable_ue8m0_cast)


# DeepGEMM's first-release names (bf16 output)
def gemm_fp8_fp8_bf16_nt(lhs, rhs, out) -> None:
    fp8_gemm_nt(lhs, rhs, out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices) -> None:
    m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m) -> None:
    m_grouped_fp8_gemm_nt_masked(lhs, rhs, out, masked_m, expected_m)


__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "per_token_cast_to_fp8", "per_block_cast_to_fp8", "ceil_to_ue8m0", "pack_ue8m0_to_int",
           "get_mk_alignment_for_contiguous_layout", "get_tma_aligned_size", "get_mn_major_tma_aligned_tensor",
           "get_col_major_tma_aligned_tensor", "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
           "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "ceil_div", "align",
           "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nn_contiguous",
           "get_m_alignment_for_contiguous_layout", "set_num_sms", "get_num_sms", "calc_diff"]


# ========================================================================================
# Training: weight-gradient (k-grouped) GEMMs, on leankernels.fp8_k_grouped_gemm.
#
# DeepGEMM's wgrad GEMMs contract over tokens with 1x128 scales along tokens on BOTH operands
# (recipe (1, 1, 128)). leankernels.fp8_k_grouped_gemm takes a [M, L] and b [N, L] (token-major
# rows) with per-row scales [M, ceil(L/128) + E - 1] (quantize_fp8_transposed's layout: group j
# of expert e in column floor(start_e/128) + e + j). DeepGEMM's scales have one row per group,
# [sum_e ceil(k_e/128), mn], so they are scattered into that layout with indices built from the
# host-side group sizes these APIs take (ks / batch_sizes: a Python list, as in DeepGEMM; no
# device sync). DeepGEMM's per-group K alignment (128) is not required. Outputs are fp32 and
# accumulate: d = c + a.T @ b per group (tn / nt), out += ... (first-release wgrad names).
from itertools import accumulate as _accumulate  # noqa: E402
from typing import List  # noqa: E402

from .. import _ops  # noqa: E402
from ..gemm import fp8_k_grouped_gemm  # noqa: E402

_RECIPE_1D1D = (1, 1, GRAN)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = GRAN) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's test utility: ``[k, mn]`` -> (float8_e4m3fn ``[k, mn]``, fp32 ``[ceil(k/gran_k), mn]``),
    one scale per gran_k consecutive rows of each column (groups along dim 0), same formula as
    per_token_cast_to_fp8."""
    _checks.tensor("x", x, (torch.float32, torch.bfloat16, torch.float16), dim=2)
    q, sf = per_token_cast_to_fp8(x.T, use_ue8m0=use_ue8m0, gran_k=gran_k)
    return q.T.contiguous(), sf.T.contiguous()


def _group_sizes_list(name: str, ks) -> List[int]:
    if isinstance(ks, torch.Tensor) or not isinstance(ks, (list, tuple)) or \
            not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks) or not ks:
        raise TypeError(f"{name} must be a non-empty list of ints >= 0 (per-group K, on the host); got {ks!r}")
    return list(ks)


def _k_grouped_scales(name: str, sf, ks: List[int], mn: int, device, rows_first: bool) -> torch.Tensor:
    """DeepGEMM's per-group scale rows, ``[sum ceil(k_e/128), mn]`` (or that transposed; the API's
    documented form first when both fit, see rows_first), as leankernels' k-grouped layout
    ``[mn, ceil(sum(ks)/128) + E - 1]`` (unused columns 0)."""
    rows = sum(ceil_div(k, GRAN) for k in ks)
    _checks.tensor(name, sf, (torch.float32,), dim=2)
    shape = tuple(sf.shape)
    if shape == (rows, mn) and (rows_first or shape != (mn, rows)):
        sf = sf.T
    elif shape != (mn, rows):
        raise ValueError(f"{name} must have shape {(rows, mn)} (one row per 128-wide group of each K group) "
                         f"or its transpose; got {tuple(sf.shape)}")
    if sf.device != device:
        raise ValueError(f"{name} is on {sf.device} but the data is on {device}")
    src, dst, start, row = [], [], 0, 0
    for e, k in enumerate(ks):
        n = ceil_div(k, GRAN)
        first = start // GRAN + e
        dst.extend(range(first, first + n))
        src.extend(range(row, row + n))
        start, row = start + k, row + n
    out = torch.zeros(mn, _ops.k_group_columns(start, len(ks)), dtype=torch.float32, device=device)
    if src:
        out[:, torch.tensor(dst, device=device)] = sf[:, torch.tensor(src, device=device)]
    return out


def _offs(ks: List[int], device) -> torch.Tensor:
    return torch.tensor(list(_accumulate(ks)), dtype=torch.int32).to(device)


def _flat_groups(name: str, x, ks: List[int], mn: int) -> torch.Tensor:
    """A flat fp8 tensor of per-group ``[mn, k_e]`` row-major blocks -> ``[mn, sum(ks)]``."""
    _checks.tensor(name, x, (_FP8,))
    x = x.reshape(-1)
    if x.numel() != mn * sum(ks):
        raise ValueError(f"{name} must hold sum(mn * k for k in ks) = {mn * sum(ks)} elements; got {x.numel()}")
    parts, p = [], 0
    for k in ks:
        parts.append(x[p:p + mn * k].view(mn, k))
        p += mn * k
    return torch.cat([t.view(torch.uint8) for t in parts], dim=1).view(_FP8)   # bytes: torch 2.4 has no float8 cat


def _k_grouped_into(name: str, d, c, shape, a, sa, b, sb, offs=None) -> None:
    """d = c + fp8_k_grouped_gemm(a, sa, b, sb, offs), the product of ``shape`` (c None: d = the
    product; c may be d itself). Straight into d (no temporary) when d is a contiguous fp32
    tensor on a's device and c is None or d: the accumulating store adds each element's whole
    sum once, the same value as c + product."""
    _checks.tensor(name, d, (torch.float32,))
    _checks.shape(name, d, tuple(shape))
    if d.device != a.device:
        raise ValueError(f"{name} is on {d.device} but a is on {a.device}; all tensors must share one device")
    if c is not None:
        _checks.tensor("c", c, (torch.float32,))
        _checks.shape("c", c, tuple(shape))
    if d.is_contiguous() and (c is None or c is d):
        fp8_k_grouped_gemm(a, sa, b, sb, offs, out=d, accumulate=c is not None)
        return
    y = fp8_k_grouped_gemm(a, sa, b, sb, offs)
    d.copy_(y if c is None else c + y)


def _recipe_1d1d(recipe) -> None:
    if recipe is not None and (not isinstance(recipe, (tuple, list)) or tuple(recipe) != _RECIPE_1D1D):
        raise ValueError(f"recipe must be (1, 1, 128) for the k-grouped GEMMs (1x128 scales along K on both "
                         f"operands); got {recipe!r}")


def k_grouped_fp8_gemm_tn_contiguous(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, ks: List[int], ks_tensor: torch.Tensor,
                                     c: Optional[torch.Tensor] = None, recipe: Tuple[int, int, int] = _RECIPE_1D1D,
                                     compiled_dims: str = "mn") -> None:
    """k-grouped GEMM, MN-major operands: ``d[g] = c[g] + a[K_g].T @ b[K_g]`` for each group g of
    K rows (the weight gradient of a grouped linear layer).

    a = (float8_e4m3fn ``[K, m]``, fp32 ``[sum ceil(k_g/128), m]``), b = (``[K, n]``,
    ``[sum ceil(k_g/128), n]``) as per_channel_cast_to_fp8 gives per group; ks: the groups' K
    (host list, K = sum(ks)); ks_tensor: the same as int32 on the device (validated, unused);
    d fp32 ``[G, m, n]`` written; c optional fp32 ``[G, m, n]`` added (may be d)."""
    _recipe_1d1d(recipe)
    ks = _group_sizes_list("ks", ks)
    a, sa = _pair("a", a)
    b, sb = _pair("b", b)
    _checks.tensor("a[0]", a, (_FP8,), 2)
    _checks.tensor("b[0]", b, (_FP8,), 2)
    _checks.tensor("ks_tensor", ks_tensor, (torch.int32,), 1)
    _checks.shape("ks_tensor", ks_tensor, (len(ks),))
    if a.shape[0] != sum(ks) or b.shape[0] != sum(ks):
        raise ValueError(f"a[0] and b[0] must have sum(ks) = {sum(ks)} rows; got {a.shape[0]} and {b.shape[0]}")
    m, n = a.shape[1], b.shape[1]
    offs = _offs(ks, a.device)
    _k_grouped_into("d", d, c, (len(ks), m, n), a.T, _k_grouped_scales("a[1]", sa, ks, m, a.device, True),
                    b.T, _k_grouped_scales("b[1]", sb, ks, n, a.device, True), offs)


def k_grouped_fp8_gemm_nt_contiguous(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, ks: List[int], ks_tensor: torch.Tensor,
                                     c: Optional[torch.Tensor] = None, recipe: Tuple[int, int, int] = _RECIPE_1D1D,
                                     compiled_dims: str = "nk") -> None:
    """k-grouped GEMM, K-major operands (DeepGEMM's SM90 form): as the tn variant, but a[0] is a
    flat fp8 tensor of the groups' ``[m, k_g]`` row-major blocks one after another
    (``sum(m * k_g)`` elements), a[1] fp32 ``[m, sum ceil(k_g/128)]`` (or its transpose); b alike
    with n."""
    _recipe_1d1d(recipe)
    ks = _group_sizes_list("ks", ks)
    a, sa = _pair("a", a)
    b, sb = _pair("b", b)
    _checks.tensor("ks_tensor", ks_tensor, (torch.int32,), 1)
    _checks.shape("ks_tensor", ks_tensor, (len(ks),))
    _checks.tensor("d", d, (torch.float32,), 3)
    m, n = d.shape[1], d.shape[2]
    A, B = _flat_groups("a[0]", a, ks, m), _flat_groups("b[0]", b, ks, n)
    _k_grouped_into("d", d, c, (len(ks), m, n), A, _k_grouped_scales("a[1]", sa, ks, m, a.device, False),
                    B, _k_grouped_scales("b[1]", sb, ks, n, a.device, False), _offs(ks, a.device))


def wgrad_gemm_fp8_fp8_fp32_nt(lhs: Tuple[torch.Tensor, torch.Tensor], rhs: Tuple[torch.Tensor, torch.Tensor],
                               out: torch.Tensor) -> None:
    """DeepGEMM's first-release weight-gradient GEMM: ``out += lhs @ rhs.T`` (fp32), lhs =
    (float8_e4m3fn ``[m, k]``, fp32 ``[m, ceil(k/128)]`` or ``[ceil(k/128), m]``), rhs = (``[n, k]``,
    ``[n, ceil(k/128)]`` or transposed): 1x128 scales along k on both operands."""
    a, sa = _pair("lhs", lhs)
    b, sb = _pair("rhs", rhs)
    _checks.tensor("lhs[0]", a, (_FP8,), 2)
    _checks.tensor("rhs[0]", b, (_FP8,), 2)
    k = a.shape[1]
    _k_grouped_into("out", out, out, (a.shape[0], b.shape[0]), a,
                    _k_grouped_scales("lhs[1]", sa, [k], a.shape[0], a.device, False),
                    b, _k_grouped_scales("rhs[1]", sb, [k], b.shape[0], a.device, False))


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs: Tuple[torch.Tensor, torch.Tensor],
                                         rhs: Tuple[torch.Tensor, torch.Tensor],
                                         out: torch.Tensor, batch_sizes: List[int]) -> None:
    """DeepGEMM's first-release k-grouped wgrad: ``out[i] += lhs_i @ rhs_i.T`` (fp32) per batch i,
    lhs = (flat float8_e4m3fn of the batches' ``[m, k_i]`` blocks, fp32 ``[sum ceil(k_i/128), m]``),
    rhs alike with n; out fp32 ``[num_batches, m, n]``; batch_sizes: the k_i (host list)."""
    ks = _group_sizes_list("batch_sizes", batch_sizes)
    a, sa = _pair("lhs", lhs)
    b, sb = _pair("rhs", rhs)
    _checks.tensor("out", out, (torch.float32,), 3)
    if out.shape[0] != len(ks):
        raise ValueError(f"out has {out.shape[0]} batches but batch_sizes has {len(ks)}")
    m, n = out.shape[1], out.shape[2]
    A, B = _flat_groups("lhs[0]", a, ks, m), _flat_groups("rhs[0]", b, ks, n)
    _k_grouped_into("out", out, out, (len(ks), m, n), A, _k_grouped_scales("lhs[1]", sa, ks, m, a.device, True),
                    B, _k_grouped_scales("rhs[1]", sb, ks, n, a.device, True), _offs(ks, a.device))


_fp8_gemm_nt_blocks = fp8_gemm_nt  # the (1, 128, 128) form above


def fp8_gemm_nt(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: Optional[torch.Tensor] = None, recipe: Optional[Tuple[int, int, int]] = None,
                compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b.T`` (``+ c``). recipe None or (1, 128, 128): b with 128x128 block scales (see
    above). recipe (1, 1, 128) (DeepGEMM's 1D1D / wgrad recipe): b = (float8_e4m3fn ``[N, K]``,
    per-row fp32 scales ``[N, ceil(K/128)]``), computed by fp8_k_grouped_gemm (fp32
    accumulation, d fp32 or bf16; c fp32 added, d fp32 then)."""
    if recipe is None or not isinstance(recipe, (tuple, list)) or tuple(recipe) != _RECIPE_1D1D:
        _fp8_gemm_nt_blocks(a, b, d, c, recipe, compiled_dims, disable_ue8m0_cast)
        return
    a, sa = _pair("a", a)
    b, sb = _pair("b", b)
    _checks.tensor("a[0]", a, (_FP8,), 2)
    _checks.tensor("b[0]", b, (_FP8,), 2)
    K = a.shape[1]
    if b.shape[1] != K:
        raise ValueError(f"b[0] has K = {b.shape[1]} but a[0] has K = {K} (NT layout: both K-major)")
    M, N, kb = a.shape[0], b.shape[0], ceil_div(K, GRAN)
    sa = _scales("a[1]", sa, (M,), kb)
    if not isinstance(sb, torch.Tensor) or tuple(sb.shape[:1]) != (N,):
        raise ValueError(f"recipe (1, 1, 128) needs per-row b scales: b[1] of shape {(N, kb)}; got "
                         f"{tuple(sb.shape) if isinstance(sb, torch.Tensor) else type(sb).__name__}")
    sb = _scales("b[1]", sb, (N,), kb)
    d = _out(d, (M, N), a.device)
    if c is not None and d.dtype != torch.float32:
        raise TypeError("d must be float32 when c is given (fp32 accumulation, as in DeepGEMM)")
    y = fp8_k_grouped_gemm(a, sa, b, sb)
    if c is not None:
        _checks.tensor("c", c, (torch.float32,))
        _checks.shape("c", c, (M, N))
        y = y + c
    d.copy_(y)


__all__ += ["per_channel_cast_to_fp8", "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous",
            "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt"]
