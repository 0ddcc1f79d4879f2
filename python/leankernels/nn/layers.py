"""DeepSeek-V3 layers on leankernels ops: Fp8Linear, MoE, MLAttention and a decoder block.

Each module loads from plain bf16/fp32 weights (``from_float`` takes the matching module of
leankernels.nn.plain, whose parameter names follow transformers' DeepseekV3 modules) and is
tested against that plain-PyTorch layer. No forward waits for the host (torch.compile(fullgraph=True)
traces them).

Inference (the default): FP8 weights only, parameters with requires_grad=False; a forward whose
input requires grad raises (there is nothing to train). Training: ``from_float(...,
trainable=True)`` keeps master weights as Parameters (as many trainable elements as the plain
layer) and runs DeepSeek-V3's FP8 recipe through ``fp8_linear`` / ``fp8_grouped_linear`` and
the differentiable routing ops; the FP8 copies are re-quantized only when a master weight
changes (its version counter moves, e.g. after an optimizer step).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .. import _ops
from ..gemm import fp8_gemm, fp8_grouped_gemm
from ..linear import fp8_grouped_linear, fp8_linear
from ..memory import empty_hugepages
from ..mla import LATENT, ROPE, LatentCache, mla_append, mla_decode
from ..quant import quantize_fp8, silu_mul_quantize_fp8
from ..routing import permute, plan, route, unpermute, update_bias
from . import plain
from .config import DeepSeekConfig, rope_interleaved, rope_tables

_OUT = (torch.bfloat16, torch.float32)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_FP8, _F32 = torch.float8_e4m3fn, torch.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _no_grad_needed(module: nn.Module, x: torch.Tensor) -> None:
    """An inference module refuses an input that requires grad at forward time (its FP8
    weights have no gradient; the error would otherwise come at backward time)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} was built for inference (FP8 weights, no master weights) "
                           f"but its input requires grad; build it with from_float(..., trainable=True) to "
                           f"train, or run it under torch.no_grad()")


def _fp8_copy(master: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, key: list):
    """``(q, scale)``: the 128x128 FP8 copy of a master weight, re-quantized into the buffers only
    when the master changed since the last call (``key`` holds its storage and version), for the
    ``quantized=`` argument of fp8_linear / fp8_grouped_linear. While torch.compile traces,
    returns None: the op then quantizes inside the graph."""
    if torch.compiler.is_compiling():
        return None
    now = (master.data_ptr(), master._version)
    if key[0] != now:
        with torch.no_grad():
            wq, ws = quantize_fp8(master.detach(), (128, 128))
            q.copy_(wq)
            scale.copy_(ws)
        key[0] = (master.data_ptr(), master._version)
    return q, scale


def _fp8_zeros(*shape, device=None) -> torch.Tensor:
    """float8_e4m3fn zeros as zero bytes (torch 2.4 has no fill kernel for float8 on the CPU); on
    the CPU in 2 MiB huge pages (leankernels.memory: decode streams them 11-25% faster in a VM)."""
    return empty_hugepages(*shape, dtype=torch.uint8, device=device).zero_().view(torch.float8_e4m3fn)


# ------------------------------------------------------------------------------ Fp8Linear
# ------------------------------------------------------------------ the eager CPU inference path
# NOTES: an inference forward on the CPU checks its operands once (_fp8_weight_ok and the
# caller's own checks) and calls the ops' implementations (leankernels._ops.*_impl), not the
# public functions, which would each check their arguments again. At decode the caches are cold
# when a layer runs (the other layers' weights have streamed through them since its last call),
# and cold, each public call costs ~40 us more than its implementation (route 74 vs 27 us, unpermute
# 60 vs 21: the checks touch many cold torch attribute getters): ~500 us of a V2-Lite MoE layer's
# ~3 ms at batch 1. Only plain eager calls take it (``_ops.direct``: no torch.compile, no
# dispatch or function mode, no autograd need); anything else takes the public functions.
def _fp8_weight_ok(w: torch.Tensor, s: torch.Tensor, *shape: int) -> bool:
    """Whether w is float8_e4m3fn of ``shape`` with its fp32 128x128 block scales s, both on the CPU."""
    return (w.dtype is _FP8 and s.dtype is _F32 and w.is_cpu and s.is_cpu and w.shape == shape
            and s.shape == (*shape[:-2], _cdiv(shape[-2], 128), _cdiv(shape[-1], 128)))


def _no_hooks(module: nn.Module) -> bool:
    """Whether calling module would run nothing but its forward (no forward hooks of its own or
    global ones), so a caller may run the forward's steps itself."""
    return not (module._forward_hooks or module._forward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks)


def _cpu_rows(x: torch.Tensor) -> bool:
    """Whether x (rows [T, K]) is a float tensor on the CPU."""
    return x.is_cpu and x.dtype in _FLOATS


# NOTES: a module's eager CPU inference forward at decode sizes is prepared once per input shape
# and dtype (_Prepared): its C++ call's arguments resolved, its output tensors allocated in
# batches. After a cache flush every distinct torch attribute or function a call touches costs
# ~15-25 us (its code and the objects' memory come from DRAM, in a VM through two levels of cold
# page tables): V2-Lite's MoE layer at batch 1 (2-core Xeon VM, medians of 60 flushed calls)
# spent ~1.3 ms of ~5.5 ms in the Python around its one C++ call (each operand's checks, the
# 9 weights' pointers, torch.empty); the prepared call checks what can change between calls.
_PREPARED_SHAPES = 4          # input shapes one module keeps prepared calls for
_OUT_BATCH_BYTES = 256 << 10  # outputs allocated at once (each its own storage), at most this many bytes
_MISSING = object()


def _link(module: nn.Module, name: str):
    """(the dict that holds module's attribute `name`, name, its value): parameters, buffers,
    submodules or plain attributes, as nn.Module looks them up."""
    for d in (module.__dict__.get("_parameters"), module.__dict__.get("_buffers"), module.__dict__.get("_modules")):
        if d is not None and name in d:
            return d, name, d[name]
    return module.__dict__, name, module.__dict__.get(name, _MISSING)


class _Prepared:
    """One module's eager CPU inference forward for one input shape and dtype as one C++ call
    ``leankernels._C.<fn>(x pointer, *mid, out pointer, *post)`` with arguments resolved once.
    ``run`` returns None, for the caller's checked path, when anything it was prepared from
    changed: an attribute, parameter, buffer or submodule re-bound (``links``: each must still
    hold the same object, also when set through the module's dicts, as loaders and ``_apply``
    do), a weight's data pointer moved (``.data =``), a module of ``typed`` with another class
    or (but the first, whose hooks its caller runs) a forward hook, or grad mode with a weight
    that requires grad, or (``trusted``: weights found free of NaN codes, see _ops.fp8_nan_free)
    one of those weights written in place since (its version counter moved). Each output is a fresh tensor (a batch holds only unused ones; one
    batch for inference mode and one outside it, so an output is an inference tensor exactly
    when the call ran in inference mode, as torch.empty's would be)."""

    __slots__ = ("links", "tensors", "ptrs", "typed", "fn", "mid", "post", "shape", "out_dtype", "outs", "trusted")

    def __init__(self, links, tensors, modules, fn, mid, post, shape, out_dtype, trusted=()):
        self.links, self.tensors = tuple(links), tuple(tensors)
        self.trusted = tuple((t, t._version) for t in trusted)
        self.typed = tuple((m, type(m), i > 0) for i, m in enumerate(modules))
        self.ptrs = tuple(t.data_ptr() for t in self.tensors)
        self.fn, self.mid, self.post = fn, mid, post
        self.shape, self.out_dtype, self.outs = tuple(shape), out_dtype, ([], [])

    def run(self, x: torch.Tensor):
        """The forward of x (a plain contiguous CPU tensor of the prepared shape and dtype, which
        the caller checked, with _ops.direct(x) true), or None."""
        for d, k, v in self.links:
            if d.get(k, _MISSING) is not v:
                return None
        for t, p in zip(self.tensors, self.ptrs):
            if t.data_ptr() != p:
                return None
        for t, v in self.trusted:
            if t._version != v:
                return None
        for m, cls, hooks in self.typed:
            if type(m) is not cls or (hooks and not _no_hooks(m)):
                return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors):
            return None
        outs = self.outs[torch.is_inference_mode_enabled()]
        if not outs:
            count = max(1, min(16, _OUT_BATCH_BYTES // max(1, math.prod(self.shape) * self.out_dtype.itemsize)))
            outs.extend(torch.empty(self.shape, dtype=self.out_dtype, device=_ops._CPU) for _ in range(count))
        out = outs.pop()
        getattr(_ops._C, self.fn)(x.data_ptr(), *self.mid, out.data_ptr(), *self.post)
        return out


def _run_prepared(module: nn.Module, x: torch.Tensor):
    """module's prepared forward of x (see _Prepared), or None."""
    prepared = module.__dict__.get("_prepared")
    if not prepared or type(x) is not torch.Tensor:
        return None
    p = prepared.get((x.shape, x.dtype))
    if p is None or not (x.is_cpu and x.is_contiguous() and _ops.direct(x)):
        return None
    return p.run(x)


def _keep_prepared(module: nn.Module, key, p: _Prepared) -> None:
    prepared = module.__dict__.setdefault("_prepared", {})
    if len(prepared) >= _PREPARED_SHAPES:
        prepared.clear()
    prepared[key] = p


# NOTES: at most this many tokens, the router's logits come from gate_logits (a C++ fp32 GEMV
# over the [E, H] gate weight, each weight row meeting every token once in L1) instead of
# x.float() and F.linear: V2-Lite batch 1 after a cache flush ~150 -> ~30 us. Above, torch's
# GEMM (compute-bound by then) is faster.
_GATE_ROWS = 16


def _router_logits(x2: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, E] of rows x2 [T, H] and the gate weight gw [E, H]."""
    if (_cpu_rows(x2) and x2.dim() == 2 and x2.shape[0] <= _GATE_ROWS and gw.dtype is _F32 and gw.dim() == 2
            and x2.shape[1] == gw.shape[1] and not gw.requires_grad and gw.is_cpu):
        return (_ops.gate_logits_impl if _ops.direct(x2, gw) else _ops.gate_logits)(x2, gw.contiguous())
    return F.linear(x2.float(), gw.float())


def fp8_linear_forward(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias, out_dtype):
    """``x [..., K] @ weight.T (+ bias)`` in ``out_dtype``: x quantized per call in 1x128 groups,
    ``weight`` float8_e4m3fn ``[N, K]`` with 128x128 ``weight_scale``, fp32 accumulation, the bias
    added in fp32. Shared by ``Fp8Linear`` and the transformers integration's FP8 linears."""
    x2 = x.reshape(-1, x.shape[-1])
    N = weight.shape[0]
    if (_ops.direct(x2, weight, weight_scale) and bias is None and out_dtype in _OUT and _cpu_rows(x2)
            and weight.dim() == 2 and _fp8_weight_ok(weight, weight_scale, N, x2.shape[1])):
        a, s = _ops.quantize_fp8_impl(x2, 1, False)
        y = _ops.fp8_gemm_impl(a, s, weight, weight_scale, out_dtype, _ops.fp8_nan_free(weight))
    else:
        a, s = quantize_fp8(x2)
        y = _fp8_gemm_bias(a, s, weight, weight_scale, bias, out_dtype)
    return y.view(*x.shape[:-1], N)


def _fp8_gemm_bias(a, s, weight, weight_scale, bias, out_dtype):
    """fp8_gemm of quantized rows a [M, K] (+ bias, added in fp32) in out_dtype."""
    if bias is None and out_dtype in _OUT:
        return fp8_gemm(a, s, weight, weight_scale, out_dtype)
    y = fp8_gemm(a, s, weight, weight_scale, torch.float32)
    return (y if bias is None else y + bias.float()).to(out_dtype)


class Fp8Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with W stored as float8_e4m3fn in 128x128 blocks (quantized
    once, at load) and x quantized per call in 1x128 groups, multiplied by ``fp8_gemm``.

    Args:
        in_features, out_features: K and N.
        bias: whether the layer has a bias (kept in ``dtype``, added after the GEMM in fp32).
        dtype: output dtype (``torch.bfloat16`` or ``torch.float32``); inputs of any float
            dtype are accepted.

    Buffers: ``weight`` float8_e4m3fn ``[N, K]`` and ``weight_scale_inv`` float32
    ``[ceil(N/128), ceil(K/128)]`` (the dequantization multiplier, as in DeepSeek-V3's FP8
    checkpoints, which load directly with ``from_fp8``).

    Trainable (``from_float(linear, trainable=True)``): ``master_weight`` fp32 ``[N, K]`` and
    ``bias`` are Parameters; the forward is ``fp8_linear`` (FP8 forward and backward) on x cast
    to ``dtype``; ``weight``/``weight_scale_inv`` follow the master, re-quantized when it changes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if dtype not in _OUT:
            raise TypeError(f"dtype must be torch.bfloat16 or torch.float32; got {dtype!r}")
        self.in_features, self.out_features, self.dtype = int(in_features), int(out_features), dtype
        self.register_buffer("weight", _fp8_zeros(out_features, in_features, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(_cdiv(out_features, 128), _cdiv(in_features, 128),
                                                            dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.register_parameter("master_weight", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype: torch.dtype | None = None, trainable: bool = False) -> "Fp8Linear":
        """Quantize an ``nn.Linear`` (any float dtype) to a new Fp8Linear on the same device;
        ``trainable=True`` also keeps its weight (fp32) and bias as trainable Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, dtype=dtype, trainable=trainable)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None, trainable: bool = False) -> "Fp8Linear":
        """From a float ``[N, K]`` weight (and optional ``[N]`` bias); see ``from_float``."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError("weight must be a 2-D float tensor [out_features, in_features]")
        dtype = dtype or (weight.dtype if weight.dtype in _OUT else torch.bfloat16)
        m = cls(weight.shape[1], weight.shape[0], bias is not None, weight.device, dtype)
        with torch.no_grad():
            w, s = quantize_fp8(weight.detach(), (128, 128))
            m.weight.copy_(w)
            m.weight_scale_inv.copy_(s)
            if bias is not None:
                m.bias.copy_(bias.detach().to(dtype))
        if trainable:
            m.master_weight = nn.Parameter(weight.detach().float().clone())
            m._fp8_key = [(m.master_weight.data_ptr(), m.master_weight._version)]
            if m.bias is not None:
                m.bias.requires_grad_(True)
        return m

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias=None,
                 dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        """From an already quantized weight (DeepSeek-V3 checkpoint layout: e4m3 ``[N, K]`` and
        ``weight_scale_inv`` ``[ceil(N/128), ceil(K/128)]``)."""
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise TypeError("weight must be a 2-D float8_e4m3fn tensor")
        m = cls(weight.shape[1], weight.shape[0], bias is not None, weight.device, dtype)
        if tuple(weight_scale_inv.shape) != tuple(m.weight_scale_inv.shape):
            raise ValueError(f"weight_scale_inv must have shape {tuple(m.weight_scale_inv.shape)}; "
                             f"got {tuple(weight_scale_inv.shape)}")
        with torch.no_grad():
            m.weight.copy_(weight)
            m.weight_scale_inv.copy_(weight_scale_inv.float())
            if bias is not None:
                m.bias.copy_(bias.to(dtype))
        return m

    @property
    def trainable(self) -> bool:
        return self.master_weight is not None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer multiplies by, as fp32 ``[N, K]``."""
        s = self.weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return self.weight.float() * s[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim {self.in_features}; got shape {tuple(x.shape)}")
        if self.master_weight is not None:
            q = _fp8_copy(self.master_weight, self.weight, self.weight_scale_inv, self._fp8_key)
            return fp8_linear(x if x.dtype == self.dtype else x.to(self.dtype), self.master_weight, self.bias,
                              quantized=q)
        _no_grad_needed(self, x)
        return fp8_linear_forward(x, self.weight, self.weight_scale_inv, self.bias, self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 128x128{', trainable' if self.trainable else ''}")


def _linear(module: nn.Module, fp8: bool, dtype: torch.dtype, trainable: bool = False) -> nn.Module:
    """An nn.Linear as Fp8Linear (fp8=True) or as a dtype copy (fp8=False); trainable or frozen."""
    if fp8:
        return Fp8Linear.from_float(module, dtype, trainable)
    out = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                    device=module.weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(module.weight)
        if module.bias is not None:
            out.bias.copy_(module.bias)
    return out.requires_grad_(trainable)


def _norm(src: plain.RMSNorm, trainable: bool = False) -> plain.RMSNorm:
    out = plain.RMSNorm(src.weight.shape[0], src.eps, src.weight.device)
    with torch.no_grad():
        out.weight.copy_(src.weight.float())
    return out.requires_grad_(trainable)


# ------------------------------------------------------------------------------------ MoE
def _bf16_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x[rows of e] @ w[e].T`` in bf16 for rows sorted by expert (the training baseline):
    ``F.grouped_mm`` where torch has it (2.8+), else a loop over the experts (reads offs on the
    host)."""
    xb, wb = x.bfloat16(), w.bfloat16()
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(xb, wb.transpose(1, 2), offs=offs)
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(xb[start:end] @ wb[e].T)
        start = end
    out.append(xb.new_zeros(x.shape[0] - start, w.shape[1]))
    return torch.cat(out)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (shared experts) with gate and up fused into one ``[2I, H]`` weight:
    ``down(silu(g) * u)`` where ``[g, u] = gate_up(x)``. Fp8Linear or nn.Linear projections."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down

    @classmethod
    def from_float(cls, mlp: plain.PlainMLP, fp8: bool = True, dtype=torch.bfloat16, trainable: bool = False) -> "SwiGLU":
        fused = nn.Linear(mlp.gate_proj.in_features, 2 * mlp.gate_proj.out_features, bias=False,
                          device=mlp.gate_proj.weight.device, dtype=mlp.gate_proj.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        return cls(_linear(fused, fp8, dtype, trainable), _linear(mlp.down_proj, fp8, dtype, trainable))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gp, dp = self.gate_up_proj, self.down_proj
        if isinstance(gp, Fp8Linear) and not gp.trainable and isinstance(dp, Fp8Linear) and not dp.trainable:
            # NOTES: the inference path in as few ops as possible (a decode step pays ~20-50 us
            # per op with cold caches): gate/up straight to fp32 (no bf16 rounding, no cast),
            # SwiGLU and the down projection's quantization in one pass (one batch-1 op after a
            # cache flush: ~48 us, against ~95 for chunk, silu, mul and quantize).
            _no_grad_needed(gp, x)
            x2 = x.reshape(-1, x.shape[-1])
            y = self._eager_cpu(x2)
            if y is None:
                gu = fp8_linear_forward(x2, gp.weight, gp.weight_scale_inv, gp.bias, torch.float32)
                a, s = silu_mul_quantize_fp8(gu)
                y = _fp8_gemm_bias(a, s, dp.weight, dp.weight_scale_inv, dp.bias, dp.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])
        dt = dp.weight.dtype if isinstance(dp, nn.Linear) else torch.float32
        gu = gp(x.to(dt) if isinstance(gp, nn.Linear) else x).float()
        g, u = gu.chunk(2, dim=-1)
        return dp((F.silu(g) * u).to(dt))

    def _eager_cpu(self, x2: torch.Tensor) -> torch.Tensor | None:
        """The FP8 inference forward of rows x2 [T, H] through the ops' implementations, or None
        where it does not apply (see the NOTES above _fp8_weight_ok)."""
        w = self._cpu_operands(x2)
        if w is None:
            return None
        a, s = _ops.quantize_fp8_impl(x2, 1, False)
        gu = _ops.fp8_gemm_impl(a, s, w[0], w[1], _F32, _ops.fp8_nan_free(w[0]))
        a, s = _ops.silu_mul_quantize_fp8_impl(gu, False)
        return _ops.fp8_gemm_impl(a, s, w[2], w[3], w[4], _ops.fp8_nan_free(w[2]))

    def _cpu_operands(self, x2: torch.Tensor):
        """(gate_up weight, its scale, down weight, its scale, out dtype) when the FP8 inference
        forward of rows x2 may run through the ops' implementations, else None."""
        gp, dp = self.gate_up_proj, self.down_proj
        if not (isinstance(gp, Fp8Linear) and not gp.trainable and isinstance(dp, Fp8Linear) and not dp.trainable):
            return None
        wg, sg, wd, sd = gp.weight, gp.weight_scale_inv, dp.weight, dp.weight_scale_inv
        if wg.dim() != 2 or wd.dim() != 2:
            return None
        N = wg.shape[0]  # gate and up: N // 2 each
        if not (_ops.direct(x2, wg, sg, wd, sd) and gp.bias is None and dp.bias is None and dp.dtype in _OUT
                and _cpu_rows(x2) and N % 2 == 0 and _fp8_weight_ok(wg, sg, N, x2.shape[1])
                and _fp8_weight_ok(wd, sd, wd.shape[0], N // 2)):
            return None
        return wg, sg, wd, sd, dp.dtype



class MoE(nn.Module):
    """DeepSeek-style MoE on leankernels ops: shared experts (a dense SwiGLU MLP) plus routed
    experts through ``route -> plan -> permute(quantize=True) -> fp8_grouped_gemm`` (gate and
    up fused, ``[E, 2I, H]``) ``-> silu_mul_quantize_fp8 -> fp8_grouped_gemm`` (down,
    ``[E, H, I]``) ``-> unpermute``. No step waits for the host.

    Args:
        cfg: the DeepSeekConfig (experts, top-k, groups, scoring, routed scaling).
        fp8_shared: shared experts as Fp8Linear (True) or bf16 nn.Linear.
        dtype: output dtype, bf16 (default) or fp32.

    Gates: ``scoring_func="sigmoid"`` uses the ``e_score_correction_bias`` buffer for
    selection (DeepSeek-V3), ``"softmax"`` none; both with ``n_group``/``topk_group`` limits.
    Load with ``MoE.from_float(plain.PlainMoE)`` or ``MoE.from_weights(cfg, gate, bias,
    experts=[(w_gate, w_up, w_down), ...], shared=(w_gate, w_up, w_down))``.

    Training (``trainable=True``): Parameters ``gate_weight`` ``[E, H]``, ``w13_master``
    ``[E, 2I, H]`` and ``w2_master`` ``[E, H, I]`` (fp32) plus the shared experts' (as many
    trainable elements as the plain layer); routed experts run ``route -> plan -> permute ->
    fp8_grouped_linear -> silu_mul -> fp8_grouped_linear -> unpermute``, all differentiable
    (gradients reach the gate through the routing weights; the selection bias only chooses).
    ``fp8_experts=False`` runs the same layer with bf16 ``F.grouped_mm`` experts and torch's
    ``F.silu(g) * u`` (the baseline).
    While training, tokens per expert accumulate in the ``load_counts`` buffer; ``balance()``
    applies DeepSeek's aux-loss-free bias update from them between steps.
    """

    def __init__(self, cfg: DeepSeekConfig, device=None, dtype=torch.bfloat16, fp8_shared: bool = True):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_weight = nn.Parameter(torch.zeros(E, H, dtype=torch.float32, device=device), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32, device=device)
                             if cfg.scoring_func == "sigmoid" else None)
        self.register_buffer("w13", _fp8_zeros(E, 2 * I, H, device=device))
        self.register_buffer("w13_scale", torch.ones(E, _cdiv(2 * I, 128), _cdiv(H, 128), device=device))
        self.register_buffer("w2", _fp8_zeros(E, H, I, device=device))
        self.register_buffer("w2_scale", torch.ones(E, _cdiv(H, 128), _cdiv(I, 128), device=device))
        self.register_parameter("w13_master", None)
        self.register_parameter("w2_master", None)
        self.fp8_experts = True
        self._routes_checked = set()  # bias given or not: route's arguments passed its checks (_eager_cpu)
        self.shared_experts = None
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            if fp8_shared:
                self.shared_experts = SwiGLU(Fp8Linear(H, 2 * Is, device=device, dtype=dtype),
                                             Fp8Linear(Is, H, device=device, dtype=dtype))
            else:
                self.shared_experts = SwiGLU(nn.Linear(H, 2 * Is, bias=False, device=device, dtype=dtype),
                                             nn.Linear(Is, H, bias=False, device=device, dtype=dtype))
        self.requires_grad_(False)

    @classmethod
    def from_weights(cls, cfg: DeepSeekConfig, gate: torch.Tensor, experts, bias=None, shared=None,
                     dtype=torch.bfloat16, fp8_shared: bool = True, trainable: bool = False,
                     fp8_experts: bool = True) -> "MoE":
        """From plain float weights: gate ``[E, H]``; experts: a list of E ``(w_gate [I, H],
        w_up [I, H], w_down [H, I])``; bias ``[E]`` (sigmoid gates); shared: one
        ``(w_gate, w_up, w_down)`` triple (intermediate = I * n_shared_experts) or None.
        ``trainable``/``fp8_experts``: see the class docstring."""
        if not fp8_experts and not trainable:
            raise ValueError("fp8_experts=False (bf16 F.grouped_mm experts) is a training baseline: pass trainable=True")
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if len(experts) != E:
            raise ValueError(f"experts must hold {E} (w_gate, w_up, w_down) triples; got {len(experts)}")
        m = cls(cfg, gate.device, dtype, fp8_shared)
        with torch.no_grad():
            m.gate_weight.copy_(gate.float())
            if bias is not None:
                if m.e_score_correction_bias is None:
                    raise ValueError("bias is only used with scoring_func='sigmoid'")
                m.e_score_correction_bias.copy_(bias.float())
            # quantize expert by expert (no full-size temporary; 128x128 blocks never straddle
            # the gate/up seam when I is a multiple of 128)
            for e in range(E):
                q, s = quantize_fp8(torch.cat([experts[e][0], experts[e][1]]), (128, 128))
                m.w13[e].copy_(q)
                m.w13_scale[e].copy_(s)
                q, s = quantize_fp8(experts[e][2], (128, 128))
                m.w2[e].copy_(q)
                m.w2_scale[e].copy_(s)
        if shared is None:
            m.shared_experts = None
        else:
            mlp = plain.PlainMLP(H, shared[0].shape[0], gate.device, shared[0].dtype)
            with torch.no_grad():
                mlp.gate_proj.weight.copy_(shared[0])
                mlp.up_proj.weight.copy_(shared[1])
                mlp.down_proj.weight.copy_(shared[2])
            m.shared_experts = SwiGLU.from_float(mlp, fp8_shared, dtype, trainable).requires_grad_(trainable)
        if trainable:
            m._make_trainable(experts, fp8_experts)
        return m

    def _make_trainable(self, experts, fp8_experts: bool) -> None:
        with torch.no_grad():
            w13 = torch.stack([torch.cat([g, u]).float() for g, u, _ in experts])
            w2 = torch.stack([d.float() for _, _, d in experts])
        self.w13_master, self.w2_master = nn.Parameter(w13), nn.Parameter(w2)
        self.gate_weight.requires_grad_(True)
        self.fp8_experts = bool(fp8_experts)
        self._fp8_keys = ([(w13.data_ptr(), w13._version)], [(w2.data_ptr(), w2._version)])
        self.register_buffer("load_counts", torch.zeros(self.cfg.n_routed_experts, dtype=torch.int64,
                                                        device=w13.device), persistent=False)

    @property
    def trainable(self) -> bool:
        return self.w13_master is not None

    @classmethod
    def from_float(cls, moe: plain.PlainMoE, dtype=torch.bfloat16, fp8_shared: bool = True, trainable: bool = False,
                   fp8_experts: bool = True, ep_group=None) -> "MoE":
        """From the plain-PyTorch (transformers-named) DeepSeek MoE; ``trainable`` and
        ``fp8_experts``: see the class docstring. With ``ep_group`` (a torch.distributed
        process group): expert parallelism, a ``leankernels.distributed.ExpertParallelMoE``
        keeping only this rank's experts (trainable too)."""
        if ep_group is not None:
            if not fp8_experts:
                raise ValueError("fp8_experts=False is not offered with ep_group (the EP layer runs FP8 experts)")
            from ..distributed import ExpertParallelMoE

            return ExpertParallelMoE.from_float(moe, ep_group, dtype, fp8_shared, trainable=trainable)
        ex = [(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight) for e in moe.experts]
        sh = moe.shared_experts
        shared = (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight) if sh is not None else None
        return cls.from_weights(moe.cfg, moe.gate.weight, ex, moe.gate.e_score_correction_bias, shared, dtype,
                                fp8_shared, trainable, fp8_experts)

    def route(self, x: torch.Tensor):
        """(weights fp32 [T, top_k], ids int32 [T, top_k]) for tokens x [T, H]."""
        cfg = self.cfg
        logits = _router_logits(x, self.gate_weight)
        return route(logits, cfg.num_experts_per_tok, cfg.scoring_func, self.e_score_correction_bias,
                     cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, float(cfg.routed_scaling_factor))

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts for tokens x [T, H] given the gate's choice; [T, H] in self.dtype."""
        p = plan(ids, self.cfg.n_routed_experts)
        if self.trainable:
            return self._train_experts(x, weights, p)
        a, s = permute(x, p, quantize=True)
        h = fp8_grouped_gemm(a, s, self.w13, self.w13_scale, p.offs, torch.float32)
        a, s = silu_mul_quantize_fp8(h)
        y = fp8_grouped_gemm(a, s, self.w2, self.w2_scale, p.offs, self.dtype)
        return unpermute(y, p, weights)

    def _train_experts(self, x: torch.Tensor, weights: torch.Tensor, p) -> torch.Tensor:
        if self.training:
            self.load_counts += p.counts
        y = self._grouped_swiglu(permute(x.to(self.dtype), p), p.offs)
        return unpermute(y, p, weights)

    def _grouped_swiglu(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The trainable routed experts on rows sorted by expert: gate/up, SwiGLU, down, through
        fp8_grouped_linear (or the bf16 baseline); shared with the expert-parallel layer."""
        if self.fp8_experts:
            h = fp8_grouped_linear(rows, self.w13_master, offs,
                                   quantized=_fp8_copy(self.w13_master, self.w13, self.w13_scale, self._fp8_keys[0]))
            # silu(g) * u in fp32, forward and backward in one pass each (leankernels::silu_mul)
            a = _ops.silu_mul(h).to(self.dtype)
        else:
            g, u = _bf16_grouped_mm(rows, self.w13_master, offs).float().chunk(2, dim=-1)
            a = (F.silu(g) * u).to(self.dtype)
        if self.fp8_experts:
            return fp8_grouped_linear(a, self.w2_master, offs,
                                      quantized=_fp8_copy(self.w2_master, self.w2, self.w2_scale, self._fp8_keys[1]))
        return _bf16_grouped_mm(a, self.w2_master, offs).to(self.dtype)

    @torch.no_grad()
    def balance(self, rate: float = 1e-3) -> torch.Tensor:
        """DeepSeek's aux-loss-free load balancing, between training steps: moves each expert's
        selection bias by ``rate`` towards the mean load (``update_bias``) using the tokens per
        expert counted since the last call, then resets the count. Returns those counts. (The
        expert-parallel layer sums the counts over its group first: a collective there.)"""
        if not self.trainable:
            raise RuntimeError("balance() counts tokens in training forwards: build the MoE with trainable=True")
        counts = self._global_counts(self.load_counts.clone())
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.copy_(update_bias(self.e_score_correction_bias, counts, rate))
        self.load_counts.zero_()
        return counts

    def _global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _run_prepared(self, x)
        if out is not None:
            return out
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"x must be a float tensor; got {x.dtype}")
        if shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x must have last dim hidden_size={self.cfg.hidden_size}; got shape {tuple(shape)}")
        if not self.trainable:
            _no_grad_needed(self, x)
        out = None if self.trainable else self._eager_cpu(x2, shape)
        if out is None:
            weights, ids = self.route(x2)
            if not _ops._is_compiling():
                self._routes_checked.add(self.e_score_correction_bias is None)
            out = self.experts(x2, weights, ids)
            if self.shared_experts is not None:
                out = self._add_shared(out, self.shared_experts(x2))
        return out.view(*shape[:-1], shape[-1])

    def _add_shared(self, out: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        # one add: torch adds bf16/fp16 in fp32 and rounds once, as (a.float() + b.float()).to(dt)
        return out + sh if sh.dtype == out.dtype else (out.float() + sh.float()).to(self.dtype)

    def _eager_cpu(self, x2: torch.Tensor, shape=None) -> torch.Tensor | None:
        """The inference forward of rows x2 [T, H] through the ops' implementations (route,
        plan, permute + quantize, GEMM, SiLU x up + quantize, GEMM, unpermute; the shared
        experts' steps beside the routed ones), or None where it does not apply (see the NOTES
        above _fp8_weight_ok): route's arguments are checked by the first forward, which takes
        the public functions."""
        cfg = self.cfg
        E, H, I, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        w13, s13, w2, s2 = self.w13, self.w13_scale, self.w2, self.w2_scale
        bias, gw = self.e_score_correction_bias, self.gate_weight
        if not (_ops.direct(x2, gw, bias, w13, s13, w2, s2) and (bias is None) in self._routes_checked
                and type(self).route is MoE.route and type(self).experts is MoE.experts and self.dtype in _OUT
                and _cpu_rows(x2) and x2.shape[0] * k < 2**31 and gw.shape == (E, H) and gw.is_cpu
                and gw.dtype is _F32 and (bias is None or (bias.dtype is _F32 and bias.is_cpu and bias.shape == (E,) and bias.is_contiguous()))
                and _fp8_weight_ok(w13, s13, E, 2 * I, H) and _fp8_weight_ok(w2, s2, E, H, I)):
            return None
        T = x2.shape[0]
        sh_module = self.shared_experts
        sw = None
        if sh_module is not None and type(sh_module).forward is SwiGLU.forward and _no_hooks(sh_module):
            sw = sh_module._cpu_operands(x2)
        if T <= _GATE_ROWS and (sh_module is None or (sw is not None and sw[4] is self.dtype)):
            # NOTES: the whole layer in one C++ call (cpu/moe.h), the same kernels in the same
            # order as the steps below, bitwise the same result: V2-Lite batch 1 after a cache
            # flush (2-core Intel Xeon VM) spent ~0.7 ms of its ~4.2 ms in the Python steps and
            # their allocations around the four weight streams.
            args = (k, cfg.scoring_func == "sigmoid", cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                    float(cfg.routed_scaling_factor))
            p = self._prepare(x2, shape, args, sw) if shape is not None else None
            out = None if p is None else p.run(x2)
            if out is not None:
                return out
            return _ops.moe_decode_impl(x2, gw, bias, *args, w13, s13, w2, s2, None if sh_module is None else sw,
                                        self.dtype, _ops.fp8_nan_free(w13, w2, *(() if sw is None else sw[0:4:2])))
        logits = _ops.gate_logits_impl(x2, gw.contiguous()) if T <= _GATE_ROWS else F.linear(x2.float(), gw)
        weights, ids = _ops.route_impl(logits, k, cfg.scoring_func == "sigmoid", bias, cfg.n_group, cfg.topk_group,
                                       cfg.norm_topk_prob, float(cfg.routed_scaling_factor))
        _, offs, row_token, token_row = _ops.plan_impl(ids, E, 1)
        a, s = _ops.permute_fp8_impl(x2, row_token, False)
        # NOTES: the shared experts' steps (when sw holds their operands) run beside the routed
        # ones (GEMM after GEMM, SiLU x up after SiLU x up): each step's code and small operands
        # are then still cached for its second call, where before every step met caches just
        # emptied by a weight stream. V2-Lite batch 1 after a cache flush, paired runs: 2862 ->
        # 2702 us and 2388 -> 2276 us (same results, bit for bit). One token: every permuted row
        # is that token's quantized row (permute's contract), so the shared experts read the
        # first one instead of quantizing x again.
        if sw is not None:
            xa, xs = (a[:1], s[:1]) if x2.shape[0] == 1 else _ops.quantize_fp8_impl(x2, 1, False)
        h = _ops.fp8_grouped_gemm_impl(a, s, w13, s13, offs, _F32, _ops.fp8_nan_free(w13))
        if sw is not None:
            gu = _ops.fp8_gemm_impl(xa, xs, sw[0], sw[1], _F32, _ops.fp8_nan_free(sw[0]))
        a, s = _ops.silu_mul_quantize_fp8_impl(h, False)
        if sw is not None:
            xa, xs = _ops.silu_mul_quantize_fp8_impl(gu, False)
        y = _ops.fp8_grouped_gemm_impl(a, s, w2, s2, offs, self.dtype, _ops.fp8_nan_free(w2))
        sh = None if sw is None else _ops.fp8_gemm_impl(xa, xs, sw[2], sw[3], sw[4], _ops.fp8_nan_free(sw[2]))
        out = _ops.unpermute_impl(y, token_row, weights)
        if sh_module is None:
            return out
        return self._add_shared(out, sh_module(x2) if sh is None else sh)

    def _prepare(self, x2: torch.Tensor, shape, args, sw) -> _Prepared | None:
        """The prepared one-call forward (moe_decode) for inputs of x's shape and dtype, kept for
        the next calls; None where an operand is not contiguous (the call then copies it)."""
        gw, bias, sh = self.gate_weight, self.e_score_correction_bias, self.shared_experts
        ws = [gw, self.w13, self.w13_scale, self.w2, self.w2_scale]
        links = [_link(self, n) for n in ("dtype", "cfg", "gate_weight", "e_score_correction_bias", "w13", "w13_scale",
                                          "w2", "w2_scale", "w13_master", "w2_master", "shared_experts")]
        if sh is not None:
            gp, dp = sh.gate_up_proj, sh.down_proj
            ws += list(sw[:4])
            links += [_link(sh, "gate_up_proj"), _link(sh, "down_proj")]
            links += [_link(m, n) for m in (gp, dp)
                      for n in ("weight", "weight_scale_inv", "bias", "master_weight", "dtype")]
        if not (x2.is_contiguous() and all(t.is_contiguous() for t in ws)) or any(v is _MISSING for _, _, v in links):
            return None
        T, H = x2.shape
        fp8 = [self.w13, self.w2] + ([] if sh is None else [sw[0], sw[2]])
        trusted = fp8 if _ops.fp8_nan_free(*fp8) else []
        mid, post = _ops.moe_decode_args(x2.dtype, T, H, H, bias, *args, ws, None if sh is None else sw[2].shape[1],
                                         self.dtype, bool(trusted))
        p = _Prepared(links, ws + ([] if bias is None else [bias]), [self] + ([] if sh is None else [sh]),
                      "moe_decode", mid, post, shape, self.dtype, trusted)
        _keep_prepared(self, (shape, x2.dtype), p)
        return p

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


# ---------------------------------------------------------------------------- MLAttention
def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 cache slots of positions [B, S] for sequences with block_table [B, max_blocks];
    computed on the device (no host sync)."""
    blk = block_table.long().gather(1, positions // block_size)
    return (blk * block_size + positions % block_size).reshape(-1)


class MLAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention over a paged latent cache.

    Projections: ``q_a_proj -> q_a_layernorm -> q_b_proj`` (or ``q_proj`` when q_lora_rank is
    None), ``kv_a_proj_with_mqa`` (latent 512 + shared RoPE key 64) ``-> kv_a_layernorm``,
    ``kv_b_proj`` (per head: 128 key + 128 value rows from the latent), ``o_proj``. RoPE is the
    interleaved rotation of DeepSeek-V3's reference code (what mla_append applies).

    Two paths, both appending the new tokens' latent rows to the cache with ``mla_append``
    (RMSNorm and RoPE fused into the write):

    * absorbed (decode, and any call with cached history): W_UK is folded into the query,
      ``q_lat[h] = q_nope[h] @ W_UK[h]`` (576-wide absorbed queries), attention runs over the
      latent cache with ``mla_decode`` (causal across the new tokens), and W_UV is applied to
      the 512-wide latent output;
    * decompress (prefill from an empty cache): keys and values are decompressed through
      kv_b_proj and attended with causal scaled_dot_product_attention.

    Args:
        cfg: DeepSeekConfig (kv_lora_rank must be 512, qk_rope_head_dim 64: the cache format).
        dtype: compute/output dtype (bf16 or fp32).
        fp8: projections as Fp8Linear (True) or bf16 nn.Linear; kv_b_proj stays bf16 (it is
            used per head for absorption).

    Load with ``MLAttention.from_float(plain_mla)`` (plain.PlainMLA, transformers' names:
    load a checkpoint into it first), or ``load_state_dict`` of a saved MLAttention (then call
    ``_absorb_weights()``; from_float does it).

    Training (``from_float(plain_mla, trainable=True)``): every projection and norm is a
    trainable Parameter (FP8 projections as trainable Fp8Linear); ``forward(x, cache=None)`` is
    the differentiable prefill (decompress path, causal over the S tokens, nothing cached). The
    absorbed decode weights are re-derived from kv_b_proj when it has changed.
    """

    def __init__(self, cfg: DeepSeekConfig, device=None, dtype=torch.bfloat16, fp8: bool = True):
        super().__init__()
        if cfg.kv_lora_rank != LATENT or cfg.qk_rope_head_dim != ROPE:
            raise ValueError(f"MLAttention needs kv_lora_rank {LATENT} and qk_rope_head_dim {ROPE} (the latent-cache "
                             f"format); got {cfg.kv_lora_rank} and {cfg.qk_rope_head_dim}")
        self.cfg, self.dtype, self.fp8, self._trainable = cfg, dtype, bool(fp8), False
        H, nh, r = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank

        def lin(k, n, fp8=self.fp8, dt=dtype):
            return Fp8Linear(k, n, device=device, dtype=dt) if fp8 else nn.Linear(k, n, bias=False, device=device, dtype=dt)

        self.fused_qkv_a_proj = None
        if r and self.fp8 and r % 128 == 0:
            # q_a_proj and kv_a_proj_with_mqa read the same x: one quantization, one GEMM. With
            # q_lora_rank a multiple of 128 no 128x128 weight block straddles the seam, so the
            # result is identical to the two separate layers.
            self.fused_qkv_a_proj = lin(H, r + LATENT + ROPE)
        elif r:
            self.q_a_proj = lin(H, r)
            self.kv_a_proj_with_mqa = lin(H, LATENT + ROPE)
        else:
            self.kv_a_proj_with_mqa = lin(H, LATENT + ROPE)
        if r:
            self.q_a_layernorm = plain.RMSNorm(r, cfg.rms_norm_eps, device)
            self.q_b_proj = lin(r, nh * cfg.qk_head_dim)
        else:
            self.q_proj = lin(H, nh * cfg.qk_head_dim)
        self.kv_a_layernorm = plain.RMSNorm(LATENT, cfg.rms_norm_eps, device)
        self.kv_b_proj = lin(LATENT, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), False, torch.bfloat16)
        self.o_proj = lin(nh * cfg.v_head_dim, H)
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._absorb_weights()
        self.requires_grad_(False)

    @classmethod
    def from_float(cls, attn: plain.PlainMLA, fp8: bool = True, dtype=torch.bfloat16,
                   trainable: bool = False) -> "MLAttention":
        """From the plain-PyTorch (transformers-named) MLA module; fp8: Fp8Linear projections
        (True) or bf16 nn.Linear ones; trainable: see the class docstring."""
        cfg = attn.cfg
        m = cls(cfg, attn.o_proj.weight.device, dtype, fp8)
        src = dict(attn.named_parameters())
        if m.fused_qkv_a_proj is not None:
            src["fused_qkv_a_proj.weight"] = torch.cat([attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight])
        with torch.no_grad():
            for name, mod in list(m.named_children()):
                if isinstance(mod, Fp8Linear):
                    new = Fp8Linear.from_weight(src[f"{name}.weight"], dtype=mod.dtype, trainable=trainable)
                    setattr(m, name, new)
                elif isinstance(mod, (nn.Linear, plain.RMSNorm)):
                    mod.weight.copy_(src[f"{name}.weight"])
                    mod.requires_grad_(trainable)
        m._absorb_weights()
        m._trainable = bool(trainable)
        return m

    @property
    def trainable(self) -> bool:
        return self._trainable

    def _absorb_weights(self) -> None:
        cfg = self.cfg
        self._absorbed_from = (self.kv_b_proj.weight.data_ptr(), self.kv_b_proj.weight._version)
        w = self.kv_b_proj.weight.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, LATENT)
        # W_UK [H, 128, 512] (q_nope @ W_UK -> latent query), W_UV^T [H, 512, 128] (latent out -> v)
        with torch.no_grad():
            self.register_buffer("w_uk", w[:, : cfg.qk_nope_head_dim].detach().contiguous(), persistent=False)
            self.register_buffer("w_uv_t", w[:, cfg.qk_nope_head_dim:].detach().transpose(1, 2).contiguous(),
                                 persistent=False)

    def _decompressed_attention(self, q, q_pe, kv_c, k_pe, cos, sin) -> torch.Tensor:
        """Causal attention of S new tokens over themselves with keys and values decompressed
        through kv_b_proj: q [B, S, nh, 192], q_pe the rotated [B, S, nh, 64] fp32, kv_c
        [B*S, 512], k_pe [B*S, 64] (not yet rotated); returns [B, S, nh * v_head_dim]."""
        cfg = self.cfg
        B, S, nh = q.shape[:3]
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        c = self.kv_a_layernorm(kv_c.float()).to(torch.bfloat16)
        kvb = self.kv_b_proj(c).view(B, S, nh, dn + dv)
        k_pe_r = rope_interleaved(k_pe.float().view(B, S, dr), cos[:, :, 0], sin[:, :, 0])
        k = torch.cat([kvb[..., :dn], k_pe_r.to(torch.bfloat16)[:, :, None, :].expand(B, S, nh, dr)], dim=-1)
        qq = torch.cat([q[..., :dn].to(torch.bfloat16), q_pe.to(torch.bfloat16)], dim=-1)
        o = F.scaled_dot_product_attention(qq.transpose(1, 2), k.transpose(1, 2), kvb[..., dn:].transpose(1, 2),
                                           is_causal=True, scale=cfg.softmax_scale)          # [B, nh, S, dv]
        return o.transpose(1, 2).reshape(B, S, nh * dv)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The cache-free (training) prefill: positions 0 .. S-1 of each sequence."""
        cfg = self.cfg
        B, S, _ = x.shape
        x = x.to(self.dtype)
        q, kv = self._q_kv(x)
        q = q.view(B, S, cfg.num_attention_heads, cfg.qk_head_dim)
        cos, sin = self.cos[:S][None, :, None, :], self.sin[:S][None, :, None, :]
        q_pe = rope_interleaved(q[..., cfg.qk_nope_head_dim:].float(), cos, sin)
        kv = kv.reshape(B * S, LATENT + ROPE)
        o = self._decompressed_attention(q, q_pe, kv[:, :LATENT], kv[:, LATENT:], cos.expand(B, S, 1, -1),
                                         sin.expand(B, S, 1, -1))
        return self.o_proj(o.to(self.dtype))

    def _q_kv(self, x: torch.Tensor):
        """(q [.., heads * 192], kv_a [.., 576]) for x [.., hidden]."""
        r = self.cfg.q_lora_rank
        if self.fused_qkv_a_proj is not None:
            qkv = self.fused_qkv_a_proj(x)
            return self.q_b_proj(self.q_a_layernorm(qkv[..., :r])), qkv[..., r:]
        kv = self.kv_a_proj_with_mqa(x)
        if r:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))), kv
        return self.q_proj(x), kv

    def forward(self, x: torch.Tensor, cache=None, block_table: torch.Tensor | None = None, start=0,
                mode: str = "auto") -> torch.Tensor:
        """Attend S new tokens per sequence and append them to the cache.

        Args:
            x: ``[B, S, hidden]`` hidden states (after the input RMSNorm).
            cache: the latent cache tensor (``LatentCache.kv``) or a LatentCache; None: a
                training prefill (causal over the S tokens, nothing cached; block_table and
                start unused, mode must be "auto" or "decompress").
            block_table: ``[B, max_blocks]`` int32 blocks of each sequence.
            start: tokens already cached per sequence: an int (same for all) or an int
                tensor ``[B]`` on x's device. The new tokens take positions start .. start+S-1.
            mode: ``"auto"`` (decompress when start is the int 0 and S > 1, else absorbed),
                ``"absorb"`` or ``"decompress"`` (start must be 0).

        Returns:
            ``[B, S, hidden]`` in the layer's dtype.
        """
        cfg = self.cfg
        kv_cache = cache.kv if isinstance(cache, LatentCache) else cache
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"x must be [B, S, {cfg.hidden_size}]; got {tuple(getattr(x, 'shape', ()))}")
        if not self.trainable:
            _no_grad_needed(self, x)
        if kv_cache is None:
            if mode not in ("auto", "decompress"):
                raise ValueError(f"cache=None (training prefill) runs the decompress path; got mode={mode!r}")
            return self._prefill(x)
        if self._trainable and not torch.compiler.is_compiling() and \
                (self.kv_b_proj.weight.data_ptr(), self.kv_b_proj.weight._version) != self._absorbed_from:
            self._absorb_weights()   # kv_b_proj trained since the last absorption
        B, S, _ = x.shape
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError("block_table must be an int32 tensor [B, max_blocks]")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table has {block_table.shape[0]} rows but x has batch {B}")
        if isinstance(start, torch.Tensor) and tuple(start.shape) != (B,):
            raise ValueError(f"start must be an int or a [B] = [{B}] tensor; got shape {tuple(start.shape)}")
        nh, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if mode not in ("auto", "absorb", "decompress"):
            raise ValueError(f"mode must be 'auto', 'absorb' or 'decompress'; got {mode!r}")
        zero_start = isinstance(start, int) and start == 0
        if mode == "decompress" and not zero_start:
            raise ValueError("mode='decompress' needs start == 0 (an empty cache)")
        decompress = mode == "decompress" or (mode == "auto" and zero_start and S > 1)
        x = x.to(self.dtype)
        dev = x.device
        if isinstance(start, int):
            start_t = torch.full((B,), start, dtype=torch.int64, device=dev)
        else:
            start_t = start.to(device=dev, dtype=torch.int64)
        positions = start_t[:, None] + torch.arange(S, device=dev)[None, :]           # [B, S]
        slots = slot_mapping(block_table, positions, kv_cache.shape[1])

        q, kv = self._q_kv(x)
        q = q.view(B, S, nh, dn + dr)
        cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        q_pe = rope_interleaved(q[..., dn:].float(), cos, sin)                          # [B, S, nh, 64] fp32
        kv = kv.reshape(B * S, LATENT + ROPE)
        kv_c, k_pe = kv[:, :LATENT], kv[:, LATENT:]
        mla_append(kv_cache, kv_c, k_pe, slots, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                   self.cos, self.sin, positions.reshape(-1))

        if decompress:
            o = self._decompressed_attention(q, q_pe, kv_c, k_pe, cos, sin)
        else:
            q_nope = q[..., :dn].to(torch.bfloat16).reshape(B * S, nh, dn).transpose(0, 1)    # [nh, BS, dn]
            q_lat = torch.bmm(q_nope, self.w_uk)                                              # [nh, BS, 512]
            qa = torch.cat([q_lat.transpose(0, 1).reshape(B, S, nh, LATENT),
                            q_pe.to(torch.bfloat16)], dim=-1)                                 # [B, S, nh, 576]
            seqlens = (start_t + S).to(torch.int32)
            out, _ = mla_decode(qa.contiguous(), kv_cache, block_table, seqlens, cfg.softmax_scale, causal=True)
            o = torch.bmm(out.reshape(B * S, nh, LATENT).transpose(0, 1), self.w_uv_t)       # [nh, BS, dv]
            o = o.transpose(0, 1).reshape(B, S, nh * dv)
        return self.o_proj(o.to(self.dtype))


# ---------------------------------------------------------------------------- the block
class DecoderBlock(nn.Module):
    """RMSNorm -> MLAttention -> residual -> RMSNorm -> MoE -> residual, on leankernels ops."""

    def __init__(self, cfg: DeepSeekConfig, attn: MLAttention, moe: MoE, norms, dtype=torch.bfloat16):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.input_layernorm, self.post_attention_layernorm = norms
        self.self_attn, self.mlp = attn, moe

    @classmethod
    def from_float(cls, block: plain.PlainBlock, dtype=torch.bfloat16, fp8: bool = True,
                   trainable: bool = False) -> "DecoderBlock":
        """From a plain.PlainBlock; ``trainable``: every part trainable (fp8=False: bf16
        projections and bf16 F.grouped_mm experts, the training baseline)."""
        attn = MLAttention.from_float(block.self_attn, fp8, dtype, trainable)
        moe = MoE.from_float(block.mlp, dtype, fp8_shared=fp8, trainable=trainable, fp8_experts=fp8 or not trainable)
        norms = (_norm(block.input_layernorm, trainable), _norm(block.post_attention_layernorm, trainable))
        return cls(block.cfg, attn, moe, norms, dtype)

    def forward(self, x: torch.Tensor, cache=None, block_table: torch.Tensor | None = None, start=0,
                mode: str = "auto") -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cache, block_table, start, mode).to(x.dtype)
        return h + self.mlp(self.post_attention_layernorm(h)).to(x.dtype)
