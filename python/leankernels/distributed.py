"""Expert parallelism on torch.distributed: send tokens to the ranks that own their experts
(``dispatch``) and bring the weighted expert outputs back (``combine``).

A MoE layer over a process group of W ranks, each owning E/W experts::

    weights, ids = route(logits, top_k, ...)                  # every rank routes its own tokens
    recv, h = dispatch(x, weights, ids, num_experts=E)        # FP8 rows + 1x128 scales
    y = fp8_grouped_gemm(*recv, w_local, w_local_scale, h.offs)   # local experts, sorted rows
    out = combine(y, h)                                       # [T, H], token order, weighted

Design note.

* Ownership: rank r owns experts ``[r*E/W, (r+1)*E/W)``. A token row travels once to every
  rank that owns at least one of its experts (not once per expert), with its top_k local
  expert ids (-1 where the expert lives elsewhere) and gate weights: per token and destination
  ``H`` FP8 bytes + ``4*ceil(H/128)`` scale bytes + ``8*top_k`` routing bytes (DeepSeek-V3:
  7168 + 224 + 64 B, against 14,336 B for the bf16 row). The receiver lays the rows out by
  local expert with ``plan``; a row routed to two local experts appears twice.
* The two layouts are ``plan``s: the sender's ``plan`` over destination ranks (each token's
  destinations with repeats removed) orders the rows it sends, the receiver's ``plan`` over
  local experts orders the rows its GEMMs read. ``permute`` gathers (and quantizes in the same
  pass), ``unpermute`` reduces: on the receiver over a row's local experts (gate weights
  applied, fp32 accumulation), on the sender over a token's destination ranks (fp32). So
  combine moves one row per (token, destination), in y's dtype, like DeepEP's combine.
* The wire is ``all_to_all_single`` on bytes: the rows, scales and routing metadata of a
  dispatch are packed into one uint8 buffer, one collective; combine sends one buffer back.
  NCCL on GPUs (any fabric NCCL runs on: NVLink, InfiniBand, RoCE, EFA), gloo on CPUs.
* Exact mode (``capacity=None``): the ranks first exchange row counts (riding on the header
  check's all_gather, or one small all_to_all without it), then send exactly the rows
  needed: fewest bytes, one host synchronisation (the split sizes). DeepEP's "normal"
  (high-throughput, prefill) kernels work this way.
* Fixed-capacity mode (``capacity=C``): every (source, destination) pair has C row slots, so
  every buffer has a static size and nothing is read on the host (with ``check=False``:
  CUDA-graph capturable in principle). Rows beyond C are not sent; they are counted per
  destination in ``handle.dropped`` (a device tensor) and contribute 0 to combine's output,
  never silently. DeepEP's "low-latency" (decode, graph-capturable) kernels work this way.
* Both functions are differentiable (torch.autograd.Function): dispatch's backward is a
  combine (gradient rows summed per token and sent back; routing-weight gradients returned
  to the (token, k) they came from), combine's backward a dispatch. The gate weights travel
  with dispatch and are applied in combine, so they get their gradient through combine. With
  ``quantize=True`` the FP8 rows carry no gradient themselves: take float rows with
  ``dequantize(recv, handle)``, whose gradient reaches x straight through (as if the wire
  were lossless, DeepSeek-V3's recipe for quantization in training).
* Every rank must call dispatch and combine (collectives). With ``check=True`` (default) the
  ranks first exchange a small header (shapes, dtypes, arguments, a local-error flag) and
  every rank raises the same ValueError when they disagree or one rank's arguments are
  invalid, instead of hanging in the exchange. A rank that never calls is caught only by the
  process group's timeout.
* Measured (README "Expert parallelism", bench/bench_distributed.py): on gloo over loopback
  the exchange's local work dominates, not the bytes; no NCCL run yet.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .gemm import fp8_grouped_gemm
from .nn.layers import MoE, SwiGLU, _no_grad_needed
from .quant import dequantize_fp8, silu_mul_quantize_fp8
from .routing import RoutePlan, permute, plan, unpermute

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_FP8 = torch.float8_e4m3fn
_PAD_SCALE = 1e-4 / 448  # the scale permute(quantize=True) gives padding rows


# ------------------------------------------------------------------------------ the handle
@dataclass
class DispatchHandle:
    """What combine (and both backwards) need to reverse a dispatch; returned by dispatch.

    offs: int32 ``[E_local]`` cumulative end row of each local expert in recv (feeds
        fp8_grouped_gemm / F.grouped_mm).
    counts: int32 ``[E_local]`` rows per local expert.
    recv_plan: the RoutePlan laying the received rows out by local expert (its ``row_token``
        names the received row each recv row came from).
    recv_weights: ``[N, top_k]`` fp32 gate weights of the N received rows (0 where the expert
        is not local); in the autograd graph of ``weights``.
    send_plan: the RoutePlan over destination ranks of this rank's tokens.
    dropped: int64 ``[W]`` rows (token, destination pairs) not sent to each rank because its
        capacity was full (all zero in exact mode). Their experts contribute 0 to combine.
    wire: bytes of the buffers this rank sent, by part: dispatch's ``rows``, ``scales``,
        ``routing`` and ``counts`` (exact mode), ``rows_sent`` (rows, or slots in capacity
        mode), and after combine ``combine_rows``; ``bytes_to_other_ranks()`` leaves out the
        rows a rank sends to itself.
    first_expert, local_experts: this rank's experts are ``first_expert + [0, local_experts)``.
    The remaining fields are the exchange's state (split sizes, wire slots, destinations).
    """
    group: object
    world: int
    rank: int
    num_experts: int
    tokens: int
    hidden: int
    top_k: int
    dtype: torch.dtype
    quantize: bool
    capacity: Optional[int]
    check: bool
    send_plan: RoutePlan = None
    send_splits: Optional[list] = None
    recv_splits: Optional[list] = None
    slot: Optional[torch.Tensor] = None
    dest: torch.Tensor = None
    row_dest: torch.Tensor = None
    recv_pairs: int = 0
    recv_plan: RoutePlan = None
    recv_ids: torch.Tensor = None
    recv_weights: torch.Tensor = None
    dropped: torch.Tensor = None
    wire: dict = field(default_factory=dict)
    _st_grad: Optional[torch.Tensor] = None

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world

    @property
    def first_expert(self) -> int:
        return self.rank * self.local_experts

    @property
    def offs(self) -> torch.Tensor:
        return self.recv_plan.offs

    @property
    def counts(self) -> torch.Tensor:
        return self.recv_plan.counts

    def bytes_to_other_ranks(self) -> dict:
        """Bytes of this rank's dispatch and combine buffers addressed to other ranks (the rows
        for its own experts stay in memory): ``{"dispatch": int, "combine": int}``."""
        if self.capacity is None:
            own_d = self.send_splits[self.rank] / max(1, sum(self.send_splits))
            own_c = self.recv_splits[self.rank] / max(1, sum(self.recv_splits))
        else:
            own_d = own_c = 1 / self.world
        w = self.wire
        d = sum(w.get(k, 0) for k in ("rows", "scales", "routing", "counts"))
        return {"dispatch": round(d * (1 - own_d)), "combine": round(w.get("combine_rows", 0) * (1 - own_c))}

    @property
    def received(self) -> int:
        """Received rows (slots in capacity mode), before the local-expert layout."""
        return self.recv_ids.shape[0]


# ------------------------------------------------------------------------------ checks
def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("leankernels.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _comm_device(group, t: Optional[torch.Tensor]) -> torch.device:
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return t.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(group, what: str, fields: dict, error: Optional[Exception], device, payload=None):
    """Exchange a small header and raise the same ValueError on every rank when a rank's
    arguments were invalid (``error``) or the ranks disagree on any of ``fields``. ``payload``
    (an int64 tensor, the same size on every rank) rides along; returns the ranks' payloads
    stacked ``[W, n]`` (None without one)."""
    names = list(fields)
    mine = torch.tensor([int(error is not None)] + [int(fields[n]) for n in names], dtype=torch.int64, device=device)
    if payload is not None:
        mine = torch.cat([mine, payload.to(device=device, dtype=torch.int64)])
    table = torch.stack(_all_gather(mine, group))
    rows = table[:, :len(names) + 1].tolist()
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"{what}: rank(s) {bad} passed invalid arguments (the error on those ranks says which); "
                         "raised on every rank so that none waits in the exchange")
    for j, name in enumerate(names, 1):
        vals = [row[j] for row in rows]
        if len(set(vals)) > 1:
            raise ValueError(f"{what}: the ranks disagree on {name}: " + ", ".join(f"rank {r}: {v}" for r, v in
                                                                                enumerate(vals)))
    return None if payload is None else table[:, len(names) + 1:]


def _all_gather(t: torch.Tensor, group) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def _check_dispatch(x, weights, ids, num_experts, world, quantize, capacity):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOAT:
        raise TypeError(f"x must be a [T, H] float32, bfloat16 or float16 tensor; got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("ids must be a [T, top_k] int32 or int64 tensor")
    if not isinstance(weights, torch.Tensor) or weights.shape != ids.shape or not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a float tensor of ids' shape {tuple(ids.shape)}; got "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but ids has {ids.shape[0]}")
    if x.device != ids.device or x.device != weights.device:
        raise ValueError(f"x, weights and ids must share one device; got {x.device}, {weights.device}, {ids.device}")
    if type(num_experts) is not int or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int; got {num_experts!r}")
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the group's world size ({world}): "
                         "rank r owns experts [r*E/W, (r+1)*E/W)")
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be a bool; got {type(quantize).__name__}")
    if capacity is not None and (type(capacity) is not int or capacity < 0):
        raise ValueError(f"capacity must be None (exact mode) or an int >= 0; got {capacity!r}")


# ------------------------------------------------------------------------------ the wire
def _pack(parts) -> torch.Tensor:
    """Row-aligned 2-D tensors -> one uint8 [n, bytes] buffer (one collective for all)."""
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], 1)


def _unpack(buf: torch.Tensor, specs):
    """Inverse of _pack: specs lists (dtype, columns) per part. Parts are strided views of buf
    where the byte offsets allow (no copy), else copies."""
    out, at = [], 0
    for dtype, cols in specs:
        nb = cols * dtype.itemsize
        part = buf[:, at:at + nb]
        try:
            out.append(part.view(dtype))
        except RuntimeError:   # misaligned for dtype's size
            out.append(part.contiguous().view(dtype))
        at += nb
    return out


def _to_wire(h: DispatchHandle, rows: torch.Tensor, fill=0) -> torch.Tensor:
    """Send-plan rows [R_s, ...] -> the send buffer (exact: the rows themselves; capacity: W*C slots)."""
    if h.capacity is None:
        return rows
    slots = h.world * h.capacity
    src = rows.view(torch.uint8) if rows.dtype == _FP8 else rows   # fp8 as bytes (torch 2.4: no fp8 fill)
    buf = torch.full((slots + 1, *src.shape[1:]), fill, dtype=src.dtype, device=src.device)
    buf[torch.where(h.slot >= 0, h.slot, slots)] = src       # unsent rows land in the spare slot
    return buf[:slots].view(_FP8) if rows.dtype == _FP8 else buf[:slots]


def _from_wire(h: DispatchHandle, buf: torch.Tensor) -> torch.Tensor:
    """Send buffer layout -> send-plan rows [R_s, ...] (zero where a row was not sent)."""
    if h.capacity is None:
        return buf
    return _gather_rows(buf, h.slot, 0)


def _exchange(h: DispatchHandle, buf: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """all_to_all_single in dispatch direction (send layout -> recv layout) or in reverse."""
    buf = buf.contiguous()
    if h.capacity is not None:
        out = torch.empty_like(buf)
        dist.all_to_all_single(out, buf, group=h.group)
        return out
    ins, outs = (h.recv_splits, h.send_splits) if reverse else (h.send_splits, h.recv_splits)
    out = buf.new_empty((sum(outs), *buf.shape[1:]))
    dist.all_to_all_single(out, buf, outs, ins, group=h.group)
    return out


def _gather_rows(t: torch.Tensor, index: torch.Tensor, fill=None) -> torch.Tensor:
    """t[index] (any dtype, fp8 through uint8); with ``fill`` where index is -1 (one gather
    from t with a fill row appended: no mask pass, no host synchronisation)."""
    src = t.view(torch.uint8) if t.dtype == _FP8 else t
    if fill is None:
        out = src[index.long()]
    else:
        src = torch.cat([src, torch.full((1, *src.shape[1:]), fill, dtype=src.dtype, device=src.device)])
        out = src[torch.where(index >= 0, index, src.shape[0] - 1).long()]
    return out.view(_FP8) if t.dtype == _FP8 else out


# ------------------------------------------------------------------------------ dispatch
def _send_layout(h: DispatchHandle, ids: torch.Tensor) -> None:
    """The sender's plan over destination ranks (one row per token and destination) and, in
    capacity mode, each row's wire slot. No communication, no host synchronisation."""
    W, El, E = h.world, h.local_experts, h.num_experts
    ids = ids.long()
    h.dest = dest = torch.where((ids >= 0) & (ids < E), torch.div(ids, El, rounding_mode="floor"), -1)
    # a destination repeated in a token's top_k gets the row once; a token has at most
    # min(top_k, W) destinations, so the plan's static row bound is T * min(top_k, W)
    dest_sorted = dest.sort(dim=1).values
    repeat = torch.zeros_like(dest_sorted, dtype=torch.bool)
    repeat[:, 1:] = dest_sorted[:, 1:] == dest_sorted[:, :-1]
    once = dest_sorted.masked_fill(repeat, -1)
    if W < once.shape[1]:
        once = once.sort(dim=1, descending=True).values[:, :W]
    h.send_plan = sp = plan(once.to(torch.int32), W)
    R = sp.row_token.shape[0]
    h.row_dest = torch.searchsorted(sp.offs.long(), torch.arange(R, device=ids.device), right=True)
    counts = sp.counts.long()
    if h.capacity is None:
        h.dropped = torch.zeros_like(counts)
    else:
        C = h.capacity
        pos = torch.arange(R, device=ids.device) - (sp.offs.long() - counts)[h.row_dest.clamp_max(W - 1)]
        h.slot = torch.where((sp.row_token >= 0) & (pos < C), h.row_dest * C + pos, -1)
        h.dropped = (counts - C).clamp_min(0)


def _counts(h: DispatchHandle) -> torch.Tensor:
    """int64 [2, W]: rows (token, destination) and (token, expert) pairs this rank sends to each rank."""
    d = h.dest.flatten()
    pairs = torch.bincount(torch.where(d >= 0, d, h.world), minlength=h.world + 1)[:h.world]
    return torch.stack([h.send_plan.counts.long(), pairs])


def _exchange_counts(h: DispatchHandle, recv: Optional[torch.Tensor] = None) -> None:
    """Exact mode: the split sizes of the all-to-all, and the received (token, expert) pairs,
    on the host (the one host synchronisation). ``recv`` [2, W]: already gathered."""
    mine = _counts(h)
    if recv is None:
        recv = torch.empty_like(mine.t().contiguous())
        dist.all_to_all_single(recv, mine.t().contiguous(), group=h.group)
        recv = recv.t()
    h.send_splits, (h.recv_splits, pairs) = mine[0].tolist(), recv.tolist()
    h.recv_pairs = sum(pairs)
    sent = sum(h.send_splits)     # the send plan's rows past this are the static bound's padding
    sp = h.send_plan
    h.send_plan = RoutePlan(sp.counts, sp.offs, sp.row_token[:sent], sp.token_row)
    h.row_dest = h.row_dest[:sent]
    h.wire["counts"] = mine.numel() * mine.element_size()


def _dispatch_forward(h: DispatchHandle, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    El, sp = h.local_experts, h.send_plan
    rows = permute(x, sp, quantize=h.quantize)              # [R, H] (+ scales), by destination
    rows = list(rows) if h.quantize else [rows]
    # routing metadata of each row: its local expert ids at the destination, and the weights
    rt = sp.row_token.long()
    tok = rt.clamp_min(0)
    row_dest = h.row_dest[:, None]
    local = (h.dest[tok] == row_dest) & (rt >= 0)[:, None]
    meta_ids = torch.where(local, ids.long()[tok] - row_dest * El, -1).to(torch.int32)
    meta_w = torch.where(local, weights[tok].float(), 0.0)
    parts = [_to_wire(h, p) for p in rows] + [_to_wire(h, meta_ids, -1), _to_wire(h, meta_w)]
    send = _pack([p.view(torch.uint8) if p.dtype == _FP8 else p for p in parts])
    n = send.shape[0]
    names = ["rows", "scales"] if h.quantize else ["rows"]
    for name, p in zip(names + ["routing", "routing"], parts):
        h.wire[name] = h.wire.get(name, 0) + p.numel() * p.element_size()
    h.wire["rows_sent"] = n
    recv = _exchange(h, send)
    K = h.top_k
    specs = [(torch.uint8, h.hidden), (torch.float32, rows[1].shape[1])] if h.quantize else [(x.dtype, h.hidden)]
    got = _unpack(recv, specs + [(torch.int32, K), (torch.float32, K)])
    h.recv_ids, recv_w = got[-2].contiguous(), got[-1].contiguous()
    pl = plan(h.recv_ids, El)
    if h.capacity is None:    # exact mode: the host knows the row count; drop the static bound's padding
        pl = RoutePlan(pl.counts, pl.offs, pl.row_token[:h.recv_pairs], pl.token_row)
    h.recv_plan = pl
    padded = h.capacity is not None       # exact mode: every row is used
    if h.quantize:
        q = _gather_rows(got[0].view(_FP8), pl.row_token, 0 if padded else None)
        s = _gather_rows(got[1], pl.row_token, _PAD_SCALE if padded else None)
        return (q, s), recv_w
    return _gather_rows(got[0], pl.row_token, 0 if padded else None), recv_w


def _dispatch_backward(h: DispatchHandle, grad_rows: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]):
    """Gradient rows in recv order [R_l, H] and weight gradients [N, top_k] -> (grad x, grad weights)."""
    pl = h.recv_plan
    N, K = h.recv_ids.shape
    local = h.recv_ids >= 0
    parts, specs = [], []
    if grad_rows is not None:
        parts.append(unpermute(grad_rows, pl, local.float()))   # sum over a row's local experts
        specs.append((parts[-1].dtype, h.hidden))
    if grad_w is not None:
        parts.append(torch.where(local, grad_w.float(), 0.0))
        specs.append((torch.float32, K))
    if not parts:
        return None, None
    back = _unpack(_exchange(h, _pack(parts), reverse=True), specs)
    ones = torch.ones(h.send_plan.token_row.shape, device=back[0].device)
    sums = [unpermute(_from_wire(h, b.contiguous()), h.send_plan, ones) for b in back]   # over destinations
    gx = sums.pop(0) if grad_rows is not None else None
    gw = sums.pop(0) if grad_w is not None else None
    return gx, gw


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, h):
        ctx.set_materialize_grads(False)
        ctx.h, ctx.x_dtype, ctx.w_dtype = h, x.dtype, weights.dtype
        recv, recv_w = _dispatch_forward(h, x, weights, ids)
        if not ctx.needs_input_grad[1]:      # no weight gradient wanted: combine skips computing it
            ctx.mark_non_differentiable(recv_w)
        if h.quantize:
            ctx.mark_non_differentiable(recv[0])
            return recv[0], recv[1], recv_w
        return recv, recv_w

    @staticmethod
    def backward(ctx, *grads):
        h = ctx.h
        if h.quantize:
            grad_rows, h._st_grad = h._st_grad, None              # from dequantize(): straight through
        else:
            grad_rows = grads[0]
        gx, gw = _dispatch_backward(h, grad_rows, grads[-1])
        return (None if gx is None else gx.to(ctx.x_dtype)), (None if gw is None else gw.to(ctx.w_dtype)), None, None


def dispatch(x, weights, ids, num_experts: int, group=None, quantize: bool = True, capacity: Optional[int] = None,
             check: bool = True):
    """Send each token row to the ranks that own its experts; collective over ``group``.

    Args:
        x: ``[T, H]`` float32, bfloat16 or float16 tokens of this rank (T may differ per rank,
            0 included).
        weights: ``[T, top_k]`` gate weights (any float dtype; applied by combine).
        ids: ``[T, top_k]`` int32/int64 expert ids in ``[0, num_experts)``; other values (-1:
            not routed) are dropped.
        num_experts: E, divisible by the group's world size W: rank r owns experts
            ``[r*E/W, (r+1)*E/W)`` (ValueError otherwise).
        group: the torch.distributed process group (default: the world).
        quantize: send FP8 e4m3 rows with 1x128 fp32 scales (``permute(quantize=True)``'s
            bytes) instead of x's dtype.
        capacity: None for exact mode (counts exchanged first, fewest bytes, one host sync), or
            C rows per (source, destination) pair (static buffers, no host sync; overflow
            counted in ``handle.dropped`` and contributing 0 in combine).
        check: exchange a small header first so that invalid or mismatched arguments raise
            ValueError on every rank instead of hanging (one small all_gather, read on the
            host). Pass False for CUDA-graph capture.

    Returns:
        ``(recv, handle)``: recv holds the received rows sorted by local expert, a row once
        per local expert it is routed to: ``(x_fp8 [R, H], scale [R, ceil(H/128)])`` with
        quantize, else ``[R, H]`` in x's dtype. ``handle.offs`` (int32 ``[E/W]``, cumulative
        ends) feeds ``fp8_grouped_gemm``; rows past ``offs[-1]`` (capacity mode's static
        bound) are padding. In exact mode R == offs[-1].
    """
    W, rank = _group_info(group)
    error, fields, h = None, {}, None
    try:
        _check_dispatch(x, weights, ids, num_experts, W, quantize, capacity)
        fields = dict(hidden=x.shape[1], top_k=ids.shape[1], dtype=_DTYPE_CODE[x.dtype], quantize=quantize,
                      num_experts=num_experts, capacity=-1 if capacity is None else capacity)
        h = DispatchHandle(group, W, rank, num_experts, x.shape[0], x.shape[1], ids.shape[1], x.dtype, quantize,
                           capacity, check)
        _send_layout(h, ids)
    except Exception as e:  # noqa: BLE001 - every rank must reach the header, then all raise
        if not check:
            raise
        error = e
    exact = capacity is None
    if check:   # one small all_gather: the arguments, and in exact mode the row counts
        fields = fields or dict.fromkeys(["hidden", "top_k", "dtype", "quantize", "num_experts", "capacity"], 0)
        counts = None
        if exact:
            counts = _counts(h).flatten() if h is not None else torch.zeros(2 * W, dtype=torch.int64)
        table = _agree(group, "dispatch", fields, error, _comm_device(group, x), counts)
        if exact:
            _exchange_counts(h, table.view(W, 2, W)[:, :, rank].t())
    elif exact:
        _exchange_counts(h)
    out = _Dispatch.apply(x, weights, ids, h)
    h.recv_weights = out[-1]
    recv = (out[0], out[1]) if quantize else out[0]
    return recv, h


def dequantize(recv, handle: DispatchHandle, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Float rows ``[R, H]`` (``dtype``, default the dispatched x's) from a quantized dispatch's
    ``(x_fp8, scale)``. Differentiable straight through: the gradient of these rows reaches
    dispatch's x as if the rows had crossed the wire unquantized."""
    q, s = recv
    return _STDequantize.apply(q, s, handle, dtype or handle.dtype)


class _STDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, s, h, dtype):
        ctx.h, ctx.s_shape = h, s.shape
        return dequantize_fp8(q, s).to(dtype)

    @staticmethod
    def backward(ctx, g):
        h = ctx.h
        h._st_grad = g if h._st_grad is None else h._st_grad + g
        # a zero gradient for the scales makes autograd run dispatch's backward, which sends
        # the stashed row gradient back to x
        return None, g.new_zeros(ctx.s_shape, dtype=torch.float32), None, None


# ------------------------------------------------------------------------------ combine
def _combine_forward(h: DispatchHandle, y: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
    part = unpermute(y, h.recv_plan, recv_w)           # [N, H]: a row's local experts, weighted, fp32 sum
    h.wire["combine_rows"] = part.numel() * part.element_size()
    back = _from_wire(h, _exchange(h, part, reverse=True))
    return unpermute(back, h.send_plan, torch.ones(h.send_plan.token_row.shape, device=y.device))   # over ranks


def _combine_backward(h: DispatchHandle, g: torch.Tensor, y: torch.Tensor, recv_w: torch.Tensor, want_w: bool):
    pl = h.recv_plan
    grad_part = _exchange(h, _to_wire(h, permute(g.contiguous(), h.send_plan)))      # [N, H]
    tr = pl.token_row.long()
    used = tr >= 0
    w_row = torch.zeros(pl.row_token.shape[0], device=y.device)
    w_row[tr[used]] = recv_w.detach().float()[used]
    grad_y = (permute(grad_part, pl).float() * w_row[:, None]).to(y.dtype)
    if not want_w:
        return grad_y, None
    gp = grad_part.float()
    grad_w = torch.stack([(y[tr[:, k].clamp_min(0)].float() * gp).sum(-1) for k in range(h.top_k)], 1)   # [N, K]
    return grad_y, torch.where(used, grad_w, 0.0)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, recv_w, h):
        ctx.h = h
        ctx.save_for_backward(y, recv_w)
        return _combine_forward(h, y, recv_w)

    @staticmethod
    def backward(ctx, g):
        y, recv_w = ctx.saved_tensors
        grad_y, grad_w = _combine_backward(ctx.h, g, y, recv_w, ctx.needs_input_grad[1])
        return grad_y, (None if grad_w is None else grad_w.to(recv_w.dtype)), None


def combine(y, handle: DispatchHandle) -> torch.Tensor:
    """Weighted sum of the expert outputs back to the rank and order of each token; collective.

    Args:
        y: ``[R, H]`` float32/bfloat16/float16 expert outputs in recv's row order (the
            grouped GEMM's output; rows past ``handle.offs[-1]`` are ignored).
        handle: dispatch's handle.

    Returns:
        ``[T, H]`` in y's dtype: ``out[t] = sum_k weights[t, k] * y[row of (t, k)]``. Each
        destination sums its local experts (fp32, sent back in y's dtype), the source sums the
        destinations in fp32. Dropped ids, and in capacity mode the rows counted in
        ``handle.dropped``, contribute 0. Differentiable in y and in dispatch's weights.
    """
    h = handle
    if not isinstance(h, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle returned by dispatch; got {type(h).__name__}")
    error = None
    R = h.recv_plan.row_token.shape[0]
    try:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.dtype not in _FLOAT:
            raise TypeError("y must be a [R, H] float32, bfloat16 or float16 tensor")
        if tuple(y.shape) != (R, h.hidden):
            raise ValueError(f"y must have shape ({R}, {h.hidden}) (recv's rows, hidden size); got {tuple(y.shape)}")
    except Exception as e:  # noqa: BLE001 - every rank must reach the header, then all raise
        if not h.check:
            raise
        error = e
    if h.check:
        ok = error is None
        fields = dict(hidden=y.shape[-1], dtype=_DTYPE_CODE[y.dtype]) if ok else dict(hidden=0, dtype=0)
        _agree(h.group, "combine", fields, error, _comm_device(h.group, y if isinstance(y, torch.Tensor) else None))
    return _Combine.apply(y, h.recv_weights, h)


# ------------------------------------------------------------------------------ local launcher
def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank, fn, world, args, port, backend, timeout_s, outdir, threads):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")     # loopback only
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = {"value": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    # NOTES: end the process here, without the interpreter's shutdown: with torch 2.13's gloo
    # backend a worker died at exit now and then (~1 in 10 runs of the README's EP block,
    # "terminate called without an active exception", SIGABRT) after its group was destroyed and
    # its result saved; the launcher then reported the signal. Nothing is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_local(fn: Callable, world_size: int, args=(), timeout: float = 120.0, backend: str = "gloo",
                 threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in a process
    group on the loopback interface (gloo: CPU; nccl: one GPU per rank) and return each rank's
    result (a list by rank). ``fn`` must be importable (a module-level function). Bounded: the
    group's collectives time out after ``timeout`` seconds and processes still running after
    ``timeout`` are terminated (TimeoutError); an exception on any rank raises RuntimeError
    with every failing rank's traceback. For tests, demos and benchmarks on one machine."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_local_worker, args=(fn, world_size, tuple(args), free_port(), backend, timeout,
                                                      outdir, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout + 30
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"launch_local: {world_size} processes still running after {timeout + 30:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        results = []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "no result"})
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        raise RuntimeError("launch_local: " + "\n".join(errors))
    return [res["value"] for res in results]


# ------------------------------------------------------------------------------ the EP layer
class ExpertParallelMoE(nn.Module):
    """``leankernels.nn.MoE`` with its routed experts spread over a process group: rank r keeps
    experts ``[r*E/W, (r+1)*E/W)`` (plus the gate and the shared experts, replicated). Same
    forward contract as MoE: ``[T, H]`` (or ``[..., H]``) tokens of this rank in, the same
    shape out; every rank of the group must call forward together (T may differ, 0 included).

    Forward: gate (``MoE.route``, the full gate on every rank) -> ``dispatch`` (FP8 rows) ->
    ``fp8_grouped_gemm`` (gate/up) -> ``silu_mul_quantize_fp8`` -> ``fp8_grouped_gemm`` (down)
    -> ``combine`` -> + shared experts. ``capacity`` (attribute, default None) selects
    dispatch's fixed-capacity mode.

    ``check`` (attribute, default True) is dispatch's header check (False: no host read in
    capacity mode). ``last_handle`` keeps the latest forward's DispatchHandle (expert load in
    ``counts``, bytes sent in ``wire``, overflow in ``dropped``).

    Build with ``MoE.from_float(plain_moe, ep_group=group)`` (or ``ExpertParallelMoE.from_float``).
    Inference by default (parameters without requires_grad, like MoE). ``trainable=True``: as
    MoE's trainable mode, with this rank's experts as fp32 masters (``w13_master``,
    ``w2_master``) run through ``fp8_grouped_linear`` on the dispatched rows (FP8 on the wire,
    dequantized straight through), and dispatch/combine's autograd carrying the gradients back
    to each token's rank. The gate and the shared experts are replicated: average their
    gradients over the group as data parallelism does (DDP, or an all_reduce before the
    optimizer step). ``balance(rate)`` all-reduces the load over the group first, so every rank
    applies the same bias update.
    """

    route = MoE.route   # the same gate (it reads cfg, gate_weight, e_score_correction_bias)

    def __init__(self, cfg, group, experts, gate_weight, bias, shared, dtype, capacity: Optional[int] = None):
        super().__init__()
        self.cfg, self.group, self.dtype, self.capacity, self.check = cfg, group, dtype, capacity, True
        self.last_handle = None
        trainable = experts.trainable
        self.gate_weight = nn.Parameter(gate_weight, requires_grad=trainable)
        self.register_buffer("e_score_correction_bias", bias)
        for name in ("w13", "w13_scale", "w2", "w2_scale"):
            self.register_buffer(name, getattr(experts, name))
        self.w13_master, self.w2_master = experts.w13_master, experts.w2_master
        self._fp8_keys = getattr(experts, "_fp8_keys", None)
        self.fp8_experts = True
        if trainable:
            self.register_buffer("load_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.int64,
                                                            device=gate_weight.device), persistent=False)
        self.shared_experts = shared

    @property
    def trainable(self) -> bool:
        return self.w13_master is not None

    @classmethod
    def from_float(cls, moe, group=None, dtype=torch.bfloat16, fp8_shared: bool = True,
                   capacity: Optional[int] = None, trainable: bool = False) -> "ExpertParallelMoE":
        """From the plain-PyTorch DeepSeek MoE (``leankernels.nn.plain.PlainMoE``): only this
        rank's experts are quantized and kept (``trainable``: see the class docstring)."""
        cfg = moe.cfg
        W, rank = _group_info(group)
        E = cfg.n_routed_experts
        if E % W:
            raise ValueError(f"n_routed_experts (num_experts, {E}) must be divisible by the group's world size ({W})")
        El = E // W
        mine = moe.experts[rank * El:(rank + 1) * El]
        local_cfg = cfg.replace(n_routed_experts=El, n_shared_experts=0, n_group=1, topk_group=1)
        gate = moe.gate.weight
        experts = MoE.from_weights(local_cfg, gate.new_zeros(El, gate.shape[1]),
                                   [(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight) for e in mine],
                                   dtype=dtype, trainable=trainable)
        bias = moe.gate.e_score_correction_bias
        bias = None if bias is None else bias.detach().float().clone()
        shared = None
        if moe.shared_experts is not None:
            shared = SwiGLU.from_float(moe.shared_experts, fp8_shared, dtype, trainable).requires_grad_(trainable)
        return cls(cfg, group, experts, gate.detach().float().clone(), bias, shared, dtype, capacity)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """The routed experts over the group for tokens x [T, H]; returns (out [T, H], handle)."""
        recv, h = dispatch(x, weights, ids, self.cfg.n_routed_experts, self.group, True, self.capacity, self.check)
        if self.trainable:
            return self._train_experts(recv, h, ids), h
        hid = fp8_grouped_gemm(*recv, self.w13, self.w13_scale, h.offs, torch.float32)
        a, s = silu_mul_quantize_fp8(hid)
        y = fp8_grouped_gemm(a, s, self.w2, self.w2_scale, h.offs, self.dtype)
        return combine(y, h), h

    def _train_experts(self, recv, h: DispatchHandle, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.load_counts += torch.bincount(ids.reshape(-1).long().clamp_min(-1) + 1,
                                               minlength=self.cfg.n_routed_experts + 1)[1:]
        return combine(self._grouped_swiglu(dequantize(recv, h, self.dtype), h.offs), h)

    _grouped_swiglu = MoE._grouped_swiglu   # FP8 experts (fp8_experts is always True here)
    balance = MoE.balance   # with the counts summed over the group: every rank calls it together

    def _global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=self.group)
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dtype not in _FLOAT:
            raise TypeError(f"x must be a float tensor; got {x.dtype}")
        if shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x must have last dim hidden_size={self.cfg.hidden_size}; got shape {tuple(shape)}")
        if not self.trainable:
            _no_grad_needed(self, x)
        x2 = x.reshape(-1, shape[-1])
        weights, ids = self.route(x2)
        out, self.last_handle = self.experts(x2, weights, ids)
        if self.shared_experts is not None:
            out = (out.float() + self.shared_experts(x2).float()).to(self.dtype)
        return out.view(*shape[:-1], shape[-1])
