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


# ---------------------------------------------------------------------------------- routing
from typing import Optional  # noqa: E402  (op schemas read the annotation)


def plan_rows(num_tokens: int, top_k: int, num_experts: int, align: int) -> int:
    """Static permuted-row count: T*top_k + min(E, T*top_k) * (align - 1) (see reference.plan_rows)."""
    n = num_tokens * top_k
    return n + torch.sym_min(num_experts, n) * (align - 1)  # sym_min: T may be symbolic when traced


@torch.library.custom_op("leankernels::route", mutates_args=())
def route(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: Optional[torch.Tensor], n_group: int,
          topk_group: int, renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device, stream = device_args(logits)
    C().route(logits.data_ptr(), dtype_code(logits.dtype), T, E, logits.stride(0),
              0 if bias is None else bias.data_ptr(), sigmoid, top_k, n_group, topk_group, renormalize,
              float(scale), weights.data_ptr(), ids.data_ptr(), device, stream)
    return weights, ids


@route.register_fake
def _(logits, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale):
    T = logits.shape[0]
    return (logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32))


@torch.library.custom_op("leankernels::plan", mutates_args=())
def plan(ids: torch.Tensor, num_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = ids.shape
    dev = ids.device
    R = plan_rows(T, K, num_experts, align)
    i32 = torch.int32
    counts = torch.empty((num_experts,), dtype=i32, device=dev)
    offs = torch.empty((num_experts,), dtype=i32, device=dev)
    row_token = torch.empty((R,), dtype=i32, device=dev)
    token_row = torch.empty((T, K), dtype=i32, device=dev)
    ids = ids.contiguous()
    device, stream = device_args(ids)
    ws_size = C().plan_workspace_size(T, K, num_experts) if device >= 0 else 0
    ws = torch.empty((max(ws_size, 1),), dtype=i32, device=dev)
    C().plan(ids.data_ptr(), T, K, num_experts, align, R, counts.data_ptr(), offs.data_ptr(),
             row_token.data_ptr(), token_row.data_ptr(), ws.data_ptr(), ws_size, device, stream)
    return counts, offs, row_token, token_row


@plan.register_fake
def _(ids, num_experts, align):
    T, K = ids.shape
    R = plan_rows(T, K, num_experts, align)
    i32 = torch.int32
    return (ids.new_empty((num_experts,), dtype=i32), ids.new_empty((num_experts,), dtype=i32),
            ids.new_empty((R,), dtype=i32), ids.new_empty((T, K), dtype=i32))


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("leankernels::permute", mutates_args=())
def permute(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    R = row_token.shape[0]
    out = torch.empty((R, H), dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return out
    x = _rows_view(x)
    device, stream = device_args(x)
    C().permute(x.data_ptr(), x.element_size(), T, H, x.stride(0), row_token.data_ptr(), R, out.data_ptr(),
                device, stream)
    return out


@permute.register_fake
def _(x, row_token):
    return x.new_empty((row_token.shape[0], x.shape[1]))


@torch.library.custom_op("leankernels::permute_fp8", mutates_args=())
def permute_fp8(x: torch.Tensor, row_token: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    R = row_token.shape[0]
    q = torch.empty((R, H), dtype=FP8, device=x.device)
    scale = torch.empty((R, _cdiv(H, GROUP)), dtype=torch.float32, device=x.device)
    if R == 0 or H == 0:
        return q, scale
    x = _rows_view(x)
    device, stream = device_args(x)
    C().permute_fp8(x.data_ptr(), dtype_code(x.dtype), T, H, x.stride(0), row_token.data_ptr(), R,
                    q.data_ptr(), scale.data_ptr(), ue8m0, device, stream)
    return q, scale


@permute_fp8.register_fake
def _(x, row_token, ue8m0):
    R, H = row_token.shape[0], x.shape[1]
    return x.new_empty((R, H), dtype=FP8), x.new_empty((R, _cdiv(H, GROUP)), dtype=torch.float32)


@torch.library.custom_op("leankernels::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, token_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    R, H = y.shape
    T, K = token_row.shape
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    y = y.contiguous()
    token_row = token_row.contiguous()
    weights = weights.contiguous()
    device, stream = device_args(y)
    C().unpermute(y.data_ptr(), dtype_code(y.dtype), R, H, token_row.data_ptr(), weights.data_ptr(), T, K,
                  out.data_ptr(), device, stream)
    return out


@unpermute.register_fake
def _(y, token_row, weights):
    return y.new_empty((token_row.shape[0], y.shape[1]))


@torch.library.custom_op("leankernels::update_bias", mutates_args=())
def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    out = torch.empty_like(bias, memory_format=torch.contiguous_format)
    E = bias.shape[0]
    if E == 0:
        return out
    bias = bias.contiguous()
    counts = counts.contiguous()
    device, stream = device_args(bias)
    C().update_bias(bias.data_ptr(), counts.data_ptr(), dtype_code(counts.dtype), E, float(rate),
                    out.data_ptr(), device, stream)
    return out


@update_bias.register_fake
def _(bias, counts, rate):
    return torch.empty_like(bias, memory_format=torch.contiguous_format)
