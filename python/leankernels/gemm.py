"""FP8 (e4m3) block-scaled GEMMs: dense, grouped-contiguous (MoE prefill) and grouped-masked
(MoE decode). The public wrappers: validation, then one torch op each.

Numerics (all three ops, every device): ``out = a @ b.T`` (NT layout, both operands K-major)
with a's 1x128 scales and b's 128x128 scales applied per 128-wide K step to an fp32
accumulator::

    acc[m, n] += (a[m, kblk] . b[n, kblk] in fp32) * (a_scale[m, kb] * b_scale[n // 128, kb])

See ``reference.fp8_gemm`` for the specification. K and N need not be multiples of 128.
"""
from __future__ import annotations

import torch

from . import _checks, _interop, _ops
from ._lib import FP8, GROUP

_OUT_DTYPES = (torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_Tensor, _Parameter, _F32 = torch.Tensor, torch.nn.Parameter, torch.float32


def _check_values() -> bool:
    """Whether to inspect the device-resident group sizes (offs, masked_m) on the host: only with
    LEANKERNELS_DEBUG=1 (a copy to the host, a synchronisation on CUDA, ~40 us even on the CPU),
    never while torch.compile traces (data-dependent). Unchecked values are safe: the CPU and
    CUDA kernels clamp every end / count to [0, rows] and give row r to the first expert whose
    (running-maximum) end exceeds r, so no value reads or writes outside a, out or b.
    The variable is read on every call (a test or a user may set it at run time)."""
    return _checks.debug() and not torch.compiler.is_compiling()


def _check_ends(offs: torch.Tensor, rows: int, what: str) -> None:
    """LEANKERNELS_DEBUG=1: offs must be non-decreasing cumulative ends in [0, rows]."""
    ends = offs.cpu()
    if bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0:
        raise ValueError(f"offs must be non-decreasing and >= 0 (cumulative end offsets); got {ends.tolist()}")
    if int(ends[-1]) > rows:
        raise ValueError(f"offs[-1] = {int(ends[-1])} exceeds {what} ({rows})")


def _out_dtype(out_dtype) -> torch.dtype:
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16 or torch.float32; got {out_dtype!r}")
    return out_dtype


def _operands(a, a_scale, b, b_scale, a_dims: int, b_dims: int):
    """Validate the four GEMM operands; returns them as torch tensors and (N, K)."""
    # NOTES: the common case (CPU tensors, weights possibly Parameters, right dtypes, dims and
    # scale shapes) in one expression: a decode-size call's checks 3.1 -> ~1 us (2-core Xeon VM).
    # Anything else, CUDA included, takes the full checks below, which name the argument.
    if ((type(a) is _Tensor and type(a_scale) is _Tensor and (type(b) is _Tensor or type(b) is _Parameter)
         and (type(b_scale) is _Tensor or type(b_scale) is _Parameter))
            and a.dtype is FP8 and b.dtype is FP8 and a_scale.dtype is _F32 and b_scale.dtype is _F32
            and a.is_cpu and a_scale.is_cpu and b.is_cpu and b_scale.is_cpu
            and a.dim() == a_dims and b.dim() == b_dims and a_scale.dim() == a_dims and b_scale.dim() == b_dims):
        sa, sb, ss, st = a.shape, b.shape, a_scale.shape, b_scale.shape
        K, N = sa[-1], sb[-2]
        kb = -(-K // GROUP)
        if (sb[-1] == K and ss[-1] == kb and ss[:-1] == sa[:-1] and st[-1] == kb and st[-2] == -(-N // GROUP)
                and st[:-2] == sb[:-2]):
            return a, a_scale, b, b_scale, N, K
    a = _interop.to_torch(a, fp8=True)
    a_scale = _interop.to_torch(a_scale)
    b = _interop.to_torch(b, fp8=True)
    b_scale = _interop.to_torch(b_scale)
    _checks.tensor("a", a, (FP8,), a_dims)
    _checks.tensor("a_scale", a_scale, (torch.float32,))
    _checks.tensor("b", b, (FP8,), b_dims)
    _checks.tensor("b_scale", b_scale, (torch.float32,))
    _checks.same_device2("a", a, "a_scale", a_scale)
    _checks.same_device2("a", a, "b", b)
    _checks.same_device2("a", a, "b_scale", b_scale)
    K = a.shape[-1]
    N, Kb = b.shape[-2], b.shape[-1]
    if Kb != K:
        raise ValueError(f"b has K = {Kb} but a has K = {K}; a is [..., K] and b is [..., N, K] (both K-major)")
    _checks.shape("a_scale", a_scale, (*a.shape[:-1], _cdiv(K, GROUP)))
    _checks.shape("b_scale", b_scale, (*b.shape[:-2], _cdiv(N, GROUP), _cdiv(K, GROUP)))
    return a, a_scale, b, b_scale, N, K


def _group_sizes(name: str, t, a: torch.Tensor, E: int) -> torch.Tensor:
    if type(t) is _Tensor and t.dtype is torch.int32 and t.dim() == 1 and t.shape[0] == E and t.is_cpu and a.is_cpu:
        return t  # the common case (see _operands)
    t = _interop.to_torch(t)
    _checks.tensor(name, t, (torch.int32,), 1)
    _checks.same_device2("a", a, name, t)
    _checks.shape(name, t, (E,))
    return t


def _check_out(out, shape, device) -> torch.Tensor:
    _checks.tensor("out", out, _OUT_DTYPES)
    _checks.shape("out", out, shape)
    if out.device != device:
        raise ValueError(f"out is on {out.device} but a is on {device}; all tensors must share one device")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernel writes rows in place)")
    return out


def fp8_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.bfloat16):
    """Dense FP8 GEMM: ``out = a @ b.T`` with block scales.

    Args:
        a: float8_e4m3fn ``[M, K]`` (activations, quantized with ``quantize_fp8(x, (1, 128))``),
            or ``[..., K]``: leading dims are flattened into M and restored in the output (as
            DeepSeek-V3's ``kernel.fp8_gemm`` does).
        a_scale: float32 ``[M, ceil(K/128)]`` (``[..., ceil(K/128)]`` matching a).
        b: float8_e4m3fn ``[N, K]`` (weights, ``quantize_fp8(w, (128, 128))``).
        b_scale: float32 ``[ceil(N/128), ceil(K/128)]``.
        out_dtype: ``torch.bfloat16`` (default) or ``torch.float32``.

    Returns:
        ``[M, N]`` (``[..., N]``) tensor of ``out_dtype``. Any strides are accepted (non-contiguous
        operands are copied); CuPy arrays (FP8 as uint8) are accepted and give a CuPy array back.
    """
    src = a
    out_dtype = _out_dtype(out_dtype)
    a, a_scale = _interop.to_torch(a, fp8=True), _interop.to_torch(a_scale)
    lead = None
    if isinstance(a, torch.Tensor) and a.dim() > 2:
        lead = tuple(a.shape[:-1])
        _checks.tensor("a_scale", a_scale, (torch.float32,))
        _checks.shape("a_scale", a_scale, (*lead, _cdiv(a.shape[-1], GROUP)))
        a, a_scale = a.reshape(-1, a.shape[-1]), a_scale.reshape(-1, a_scale.shape[-1])
    a, a_scale, b, b_scale, N, K = _operands(a, a_scale, b, b_scale, 2, 2)
    op = _ops.fp8_gemm_impl if _ops.direct(a, a_scale, b, b_scale) else _ops.fp8_gemm
    out = op(a, a_scale, b, b_scale, out_dtype)
    return _interop.like_input(out if lead is None else out.view(*lead, N), src)


def fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype = torch.bfloat16, out=None):
    """Grouped FP8 GEMM, contiguous layout (MoE prefill / training forward).

    Rows of ``a`` are sorted by expert: rows ``[offs[e-1], offs[e])`` (with ``offs[-1]`` read as
    0 for e = 0) are multiplied by expert ``e``'s weights: ``out[r] = a[r] @ b[e].T``. No
    per-expert padding is required; experts may have zero rows.

    Args:
        a: float8_e4m3fn ``[M_total, K]``; a_scale: float32 ``[M_total, ceil(K/128)]``.
        b: float8_e4m3fn ``[E, N, K]``; b_scale: float32 ``[E, ceil(N/128), ceil(K/128)]``.
        offs: int32 ``[E]``, cumulative END offsets (``F.grouped_mm`` convention), on a's
            device, non-decreasing, ``offs[-1] <= M_total``. offs stays on the device and is
            not read on the host (no synchronisation, no copy): monotonicity and the bound are
            checked (ValueError) only with ``LEANKERNELS_DEBUG=1``, on any device. Unchecked
            bad offs never cause out-of-bounds access: the kernels clamp ends to
            ``[0, M_total]`` and give row r to the first expert whose end (running maximum)
            exceeds r, as ``reference.fp8_grouped_gemm`` does.
        out_dtype: ``torch.bfloat16`` (default) or ``torch.float32`` (ignored when ``out`` is given).
        out: optional contiguous ``[M_total, N]`` bf16/fp32 tensor written in place. Rows past
            ``offs[-1]`` are left untouched, so the caller controls them (and no zero fill is
            paid). Without ``out`` those rows of the new tensor are zero.

    Returns:
        ``[M_total, N]`` (``out`` itself when given).
    """
    src = a
    a, a_scale, b, b_scale, N, K = _operands(a, a_scale, b, b_scale, 2, 3)
    E = b.shape[0]
    offs = _group_sizes("offs", offs, a, E)
    if E == 0:
        raise ValueError("b must hold at least one expert (E >= 1)")
    if _check_values():
        _check_ends(offs, a.shape[0], "the number of rows of a")
    if out is not None:
        out = _check_out(_interop.to_torch(out), (a.shape[0], N), a.device)
        fast = _ops.direct(a, a_scale, b, b_scale, offs, out)
        (_ops.fp8_grouped_gemm_out_impl if fast else _ops.fp8_grouped_gemm_out)(a, a_scale, b, b_scale, offs, out)
        return _interop.like_input(out, src)
    out_dtype = _out_dtype(out_dtype)
    op = _ops.fp8_grouped_gemm_impl if _ops.direct(a, a_scale, b, b_scale, offs) else _ops.fp8_grouped_gemm
    return _interop.like_input(op(a, a_scale, b, b_scale, offs, out_dtype), src)


def fp8_grouped_gemm_masked(a, a_scale, b, b_scale, masked_m, out_dtype: torch.dtype = torch.bfloat16, out=None):
    """Grouped FP8 GEMM, masked layout (MoE decode under CUDA graphs).

    ``out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T``; rows at or past ``masked_m[e]`` are
    not computed.

    Args:
        a: float8_e4m3fn ``[E, M_max, K]``; a_scale: float32 ``[E, M_max, ceil(K/128)]``.
        b: float8_e4m3fn ``[E, N, K]``; b_scale: float32 ``[E, ceil(N/128), ceil(K/128)]``.
        masked_m: int32 ``[E]`` valid rows per expert, on a's device, read there (no host
            synchronisation). Values are clamped to ``[0, M_max]``; with ``LEANKERNELS_DEBUG=1``
            values outside that range raise ValueError (on any device).
        out_dtype: ``torch.bfloat16`` (default) or ``torch.float32`` (ignored when ``out`` is given).
        out: optional contiguous ``[E, M_max, N]`` tensor written in place; rows past
            ``masked_m[e]`` are left untouched. Without ``out`` they are zero.

    Returns:
        ``[E, M_max, N]`` (``out`` itself when given).
    """
    src = a
    a, a_scale, b, b_scale, N, K = _operands(a, a_scale, b, b_scale, 3, 3)
    E = b.shape[0]
    if a.shape[0] != E:
        raise ValueError(f"a has {a.shape[0]} groups but b has {E} experts; a is [E, M_max, K], b is [E, N, K]")
    masked_m = _group_sizes("masked_m", masked_m, a, E)
    if E == 0:
        raise ValueError("b must hold at least one expert (E >= 1)")
    if _check_values():
        m = masked_m.cpu()
        if int(m.min()) < 0 or int(m.max()) > a.shape[1]:
            raise ValueError(f"masked_m values must lie in [0, M_max={a.shape[1]}]; got {m.tolist()}")
    if out is not None:
        out = _check_out(_interop.to_torch(out), (E, a.shape[1], N), a.device)
        fast = _ops.direct(a, a_scale, b, b_scale, masked_m, out)
        (_ops.fp8_grouped_gemm_masked_out_impl if fast else _ops.fp8_grouped_gemm_masked_out)(
            a, a_scale, b, b_scale, masked_m, out)
        return _interop.like_input(out, src)
    out_dtype = _out_dtype(out_dtype)
    op = _ops.fp8_grouped_gemm_masked_impl if _ops.direct(a, a_scale, b, b_scale, masked_m) else _ops.fp8_grouped_gemm_masked
    return _interop.like_input(op(a, a_scale, b, b_scale, masked_m, out_dtype), src)


# ------------------------------------------------------------------- training (MoE wgrad)
def _k_offs(offs, device: torch.device, tokens: int, what: str):
    """Validate the optional offs of the k-grouped layout; returns (offs or None, E)."""
    if offs is None:
        return None, 1
    offs = _interop.to_torch(offs)
    _checks.tensor("offs", offs, (torch.int32,), 1)
    if offs.device != device:
        raise ValueError(f"offs is on {offs.device} but the operands are on {device}; all tensors must share one device")
    if offs.shape[0] == 0:
        raise ValueError("offs must hold at least one expert (E >= 1)")
    if _check_values():
        _check_ends(offs, tokens, what)
    return offs, offs.shape[0]


def fp8_k_grouped_gemm(a, a_scale, b, b_scale, offs=None, out_dtype: torch.dtype = torch.float32, out=None,
                       accumulate: bool = False):
    """k-grouped FP8 GEMM, the weight gradient of a (grouped) linear layer: ``a @ b.T`` contracted
    over tokens, per expert.

    With ``a, a_scale = quantize_fp8_transposed(dy, offs)`` and ``b, b_scale =
    quantize_fp8_transposed(x, offs)`` this is dW = dy.T @ x per expert (DeepSeek-V3's Wgrad:
    both operands in 1x128 groups along tokens, no group straddling two experts).

    Args:
        a: float8_e4m3fn ``[M, L]`` (L tokens); a_scale: float32 ``[M, G]``.
        b: float8_e4m3fn ``[N, L]``; b_scale: float32 ``[N, G]``. Scales are per row, one per
            128-token group, in the layout ``quantize_fp8_transposed`` produces:
            ``G = ceil(L/128) + E - 1`` (``E = 1`` without offs).
        offs: None (one dense product over all L tokens) or int32 ``[E]`` cumulative END
            offsets of the experts' tokens (``F.grouped_mm`` convention) on a's device,
            non-decreasing, ``offs[-1] <= L``. Not read on the host (no synchronisation):
            checked (ValueError) only with ``LEANKERNELS_DEBUG=1``. Unchecked bad values never
            cause out-of-bounds access: ends are clamped to ``[0, L]`` and each expert starts at
            the running maximum of the earlier ends (a decreasing end gives an empty expert),
            as ``reference.k_groups`` does; tokens past the last end are ignored.
        out_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (ignored when ``out`` is given).
        out: optional contiguous float32 or bfloat16 tensor of the result's shape, on a's device,
            written in place (experts without tokens: zeros) and returned. Reusing one saves
            allocating (and, on a CPU, first-touching) a fresh output per call: at MoE wgrad
            sizes ([64, 2816, 2048] fp32 = 1.48 GB) that costs more than the GEMM.
        accumulate: ``out += a @ b.T`` per expert instead (``out`` float32, required): a weight
            gradient summed into an existing fp32 gradient buffer, as DeepGEMM's wgrad GEMM
            takes ``c``. Each element gets its whole fp32 sum added once, so the result equals
            ``out + fp8_k_grouped_gemm(...)`` exactly; experts without tokens keep their values.

    Returns:
        ``[M, N]`` without offs, else ``[E, M, N]`` with ``out[e] = a[:, seg_e] @ b[:, seg_e].T``;
        experts without tokens give zeros. Per 128-token group the fp32 sum of exact e4m3
        products is multiplied by ``a_scale[m, g] * b_scale[n, g]`` and accumulated in fp32
        (``reference.fp8_k_grouped_gemm``). Any strides are accepted (copied to contiguous).
        ``out`` itself when given.
    """
    src = a
    out_dtype = _out_dtype(out_dtype)
    a = _interop.to_torch(a, fp8=True)
    a_scale = _interop.to_torch(a_scale)
    b = _interop.to_torch(b, fp8=True)
    b_scale = _interop.to_torch(b_scale)
    _checks.tensor("a", a, (FP8,), 2)
    _checks.tensor("a_scale", a_scale, (torch.float32,), 2)
    _checks.tensor("b", b, (FP8,), 2)
    _checks.tensor("b_scale", b_scale, (torch.float32,), 2)
    _checks.same_device2("a", a, "a_scale", a_scale)
    _checks.same_device2("a", a, "b", b)
    _checks.same_device2("a", a, "b_scale", b_scale)
    M, L = a.shape
    if b.shape[1] != L:
        raise ValueError(f"b has L = {b.shape[1]} tokens but a has L = {L}; a is [M, L] and b is [N, L] (token-major)")
    offs, E = _k_offs(offs, a.device, L, "the number of tokens L")
    G = _ops.k_group_columns(L, E)
    _checks.shape("a_scale", a_scale, (M, G))
    _checks.shape("b_scale", b_scale, (b.shape[0], G))
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into out: pass out (a float32 tensor of the result's shape)")
    if out is not None:
        shape = (M, b.shape[0]) if offs is None else (E, M, b.shape[0])
        out = _check_out(_interop.to_torch(out), shape, a.device)
        if accumulate and out.dtype != torch.float32:
            raise TypeError(f"out has dtype {out.dtype}; accumulate=True needs a float32 out")
    fast = _ops.direct(a, a_scale, b, b_scale, offs, out)  # (out None is skipped)
    if fast:
        a, a_scale, b, b_scale = a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous()
        offs = None if offs is None else offs.contiguous()
    if out is not None:
        (_ops.fp8_k_grouped_gemm_out_impl if fast else _ops.fp8_k_grouped_gemm_out)(
            a, a_scale, b, b_scale, offs, out, bool(accumulate))
        return _interop.like_input(out, src)
    op = _ops.fp8_k_grouped_gemm_impl if fast else _ops.fp8_k_grouped_gemm
    return _interop.like_input(op(a, a_scale, b, b_scale, offs, out_dtype), src)
