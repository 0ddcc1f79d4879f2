"""torch.library definitions of every leankernels op and their fake (meta) kernels.

Each op takes tensors already validated by the public wrapper (quant.py, gemm.py, ...),
allocates its outputs and calls the framework-free C++ core with raw pointers on the
current CUDA stream, so ops work in eager mode, under torch.compile(fullgraph=True) and
inside CUDA graphs. The fake kernels give shapes and dtypes for tracing.
"""
from __future__ import annotations

import torch

from ._lib import C, FP8, GROUP, device_args, dtype_code


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------ quant
def _quant_layout(x: torch.Tensor, block_rows: int):
    """View x as [batch, rows, K] with unit column stride: (x', batch, rows, K, bstride, rstride).

    Any row and batch strides are fine (the kernels only read x); only the last dim must be
    dense, and 1x128 leading dims must collapse into one (reshape copies when they do not).
    """
    K = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if block_rows == 1:
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, 1, x2.shape[0], K, 0, x2.stride(0)
    if x.dim() == 2:
        return x, 1, x.shape[0], K, 0, x.stride(0)
    return x, x.shape[0], x.shape[1], K, x.stride(0), x.stride(1)


def _quant_scale_shape(shape, block_rows: int):
    K = shape[-1]
    if block_rows == 1:
        return (*shape[:-1], _cdiv(K, GROUP))
    return (*shape[:-2], _cdiv(shape[-2], GROUP), _cdiv(K, GROUP))


@torch.library.custom_op("leankernels::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, block_rows: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(_quant_scale_shape(x.shape, block_rows), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale
    xv, batch, rows, K, bstride, rstride = _quant_layout(x, block_rows)
    device, stream = device_args(x)
    C().quantize_fp8(xv.data_ptr(), dtype_code(x.dtype), batch, rows, K, bstride, rstride, block_rows,
                     q.data_ptr(), scale.data_ptr(), ue8m0, device, stream)
    return q, scale


@quantize_fp8.register_fake
def _(x, block_rows, ue8m0):
    return (x.new_empty(x.shape, dtype=FP8),
            x.new_empty(_quant_scale_shape(x.shape, block_rows), dtype=torch.float32))


@torch.library.custom_op("leankernels::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out
    q = q.contiguous()
    scale = scale.contiguous()
    K = q.shape[-1]
    if block_rows == 1:
        batch, rows = 1, q.numel() // K
    else:
        batch = q.shape[0] if q.dim() == 3 else 1
        rows = q.shape[-2]
    device, stream = device_args(q)
    C().dequantize_fp8(q.data_ptr(), scale.data_ptr(), batch, rows, K, block_rows, out.data_ptr(), device, stream)
    return out


@dequantize_fp8.register_fake
def _(q, scale, block_rows):
    return q.new_empty(q.shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------- gemm
# Layout codes mirror lk::GemmLayout in csrc/cpu/gemm.h.
_GEMM_DENSE, _GEMM_CONTIGUOUS, _GEMM_MASKED = 0, 1, 2


def _gemm_launch(layout: int, a, a_scale, b, b_scale, groups, M: int, out: torch.Tensor) -> None:
    """Call the C++ core. a is [R, K] (or [G, M, K] for masked), b [G, N, K]; out preallocated."""
    if out.numel() == 0:
        return
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernel writes rows in place)")
    a, a_scale, b, b_scale = a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous()
    G, N, K = (1, b.shape[0], b.shape[1]) if b.dim() == 2 else (b.shape[0], b.shape[1], b.shape[2])
    gptr = 0
    if groups is not None:
        groups = groups.contiguous()
        gptr = groups.data_ptr()
    device, stream = device_args(a)
    C().fp8_gemm(layout, a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), gptr, G, M, N, K,
                 out.data_ptr(), dtype_code(out.dtype), device, stream)


@torch.library.custom_op("leankernels::fp8_gemm", mutates_args=())
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_DENSE, a, a_scale, b, b_scale, None, a.shape[0], out)
    return out


@fp8_gemm.register_fake
def _(a, a_scale, b, b_scale, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # Zeros, so rows past offs[-1] (unknown on the host without a sync) are defined.
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out)
    return out


@fp8_grouped_gemm.register_fake
def _(a, a_scale, b, b_scale, offs, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm_out", mutates_args=("out",))
def fp8_grouped_gemm_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         offs: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out)


@fp8_grouped_gemm_out.register_fake
def _(a, a_scale, b, b_scale, offs, out):
    return None


@torch.library.custom_op("leankernels::fp8_grouped_gemm_masked", mutates_args=())
def fp8_grouped_gemm_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            masked_m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)
    return out


@fp8_grouped_gemm_masked.register_fake
def _(a, a_scale, b, b_scale, masked_m, out_dtype):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm_masked_out", mutates_args=("out",))
def fp8_grouped_gemm_masked_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                masked_m: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)


@fp8_grouped_gemm_masked_out.register_fake
def _(a, a_scale, b, b_scale, masked_m, out):
    return None
