"""Expert gating and token routing for Mixture-of-Experts layers: the public wrappers.

A MoE layer with these ops::

    weights, ids = route(logits, top_k=8, score="sigmoid", bias=bias, n_group=8, topk_group=4,
                         scale=2.5)                      # DeepSeek-V3 gate, one kernel
    p = plan(ids, num_experts=256)                       # expert-sorted layout, on the device
    a, a_scale = permute(x, p, quantize=True)            # gather + 1x128 FP8 quantization
    y = fp8_grouped_gemm(a, a_scale, w, w_scale, p.offs) # expert GEMMs
    out = unpermute(y, p, weights)                       # weighted combine, token order

No op synchronises with the host (plan's row count is a static bound), so the whole layer is
CUDA-graph capturable; every op is deterministic. reference.py holds the specification.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks, _interop, _ops
from ._lib import build_info

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_IDS = (torch.int32, torch.int64)
_SCORES = ("softmax", "sigmoid")
MAX_TOP_K = 32
_INT32, _F32 = torch.int32, torch.float32
_Tensor = torch.Tensor
_I32 = (_INT32,)


class RoutePlan(NamedTuple):
    """Where each (token, k) pair goes in expert-sorted order. All int32 tensors on the device.

    counts: ``[E]`` tokens routed to each expert (unpadded).
    offs: ``[E]`` cumulative END row of each expert's segment, each segment padded to ``align``
        rows (the ``offs`` of fp8_grouped_gemm / F.grouped_mm).
    row_token: ``[R]`` source token of each permuted row; -1 for padding rows and rows past
        ``offs[-1]``. R = T*top_k + min(E, T*top_k) * (align - 1), a static bound.
    token_row: ``[T, top_k]`` permuted row of each (token, k); -1 where the id was dropped.
    """
    counts: torch.Tensor
    offs: torch.Tensor
    row_token: torch.Tensor
    token_row: torch.Tensor


_PLAN_FIELDS = tuple(f"plan.{name}" for name in RoutePlan._fields)


def _new_plan(fields: tuple) -> RoutePlan:
    return tuple.__new__(RoutePlan, fields)  # RoutePlan(*fields) without the argument parsing


def _int(name: str, v, lo: int = None) -> int:
    if type(v) is int and (lo is None or v >= lo):
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v}")
    return v


def _cuda_checked(name: str, t: torch.Tensor) -> None:
    if t.is_cuda and not build_info()["cuda"]:
        raise ValueError(f"{name} is on {t.device} but this leankernels build has no CUDA kernels")


def route(logits, top_k: int, score: str = "softmax", bias=None, n_group: int = 1, topk_group: int = 1,
          renormalize: bool = True, scale: float = 1.0):
    """Pick top_k experts per token and their gate weights, in one pass over the logits.

    Args:
        logits: ``[T, E]`` float32, bfloat16 or float16 router logits (any row stride).
        top_k: experts per token, 1 <= top_k <= min(E, 32).
        score: ``"softmax"`` (Mixtral, Qwen) or ``"sigmoid"`` (DeepSeek-V3).
        bias: optional ``[E]`` float tensor added to the scores for selection only
            (DeepSeek-V3's e_score_correction_bias; see update_bias).
        n_group, topk_group: group-limited routing: the E experts form n_group equal groups
            (any size; n_group must divide E), each group scores the sum of its top-2
            selection scores (bias given) or its best score (no bias), and only experts of the
            topk_group best groups are eligible.
        renormalize: divide the chosen weights by their sum (fp32, summed in k order).
        scale: multiplies the weights after renormalisation (DeepSeek-V3: 2.5).

    Returns:
        ``(weights, ids)``: float32 ``[T, top_k]`` and int32 ``[T, top_k]``; ids ordered by
        descending selection score, ties to the lower expert index (and the lower group
        index). Weights are the unbiased scores of the chosen experts.

    Scores are sigmoid/softmax evaluated in float64 and rounded once to fp32 (correctly
    rounded, identical on every device). NaN logits: the score is NaN and ranks as -inf in
    selection (a NaN expert is chosen only when fewer than top_k others are eligible, and then
    that token's renormalised weights are NaN); softmax leaves NaN logits out of its sum, and a
    row without a finite maximum logit (all -inf, or a +inf) has all-NaN softmax scores, as in
    PyTorch. CUDA supports up to 12288 experts; the CPU any number.
    """
    if (type(logits) is _Tensor and type(top_k) is int and type(n_group) is int and type(topk_group) is int
            and type(scale) is float and (renormalize is True or renormalize is False)
            and (score == "sigmoid" or score == "softmax") and logits.is_cpu
            and top_k >= 1 and topk_group >= 1 and n_group >= 1 and -3.4e38 <= scale <= 3.4e38
            and (bias is None or (type(bias) is _Tensor and bias.is_cpu and bias.dtype is _F32 and bias.dim() == 1
                                  and bias.is_contiguous()))):
        # an eager CPU call: the checks below in fewer expressions (a decode step makes many),
        # each attribute read once
        dt, ls = logits.dtype, logits.shape
        if dt in _FLOAT and len(ls) == 2:
            E = ls[1]
            G = E // n_group
            if (top_k <= E and top_k <= MAX_TOP_K and E == G * n_group and topk_group <= n_group
                    and (n_group == 1 or (top_k <= topk_group * G and (bias is None or G >= 2)))
                    and (bias is None or bias.shape[0] == E) and _ops.direct_cpu(logits, bias)):
                return _ops.route_rows(logits, _ops._DTYPE_CODES[dt], ls[0], E, top_k, score == "sigmoid", bias,
                                       n_group, topk_group, renormalize, scale)
    src = logits
    logits = _interop.to_torch(logits)
    _checks.tensor("logits", logits, _FLOAT, dim=2)
    if logits.is_cuda:
        _cuda_checked("logits", logits)
    T, E = logits.shape
    if not (type(top_k) is int and type(n_group) is int and type(topk_group) is int
            and top_k >= 1 and n_group >= 1 and topk_group >= 1):
        top_k = _int("top_k", top_k, 1)
        n_group = _int("n_group", n_group, 1)
        topk_group = _int("topk_group", topk_group, 1)
    if E < 1:
        raise ValueError("logits must have at least one expert (shape [T, E] with E >= 1)")
    if score not in _SCORES:
        raise ValueError(f"score must be 'softmax' or 'sigmoid'; got {score!r}")
    if top_k > E:
        raise ValueError(f"top_k ({top_k}) exceeds the number of experts ({E})")
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k must be <= {MAX_TOP_K}; got {top_k}")
    if E % n_group:
        raise ValueError(f"n_group ({n_group}) must divide the number of experts ({E})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) exceeds n_group ({n_group})")
    G = E // n_group
    if n_group > 1 and top_k > topk_group * G:
        raise ValueError(f"top_k ({top_k}) exceeds the {topk_group * G} experts of the topk_group={topk_group} kept groups")
    if logits.is_cuda and E > 12288:
        raise ValueError(f"logits has {E} experts; the CUDA route kernel supports up to 12288")
    if bias is not None:
        bias = _interop.to_torch(bias)
        _checks.tensor("bias", bias, _FLOAT, dim=1)
        _checks.shape("bias", bias, (E,))
        _checks.same_device2("logits", logits, "bias", bias)
        if n_group > 1 and G < 2:
            raise ValueError("bias with n_group > 1 needs at least 2 experts per group (groups score their top-2)")
        if bias.dtype != torch.float32:
            bias = bias.float()
        if not bias.is_contiguous():
            bias = bias.contiguous()
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool; got {type(renormalize).__name__}")
    if type(scale) is not float and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a float; got {type(scale).__name__}")
    if abs(scale) > 3.4e38:
        raise ValueError(f"scale must fit float32; got {scale}")
    op = _ops.route_impl if _ops.direct(logits, bias) else _ops.route
    w, ids = op(logits, top_k, score == "sigmoid", bias, n_group, topk_group, renormalize, float(scale))
    if src is logits:
        return w, ids
    return _interop.like_input(w, src), _interop.like_input(ids, src)


def plan(ids, num_experts: int, align: int = 1) -> RoutePlan:
    """Lay the routed (token, k) pairs out by expert, entirely on the device.

    Args:
        ids: ``[T, top_k]`` int32 (or int64) expert ids, e.g. from route. Ids outside
            ``[0, num_experts)`` mean "not routed here" (expert parallelism: experts owned by
            another rank) and are dropped.
        num_experts: E, the number of (local) experts.
        align: pad each expert's segment to a multiple of align rows (e.g. a GEMM tile).

    Returns:
        RoutePlan(counts, offs, row_token, token_row), int32. Rows of one expert keep token
        order (stable, ordered by the flat (token, k) index). The row count
        R = T*top_k + min(E, T*top_k) * (align - 1) is a static bound, so nothing waits for the
        device; rows past ``offs[-1]`` are padding (-1). Deterministic. CUDA supports up to
        12288 experts.
    """
    if (type(ids) is _Tensor and type(num_experts) is int and type(align) is int and ids.is_cpu
            and ids.dtype is _INT32 and 1 <= num_experts < 2**31 and align >= 1 and ids.is_contiguous()
            and _ops.plain_eager()):
        # an eager CPU call: the checks below in fewer expressions (a decode step makes many).
        # Contiguous int32: strided (a sparse tensor is not contiguous), never requires grad.
        s = ids.shape
        if len(s) == 2:
            T, K = s
            R = T * K if align == 1 else _ops.plan_rows(T, K, num_experts, align)
            if R < 2**31:
                return _new_plan(_ops.plan_impl(ids, num_experts, align, R, s))
    ids = _interop.to_torch(ids)
    _checks.tensor("ids", ids, _IDS, dim=2)
    if ids.is_cuda:
        _cuda_checked("ids", ids)
    if not (type(num_experts) is int and type(align) is int and num_experts >= 1 and align >= 1):
        num_experts = _int("num_experts", num_experts, 1)
        align = _int("align", align, 1)
    R = _ops.plan_rows(ids.shape[0], ids.shape[1], num_experts, align)
    if R >= 2**31 or num_experts >= 2**31:
        raise ValueError(f"ids with num_experts={num_experts}, align={align} routes {R} rows; plan indexes "
                         "rows and experts with int32 (< 2**31)")
    if ids.is_cuda and num_experts > 12288:
        raise ValueError(f"num_experts ({num_experts}) exceeds 12288, the CUDA plan kernel's limit")
    if ids.dtype != torch.int32:
        ids = ids.clamp(-1, num_experts).to(torch.int32)
    if _ops.direct(ids):
        return _new_plan(_ops.plan_impl(ids if ids.is_contiguous() else ids.contiguous(), num_experts, align, R))
    return RoutePlan(*_ops.plan(ids, num_experts, align))


def _plan_maps(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's (row_token, token_row), validated: the only fields permute and unpermute read."""
    if isinstance(plan, tuple) and len(plan) == 4:
        rt, tr = plan[2], plan[3]
        if (type(rt) is _Tensor and type(tr) is _Tensor and rt.dtype is _INT32 and tr.dtype is _INT32
                and rt.dim() == 1 and tr.dim() == 2 and (rt.is_cpu or rt.is_cuda) and (tr.is_cpu or tr.is_cuda)):
            return rt, tr  # the common case in one expression; anything else takes the checks below
    else:
        raise TypeError(f"plan must be the RoutePlan returned by leankernels.plan; got {type(plan).__name__}")
    for name, t in zip(_PLAN_FIELDS[2:], (rt, tr)):
        _checks.tensor(name, t, _I32)  # raises, naming the field (or accepts a meta tensor)
    if rt.dim() != 1 or tr.dim() != 2:
        raise ValueError("plan has the wrong shapes; pass the RoutePlan returned by leankernels.plan")
    return rt, tr


def permute(x, plan: RoutePlan, quantize: bool = False, scale_fmt: str = "fp32"):
    """Gather token rows into expert-sorted order (optionally quantized to FP8 in the same pass).

    Args:
        x: ``[T, H]`` float32, bfloat16 or float16 activations (unit column stride).
        plan: the RoutePlan of these T tokens.
        quantize: also quantize each gathered row to float8_e4m3fn with one fp32 scale per
            128 columns (1x128 groups, the fp8_grouped_gemm activation format).
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` scales (as quantize_fp8), with quantize=True.

    Returns:
        ``[R, H]`` rows in x's dtype, padding rows zero; or with quantize=True
        ``(x_fp8 [R, H], scale [R, ceil(H/128)])``, byte-identical to
        ``quantize_fp8(permute(x, plan))`` (padding rows: zeros with scale 1e-4/448).
    """
    if type(x) is _Tensor and type(plan) is RoutePlan:
        rt, tr = plan[2], plan[3]
        if type(rt) is _Tensor and type(tr) is _Tensor and x.is_cpu and rt.is_cpu:
            # an eager CPU call: the checks below in fewer expressions (a decode step makes many),
            # each attribute read once (~0.1-0.4 us each on a slow CPU)
            dt, xs, rs, ts = x.dtype, x.shape, rt.shape, tr.shape
            if (dt in _FLOAT and rt.dtype is _INT32 and tr.dtype is _INT32 and len(xs) == 2 and len(rs) == 1
                    and len(ts) == 2 and (quantize is False or quantize is True)
                    and (scale_fmt == "fp32" or scale_fmt == "ue8m0") and xs[0] == ts[0] and rt.is_contiguous()
                    and _ops.direct_cpu(x)):  # rt: contiguous int32, so strided and never requiring grad
                if quantize:
                    return _ops.permute_fp8_rows(x, _ops._DTYPE_CODES[dt], xs[0], xs[1], rt, rs[0],
                                                 scale_fmt == "ue8m0")
                return _ops.permute_impl(x, rt)
    src = x
    x = _interop.to_torch(x)
    _checks.tensor("x", x, _FLOAT, dim=2)
    row_token, token_row = _plan_maps(plan)
    _checks.same_device2("x", x, "row_token", row_token)
    if x.is_cuda:
        _cuda_checked("x", x)
    if x.shape[0] != token_row.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but plan was made for {token_row.shape[0]}")
    if quantize is not False and quantize is not True:
        raise TypeError(f"quantize must be a bool; got {type(quantize).__name__}")
    if scale_fmt != "fp32" and scale_fmt != "ue8m0":
        raise ValueError(f"scale_fmt must be 'fp32' or 'ue8m0'; got {scale_fmt!r}")
    fast = _ops.direct(x, row_token)
    if fast and not row_token.is_contiguous():
        row_token = row_token.contiguous()
    if quantize and not fast:
        _checks.no_grad_needed("permute(quantize=True)", "train with quantize=False (differentiable) and "
                               "fp8_grouped_linear, which quantizes inside", x)
    if quantize:
        q, s = (_ops.permute_fp8_impl if fast else _ops.permute_fp8)(x, row_token, scale_fmt == "ue8m0")
        if src is x:
            return q, s
        return _interop.like_input(q, src), _interop.like_input(s, src)
    out = _ops.permute_impl(x, row_token) if fast else _ops.permute(x, row_token, token_row)
    return out if src is x else _interop.like_input(out, src)


def unpermute(y, plan: RoutePlan, weights):
    """Weighted combine of the expert outputs back into token order.

    Args:
        y: ``[R, H]`` float32, bfloat16 or float16 expert outputs in the plan's row order.
        plan: the RoutePlan that laid the rows out.
        weights: ``[T, top_k]`` gate weights (float32; other float dtypes are widened).

    Returns:
        ``[T, H]`` in y's dtype: out[t] = sum over k of weights[t, k] * y[token_row[t, k]],
        accumulated in fp32 in k order; dropped (t, k) pairs contribute nothing, so a token
        routed nowhere gets zeros.
    """
    if type(y) is _Tensor and type(plan) is RoutePlan and type(weights) is _Tensor:
        rt, tr = plan[2], plan[3]
        if type(rt) is _Tensor and type(tr) is _Tensor and y.is_cpu and tr.is_cpu and weights.is_cpu:
            # an eager CPU call: the checks below in fewer expressions, each attribute read once
            dt, ys, rs, ts = y.dtype, y.shape, rt.shape, tr.shape
            if (dt in _FLOAT and weights.dtype is _F32 and rt.dtype is _INT32 and tr.dtype is _INT32
                    and len(ys) == 2 and len(rs) == 1 and len(ts) == 2 and ys[0] == rs[0] and weights.shape == ts
                    and _ops.direct_cpu(y, tr, weights)):
                return _ops.unpermute_rows(y, dt, ys[0], ys[1], tr, ts[0], ts[1], weights)
    src = y
    y = _interop.to_torch(y)
    weights = _interop.to_torch(weights)
    _checks.tensor("y", y, _FLOAT, dim=2)
    row_token, token_row = _plan_maps(plan)
    _checks.tensor("weights", weights, _FLOAT, dim=2)
    _checks.same_device2("y", y, "token_row", token_row)
    _checks.same_device2("y", y, "weights", weights)
    if y.is_cuda:
        _cuda_checked("y", y)
    if y.shape[0] != row_token.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but plan has {row_token.shape[0]}")
    if weights.shape != token_row.shape:
        _checks.shape("weights", weights, tuple(token_row.shape))
    if weights.dtype is not _F32:
        weights = weights.float()
    op = _ops.unpermute_impl if _ops.direct(y, token_row, weights) else _ops.unpermute
    out = op(y, token_row, weights)
    return out if src is y else _interop.like_input(out, src)


def update_bias(bias, counts, rate: float = 1e-3):
    """DeepSeek-V3 auxiliary-loss-free load balancing step.

    Args:
        bias: ``[E]`` float32 selection bias (route's ``bias``).
        counts: ``[E]`` int32 or int64 tokens per expert (``plan(...).counts``, possibly summed
            over steps or ranks).
        rate: the bias update speed gamma.

    Returns:
        A new float32 ``[E]`` tensor: bias_e + rate * sign(mean(counts) - counts_e); the sign is
        exact (computed in integers as sign(sum(counts) - E * counts_e)), so overloaded experts
        go down and underloaded ones up.
    """
    src = bias
    bias = _interop.to_torch(bias)
    counts = _interop.to_torch(counts)
    _checks.tensor("bias", bias, (torch.float32,), dim=1)
    _checks.tensor("counts", counts, _IDS, dim=1)
    _checks.same_device(bias=bias, counts=counts)
    _cuda_checked("bias", bias)
    _checks.shape("counts", counts, tuple(bias.shape))
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"rate must be a float; got {type(rate).__name__}")
    if abs(rate) > 3.4e38:
        raise ValueError(f"rate must fit float32; got {rate}")
    op = _ops.update_bias_impl if _ops.direct(bias, counts) else _ops.update_bias
    return _interop.like_input(op(bias, counts, float(rate)), src)
