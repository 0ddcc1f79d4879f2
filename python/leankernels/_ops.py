"""torch.library definitions of every leankernels op and their fake (meta) kernels.

Each op is two functions: ``<op>_impl`` allocates the outputs and calls the framework-free C++
core with raw pointers on the current CUDA stream, trusting its arguments; the torch.library
op ``<op>`` (``torch.ops.leankernels.<op>``) checks what would make the C++ core read or write
out of bounds, then runs ``<op>_impl``. The ops work in eager mode, under
torch.compile(fullgraph=True) and inside CUDA graphs; the fake kernels give shapes and dtypes
for tracing.

The public wrappers (quant.py, gemm.py, routing.py, mla.py) validate every argument fully
(errors name it) and then, when nothing needs the op boundary (see ``direct``), call
``<op>_impl`` straight away: an eager call at decode size then costs a few microseconds
instead of the ~15 us of the torch.library dispatch plus a second round of checks. The
decode-size CPU fast paths (route, permute with quantize, unpermute, quantize_fp8 of [T, K])
call the helper their ``_impl`` runs in (``route_rows``, ...) with the shapes they already
read, after ``direct_cpu``.
"""
from __future__ import annotations

import math
import typing
import weakref

import torch
import torch.autograd.forward_ad as _fwad

from . import memory
from ._lib import _DTYPE_CODES, FP8, GROUP, _C, device_args, dtype_code

# ------------------------------------------------------------------------- the eager fast path
_Tensor, _Parameter, _strided = torch.Tensor, torch.nn.Parameter, torch.strided
_CPU = torch.device("cpu")
_grad_on = torch.is_grad_enabled
# CPU outputs of the decode-size helpers: `template.new_empty(*sizes)` (positional sizes, no
# dtype or device argument) is ~0.6 us cheaper than torch.empty(*sizes, dtype=...) on a Zen 1 VM
# (2.7 vs 3.3 us; the same kind of tensor: contiguous, on the CPU, not requiring grad). The
# templates name the CPU: a default device set when this module is imported must not move them.
_new_fp8_cpu = torch.empty(0, dtype=FP8, device="cpu").new_empty
_new_f32_cpu = torch.empty(0, dtype=torch.float32, device="cpu").new_empty
_new_i32_cpu = torch.empty(0, dtype=torch.int32, device="cpu").new_empty
try:  # private torch hooks; should one be missing in some torch release, every call takes the op
    _is_compiling = torch.compiler.is_compiling
    _function_mode_on = torch._C._is_torch_function_mode_enabled
    _dispatch_modes = torch._C._len_torch_dispatch_stack
    _profiler_on = torch.autograd._profiler_enabled
    _jit_tracing = torch._C._get_tracing_state
    _functorch_level = torch._C._functorch.peek_interpreter_stack
    _fwad._current_level  # noqa: B018
except AttributeError:  # pragma: no cover
    def _is_compiling():
        return True


def direct(*tensors) -> bool:
    """Whether an eager call may run an op's ``*_impl`` directly instead of through
    torch.library: True only when nothing would see, transform or record the op.

    False (so the op is called, and everything that hooks the dispatcher sees it) under
    torch.compile / torch.export tracing, with a TorchFunctionMode or TorchDispatchMode
    active (FakeTensorMode, make_fx, user modes), inside torch.func transforms, jit tracing,
    forward-mode AD or the profiler (its traces name the op), when an input is not a plain
    dense tensor (a subclass such as FakeTensor or DTensor, a meta or sparse tensor), and
    when autograd needs the op (grad mode on and an input requires grad). ``None`` entries
    (optional arguments) are skipped. The arguments must already be validated as tensors.
    """
    if not plain_eager():
        return False
    for t in tensors:
        if t is None:
            continue
        if (type(t) is not _Tensor and type(t) is not _Parameter) or t.is_meta or t.layout is not _strided \
                or (t.requires_grad and _grad_on()):
            return False
    return True


def plain_eager() -> bool:
    """direct's global half: no tracing, mode, torch.func transform, profiler or forward AD."""
    return not (_is_compiling() or _function_mode_on() or _dispatch_modes() or _profiler_on()
                or _functorch_level() is not None or _jit_tracing() is not None or _fwad._current_level >= 0)


def direct_cpu(a, b=None, c=None) -> bool:
    """``direct(a, b, c)`` for tensors the caller has already found to be exactly torch.Tensor
    and on the CPU (so neither a subclass nor meta): the decode-size fast paths' version, with
    fixed arguments and without the checks they made (NOTES: ~0.5 us less per call on a Zen 1
    VM, where a T=1 call is ~20 us)."""
    if not plain_eager() or a.layout is not _strided or (b is not None and b.layout is not _strided) \
            or (c is not None and c.layout is not _strided):
        return False
    return not (_grad_on() and (a.requires_grad or (b is not None and b.requires_grad)
                                or (c is not None and c.requires_grad)))


def _custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op`` on a function whose annotations are resolved first: this
    module postpones annotations (``from __future__ import annotations``), and torch < 2.5's
    schema inference reads them as the strings they then are."""
    def wrap(fn):
        hints = typing.get_type_hints(fn)
        if hints.get("return") is type(None):   # get_type_hints turns "-> None" into NoneType
            hints["return"] = None
        fn.__annotations__ = hints
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
    return wrap


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Checks of what would make the C++ core read or write out of bounds. The public wrappers
# validate fully; these keep a direct torch.ops.leankernels.* call memory-safe (each names the
# argument). Only shapes/dtypes/strides: no data-dependent value is inspected here.
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_F32, _I32 = torch.float32, torch.int32


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"leankernels: {msg}")


def _need_t(name: str, t, dtypes, dim=None, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"leankernels: {name} must be a tensor; got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"leankernels: {name} has dtype {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"leankernels: {name} must have {dim} dimensions; got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"leankernels: {name} must have shape {tuple(shape)}; got {tuple(t.shape)}")


# ------------------------------------------------------------------------------------ quant
def _fp8_rows_out(x, rows, K, cpu):
    """Empty FP8 codes [rows, K] and fp32 scales [rows, ceil(K / 128)] on x's device."""
    if cpu:
        return _new_fp8_cpu(rows, K), _new_f32_cpu(rows, -(-K // GROUP))
    q = torch.empty(rows, K, dtype=FP8, device=x.device)
    return q, q.new_empty(rows, -(-K // GROUP), dtype=_F32)


def quantize_rows(x, code, T, K, ue8m0, cpu=True):
    """quantize_fp8_impl(x, 1, ue8m0) of x [T, K] whose dtype has code `code`; cpu: x.is_cpu."""
    q, scale = _fp8_rows_out(x, T, K, cpu)
    if T == 0 or K == 0:
        return q, scale
    x, row_stride = _unit_rows(x, K)
    device, stream = (-1, 0) if cpu else device_args(x)
    _C.quantize_fp8(x.data_ptr(), code, 1, T, K, 0, row_stride, 1, q.data_ptr(), scale.data_ptr(), ue8m0, device,
                    stream)
    return q, scale


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


def quantize_fp8_impl(x, block_rows, ue8m0):
    cpu = x.is_cpu
    if block_rows == 1 and x.dim() == 2:  # [T, K] activations (the decode case): ints, no reshape
        T, K = x.shape
        return quantize_rows(x, _DTYPE_CODES[x.dtype], T, K, ue8m0, cpu)
    shape = x.shape
    dev = _CPU if cpu else x.device
    q = torch.empty(shape, dtype=FP8, device=dev)
    scale = torch.empty(_quant_scale_shape(shape, block_rows), dtype=_F32, device=dev)
    if x.numel() == 0:
        return q, scale
    xv, batch, rows, K, bstride, rstride = _quant_layout(x, block_rows)
    device, stream = (-1, 0) if cpu else device_args(x)
    _C.quantize_fp8(xv.data_ptr(), _DTYPE_CODES[x.dtype], batch, rows, K, bstride, rstride, block_rows,
                    q.data_ptr(), scale.data_ptr(), ue8m0, device, stream)
    return q, scale


@_custom_op("leankernels::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, block_rows: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _need(block_rows in (1, GROUP), f"block_rows must be 1 or 128; got {block_rows}")
    _need_t("x", x, _FLOATS)
    _need(x.dim() >= 1 if block_rows == 1 else x.dim() in (2, 3), f"x has a bad shape {tuple(x.shape)}")
    return quantize_fp8_impl(x, block_rows, ue8m0)


@quantize_fp8.register_fake
def _(x, block_rows, ue8m0):
    return (x.new_empty(x.shape, dtype=FP8),
            x.new_empty(_quant_scale_shape(x.shape, block_rows), dtype=torch.float32))


def silu_mul_quantize_fp8_impl(h, ue8m0):
    """h: [R, 2I] float, unit column stride."""
    R, I = h.shape[0], h.shape[1] // 2
    if h.is_cuda:  # no fused CUDA kernel: the same math in two steps (torch's silu, then quantize)
        g, u = h.float().chunk(2, dim=-1)
        return quantize_fp8_impl(torch.nn.functional.silu(g).mul_(u), 1, ue8m0)
    q = torch.empty(R, I, dtype=FP8)
    scale = torch.empty(R, -(-I // GROUP), dtype=_F32)
    if R == 0 or I == 0:
        return q, scale
    _C.silu_mul_quantize_fp8(h.data_ptr(), _DTYPE_CODES[h.dtype], R, I, h.stride(0), q.data_ptr(),
                             scale.data_ptr(), ue8m0)
    return q, scale


@_custom_op("leankernels::silu_mul_quantize_fp8", mutates_args=())
def silu_mul_quantize_fp8(h: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("h", h, _FLOATS, dim=2)
    _need(h.shape[1] % 2 == 0, f"h must have an even last dim (gate and up halves); got shape {tuple(h.shape)}")
    return silu_mul_quantize_fp8_impl(h if h.stride(1) == 1 else h.contiguous(), ue8m0)


@silu_mul_quantize_fp8.register_fake
def _(h, ue8m0):
    R, I = h.shape[0], h.shape[1] // 2
    return h.new_empty((R, I), dtype=FP8), h.new_empty((R, _cdiv(I, GROUP)), dtype=torch.float32)


def dequantize_fp8_impl(q, scale, block_rows):
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
    _C.dequantize_fp8(q.data_ptr(), scale.data_ptr(), batch, rows, K, block_rows, out.data_ptr(), device, stream)
    return out


@_custom_op("leankernels::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    _need(block_rows in (1, GROUP), f"block_rows must be 1 or 128; got {block_rows}")
    _need_t("q", q, (FP8,))
    _need(q.dim() >= 1 if block_rows == 1 else q.dim() in (2, 3), f"q has a bad shape {tuple(q.shape)}")
    _need_t("scale", scale, (torch.float32,), shape=_quant_scale_shape(q.shape, block_rows))
    return dequantize_fp8_impl(q, scale, block_rows)


@dequantize_fp8.register_fake
def _(q, scale, block_rows):
    return q.new_empty(q.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------- routing
from typing import Optional  # noqa: E402  (op schemas read the annotation)


def plan_rows(num_tokens: int, top_k: int, num_experts: int, align: int) -> int:
    """Static permuted-row count: T*top_k + min(E, T*top_k) * (align - 1) (see reference.plan_rows)."""
    n = num_tokens * top_k
    if align == 1:
        return n
    if type(n) is int and type(num_experts) is int:
        return n + min(num_experts, n) * (align - 1)
    return n + torch.sym_min(num_experts, n) * (align - 1)  # sym_min: T may be symbolic when traced


def gate_logits_impl(x, weight):
    """The router's fp32 logits x [T, H] @ weight [E, H]^T on the CPU (leankernels.nn.MoE at
    decode sizes; fp32 sums, ~1 ulp from F.linear's); weight: contiguous float32; CUDA: F.linear."""
    if x.is_cuda:
        return torch.nn.functional.linear(x.float(), weight)
    T, H = x.shape
    E = weight.shape[0]
    out = torch.empty(T, E, dtype=_F32)
    if T == 0 or E == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    _C.gate_logits(x.data_ptr(), _DTYPE_CODES[x.dtype], T, H, x.stride(0), weight.data_ptr(), E, out.data_ptr())
    return out


def moe_decode_impl(x, gate_w, bias, top_k, sigmoid, n_group, topk_group, renormalize, scale, w13, s13, w2, s2,
                    shared, out_dtype, nan_free=False):
    """A DeepSeek MoE layer's forward for a few tokens on the CPU in one C++ call (cpu/moe.h:
    the op-by-op eager forward's kernels in its order, the same result bitwise), on operands the
    caller checked: x [T, H] float, gate_w fp32 [E, H], bias None or fp32 [E], w13 / s13
    [E, 2I, H] e4m3 and its 128x128 scales, w2 / s2 [E, H, I], shared None or (gate_up [2Is, H],
    its scales, down [H, Is], its scales, out_dtype); out_dtype f32 or bf16; nan_free: the FP8
    weights hold no NaN code (fp8_nan_free)."""
    T, H = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(T, H, dtype=out_dtype)
    ws = [t if t.is_contiguous() else t.contiguous() for t in (gate_w, w13, s13, w2, s2)]  # alive through the call
    if shared is not None:
        ws += [t if t.is_contiguous() else t.contiguous() for t in shared[:4]]
    mid, post = moe_decode_args(x.dtype, T, H, x.stride(0), bias, top_k, sigmoid, n_group, topk_group, renormalize,
                                scale, ws, None if shared is None else shared[2].shape[1], out_dtype, nan_free)
    _C.moe_decode(x.data_ptr(), *mid, out.data_ptr(), *post)
    return out


def moe_decode_args(x_dtype, T, H, x_stride, bias, top_k, sigmoid, n_group, topk_group, renormalize, scale, ws,
                    Is, out_dtype, nan_free=False):
    """``_C.moe_decode``'s arguments between x's pointer and out's, and after out's: ws are the
    contiguous (gate_w, w13, s13, w2, s2[, shared gate_up, its scales, down, its scales]), Is the
    shared experts' intermediate size (None: no shared experts), nan_free as moe_decode_impl's."""
    E, I = ws[0].shape[0], ws[3].shape[2]
    sp = (0, 0, 0, 0) if Is is None else tuple(t.data_ptr() for t in ws[5:9])
    mid = (_DTYPE_CODES[x_dtype], T, H, x_stride, ws[0].data_ptr(), E, top_k, sigmoid,
           0 if bias is None else bias.data_ptr(), n_group, topk_group, renormalize, scale, ws[1].data_ptr(),
           ws[2].data_ptr(), I, ws[3].data_ptr(), ws[4].data_ptr(), sp[0], sp[1], Is or 0, sp[2], sp[3])
    return mid, (_DTYPE_CODES[out_dtype], bool(nan_free))


def moe_experts_impl(x, ids, weights, w13, s13, w2, s2, nan_free=False):
    """Routed experts for tokens the caller routed, in one C++ call (cpu/moe.h moe_experts: the
    op-by-op steps plan, permute + quantize, the grouped GEMMs with SiLU x up + quantize between,
    unpermute in fp32, rounded once to x's dtype), on checked operands: x [T, H] float32 or
    bfloat16, ids [T, k] int32 / int64, weights [T, k] float, w13 / s13 [E, 2I, H], w2 / s2
    [E, H, I]; nan_free: w13 and w2 hold no NaN code (fp8_nan_free)."""
    T, H = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    weights = weights if weights.dtype is _F32 and weights.is_contiguous() else weights.float().contiguous()
    ws = [t if t.is_contiguous() else t.contiguous() for t in (w13, s13, w2, s2)]
    out = torch.empty(T, H, dtype=x.dtype)
    _C.moe_experts(x.data_ptr(), _DTYPE_CODES[x.dtype], T, H, x.stride(0), ids.data_ptr(), _DTYPE_CODES[ids.dtype],
                   weights.data_ptr(), ids.shape[1], w13.shape[0], ws[0].data_ptr(), ws[1].data_ptr(), w2.shape[2],
                   ws[2].data_ptr(), ws[3].data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype], nan_free)
    return out


# id(t) -> (weak reference to t, data pointer, version, numel) of CPU FP8 tensors found free of
# NaN codes (see fp8_nan_free).
_NAN_FREE: dict = {}


def _forget_nan_free(ref, key):
    if _NAN_FREE.get(key, (None,))[0] is ref:
        del _NAN_FREE[key]


def fp8_nan_free(*ts) -> bool:
    """Whether every tensor of ts is a contiguous CPU float8_e4m3fn tensor holding no NaN code
    (0x7f / 0xff), so the CPU GEMMs may skip their NaN check on it (cpu/gemm.h b_nan_free). A
    tensor is scanned once (threaded C++), then trusted while it is the same object with the same
    data pointer and version counter: in-place writes bump the version (``copy_``,
    ``load_state_dict``, ``fill_``, also under no_grad); writes that bypass it (through ``.data``,
    a NumPy or DLPack alias) are not seen, as autograd does not see them. Inference tensors have no
    version counter and are never trusted."""
    for t in ts:
        if not isinstance(t, torch.Tensor) or t.dtype is not FP8 or not t.is_cpu or t.is_inference() or not t.is_contiguous():
            return False
        key, ptr, version, n = id(t), t.data_ptr(), t._version, t.numel()
        e = _NAN_FREE.get(key)
        if e is not None and e[0]() is t and e[1] == ptr and e[2] == version and e[3] == n:
            continue
        if not _C.fp8_nan_free(ptr, n):
            return False
        ref = weakref.ref(t, lambda r, k=key: _forget_nan_free(r, k))
        _NAN_FREE[key] = (ref, ptr, version, n)
    return True


@_custom_op("leankernels::gate_logits", mutates_args=())
def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _need_t("x", x, _FLOATS, dim=2)
    _need_t("weight", weight, (torch.float32,), dim=2)
    _need(weight.shape[1] == x.shape[1], f"x and weight must have the same hidden size; got {x.shape[1]} and "
                                         f"{weight.shape[1]}")
    _need(x.device == weight.device, "x and weight must be on the same device")
    return gate_logits_impl(x, weight.contiguous())


@gate_logits.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def route_impl(logits, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale):
    """bias: None or a contiguous float32 [E]."""
    T, E = logits.shape
    return route_rows(logits, _DTYPE_CODES[logits.dtype], T, E, top_k, sigmoid, bias, n_group, topk_group,
                      renormalize, scale, logits.is_cpu)


def route_rows(logits, code, T, E, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale, cpu=True):
    """route_impl of logits [T, E] whose dtype has code `code`; cpu: logits.is_cpu."""
    weights = _new_f32_cpu(T, top_k) if cpu else torch.empty(T, top_k, dtype=_F32, device=logits.device)
    ids = _new_i32_cpu(T, top_k) if cpu else weights.new_empty(T, top_k, dtype=_I32)
    if T == 0:
        return weights, ids
    logits, row_stride = _unit_rows(logits, E)
    device, stream = (-1, 0) if cpu else device_args(logits)
    _C.route(logits.data_ptr(), code, T, E, row_stride, 0 if bias is None else bias.data_ptr(), sigmoid, top_k,
             n_group, topk_group, renormalize, float(scale), weights.data_ptr(), ids.data_ptr(), device, stream)
    return weights, ids


@_custom_op("leankernels::route", mutates_args=())
def route(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: Optional[torch.Tensor], n_group: int,
          topk_group: int, renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("logits", logits, _FLOATS, dim=2)
    T, E = logits.shape
    _need(1 <= top_k <= min(E, 32), f"top_k must be in [1, min(E, 32)]; got {top_k}")
    if bias is not None:
        _need_t("bias", bias, (torch.float32,), shape=(E,))
        bias = bias.contiguous()
    return route_impl(logits, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale)


@route.register_fake
def _(logits, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale):
    T = logits.shape[0]
    return (logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32))


def plan_impl(ids, num_experts, align, R=None, cpu_shape=None):
    """ids: contiguous int32 [T, top_k]; R: plan_rows(T, top_k, num_experts, align) if known;
    cpu_shape: ids.shape, given when ids is known to be on the CPU (the eager fast path: no
    device lookups)."""
    cpu = cpu_shape is not None
    T, K = cpu_shape if cpu else ids.shape
    if R is None:
        R = plan_rows(T, K, num_experts, align)
    new = _new_i32_cpu if cpu else ids.new_empty  # int32 on ids' device (cheaper than torch.empty)
    counts, offs, row_token, token_row = new(num_experts), new(num_experts), new(R), new(T, K)
    device, stream = (-1, 0) if cpu or ids.is_cpu else device_args(ids)
    ws_size, ws_ptr = 0, 0
    if device >= 0:  # the CUDA kernel's workspace (the CPU needs none)
        ws_size = _C.plan_workspace_size(T, K, num_experts)
        ws = new(max(ws_size, 1))
        ws_ptr = ws.data_ptr()
    _C.plan(ids.data_ptr(), T, K, num_experts, align, R, counts.data_ptr(), offs.data_ptr(),
            row_token.data_ptr(), token_row.data_ptr(), ws_ptr, ws_size, device, stream)
    return counts, offs, row_token, token_row


@_custom_op("leankernels::plan", mutates_args=())
def plan(ids: torch.Tensor, num_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _need_t("ids", ids, (torch.int32,), dim=2)
    _need(num_experts >= 1, f"num_experts must be >= 1; got {num_experts}")
    _need(align >= 1, f"align must be >= 1; got {align}")
    return plan_impl(ids.contiguous(), num_experts, align)


@plan.register_fake
def _(ids, num_experts, align):
    T, K = ids.shape
    R = plan_rows(T, K, num_experts, align)
    i32 = torch.int32
    return (ids.new_empty((num_experts,), dtype=i32), ids.new_empty((num_experts,), dtype=i32),
            ids.new_empty((R,), dtype=i32), ids.new_empty((T, K), dtype=i32))


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def permute_impl(x, row_token):
    """row_token: contiguous int32 [R]."""
    T, H = x.shape
    R = row_token.shape[0]
    out = torch.empty(R, H, dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return out
    x = _rows_view(x)
    device, stream = device_args(x)
    _C.permute(x.data_ptr(), x.element_size(), T, H, x.stride(0), row_token.data_ptr(), R, out.data_ptr(),
               device, stream)
    return out


@_custom_op("leankernels::permute", mutates_args=())
def permute(x: torch.Tensor, row_token: torch.Tensor, token_row: torch.Tensor) -> torch.Tensor:
    """token_row (the plan's inverse map) is only read by the backward."""
    _need(x.dim() == 2, f"x must be [T, H]; got shape {tuple(x.shape)}")
    _need_t("row_token", row_token, (torch.int32,), dim=1)
    _need_t("token_row", token_row, (torch.int32,), dim=2)
    _need(token_row.shape[0] == x.shape[0], f"token_row has {token_row.shape[0]} tokens but x has {x.shape[0]}")
    return permute_impl(x, row_token.contiguous())


@permute.register_fake
def _(x, row_token, token_row):
    return x.new_empty((row_token.shape[0], x.shape[1]))


def permute_fp8_impl(x, row_token, ue8m0):
    """row_token: contiguous int32 [R]."""
    T, H = x.shape
    return permute_fp8_rows(x, _DTYPE_CODES[x.dtype], T, H, row_token, row_token.shape[0], ue8m0, x.is_cpu)


def _unit_rows(x, H):
    """x [T, H] with unit column stride (a copy when it has none) and its row stride."""
    if x.is_contiguous():
        return x, H
    if x.stride(1) != 1:
        return x.contiguous(), H
    return x, x.stride(0)


def permute_fp8_rows(x, code, T, H, row_token, R, ue8m0, cpu=True):
    """permute_fp8_impl of x [T, H] (dtype code `code`) and contiguous row_token [R]; cpu: x.is_cpu."""
    q, scale = _fp8_rows_out(x, R, H, cpu)
    if R == 0 or H == 0:
        return q, scale
    x, row_stride = _unit_rows(x, H)
    device, stream = (-1, 0) if cpu else device_args(x)
    _C.permute_fp8(x.data_ptr(), code, T, H, row_stride, row_token.data_ptr(), R, q.data_ptr(), scale.data_ptr(),
                   ue8m0, device, stream)
    return q, scale


@_custom_op("leankernels::permute_fp8", mutates_args=())
def permute_fp8(x: torch.Tensor, row_token: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("x", x, _FLOATS, dim=2)
    _need_t("row_token", row_token, (torch.int32,), dim=1)
    return permute_fp8_impl(x, row_token.contiguous(), ue8m0)


@permute_fp8.register_fake
def _(x, row_token, ue8m0):
    R, H = row_token.shape[0], x.shape[1]
    return x.new_empty((R, H), dtype=FP8), x.new_empty((R, _cdiv(H, GROUP)), dtype=torch.float32)


def unpermute_impl(y, token_row, weights):
    """weights: float32 of token_row's shape."""
    R, H = y.shape
    T, K = token_row.shape
    return unpermute_rows(y, y.dtype, R, H, token_row, T, K, weights, y.is_cpu)


def unpermute_rows(y, dtype, R, H, token_row, T, K, weights, cpu=True):
    """unpermute_impl of y [R, H] of dtype `dtype`, token_row [T, K] and weights; cpu: y.is_cpu."""
    out = y.new_empty(T, H)
    if T == 0 or H == 0:
        return out
    if not y.is_contiguous():
        y = y.contiguous()
    if not token_row.is_contiguous():
        token_row = token_row.contiguous()
    if not weights.is_contiguous():
        weights = weights.contiguous()
    device, stream = (-1, 0) if cpu else device_args(y)
    _C.unpermute(y.data_ptr(), _DTYPE_CODES[dtype], R, H, token_row.data_ptr(), weights.data_ptr(), T, K,
                 out.data_ptr(), device, stream)
    return out


@_custom_op("leankernels::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, token_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _need_t("y", y, _FLOATS, dim=2)
    _need_t("token_row", token_row, (torch.int32,), dim=2)
    _need_t("weights", weights, (torch.float32,), shape=token_row.shape)
    return unpermute_impl(y, token_row, weights)


@unpermute.register_fake
def _(y, token_row, weights):
    return y.new_empty((token_row.shape[0], y.shape[1]))


def update_bias_impl(bias, counts, rate):
    out = torch.empty_like(bias, memory_format=torch.contiguous_format)
    E = bias.shape[0]
    if E == 0:
        return out
    bias = bias.contiguous()
    counts = counts.contiguous()
    device, stream = device_args(bias)
    _C.update_bias(bias.data_ptr(), counts.data_ptr(), dtype_code(counts.dtype), E, float(rate),
                   out.data_ptr(), device, stream)
    return out


@_custom_op("leankernels::update_bias", mutates_args=())
def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    _need_t("bias", bias, (torch.float32,), dim=1)
    _need_t("counts", counts, (torch.int32, torch.int64), shape=bias.shape)
    return update_bias_impl(bias, counts, rate)


@update_bias.register_fake
def _(bias, counts, rate):
    return torch.empty_like(bias, memory_format=torch.contiguous_format)
# -------------------------------------------------------------------------------------- mla
from typing import Optional  # noqa: E402  (Python 3.9: torch evaluates op annotations)

MLA_LATENT, MLA_DIM, MLA_FP8_BYTES = 512, 576, 656


from ._checks import debug as _mla_debug  # noqa: E402  (LEANKERNELS_DEBUG, read on every call)


def _mla_error_flag(t: torch.Tensor, debug: bool):
    """A device int32 the CUDA kernels set on a bad index; only allocated under debug."""
    if debug and t.device.type == "cuda":
        return torch.zeros(4, dtype=torch.int32, device=t.device)
    return None


def _mla_raise_flag(flag) -> None:
    """Raise for the first bad index a CUDA kernel reported: flag = {kind, i, j, value}."""
    if flag is None:
        return
    kind, i, j, value = flag.tolist()  # syncs: debug mode only
    if kind != 0:
        where = {1: f"slot_mapping[{i}]", 2: f"block_table[{i}, {j}]", 3: f"positions[{i}]"}[kind]
        raise ValueError(f"leankernels: {where} = {value} is out of range (LEANKERNELS_DEBUG=1)")


def _mla_cache_geometry(cache: torch.Tensor):
    """(fp8, num_blocks, block_size, block stride in bytes) of a [nb, bs, 576|656] cache."""
    _need_t("cache", cache, (torch.bfloat16, torch.uint8, torch.float8_e4m3fn), dim=3)
    width = MLA_DIM if cache.dtype == torch.bfloat16 else MLA_FP8_BYTES
    _need(cache.shape[2] == width and cache.stride(2) == 1 and (cache.shape[1] <= 1 or cache.stride(1) == width)
          and cache.stride(0) >= 0, f"cache must be [num_blocks, block_size, {width}] with dense tokens; "
          f"got shape {tuple(cache.shape)}, strides {cache.stride()}")
    _need(cache.shape[1] >= 1, f"cache block_size (dim 1) must be >= 1; got shape {tuple(cache.shape)}")
    fp8 = cache.dtype != torch.bfloat16
    return fp8, cache.shape[0], cache.shape[1], cache.stride(0) * cache.element_size()


def mla_append_impl(cache, kv_c, k_pe, slot_mapping, norm_weight, eps, cos, sin, positions):
    fp8 = cache.dtype != torch.bfloat16
    nb, bs, bstride = cache.shape[0], cache.shape[1], cache.stride(0) * cache.element_size()
    T = kv_c.shape[0]
    if T == 0 or cache.numel() == 0:
        return
    debug = _mla_debug()
    flag = _mla_error_flag(cache, debug)
    device, stream = device_args(cache)
    _C.mla_append(
        kv_c.data_ptr(), dtype_code(kv_c.dtype), kv_c.stride(0), k_pe.data_ptr(), dtype_code(k_pe.dtype),
        k_pe.stride(0), slot_mapping.data_ptr(), T, norm_weight.data_ptr() if norm_weight is not None else 0,
        eps, cos.data_ptr() if cos is not None else 0, sin.data_ptr() if sin is not None else 0,
        positions.data_ptr() if positions is not None else 0, cos.shape[0] if cos is not None else 0,
        cache.data_ptr(), fp8, nb, bs, bstride, debug, flag.data_ptr() if flag is not None else 0, device, stream)
    _mla_raise_flag(flag)


@_custom_op("leankernels::mla_append", mutates_args=("cache",))
def mla_append(cache: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
               norm_weight: Optional[torch.Tensor], eps: float, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
               positions: Optional[torch.Tensor]) -> None:
    _mla_cache_geometry(cache)
    _need_t("kv_c", kv_c, _FLOATS, dim=2)
    T = kv_c.shape[0]
    _need(kv_c.shape[1] == MLA_LATENT and kv_c.stride(1) == 1, f"kv_c must be [T, 512] with unit column stride")
    _need_t("k_pe", k_pe, _FLOATS, dim=2)
    _need(tuple(k_pe.shape) == (T, MLA_DIM - MLA_LATENT) and k_pe.stride(1) == 1,
          f"k_pe must be [T={T}, 64] with unit column stride; got {tuple(k_pe.shape)}")
    _need_t("slot_mapping", slot_mapping, (torch.int64,), shape=(T,))
    _need(slot_mapping.is_contiguous(), "slot_mapping must be contiguous")
    if norm_weight is not None:
        _need_t("norm_weight", norm_weight, (torch.float32,), shape=(MLA_LATENT,))
        _need(norm_weight.is_contiguous(), "norm_weight must be contiguous")
    _need((cos is None) == (sin is None), "cos and sin must be given together")
    if cos is not None:
        _need_t("cos", cos, (torch.float32,), dim=2)
        _need(cos.shape[1] == (MLA_DIM - MLA_LATENT) // 2 and cos.is_contiguous(), "cos must be a contiguous [P, 32]")
        _need_t("sin", sin, (torch.float32,), shape=cos.shape)
        _need(sin.is_contiguous(), "sin must be contiguous")
        if positions is None:
            _need(cos.shape[0] >= T, f"cos has {cos.shape[0]} rows for {T} tokens (pass positions)")
    if positions is not None:
        _need(cos is not None, "positions needs cos and sin")
        _need_t("positions", positions, (torch.int64,), shape=(T,))
        _need(positions.is_contiguous(), "positions must be contiguous")
    mla_append_impl(cache, kv_c, k_pe, slot_mapping, norm_weight, eps, cos, sin, positions)


@mla_append.register_fake
def _(cache, kv_c, k_pe, slot_mapping, norm_weight, eps, cos, sin, positions):
    return None


def mla_decode_impl(q, cache, block_table, seqlens, softmax_scale, causal, num_splits):
    """seqlens contiguous, block_table with unit column stride."""
    B, s_q, H, _ = q.shape
    fp8 = cache.dtype != torch.bfloat16
    nb, bs, bstride = cache.shape[0], cache.shape[1], cache.stride(0) * cache.element_size()
    num_splits = min(num_splits, max(1, block_table.shape[1] * bs))  # more splits than keys: empty ones
    out = torch.empty(B, s_q, H, MLA_LATENT, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q = q.contiguous()
    if q.is_cuda and q.data_ptr() % 16:
        q = q.clone()  # a contiguous view at an odd offset: the CUDA kernel loads q in 16-byte chunks
    rows = s_q * H
    if num_splits > 1:
        o_part = torch.empty(B, num_splits, rows, MLA_LATENT, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, num_splits, rows, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = None
    debug = _mla_debug()
    flag = _mla_error_flag(q, debug)
    device, stream = device_args(q)
    _C.mla_decode(
        q.data_ptr(), B, s_q, H, cache.data_ptr(), fp8, nb, bs, bstride, block_table.data_ptr(),
        block_table.shape[1], block_table.stride(0), seqlens.data_ptr(), softmax_scale, causal, num_splits,
        o_part.data_ptr() if o_part is not None else 0, lse_part.data_ptr() if lse_part is not None else 0,
        out.data_ptr(), lse.data_ptr(), flag.data_ptr() if flag is not None else 0, device, stream)
    _mla_raise_flag(flag)
    return out, lse


@_custom_op("leankernels::mla_decode", mutates_args=())
def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
               softmax_scale: float, causal: bool, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("q", q, (torch.bfloat16,), dim=4)
    _need(q.shape[3] == MLA_DIM, f"q must be [B, s_q, H, 576]; got {tuple(q.shape)}")
    B, s_q, H, _ = q.shape
    _mla_cache_geometry(cache)
    _need_t("block_table", block_table, (torch.int32,), dim=2)
    _need(block_table.shape[0] == B and block_table.stride(1) == 1 and block_table.stride(0) >= 0,
          f"block_table must be [B={B}, max_blocks] with unit column stride; got {tuple(block_table.shape)}")
    _need_t("seqlens", seqlens, (torch.int32,), shape=(B,))
    seqlens = seqlens.contiguous()
    _need(num_splits >= 1, f"num_splits must be >= 1; got {num_splits}")
    return mla_decode_impl(q, cache, block_table, seqlens, softmax_scale, causal, num_splits)


@mla_decode.register_fake
def _(q, cache, block_table, seqlens, softmax_scale, causal, num_splits):
    B, s_q, H, _ = q.shape
    return q.new_empty(B, s_q, H, MLA_LATENT), q.new_empty(B, H, s_q, dtype=torch.float32)


@_custom_op("leankernels::mla_schedule", mutates_args=())
def mla_schedule(seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("seqlens", seqlens, (torch.int32,), dim=1)
    _need(num_parts >= 1, f"num_parts must be >= 1; got {num_parts}")
    B = seqlens.shape[0]
    metadata = torch.empty(num_parts, 8, dtype=torch.int32, device=seqlens.device)
    num_splits = torch.empty(B + 1, dtype=torch.int32, device=seqlens.device)
    seqlens = seqlens.contiguous()
    device, stream = device_args(seqlens)
    _C.mla_schedule(seqlens.data_ptr(), B, num_parts, metadata.data_ptr(), num_splits.data_ptr(), device, stream)
    return metadata, num_splits


@mla_schedule.register_fake
def _(seqlens, num_parts):
    B = seqlens.shape[0]
    return (seqlens.new_empty(num_parts, 8, dtype=torch.int32), seqlens.new_empty(B + 1, dtype=torch.int32))
# ------------------------------------------------------------------------------------- gemm
# Layout codes mirror lk::GemmLayout in csrc/cpu/gemm.h.
_GEMM_DENSE, _GEMM_CONTIGUOUS, _GEMM_MASKED = 0, 1, 2


def _gemm_checks(layout: int, a, a_scale, b, b_scale, groups, out=None, out_dtype=None) -> None:
    """What the C++ core needs of a GEMM's operands (a direct torch.ops call is memory-safe):
    the given ``out``, or (out=None) the output the op allocates with ``out_dtype``."""
    dense, masked = layout == _GEMM_DENSE, layout == _GEMM_MASKED
    _need_t("a", a, (FP8,), dim=3 if masked else 2)
    _need_t("b", b, (FP8,), dim=2 if dense else 3)
    N, K = b.shape[-2], b.shape[-1]
    _need(a.shape[-1] == K, f"a and b must have the same K; got {a.shape[-1]} and {K}")
    _need_t("a_scale", a_scale, (torch.float32,), shape=(*a.shape[:-1], _cdiv(K, GROUP)))
    _need_t("b_scale", b_scale, (torch.float32,), shape=(*b.shape[:-2], _cdiv(N, GROUP), _cdiv(K, GROUP)))
    if not dense:
        name = "masked_m" if masked else "offs"
        _need_t(name, groups, (torch.int32,), shape=(b.shape[0],))
        _need(b.shape[0] >= 1, "b must hold at least one expert")
    if masked:
        _need(a.shape[0] == b.shape[0], f"a has {a.shape[0]} groups but b has {b.shape[0]} experts")
    if out is None:
        if out_dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"leankernels: out_dtype must be torch.bfloat16 or torch.float32; got {out_dtype}")
        return
    _need_t("out", out, (torch.bfloat16, torch.float32), shape=(*a.shape[:-1], N))
    if out.numel() and not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernel writes rows in place)")


def _gemm_launch(layout: int, a, a_scale, b, b_scale, groups, M: int, out: torch.Tensor, b_nan_free=False) -> None:
    """Call the C++ core on checked operands. a is [R, K] (or [G, M, K] for masked), b [G, N, K]
    (or [N, K]); group sizes stay on the device: the kernels clamp them (see gemm.py); b_nan_free:
    b holds no NaN code (fp8_nan_free; the CPU kernels then skip their NaN check)."""
    if out.numel() == 0:
        return
    a, a_scale, b, b_scale = a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous()
    G, N, K = (1, b.shape[0], b.shape[1]) if b.dim() == 2 else (b.shape[0], b.shape[1], b.shape[2])
    gptr = 0
    if groups is not None:
        groups = groups.contiguous()
        gptr = groups.data_ptr()
    device, stream = device_args(a)
    _C.fp8_gemm(layout, a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), gptr, G, M, N, K,
                out.data_ptr(), dtype_code(out.dtype), device, stream, b_nan_free)


def fp8_gemm_impl(a, a_scale, b, b_scale, out_dtype, b_nan_free=False):
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_DENSE, a, a_scale, b, b_scale, None, a.shape[0], out, b_nan_free)
    return out


@_custom_op("leankernels::fp8_gemm", mutates_args=())
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    _gemm_checks(_GEMM_DENSE, a, a_scale, b, b_scale, None, out_dtype=out_dtype)
    return fp8_gemm_impl(a, a_scale, b, b_scale, out_dtype)


@fp8_gemm.register_fake
def _(a, a_scale, b, b_scale, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


def fp8_grouped_gemm_impl(a, a_scale, b, b_scale, offs, out_dtype, b_nan_free=False):
    # Zeros, so rows past offs[-1] (unknown on the host without a sync) are defined.
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out, b_nan_free)
    return out


@_custom_op("leankernels::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _gemm_checks(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, out_dtype=out_dtype)
    return fp8_grouped_gemm_impl(a, a_scale, b, b_scale, offs, out_dtype)


@fp8_grouped_gemm.register_fake
def _(a, a_scale, b, b_scale, offs, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def fp8_grouped_gemm_out_impl(a, a_scale, b, b_scale, offs, out):
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out)


@_custom_op("leankernels::fp8_grouped_gemm_out", mutates_args=("out",))
def fp8_grouped_gemm_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         offs: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_checks(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, out)
    fp8_grouped_gemm_out_impl(a, a_scale, b, b_scale, offs, out)


@fp8_grouped_gemm_out.register_fake
def _(a, a_scale, b, b_scale, offs, out):
    return None


def fp8_grouped_gemm_masked_impl(a, a_scale, b, b_scale, masked_m, out_dtype):
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)
    return out


@_custom_op("leankernels::fp8_grouped_gemm_masked", mutates_args=())
def fp8_grouped_gemm_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            masked_m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _gemm_checks(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, out_dtype=out_dtype)
    return fp8_grouped_gemm_masked_impl(a, a_scale, b, b_scale, masked_m, out_dtype)


@fp8_grouped_gemm_masked.register_fake
def _(a, a_scale, b, b_scale, masked_m, out_dtype):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype)


def fp8_grouped_gemm_masked_out_impl(a, a_scale, b, b_scale, masked_m, out):
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)


@_custom_op("leankernels::fp8_grouped_gemm_masked_out", mutates_args=("out",))
def fp8_grouped_gemm_masked_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                masked_m: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_checks(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, out)
    fp8_grouped_gemm_masked_out_impl(a, a_scale, b, b_scale, masked_m, out)


@fp8_grouped_gemm_masked_out.register_fake
def _(a, a_scale, b, b_scale, masked_m, out):
    return None


# ------------------------------------------------------------------------------- training
# Autograd for the differentiable ops. DeepSeek-V3's FP8 recipe (fp8_linear, fp8_grouped_linear):
#   Fprop  y  = x(1x128) . W(128x128)
#   Dgrad  dx = dy(1x128) . W^T, where W^T's 128x128 blocks are W's blocks transposed (the FP8
#               bytes and the block scales are transposed; nothing is requantized)
#   Wgrad  dW = dy^T . x, both quantized in 1x128 groups along the tokens (a group never spans
#               two experts), fp32 accumulation, the result in the weight's dtype
# Quantization is straight-through. Backward formulas call the ops through torch.ops so that
# torch.compile and AOTAutograd trace them like any other op.
_lk_ops = torch.ops.leankernels


def _transpose_blocks(w: torch.Tensor, scale: torch.Tensor):
    """W^T from W's FP8 bytes and 128x128 scales: [(E,) N, K] -> [(E,) K, N], exact. An eager
    CPU call runs the C++ byte transpose (~2 GB/s through torch's strided uint8 copy)."""
    if w.is_cpu and w.is_contiguous() and direct(w):
        N, K = w.shape[-2], w.shape[-1]
        wt = torch.empty(*w.shape[:-2], K, N, dtype=torch.uint8)
        _C.transpose_bytes(w.data_ptr(), wt.data_ptr(), w.numel() // max(N * K, 1), N, K)
        wt = wt.view(FP8)
    else:
        wt = w.view(torch.uint8).transpose(-1, -2).contiguous().view(FP8)
    return wt, scale.transpose(-1, -2).contiguous()


def _linear_checks(x, weight, bias, weight_fp8, weight_scale, grouped: bool) -> None:
    _need_t("x", x, _FLOATS)
    _need_t("weight", weight, _FLOATS, dim=3 if grouped else 2)
    if grouped:
        _need(x.dim() == 2, f"x must be [M, K]; got shape {tuple(x.shape)}")
    else:
        _need(x.dim() >= 1, "x must have at least one dimension")
    N, K = weight.shape[-2], weight.shape[-1]
    _need(x.shape[-1] == K, f"x has last dim {x.shape[-1]} but weight has K = {K}")
    if bias is not None:
        _need_t("bias", bias, _FLOATS, shape=(N,))
    _need((weight_fp8 is None) == (weight_scale is None), "weight_fp8 and weight_scale come together")
    if weight_fp8 is not None:
        _need_t("weight_fp8", weight_fp8, (FP8,), shape=weight.shape)
        _need_t("weight_scale", weight_scale, (torch.float32,), shape=_quant_scale_shape(weight.shape, GROUP))


def _linear_out(y32: torch.Tensor, bias, dtype) -> torch.Tensor:
    if bias is not None:
        y32 = y32 + bias.float()
    return y32 if y32.dtype == dtype else y32.to(dtype)


def _gemm_dtype(x: torch.Tensor, bias) -> torch.dtype:
    """The GEMM writes the output dtype itself when it can (bf16/fp32, no bias to add in fp32)."""
    return x.dtype if bias is None and x.dtype in (torch.bfloat16, torch.float32) else torch.float32


def fp8_linear_impl(x, weight, bias, weight_fp8, weight_scale):
    K, N = x.shape[-1], weight.shape[0]
    a, s = quantize_fp8_impl(x.reshape(-1, K), 1, False)
    if weight_fp8 is None:
        weight_fp8, weight_scale = quantize_fp8_impl(weight, GROUP, False)
    y = fp8_gemm_impl(a, s, weight_fp8, weight_scale, _gemm_dtype(x, bias))
    return _linear_out(y, bias, x.dtype).view(*x.shape[:-1], N)


@_custom_op("leankernels::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               weight_fp8: Optional[torch.Tensor], weight_scale: Optional[torch.Tensor]) -> torch.Tensor:
    _linear_checks(x, weight, bias, weight_fp8, weight_scale, False)
    return fp8_linear_impl(x, weight, bias, weight_fp8, weight_scale)


@fp8_linear.register_fake
def _(x, weight, bias, weight_fp8, weight_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fp8_grouped_linear_impl(x, weight, offs, weight_fp8, weight_scale):
    a, s = quantize_fp8_impl(x, 1, False)
    if weight_fp8 is None:
        weight_fp8, weight_scale = quantize_fp8_impl(weight, GROUP, False)
    y = fp8_grouped_gemm_impl(a, s, weight_fp8, weight_scale, offs, _gemm_dtype(x, None))
    return _linear_out(y, None, x.dtype)


@_custom_op("leankernels::fp8_grouped_linear", mutates_args=())
def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor,
                       weight_fp8: Optional[torch.Tensor], weight_scale: Optional[torch.Tensor]) -> torch.Tensor:
    _linear_checks(x, weight, None, weight_fp8, weight_scale, True)
    _need_t("offs", offs, (torch.int32,), shape=(weight.shape[0],))
    _need(weight.shape[0] >= 1, "weight must hold at least one expert")
    return fp8_grouped_linear_impl(x, weight, offs.contiguous(), weight_fp8, weight_scale)


@fp8_grouped_linear.register_fake
def _(x, weight, offs, weight_fp8, weight_scale):
    return x.new_empty((x.shape[0], weight.shape[1]))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, weight_fp8, weight_scale = inputs
    ctx.save_for_backward(x, weight, None, weight_fp8, weight_scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grouped_linear_setup(ctx, inputs, output) -> None:
    x, weight, offs, weight_fp8, weight_scale = inputs
    ctx.save_for_backward(x, weight, offs, weight_fp8, weight_scale)


def _linear_backward(ctx, grad, grouped: bool):
    x, weight, offs, wq, ws = ctx.saved_tensors
    K, N = weight.shape[-1], weight.shape[-2]
    g = grad.reshape(-1, N)
    x2 = x.reshape(-1, K)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        if wq is None:
            wq, ws = _lk_ops.quantize_fp8(weight, GROUP, False)
        wt, wts = _transpose_blocks(wq, ws)
        gq, gs = _lk_ops.quantize_fp8(g, 1, False)
        # straight to x's dtype when the GEMM writes it (its bf16 store rounds the fp32 sum to
        # nearest even: bitwise what a cast of its fp32 output gives, without that pass)
        dt = _gemm_dtype(x, None)
        if grouped:
            dx = _lk_ops.fp8_grouped_gemm(gq, gs, wt, wts, offs, dt)
        else:
            dx = _lk_ops.fp8_gemm(gq, gs, wt, wts, dt)
        dx = dx.to(x.dtype).view(x.shape)
    if ctx.needs_input_grad[1]:
        gt, gts = _lk_ops.quantize_fp8_transposed(g, offs, False)
        xt, xts = _lk_ops.quantize_fp8_transposed(x2, offs, False)
        dw = _lk_ops.fp8_k_grouped_gemm(gt, gts, xt, xts, offs, torch.float32).to(weight.dtype)
    if not grouped and ctx.needs_input_grad[2]:
        db = g.float().sum(0).to(ctx.bias_dtype)
    return dx, dw, db, None, None


fp8_linear.register_autograd(lambda ctx, grad: _linear_backward(ctx, grad, False), setup_context=_linear_setup)
fp8_grouped_linear.register_autograd(lambda ctx, grad: _linear_backward(ctx, grad, True),
                                     setup_context=_grouped_linear_setup)


# SwiGLU between a trainable MoE expert's two GEMMs (nn.MoE with trainable=True): a = silu(g) * u
# for h = [g | u] [R, 2I], computed in fp32 and returned in h's dtype, with its gradient
# dh = [(da * u) * s * (1 + g * (1 - s)) | da * silu(g)], s = sigmoid(g): torch's F.silu(g) * u and
# silu_backward, in one pass each way (the composite ran h.float(), silu, mul, a cast, then mul,
# mul, silu_backward and cat: 43 ms forward + backward at R=8192 I=704 bf16 on the 2-core Zen 4
# VM). CPU bf16/fp32: the C++ kernels (cpu/quant_body.h); elsewhere (CUDA, fp16): the composite.
_SWIGLU_DTYPES = (torch.float32, torch.bfloat16)


def silu_mul_impl(h):
    """h [R, 2I] float with unit column stride."""
    R, I = h.shape[0], h.shape[1] // 2
    if not (h.is_cpu and h.dtype in _SWIGLU_DTYPES):
        g, u = h.float().chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u).to(h.dtype)
    out = torch.empty(R, I, dtype=h.dtype)
    if out.numel():
        _C.silu_mul(h.data_ptr(), _DTYPE_CODES[h.dtype], R, I, h.stride(0), out.data_ptr())
    return out


def silu_mul_backward_impl(h, grad):
    """h [R, 2I], grad [R, I] in h's dtype, both with unit column stride -> dh [R, 2I]."""
    R, I = h.shape[0], h.shape[1] // 2
    if not (h.is_cpu and h.dtype in _SWIGLU_DTYPES):
        g, u = h.float().chunk(2, dim=-1)
        d = grad.float()
        dg = torch.ops.aten.silu_backward(d * u, g)
        return torch.cat([dg, d * torch.nn.functional.silu(g)], dim=-1).to(h.dtype)
    dh = torch.empty(R, 2 * I, dtype=h.dtype)
    if dh.numel():
        _C.silu_mul_backward(h.data_ptr(), grad.data_ptr(), _DTYPE_CODES[h.dtype], R, I, h.stride(0), grad.stride(0),
                             dh.data_ptr())
    return dh


def _unit_cols(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@_custom_op("leankernels::silu_mul", mutates_args=())
def silu_mul(h: torch.Tensor) -> torch.Tensor:
    _need_t("h", h, _FLOATS, dim=2)
    _need(h.shape[1] % 2 == 0, f"h must have an even last dim (gate and up halves); got shape {tuple(h.shape)}")
    return silu_mul_impl(_unit_cols(h))


@silu_mul.register_fake
def _(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@_custom_op("leankernels::silu_mul_backward", mutates_args=())
def silu_mul_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    _need_t("h", h, _FLOATS, dim=2)
    _need(h.shape[1] % 2 == 0, f"h must have an even last dim (gate and up halves); got shape {tuple(h.shape)}")
    _need_t("grad", grad, (h.dtype,), shape=(h.shape[0], h.shape[1] // 2))
    _need(grad.device == h.device, f"grad is on {grad.device} but h is on {h.device}")
    return silu_mul_backward_impl(_unit_cols(h), _unit_cols(grad))


@silu_mul_backward.register_fake
def _(h, grad):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _silu_mul_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _silu_mul_grad(ctx, grad):
    (h,) = ctx.saved_tensors
    return _lk_ops.silu_mul_backward(h, grad.to(h.dtype))


silu_mul.register_autograd(_silu_mul_grad, setup_context=_silu_mul_setup)


def _route_setup(ctx, inputs, output) -> None:
    logits, _top_k, sigmoid, _bias, _n_group, _topk_group, renormalize, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.sigmoid, ctx.renormalize, ctx.scale = sigmoid, renormalize, scale


def _route_backward(ctx, grad_weights, _grad_ids):
    """weights = scale * s[ids] / sum(s[ids]) (or without the division), s = sigmoid or softmax
    of the logits: the chain rule through the chosen experts; the bias only chose, so it has no
    gradient, and ids are integers."""
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return (None,) * 8
    z = logits.float()
    s = torch.sigmoid(z) if ctx.sigmoid else torch.softmax(z, dim=-1)
    idx = ids.long()
    g = grad_weights.float() * ctx.scale
    if ctx.renormalize:
        w = s.gather(1, idx)
        total = w.sum(1, keepdim=True)
        g = (g - (g * w).sum(1, keepdim=True) / total) / total
    gs = torch.zeros_like(s).scatter_add(1, idx, g)
    gz = gs * s * (1 - s) if ctx.sigmoid else s * (gs - (gs * s).sum(1, keepdim=True))
    return gz.to(logits.dtype), None, None, None, None, None, None, None


route.register_autograd(_route_backward, setup_context=_route_setup)


def _permute_setup(ctx, inputs, output) -> None:
    x, _row_token, token_row = inputs
    ctx.save_for_backward(token_row)
    ctx.x_dtype = x.dtype


def _permute_backward(ctx, grad):
    """dx[t] = sum over k of grad[token_row[t, k]]: the gather's adjoint, which is unpermute with
    unit weights (a gather, so deterministic: no scatter-add)."""
    (token_row,) = ctx.saved_tensors
    ones = torch.ones(token_row.shape, dtype=torch.float32, device=token_row.device)
    return _lk_ops.unpermute(grad.to(ctx.x_dtype), token_row, ones), None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output) -> None:
    y, token_row, weights = inputs
    ctx.save_for_backward(y, token_row, weights)


def _unpermute_backward(ctx, grad):
    """dy[token_row[t, k]] = weights[t, k] * grad[t] (each row has at most one source, so a plain
    indexed write, with dropped pairs sent to a spare row); dweights[t, k] = grad[t] . y[row]."""
    y, token_row, weights = ctx.saved_tensors
    T, K = token_row.shape
    R, H = y.shape
    if y.is_cpu and y.dtype in (torch.float32, torch.bfloat16) and direct(y, grad, token_row, weights):
        return _unpermute_backward_cpu(ctx, grad, y, token_row, weights)
    g = grad.float()
    flat = token_row.reshape(-1).long()
    valid = flat >= 0
    dy = dw = None
    if ctx.needs_input_grad[0]:
        vals = (weights.reshape(-1, 1) * g.repeat_interleave(K, dim=0)).to(y.dtype)
        vals = torch.where(valid[:, None], vals, torch.zeros((), dtype=y.dtype, device=y.device))
        dy = y.new_zeros(R + 1, H).index_copy(0, torch.where(valid, flat, R), vals)[:R]
    if ctx.needs_input_grad[2]:
        rows = y.index_select(0, flat.clamp(0, max(R - 1, 0))).float().view(T, K, H) if R else \
            y.new_zeros(T, K, H, dtype=torch.float32)
        dw = torch.where(valid.view(T, K), (rows * g[:, None, :]).sum(-1), torch.zeros((), device=y.device))
    return dy, None, dw


def _unpermute_backward_cpu(ctx, grad, y, token_row, weights):
    """_unpermute_backward in one C++ pass (cpu/routing_body.h: unpermute_backward); eager CPU."""
    T, K = token_row.shape
    R, H = y.shape
    need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dy = y.new_zeros(R, H) if need_dy else None
    dw = torch.empty(T, K, dtype=torch.float32) if need_dw else None
    if T and H and (need_dy or need_dw):
        grad, y = grad.to(y.dtype).contiguous(), y.contiguous()
        token_row, weights = token_row.contiguous(), weights.contiguous()  # (weights: fp32, checked)
        _C.unpermute_backward(grad.data_ptr(), y.data_ptr(), _DTYPE_CODES[y.dtype], R, H, token_row.data_ptr(),
                              weights.data_ptr(), T, K, 0 if dy is None else dy.data_ptr(),
                              0 if dw is None else dw.data_ptr())
    elif dw is not None:
        dw.zero_()
    return dy, None, dw


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

# ------------------------------------------------------------------- training (MoE wgrad)
# quantize_fp8_transposed and fp8_k_grouped_gemm: tokens are the contraction dimension, split
# by expert (offs) into groups of 128 (reference.k_groups; csrc/common/k_groups.h).
def k_group_columns(M: int, num_experts: int) -> int:
    """Scale columns of the k-grouped layout: ceil(M/128) + E - 1."""
    return _cdiv(M, GROUP) + num_experts - 1


def quantize_fp8_transposed_impl(x, offs, ue8m0):
    """x [M, K] with unit column stride; offs None or a contiguous int32 [E]."""
    M, K = x.shape
    E = 1 if offs is None else offs.shape[0]
    dev = x.device
    q = torch.empty(K, M, dtype=FP8, device=dev)
    scale = torch.empty(K, k_group_columns(M, E), dtype=_F32, device=dev)
    if q.numel() == 0:
        scale.zero_()
        return q, scale
    device, stream = (-1, 0) if x.is_cpu else device_args(x)
    _C.quantize_fp8_transposed(x.data_ptr(), _DTYPE_CODES[x.dtype], M, K, x.stride(0),
                               0 if offs is None else offs.data_ptr(), E, q.data_ptr(), scale.data_ptr(), ue8m0,
                               device, stream)
    return q, scale


def _op_offs(offs, device) -> Optional[torch.Tensor]:
    if offs is None:
        return None
    _need_t("offs", offs, (torch.int32,), dim=1)
    _need(offs.shape[0] >= 1, "offs must hold at least one expert (E >= 1)")
    _need(offs.device == device, f"offs is on {offs.device} but the operands are on {device}")
    return offs.contiguous()


@_custom_op("leankernels::quantize_fp8_transposed", mutates_args=())
def quantize_fp8_transposed(x: torch.Tensor, offs: Optional[torch.Tensor], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _need_t("x", x, _FLOATS, dim=2)
    if x.stride(1) != 1 or x.stride(0) < 0:
        x = x.contiguous()
    return quantize_fp8_transposed_impl(x, _op_offs(offs, x.device), ue8m0)


@quantize_fp8_transposed.register_fake
def _(x, offs, ue8m0):
    M, K = x.shape
    E = 1 if offs is None else offs.shape[0]
    return x.new_empty((K, M), dtype=FP8), x.new_empty((K, k_group_columns(M, E)), dtype=torch.float32)


# NOTES: a CPU wgrad output of this size or more comes from the CPU buffer pool of
# leankernels.memory (2 MiB huge pages, blocks reused once the previous output of the same size
# is freed), not from torch.empty, which maps fresh memory for every allocation over 32 MiB
# (glibc): first-touching hundreds of MiB in 4 KiB pages cost more than the GEMM. 2-core Zen 4 VM
# (2026-12-03), V2-Lite wgrad T=4096 K=2048, fp32 out, fresh huge pages vs torch.empty: E=64
# N_out=1408 (738 MB) 477-492 -> 212-256 ms. Reused blocks (2026-12-04): no first touch at all;
# a MoE training step's wgrad GEMMs spent ~20% of their time zeroing fresh pages before.
# Below 8 MiB, torch.empty reuses memory already touched (glibc's heap).
_HUGE_OUTPUT_BYTES = 8 << 20


def fp8_k_grouped_gemm_impl(a, a_scale, b, b_scale, offs, out_dtype):
    """All contiguous; offs None or a contiguous int32 [E]."""
    M, L = a.shape
    N = b.shape[0]
    shape = (M, N) if offs is None else (offs.shape[0], M, N)
    nbytes = math.prod(shape) * out_dtype.itemsize
    if a.device.type == "cpu" and nbytes >= _HUGE_OUTPUT_BYTES:
        out = memory.empty_hugepages(*shape, dtype=out_dtype, reuse=True)
    else:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    _k_grouped_launch(a, a_scale, b, b_scale, offs, out, False)
    return out


def _k_grouped_launch(a, a_scale, b, b_scale, offs, out, accumulate: bool) -> None:
    if out.numel() == 0:
        return
    M, L = a.shape
    device, stream = device_args(a)
    _C.fp8_k_grouped_gemm(a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(),
                          0 if offs is None else offs.data_ptr(), 1 if offs is None else offs.shape[0], M,
                          b.shape[0], L, out.data_ptr(), dtype_code(out.dtype), device, stream, accumulate)


def fp8_k_grouped_gemm_out_impl(a, a_scale, b, b_scale, offs, out, accumulate: bool) -> None:
    """fp8_k_grouped_gemm_impl into ``out`` (contiguous, the op's shape): written, or with
    ``accumulate`` (f32 out) added to. The CPU kernels add in their stores; on a GPU the product
    goes to a temporary that is then added (the CUDA kernel has no accumulating store)."""
    if accumulate and a.device.type != "cpu":
        out.add_(fp8_k_grouped_gemm_impl(a, a_scale, b, b_scale, offs, torch.float32))
        return
    _k_grouped_launch(a, a_scale, b, b_scale, offs, out, accumulate)


def _k_grouped_checks(a, a_scale, b, b_scale, offs):
    """The op-level checks of fp8_k_grouped_gemm(_out); returns offs (contiguous or None)."""
    _need_t("a", a, (FP8,), dim=2)
    _need_t("b", b, (FP8,), dim=2)
    M, L = a.shape
    _need(b.shape[1] == L, f"a and b must have the same L (tokens); got {L} and {b.shape[1]}")
    offs = _op_offs(offs, a.device)
    G = k_group_columns(L, 1 if offs is None else offs.shape[0])
    _need_t("a_scale", a_scale, (torch.float32,), shape=(M, G))
    _need_t("b_scale", b_scale, (torch.float32,), shape=(b.shape[0], G))
    for name, t in (("a_scale", a_scale), ("b", b), ("b_scale", b_scale)):
        _need(t.device == a.device, f"{name} is on {t.device} but a is on {a.device}")
    return offs


@_custom_op("leankernels::fp8_k_grouped_gemm", mutates_args=())
def fp8_k_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       offs: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    offs = _k_grouped_checks(a, a_scale, b, b_scale, offs)
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"leankernels: out_dtype must be torch.bfloat16 or torch.float32; got {out_dtype}")
    return fp8_k_grouped_gemm_impl(a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous(),
                                   offs, out_dtype)


@_custom_op("leankernels::fp8_k_grouped_gemm_out", mutates_args=("out",))
def fp8_k_grouped_gemm_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                           offs: Optional[torch.Tensor], out: torch.Tensor, accumulate: bool) -> None:
    offs = _k_grouped_checks(a, a_scale, b, b_scale, offs)
    M, N = a.shape[0], b.shape[0]
    _need_t("out", out, (torch.float32,) if accumulate else (torch.bfloat16, torch.float32),
            shape=(M, N) if offs is None else (offs.shape[0], M, N))
    _need(out.device == a.device, f"out is on {out.device} but a is on {a.device}")
    _need(out.numel() == 0 or out.is_contiguous(), "out must be contiguous (the kernel writes rows in place)")
    fp8_k_grouped_gemm_out_impl(a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous(), offs,
                                out, accumulate)


@fp8_k_grouped_gemm_out.register_fake
def _(a, a_scale, b, b_scale, offs, out, accumulate):
    return None


@fp8_k_grouped_gemm.register_fake
def _(a, a_scale, b, b_scale, offs, out_dtype):
    M, N = a.shape[0], b.shape[0]
    return a.new_empty((M, N) if offs is None else (offs.shape[0], M, N), dtype=out_dtype)
