"""Hostile inputs for every public op, the compat layers and the raw torch ops (CPU).

Project standard: bad input gets a clear TypeError/ValueError naming the argument; never a
crash, hang, silent truncation or out-of-bounds write. Legal-but-odd input (empty, strided,
expanded, NaN/Inf, out-of-range data-dependent ids that are documented as skipped) must give
the reference result.

Every case runs in a child process (this file run as a script), so a segfault or abort is
reported as that case's failure instead of killing pytest; a watchdog (faulthandler) turns a
hang into a failure too. Cases are table-driven (CASES) plus hypothesis-driven ones that run
inside the child with a fixed seed and few examples.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

CASE_TIMEOUT_S = 30
ERR = (TypeError, ValueError)

# name -> (fn, expect, arg): expect "ok" (fn checks its own result) | "err" (must raise
# TypeError/ValueError whose message contains arg) | "nocrash" (any Python exception or a
# result; used for raw ops where only memory safety is promised and fn checks guards).
CASES: dict = {}


def case(name, expect="err", arg=None):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = (fn, expect, arg)
        return fn

    return deco


def err(name, arg, fn):
    CASES[name] = (fn, "err", arg)


# ------------------------------------------------------------------------------ helpers
def _lk():
    import leankernels

    return leankernels


def _ops():
    import leankernels  # noqa: F401  (registers the ops)

    return torch.ops.leankernels


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _same(x, y):
    """Bitwise-ish equality that treats NaN == NaN (fp8 compared via its bytes)."""
    if x.dtype == torch.float8_e4m3fn:
        x, y = x.view(torch.uint8), y.view(torch.uint8)
    assert x.shape == y.shape, (x.shape, y.shape)
    assert x.dtype == y.dtype, (x.dtype, y.dtype)
    if x.dtype.is_floating_point:
        assert torch.equal(torch.isnan(x), torch.isnan(y))
        m = ~torch.isnan(x)
        assert torch.equal(x[m], y[m])
    else:
        assert torch.equal(x, y)


def _close(x, y, tol=1e-2):
    assert x.shape == y.shape, (x.shape, y.shape)
    x, y = x.double(), y.double()
    assert torch.equal(torch.isnan(x), torch.isnan(y))
    m = ~torch.isnan(x)
    assert torch.allclose(x[m], y[m], rtol=tol, atol=tol), (x - y).abs().max()


def _guarded(shape, dtype, pad=37):
    """A contiguous view of `shape` inside a larger poisoned buffer; returns (view, check)."""
    n = math.prod(shape)
    buf = torch.empty(n + 2 * pad, dtype=dtype)
    if dtype.is_floating_point:
        buf.fill_(float("nan"))
    else:
        buf.fill_(-7)
    view = buf[pad:pad + n].view(shape)

    def check():
        for part in (buf[:pad], buf[pad + n:]):
            if dtype.is_floating_point:
                assert bool(torch.isnan(part).all()), "write outside the output (guard overwritten)"
            else:
                assert bool((part == -7).all()), "write outside the output (guard overwritten)"

    return view, check


def _gemm_args(M=5, N=136, K=160, E=None, masked=False, seed=0):
    lk = _lk()
    if masked:
        x = _rand(E, M, K, seed=seed)
    else:
        x = _rand(M, K, seed=seed)
    a, a_s = lk.quantize_fp8(x)
    w = _rand(*((E,) if E else ()), N, K, seed=seed + 1)
    b, b_s = lk.quantize_fp8(w, (128, 128))
    return a, a_s, b, b_s


def _cache(nb=4, bs=8, fp8=False):
    return _lk().LatentCache(nb, bs, fp8=fp8).kv


def _append_args(T=3, seed=0):
    return _rand(T, 512, seed=seed), _rand(T, 64, seed=seed + 1)


def _decode_args(B=2, s_q=1, H=2, nb=4, bs=8, seqlens=(5, 11), fp8=False):
    lk = _lk()
    cache = lk.LatentCache(nb, bs, fp8=fp8)
    n = nb * bs
    kv_c, k_pe = _append_args(n, seed=3)
    lk.mla_append(cache.kv, kv_c, k_pe, torch.arange(n))
    q = _rand(B, s_q, H, 576, seed=4, dtype=torch.bfloat16)
    bt = torch.arange(B * 2, dtype=torch.int32).view(B, 2) % nb
    return q, cache.kv, bt, torch.tensor(seqlens, dtype=torch.int32)


# ======================================================================= quantize / dequantize
def _q(**kw):
    return lambda: _lk().quantize_fp8(**kw)


err("quant_x_none", "x", _q(x=None))
err("quant_x_list", "x", _q(x=[1.0, 2.0]))
err("quant_x_int", "x", _q(x=torch.ones(4, 8, dtype=torch.int32)))
err("quant_x_fp64", "x", _q(x=torch.ones(4, 8, dtype=torch.float64)))
err("quant_x_scalar", "x", _q(x=torch.tensor(1.0)))
err("quant_block_bad", "block", _q(x=torch.ones(4, 8), block=(2, 128)))
err("quant_block_none", "block", _q(x=torch.ones(4, 8), block=None))
err("quant_block_int", "block", _q(x=torch.ones(4, 8), block=128))
err("quant_block_float", "block", _q(x=torch.ones(4, 8), block=(1.5, 128)))
err("quant_scale_fmt", "scale_fmt", _q(x=torch.ones(4, 8), scale_fmt="e8m0"))
err("quant_scale_fmt_none", "scale_fmt", _q(x=torch.ones(4, 8), scale_fmt=None))
err("quant_128_1d", "x", _q(x=torch.ones(8), block=(128, 128)))
err("quant_128_4d", "x", _q(x=torch.ones(1, 2, 8, 8), block=(128, 128)))


def _check_quant(x, block=(1, 128)):
    lk = _lk()
    q, s = lk.quantize_fp8(x, block)
    rq, rs = lk.reference.quantize_fp8(x.contiguous(), block)
    _same(q, rq)
    _same(s, rs)


case("quant_empty_rows", "ok")(lambda: _check_quant(torch.ones(0, 200)))
case("quant_empty_k", "ok")(lambda: _check_quant(torch.ones(3, 0)))
case("quant_noncontig", "ok")(lambda: _check_quant(_rand(300, 40).t()))
case("quant_expanded", "ok")(lambda: _check_quant(_rand(1, 200).expand(7, 200)))
case("quant_expanded_128", "ok")(lambda: _check_quant(_rand(1, 130, 1).expand(2, 130, 260), (128, 128)))
case("quant_nan_inf", "ok")(lambda: _check_quant(torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 1.0, -3.0]])))


@case("quant_meta", "ok")
def _():
    q, s = _lk().quantize_fp8(torch.empty(3, 300, device="meta"))
    assert q.device.type == "meta" and tuple(s.shape) == (3, 3)


def _dq(x_fp8, scale, block=(1, 128)):
    return lambda: _lk().dequantize_fp8(x_fp8, scale, block)


_Q8 = torch.zeros(4, 200).to(torch.float8_e4m3fn)
err("dequant_x_fp32", "x_fp8", _dq(torch.zeros(4, 200), torch.ones(4, 2)))
err("dequant_scale_bf16", "scale", _dq(_Q8, torch.ones(4, 2, dtype=torch.bfloat16)))
err("dequant_scale_shape", "scale", _dq(_Q8, torch.ones(4, 1)))
err("dequant_scale_none", "scale", _dq(_Q8, None))
err("dequant_block", "block", _dq(_Q8, torch.ones(4, 2), (1, 64)))


@case("dequant_noncontig", "ok")
def _():
    lk = _lk()
    q, s = lk.quantize_fp8(_rand(6, 300))
    got = lk.dequantize_fp8(q[::2], s[::2])
    _same(got, lk.reference.dequantize_fp8(q[::2].contiguous(), s[::2].contiguous()))


# ========================================================================================= gemm
def _gemm(**over):
    def fn():
        a, a_s, b, b_s = _gemm_args()
        args = dict(a=a, a_scale=a_s, b=b, b_scale=b_s)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        return _lk().fp8_gemm(**args)

    return fn


err("gemm_a_fp32", "a", _gemm(a=lambda d: d["a"].float()))
err("gemm_a_none", "a", _gemm(a=None))
err("gemm_a_3d", "a", _gemm(a=lambda d: d["a"][None]))
err("gemm_a_scale_shape", "a_scale", _gemm(a_scale=lambda d: d["a_scale"][:, :1]))
err("gemm_a_scale_bf16", "a_scale", _gemm(a_scale=lambda d: d["a_scale"].bfloat16()))
err("gemm_b_k", "b", _gemm(b=lambda d: d["b"][:, :128]))
err("gemm_b_scale_shape", "b_scale", _gemm(b_scale=lambda d: d["b_scale"][:1]))
err("gemm_out_dtype", "out_dtype", _gemm(out_dtype=torch.float16))
err("gemm_out_dtype_str", "out_dtype", _gemm(out_dtype="bf16"))


def _check_gemm(a, a_s, b, b_s):
    lk = _lk()
    got = lk.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    ref = lk.reference.fp8_gemm(a.contiguous(), a_s.contiguous(), b.contiguous(), b_s.contiguous(),
                                out_dtype=torch.float32)
    _close(got, ref, 1e-4)


@case("gemm_empty_m", "ok")
def _():
    a, a_s, b, b_s = _gemm_args(M=0)
    assert _lk().fp8_gemm(a, a_s, b, b_s).shape == (0, 136)


@case("gemm_noncontig_expanded_nan", "ok")
def _():
    a, a_s, b, b_s = _gemm_args(M=6)
    a_s = a_s.clone()
    a_s[1, 0] = float("nan")
    a_s[2, 1] = float("inf")
    _check_gemm(a[::2], a_s[::2], b, b_s)
    _check_gemm(a[:1].expand(4, -1), a_s[:1].expand(4, -1), b, b_s)


def _grouped(out=None, offs=None, **over):
    def fn():
        a, a_s, b, b_s = _gemm_args(M=9, E=3)
        args = dict(a=a, a_scale=a_s, b=b, b_scale=b_s, offs=torch.tensor([2, 2, 9], dtype=torch.int32))
        if offs is not None:
            args["offs"] = offs
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        if out is not None:
            args["out"] = out
        return _lk().fp8_grouped_gemm(**args)

    return fn


def _env(fn, debug: bool):
    """fn run with LEANKERNELS_DEBUG=1 (debug) or unset: group sizes are value-checked only in debug."""
    def run():
        old = os.environ.pop("LEANKERNELS_DEBUG", None)
        if debug:
            os.environ["LEANKERNELS_DEBUG"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("LEANKERNELS_DEBUG", None)
            if old is not None:
                os.environ["LEANKERNELS_DEBUG"] = old

    return run


I32 = torch.int32
err("grouped_offs_decreasing", "offs", _env(_grouped(offs=torch.tensor([5, 2, 9], dtype=I32)), debug=True))
err("grouped_offs_gt_m", "offs", _env(_grouped(offs=torch.tensor([2, 2, 10], dtype=I32)), debug=True))
err("grouped_offs_negative", "offs", _env(_grouped(offs=torch.tensor([-1, 2, 9], dtype=I32)), debug=True))
err("grouped_offs_int64", "offs", _grouped(offs=torch.tensor([2, 2, 9])))
err("grouped_offs_len", "offs", _grouped(offs=torch.tensor([2, 9], dtype=I32)))
err("grouped_offs_list", "offs", _grouped(offs=[2, 2, 9]))
err("grouped_offs_2d", "offs", _grouped(offs=torch.tensor([[2, 2, 9]], dtype=I32)))
err("grouped_out_shape", "out", _grouped(out=torch.empty(9, 8)))
err("grouped_out_dtype", "out", _grouped(out=torch.empty(9, 136, dtype=torch.float16)))
err("grouped_out_noncontig", "out", _grouped(out=torch.empty(136, 9).t()))
err("grouped_b_2d", "b", _grouped(b=lambda d: d["b"][0]))


@case("grouped_out_guarded", "ok")
def _():
    lk = _lk()
    a, a_s, b, b_s = _gemm_args(M=9, E=3)
    offs = torch.tensor([2, 2, 7], dtype=I32)
    out, check = _guarded((9, 136), torch.float32)
    assert lk.fp8_grouped_gemm(a, a_s, b, b_s, offs, out=out) is out
    check()
    assert bool(torch.isnan(out[7:]).all()), "rows past offs[-1] must be left untouched"
    ref = lk.reference.fp8_grouped_gemm(a, a_s, b, b_s, offs, out_dtype=torch.float32)
    _close(out[:7], ref[:7], 1e-4)


@case("grouped_offs_unchecked_guarded", "ok")
def _():
    """Without LEANKERNELS_DEBUG bad offs are not read on the host: the kernel clamps them and
    follows the reference rule (row r to the first expert whose running-max end exceeds r),
    writing nothing outside out."""
    lk = _lk()
    a, a_s, b, b_s = _gemm_args(M=9, E=3)
    for ends in ([5, 2, 9], [2, 2, 10], [-1, 2, 9], [-4, 99, -3], [2147483647, 0, 1]):
        offs = torch.tensor(ends, dtype=I32)
        out, check = _guarded((9, 136), torch.float32)
        _env(lambda: lk.fp8_grouped_gemm(a, a_s, b, b_s, offs, out=out), debug=False)()
        check()
        want = lk.reference.fp8_grouped_gemm(a, a_s, b, b_s, offs, out=torch.full((9, 136), float("nan")))
        assert torch.equal(torch.isnan(out), torch.isnan(want)), ends
        m = ~torch.isnan(want)
        _close(out[m], want[m], 1e-4)


def _masked(masked_m, out=None, **over):
    def fn():
        a, a_s, b, b_s = _gemm_args(M=4, E=2, masked=True)
        args = dict(a=a, a_scale=a_s, b=b, b_scale=b_s, masked_m=masked_m)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        if out is not None:
            args["out"] = out
        return _lk().fp8_grouped_gemm_masked(**args)

    return fn


err("masked_m_gt_mmax", "masked_m", _env(_masked(torch.tensor([5, 1], dtype=I32)), debug=True))
err("masked_m_negative", "masked_m", _env(_masked(torch.tensor([-1, 1], dtype=I32)), debug=True))


@case("masked_m_unchecked_guarded", "ok")
def _():
    """Without LEANKERNELS_DEBUG masked_m is clamped to [0, M_max] in the kernel (reference rule)."""
    lk = _lk()
    a, a_s, b, b_s = _gemm_args(M=4, E=2, masked=True)
    for mm in ([5, 1], [-1, 4], [2147483647, -2147483648]):
        masked_m = torch.tensor(mm, dtype=I32)
        out, check = _guarded((2, 4, 136), torch.float32)
        _env(lambda: lk.fp8_grouped_gemm_masked(a, a_s, b, b_s, masked_m, out=out), debug=False)()
        check()
        want = lk.reference.fp8_grouped_gemm_masked(a, a_s, b, b_s, masked_m,
                                                     out=torch.full((2, 4, 136), float("nan")))
        assert torch.equal(torch.isnan(out), torch.isnan(want)), mm
        m = ~torch.isnan(want)
        _close(out[m], want[m], 1e-4)
err("masked_m_len", "masked_m", _masked(torch.tensor([1], dtype=I32)))
err("masked_m_float", "masked_m", _masked(torch.tensor([1.0, 1.0])))
err("masked_a_groups", "a", _masked(torch.tensor([1, 1], dtype=I32), a=lambda d: d["a"][:1],
                                    a_scale=lambda d: d["a_scale"][:1]))
err("masked_out_shape", "out", _masked(torch.tensor([1, 1], dtype=I32), out=torch.empty(2, 3, 136)))


@case("masked_out_guarded", "ok")
def _():
    lk = _lk()
    a, a_s, b, b_s = _gemm_args(M=4, E=2, masked=True)
    mm = torch.tensor([3, 0], dtype=I32)
    out, check = _guarded((2, 4, 136), torch.bfloat16)
    lk.fp8_grouped_gemm_masked(a, a_s, b, b_s, mm, out=out)
    check()
    assert bool(torch.isnan(out[0, 3:]).all()) and bool(torch.isnan(out[1]).all())
    ref = lk.reference.fp8_grouped_gemm_masked(a, a_s, b, b_s, mm, out_dtype=torch.float32)
    _close(out[0, :3].float(), ref[0, :3], 1e-2)


# ====================================================================================== routing
def _route(logits=None, **kw):
    return lambda: _lk().route(_rand(5, 16) if logits is None else logits, **{"top_k": 2, **kw})


err("route_logits_1d", "logits", _route(torch.ones(16)))
err("route_logits_int", "logits", _route(torch.ones(5, 16, dtype=torch.int64)))
err("route_logits_none", "logits", lambda: _lk().route(None, 2))
err("route_logits_e0", "logits", _route(torch.ones(5, 0)))
err("route_top_k_0", "top_k", _route(top_k=0))
err("route_top_k_float", "top_k", _route(top_k=2.0))
err("route_top_k_none", "top_k", _route(top_k=None))
err("route_top_k_gt_e", "top_k", _route(top_k=17))
err("route_top_k_gt_32", "top_k", _route(torch.ones(2, 64), top_k=33))
err("route_score", "score", _route(score="relu"))
err("route_n_group", "n_group", _route(n_group=3))
err("route_topk_group", "topk_group", _route(n_group=4, topk_group=5))
err("route_bias_shape", "bias", _route(bias=torch.zeros(15)))
err("route_bias_int", "bias", _route(bias=torch.zeros(16, dtype=torch.int32)))
err("route_renorm", "renormalize", _route(renormalize=1))
err("route_scale", "scale", _route(scale="2.5"))
err("route_scale_huge", "scale", _route(scale=2**1000))
err("update_bias_rate_huge", "rate", lambda: _lk().update_bias(torch.zeros(4), torch.ones(4, dtype=I32), rate=10**400))


def _check_route(logits, **kw):
    lk = _lk()
    w, i = lk.route(logits, **kw)
    rw, ri = lk.reference.route(logits.contiguous(), **kw)
    _same(i, ri)
    _close(w, rw, 1e-6)


case("route_t0", "ok")(lambda: _check_route(torch.ones(0, 16), top_k=2))
case("route_noncontig", "ok")(lambda: _check_route(_rand(16, 10).t(), top_k=3, score="sigmoid"))
case("route_nan_inf", "ok")(lambda: _check_route(
    torch.tensor([[float("nan"), 1.0, 2.0, float("-inf")], [float("inf"), 0.0, 1.0, 2.0]]), top_k=2))


def _plan_ids():
    return torch.tensor([[0, 3], [7, -1], [2, 2], [1, 100]], dtype=I32)


err("plan_ids_float", "ids", lambda: _lk().plan(torch.zeros(3, 2), 4))
err("plan_ids_1d", "ids", lambda: _lk().plan(torch.zeros(3, dtype=I32), 4))
err("plan_num_experts_0", "num_experts", lambda: _lk().plan(_plan_ids(), 0))
err("plan_num_experts_float", "num_experts", lambda: _lk().plan(_plan_ids(), 4.0))
err("plan_align_0", "align", lambda: _lk().plan(_plan_ids(), 4, align=0))
err("plan_align_none", "align", lambda: _lk().plan(_plan_ids(), 4, align=None))


@case("plan_ids_out_of_range", "ok")
def _():
    lk = _lk()
    for ids in (_plan_ids(), _plan_ids().long() * (2**40), torch.tensor([[2**40, -(2**40)]])):
        got = lk.plan(ids, 4, align=2)
        ref = lk.reference.plan(ids, 4, align=2)
        for g, r in zip(got, ref):
            _same(g, r)


def _perm_setup():
    lk = _lk()
    ids = _plan_ids()
    return lk, lk.plan(ids, 4), _rand(4, 130)


err("permute_plan_none", "plan", lambda: _lk().permute(torch.ones(4, 8), None))
err("permute_plan_tuple3", "plan", lambda: _lk().permute(torch.ones(4, 8), (1, 2, 3)))
err("permute_x_tokens", "x", lambda: (lambda lk, p, x: lk.permute(x[:3], p))(*_perm_setup()))
err("permute_quantize_int", "quantize", lambda: (lambda lk, p, x: lk.permute(x, p, quantize=1))(*_perm_setup()))
err("unpermute_y_rows", "y", lambda: (lambda lk, p, x: lk.unpermute(x, p, torch.ones(4, 2)))(*_perm_setup()))
err("unpermute_weights_shape", "weights",
    lambda: (lambda lk, p, x: lk.unpermute(lk.permute(x, p), p, torch.ones(4, 3)))(*_perm_setup()))


@case("permute_forged_plan", "ok")
def _():
    """A hand-made plan with out-of-range rows/tokens: skipped (zero rows), never read OOB."""
    lk, p, x = _perm_setup()
    forged = lk.RoutePlan(p.counts, p.offs, torch.full_like(p.row_token, 10**6),
                          torch.full_like(p.token_row, -(10**6)))
    assert not bool(lk.permute(x, forged).any())
    assert not bool(lk.unpermute(x.new_ones(p.row_token.shape[0], 130), forged, torch.ones(4, 2)).any())


err("update_bias_counts_shape", "counts", lambda: _lk().update_bias(torch.zeros(4), torch.ones(3, dtype=I32)))
err("update_bias_bias_int", "bias", lambda: _lk().update_bias(torch.zeros(4, dtype=I32), torch.ones(4, dtype=I32)))
err("update_bias_rate", "rate", lambda: _lk().update_bias(torch.zeros(4), torch.ones(4, dtype=I32), rate="x"))
err("update_bias_counts_float", "counts", lambda: _lk().update_bias(torch.zeros(4), torch.ones(4)))


# ========================================================================================== mla
def _append(**over):
    def fn():
        kv_c, k_pe = _append_args()
        args = dict(cache=_cache(), kv_c=kv_c, k_pe=k_pe, slot_mapping=torch.tensor([0, 5, 9]))
        args.update(over)
        return _lk().mla_append(**args)

    return fn


err("append_cache_width", "cache", _append(cache=torch.zeros(4, 8, 500, dtype=torch.bfloat16)))
err("append_cache_fp32", "cache", _append(cache=torch.zeros(4, 8, 576)))
err("append_cache_2d", "cache", _append(cache=torch.zeros(32, 576, dtype=torch.bfloat16)))
err("append_cache_strided", "cache", _append(cache=torch.zeros(4, 16, 576, dtype=torch.bfloat16)[:, ::2]))
err("append_kv_c_width", "kv_c", _append(kv_c=torch.zeros(3, 500)))
err("append_kv_c_int", "kv_c", _append(kv_c=torch.zeros(3, 512, dtype=I32)))
err("append_k_pe_width", "k_pe", _append(k_pe=torch.zeros(3, 32)))
err("append_k_pe_tokens", "k_pe", _append(k_pe=torch.zeros(2, 64)))
err("append_slot_float", "slot_mapping", _append(slot_mapping=torch.tensor([0.0, 1.0, 2.0])))
err("append_slot_len", "slot_mapping", _append(slot_mapping=torch.tensor([0, 1])))
err("append_slot_list", "slot_mapping", _append(slot_mapping=[0, 1, 2]))
err("append_norm_weight", "norm_weight", _append(norm_weight=torch.ones(500)))
err("append_cos_alone", "cos", _append(cos=torch.ones(3, 32)))
err("append_cos_width", "cos", _append(cos=torch.ones(3, 64), sin=torch.ones(3, 64)))
err("append_positions_no_cos", "positions", _append(positions=torch.tensor([0, 1, 2])))


@case("append_positions_out_of_range_skipped", "ok")
def _():
    """Out-of-range positions are data-dependent indices: the token is skipped (documented)."""
    lk = _lk()
    cache = _cache()
    kv_c, k_pe = _append_args()
    cos, sin = torch.ones(4, 32), torch.zeros(4, 32)
    lk.mla_append(cache, kv_c, k_pe, torch.tensor([0, 5, 9]), cos=cos, sin=sin, positions=torch.tensor([0, 4, -1]))
    assert bool(cache[0, 0].any()) and not bool(cache[0, 5].any()) and not bool(cache[1, 1].any())
err("append_eps_none", "eps", _append(norm_weight=torch.ones(512), eps=None))
err("append_eps_str", "eps", _append(norm_weight=torch.ones(512), eps="1e-6"))
err("append_eps_huge_int", "eps", _append(norm_weight=torch.ones(512), eps=10**400))


@case("append_slots_out_of_range_guarded", "ok")
def _():
    """Slots past the cache / negative are skipped; blocks around the cache stay poisoned."""
    lk = _lk()
    for fp8 in (False, True):
        dt, w = (torch.uint8, 656) if fp8 else (torch.bfloat16, 576)
        buf = torch.empty(6, 8, w, dtype=dt)
        buf.fill_(0x7F) if fp8 else buf.fill_(float("nan"))
        cache = buf[1:5]
        kv_c, k_pe = _append_args(5)
        slots = torch.tensor([3, 32, -1, 10**12, 31])
        ref = cache.clone()
        lk.mla_append(cache, kv_c, k_pe, slots)
        lk.reference.mla_append(ref, kv_c, k_pe, slots)
        _same(cache, ref)
        for blk in (buf[0], buf[5]):
            if fp8:
                assert bool((blk == 0x7F).all())
            else:
                assert bool(torch.isnan(blk).all())


@case("append_empty_and_meta", "ok")
def _():
    lk = _lk()
    kv_c, k_pe = _append_args(0)
    lk.mla_append(_cache(), kv_c, k_pe, torch.zeros(0, dtype=torch.int64))
    lk.mla_append(torch.empty(4, 8, 576, dtype=torch.bfloat16, device="meta"), kv_c.to("meta"),
                  k_pe.to("meta"), torch.zeros(0, dtype=torch.int64, device="meta"))


def _decode(**over):
    def fn():
        q, cache, bt, sl = _decode_args()
        args = dict(q=q, cache=cache, block_table=bt, seqlens=sl, softmax_scale=0.05)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        return _lk().mla_decode(**args)

    return fn


err("decode_q_fp32", "q", _decode(q=lambda d: d["q"].float()))
err("decode_q_dim", "q", _decode(q=lambda d: d["q"][..., :512]))
err("decode_q_3d", "q", _decode(q=lambda d: d["q"][0]))
err("decode_cache_width", "cache", _decode(cache=torch.zeros(4, 8, 512, dtype=torch.bfloat16)))
err("decode_bt_int64", "block_table", _decode(block_table=lambda d: d["block_table"].long()))
err("decode_bt_rows", "block_table", _decode(block_table=lambda d: d["block_table"][:1]))
err("decode_bt_range", "block_table", _decode(block_table=torch.tensor([[4, 0], [1, 2]], dtype=I32)))
err("decode_bt_negative", "block_table", _decode(block_table=torch.tensor([[0, 1], [-1, 2]], dtype=I32)))
err("decode_seqlens_capacity", "seqlens", _decode(seqlens=torch.tensor([5, 17], dtype=I32)))
err("decode_seqlens_negative", "seqlens", _decode(seqlens=torch.tensor([-1, 3], dtype=I32)))
err("decode_seqlens_len", "seqlens", _decode(seqlens=torch.tensor([5], dtype=I32)))
err("decode_seqlens_int64", "seqlens", _decode(seqlens=torch.tensor([5, 3])))
err("decode_scale_nan", "softmax_scale", _decode(softmax_scale=float("nan")))
err("decode_scale_none", "softmax_scale", _decode(softmax_scale=None))
err("decode_scale_str", "softmax_scale", _decode(softmax_scale="0.1"))
err("decode_scale_huge_int", "softmax_scale", _decode(softmax_scale=2**1100))
err("decode_num_splits_0", "num_splits", _decode(num_splits=0))
err("decode_cache_block_size_0", "block_size", _decode(cache=torch.zeros(4, 0, 576, dtype=torch.bfloat16),
                                                      seqlens=torch.zeros(2, dtype=I32)))
err("decode_num_splits_float", "num_splits", _decode(num_splits=1.5))


@case("decode_num_splits_huge", "ok")
def _():
    out, lse = _decode(num_splits=2**40)()
    ref_out, ref_lse = _decode(num_splits=1)()
    _close(out.float(), ref_out.float(), 1e-2)
    _close(lse, ref_lse, 1e-5)


@case("decode_unused_bt_padding_and_empty", "ok")
def _():
    lk = _lk()
    q, cache, bt, _ = _decode_args()
    bt = torch.tensor([[1, -5], [2, 10**6]], dtype=I32)  # entries past ceil(seqlen/bs) never read
    sl = torch.tensor([8, 0], dtype=I32)
    out, lse = lk.mla_decode(q, cache, bt, sl, 0.05)
    rout, rlse = lk.reference.mla_decode(q, cache, bt, sl, 0.05)
    _close(out.float(), rout.float(), 2e-2)
    assert bool(torch.isinf(lse[1]).all()) and not bool(out[1].any())
    q0 = q[:0]
    out0, _ = lk.mla_decode(q0, cache, bt[:0], sl[:0], 0.05)
    assert out0.shape == (0, 1, 2, 512)


err("cache_num_blocks_0", "num_blocks", lambda: _lk().LatentCache(0, 8))
err("cache_num_blocks_float", "num_blocks", lambda: _lk().LatentCache(1.5, 8))
err("cache_num_blocks_none", "num_blocks", lambda: _lk().LatentCache(None, 8))
err("cache_block_size_neg", "block_size", lambda: _lk().LatentCache(2, -1))
err("cache_block_size_str", "block_size", lambda: _lk().LatentCache(2, "8"))
err("cache_allocate_neg", "num_blocks", lambda: _lk().LatentCache(2, 8).allocate(-1))
err("cache_allocate_float", "num_blocks", lambda: _lk().LatentCache(2, 8).allocate(1.5))
err("cache_free_range", "blocks", lambda: _lk().LatentCache(2, 8).free([2]))
err("cache_double_free", "blocks", lambda: _lk().LatentCache(2, 8).free([1]))
err("cache_slot_mapping_bad_block", "blocks", lambda: _lk().LatentCache(2, 8).slot_mapping([0, 5], 0, 12))
err("cache_slot_mapping_neg_start", "start", lambda: _lk().LatentCache(2, 8).slot_mapping([0, 1], -1, 2))
err("cache_slot_mapping_neg_count", "count", lambda: _lk().LatentCache(2, 8).slot_mapping([0, 1], 0, -1))
err("cache_slot_mapping_past", "blocks", lambda: _lk().LatentCache(2, 8).slot_mapping([0], 4, 8))
err("cache_block_table_narrow", "max_blocks", lambda: _lk().LatentCache.block_table([[0, 1, 2]], max_blocks=2))


@case("meta_tensors_everywhere", "ok")
def _():
    """Meta tensors trace through every op (shapes only, no kernel, no data-dependent check)."""
    lk = _lk()
    m = torch.device("meta")
    a, a_s, b, b_s = (t.to(m) for t in _gemm_args(M=9, E=3))
    assert lk.fp8_grouped_gemm(a, a_s, b, b_s, torch.zeros(3, dtype=I32, device=m)).shape == (9, 136)
    a, a_s, b, b_s = (t.to(m) for t in _gemm_args())
    assert lk.fp8_gemm(a, a_s, b, b_s).shape == (5, 136)
    w, ids = lk.route(torch.empty(5, 16, device=m), 2)
    assert ids.shape == (5, 2)
    assert lk.plan(ids, 16).row_token.shape == (10,)
    q, cache, bt, sl = (t.to(m) for t in _decode_args())
    out, lse = lk.mla_decode(q, cache, bt, sl, 0.05)
    assert out.shape == (2, 1, 2, 512) and lse.shape == (2, 2, 1)


# ======================================================================================= compat
def _dg():
    from leankernels.compat import deep_gemm

    return deep_gemm


@case("dg_gemm_d_shape", "err", "d")
def _():
    a, a_s, b, b_s = _gemm_args()
    _dg().fp8_gemm_nt((a, a_s), (b, b_s), torch.empty(5, 8, dtype=torch.bfloat16))


@case("dg_gemm_d_guarded", "ok")
def _():
    lk = _lk()
    a, a_s, b, b_s = _gemm_args()
    d, check = _guarded((5, 136), torch.float32)
    _dg().fp8_gemm_nt((a, a_s), (b, b_s), d)
    check()
    _close(d, lk.reference.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32), 1e-4)


@case("dg_contig_m_indices_range", "err", "m_indices")
def _():
    a, a_s, b, b_s = _gemm_args(M=6, E=2)
    _dg().m_grouped_fp8_gemm_nt_contiguous((a, a_s), (b, b_s), torch.empty(6, 136, dtype=torch.bfloat16),
                                           torch.tensor([0, 0, 1, 1, 2, 2], dtype=I32))


@case("dg_contig_m_indices_unsorted", "err", "m_indices")
def _():
    a, a_s, b, b_s = _gemm_args(M=6, E=2)
    _dg().m_grouped_fp8_gemm_nt_contiguous((a, a_s), (b, b_s), torch.empty(6, 136, dtype=torch.bfloat16),
                                           torch.tensor([1, 1, 0, 0, 1, 1], dtype=I32))


@case("dg_contig_m_indices_len", "err", "m_indices")
def _():
    a, a_s, b, b_s = _gemm_args(M=6, E=2)
    _dg().m_grouped_fp8_gemm_nt_contiguous((a, a_s), (b, b_s), torch.empty(6, 136, dtype=torch.bfloat16),
                                           torch.tensor([0, 0, 1], dtype=I32))


@case("dg_masked_m_range", "err", "masked_m")
def _():
    a, a_s, b, b_s = _gemm_args(M=4, E=2, masked=True)
    _dg().m_grouped_fp8_gemm_nt_masked((a, a_s), (b, b_s), torch.empty(2, 4, 136, dtype=torch.bfloat16),
                                       torch.tensor([9, 1], dtype=I32), 4)


@case("dg_operand_not_tuple", "err", "a")
def _():
    a, a_s, b, b_s = _gemm_args()
    _dg().fp8_gemm_nt(a, (b, b_s), torch.empty(5, 136, dtype=torch.bfloat16))


def _fm():
    from leankernels.compat import flash_mla

    return flash_mla


err("dg_recipe_int", "recipe", lambda: _dg().fp8_gemm_nt(_gemm_args()[:2], _gemm_args()[2:],
                                                       torch.empty(5, 136), recipe=5))
err("dg_cast_gran_0", "gran_k", lambda: _dg().per_token_cast_to_fp8(torch.ones(4, 8), gran_k=0))
err("dg_block_cast_gran_neg", "gran_k", lambda: _dg().per_block_cast_to_fp8(torch.ones(4, 8), gran_k=-128))
err("dg_expected_m", "expected_m", lambda: _dg().m_grouped_fp8_gemm_nt_masked(
    _gemm_args(M=4, E=2, masked=True)[:2], _gemm_args(M=4, E=2, masked=True)[2:],
    torch.empty(2, 4, 136), torch.ones(2, dtype=I32), None))
err("fm_metadata_heads_float", "num_heads_k", lambda: _fm().get_mla_metadata(torch.ones(2, dtype=I32), 16, 1.5))
err("fm_metadata_heads_none", "num_q_tokens_per_head_k",
    lambda: _fm().get_mla_metadata(torch.ones(2, dtype=I32), None, 1))


@case("fm_metadata_seqlens_float", "err", "cache_seqlens")
def _():
    _fm().get_mla_metadata(torch.ones(2), 16, 1)


@case("fm_metadata_heads_0", "err", "num_heads_k")
def _():
    _fm().get_mla_metadata(torch.ones(2, dtype=I32), 16, 0)


def _fm_call(**over):
    def fn():
        fm = _fm()
        q, cache, bt, sl = _decode_args()
        md, ns = fm.get_mla_metadata(sl, 2, 1)
        args = dict(q=q, k_cache=cache[:, :, None], block_table=bt, cache_seqlens=sl, head_dim_v=512,
                    tile_scheduler_metadata=md, num_splits=ns)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        return fm.flash_mla_with_kvcache(**args)

    return fn


err("fm_k_cache_heads", "k_cache", _fm_call(k_cache=lambda d: d["k_cache"].expand(-1, -1, 3, -1)))  # 3 does not divide h_q = 2
err("fm_head_dim_v", "head_dim_v", _fm_call(head_dim_v=256))
err("fm_num_splits_len", "num_splits", _fm_call(num_splits=torch.zeros(2, dtype=I32)))
err("fm_metadata_shape", "tile_scheduler_metadata", _fm_call(tile_scheduler_metadata=torch.zeros(4, 7, dtype=I32)))
err("fm_seqlens_capacity", "seqlens", _fm_call(cache_seqlens=torch.tensor([5, 99], dtype=I32)))


# ============================================================== raw torch ops (no Python wrapper)
# These bypass the public validation: anything that could read or write out of bounds must
# be rejected (ValueError) by the op itself. Outputs the op allocates can't be guarded, so the
# cases use sizes where an unchecked kernel would read/write far out of bounds (a crash or a
# corrupted guard).
def _raw_err(name, arg, fn):
    CASES["raw_" + name] = (fn, "err", arg)


_raw_err("quant_block_rows", "block_rows", lambda: _ops().quantize_fp8(torch.ones(4, 8), 7, False))
_raw_err("dequant_scale_small", "scale", lambda: _ops().dequantize_fp8(
    torch.zeros(64, 4096).to(torch.float8_e4m3fn), torch.ones(1, 1), 1))
_raw_err("dequant_block_rows", "block_rows", lambda: _ops().dequantize_fp8(
    torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(4, 1), 3))


def _raw_gemm(fn_name, over, grouped=None):
    def fn():
        if grouped == "masked":
            a, a_s, b, b_s = _gemm_args(M=4, E=2, masked=True)
            extra = [torch.tensor([4, 4], dtype=I32)]
        elif grouped:
            a, a_s, b, b_s = _gemm_args(M=9, E=3)
            extra = [torch.tensor([2, 2, 9], dtype=I32)]
        else:
            a, a_s, b, b_s = _gemm_args()
            extra = []
        args = [a, a_s, b, b_s, *extra]
        if fn_name.endswith("_out"):
            args.append(None)
        for i, v in over.items():
            args[i] = v(args) if callable(v) else v
        if len(args) == 4 + len(extra):
            args.append(torch.float32)
        return getattr(_ops(), fn_name)(*args)

    return fn


_raw_err("gemm_a_scale_small", "a_scale", _raw_gemm("fp8_gemm", {1: torch.ones(1, 1)}))
_raw_err("gemm_a_scale_bf16", "a_scale", _raw_gemm("fp8_gemm", {1: lambda a: a[1].bfloat16()}))
_raw_err("gemm_b_scale_small", "b_scale", _raw_gemm("fp8_gemm", {3: torch.ones(1, 1)}))
_raw_err("gemm_k_mismatch", "K", _raw_gemm("fp8_gemm", {0: lambda a: a[0][:, :64].contiguous()}))
_raw_err("gemm_a_fp32", "a", _raw_gemm("fp8_gemm", {0: lambda a: torch.zeros(5, 40)}))
_raw_err("gemm_out_dtype_f16", "out_dtype", lambda: _ops().fp8_gemm(*_gemm_args(), torch.float16))
_raw_err("grouped_out_dtype_f16", "out_dtype", lambda: _ops().fp8_grouped_gemm(
    *_gemm_args(M=9, E=3), torch.tensor([2, 2, 9], dtype=I32), torch.float16))
_raw_err("grouped_offs_short", "offs", _raw_gemm("fp8_grouped_gemm", {4: torch.tensor([9], dtype=I32)}, True))
_raw_err("grouped_offs_int64", "offs", _raw_gemm("fp8_grouped_gemm", {4: torch.tensor([2, 2, 9])}, True))
_raw_err("grouped_out_small", "out", _raw_gemm("fp8_grouped_gemm_out", {5: torch.empty(2, 8)}, True))
_raw_err("grouped_b_2d", "b", _raw_gemm("fp8_grouped_gemm", {2: lambda a: a[2][0]}, True))
_raw_err("masked_out_small", "out", _raw_gemm("fp8_grouped_gemm_masked_out", {5: torch.empty(2, 1, 8)}, "masked"))
_raw_err("masked_m_short", "masked_m", _raw_gemm("fp8_grouped_gemm_masked", {4: torch.tensor([1], dtype=I32)},
                                                  "masked"))
_raw_err("masked_a_groups", "a", _raw_gemm("fp8_grouped_gemm_masked", {0: lambda a: a[0][:1],
                                                                       1: lambda a: a[1][:1]}, "masked"))


@case("raw_grouped_out_guarded", "ok")
def _():
    a, a_s, b, b_s = _gemm_args(M=9, E=3)
    out, check = _guarded((9, 136), torch.float32)
    _ops().fp8_grouped_gemm_out(a, a_s, b, b_s, torch.tensor([-5, 100, 3], dtype=I32), out)  # clamped
    check()


_raw_err("route_bias_short", "bias", lambda: _ops().route(_rand(4, 4096), 2, False, torch.zeros(1), 1, 1, True, 1.0))
_raw_err("route_top_k_big", "top_k", lambda: _ops().route(_rand(4, 64), 40, False, None, 1, 1, True, 1.0))
_raw_err("route_top_k_gt_e", "top_k", lambda: _ops().route(_rand(4, 8), 9, False, None, 1, 1, True, 1.0))
_raw_err("route_logits_int", "logits", lambda: _ops().route(torch.ones(4, 8, dtype=I32), 2, False, None, 1, 1,
                                                            True, 1.0))
_raw_err("plan_ids_int64", "ids", lambda: _ops().plan(torch.zeros(4, 2, dtype=torch.int64), 4, 1))
_raw_err("plan_align_0", "align", lambda: _ops().plan(torch.zeros(4, 2, dtype=I32), 4, 0))
_raw_err("plan_experts_0", "num_experts", lambda: _ops().plan(torch.zeros(4, 2, dtype=I32), 0, 1))
_raw_err("permute_row_token_int64", "row_token",
         lambda: _ops().permute(torch.ones(4, 8), torch.zeros(6, dtype=torch.int64), torch.zeros(4, 1, dtype=I32)))
_raw_err("permute_token_row_tokens", "token_row",
         lambda: _ops().permute(torch.ones(4, 8), torch.zeros(6, dtype=I32), torch.zeros(5, 1, dtype=I32)))
_raw_err("permute_x_int", "x",
         lambda: _ops().permute_fp8(torch.ones(4, 8, dtype=I32), torch.zeros(6, dtype=I32), False))
_raw_err("unpermute_weights_small", "weights", lambda: _ops().unpermute(
    torch.ones(8, 4096), torch.zeros(1000, 8, dtype=I32), torch.ones(1, 1)))
_raw_err("unpermute_token_row_1d", "token_row", lambda: _ops().unpermute(
    torch.ones(8, 8), torch.zeros(8, dtype=I32), torch.ones(8)))
_raw_err("update_bias_counts_short", "counts", lambda: _ops().update_bias(
    torch.zeros(10000), torch.ones(1, dtype=I32), 0.1))
_raw_err("update_bias_bias_bf16", "bias", lambda: _ops().update_bias(
    torch.zeros(8, dtype=torch.bfloat16), torch.ones(8, dtype=I32), 0.1))


def _raw_append(**over):
    def fn():
        kv_c, k_pe = _append_args()
        args = dict(cache=_cache(), kv_c=kv_c, k_pe=k_pe, slot_mapping=torch.tensor([0, 5, 31]), norm_weight=None,
                    eps=1e-6, cos=None, sin=None, positions=None)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        return _ops().mla_append(*args.values())

    return fn


_raw_err("append_cache_narrow", "cache", _raw_append(cache=torch.zeros(4, 8, 16, dtype=torch.bfloat16)))
_raw_err("append_cache_fp32", "cache", _raw_append(cache=torch.zeros(4, 8, 576)))
_raw_err("append_kv_c_narrow", "kv_c", _raw_append(kv_c=torch.zeros(3, 8)))
_raw_err("append_k_pe_narrow", "k_pe", _raw_append(k_pe=torch.zeros(3, 8)))
_raw_err("append_k_pe_tokens", "k_pe", _raw_append(k_pe=torch.zeros(1, 64)))
_raw_err("append_slots_int32", "slot_mapping", _raw_append(slot_mapping=torch.tensor([0, 5, 31], dtype=I32)))
_raw_err("append_slots_short", "slot_mapping", _raw_append(slot_mapping=torch.tensor([0])))
_raw_err("append_norm_short", "norm_weight", _raw_append(norm_weight=torch.ones(4)))
_raw_err("append_cos_narrow", "cos", _raw_append(cos=torch.ones(3, 4), sin=torch.ones(3, 4)))
_raw_err("append_cos_bf16", "cos", _raw_append(cos=torch.ones(3, 32, dtype=torch.bfloat16),
                                               sin=torch.ones(3, 32, dtype=torch.bfloat16)))
_raw_err("append_positions_int32", "positions", _raw_append(cos=torch.ones(3, 32), sin=torch.ones(3, 32),
                                                            positions=torch.tensor([0, 1, 2], dtype=I32)))


def _raw_decode(**over):
    def fn():
        q, cache, bt, sl = _decode_args()
        args = dict(q=q, cache=cache, block_table=bt, seqlens=sl, softmax_scale=0.05, causal=True, num_splits=1)
        args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
        return _ops().mla_decode(*args.values())

    return fn


_raw_err("decode_q_narrow", "q", _raw_decode(q=lambda d: d["q"][..., :8].contiguous()))
_raw_err("decode_q_fp32", "q", _raw_decode(q=lambda d: d["q"].float()))
_raw_err("decode_cache_narrow", "cache", _raw_decode(cache=torch.zeros(4, 8, 16, dtype=torch.bfloat16)))
_raw_err("decode_bt_short", "block_table", _raw_decode(block_table=torch.zeros(1, 2, dtype=I32)))
_raw_err("decode_bt_int64", "block_table", _raw_decode(block_table=torch.zeros(2, 2, dtype=torch.int64)))
_raw_err("decode_seqlens_short", "seqlens", _raw_decode(seqlens=torch.tensor([5], dtype=I32)))
_raw_err("decode_seqlens_capacity", "seqlens", _raw_decode(seqlens=torch.tensor([5, 10**6], dtype=I32)))
_raw_err("decode_num_splits_0", "num_splits", _raw_decode(num_splits=0))
_raw_err("decode_cache_block_size_0", "block_size", _raw_decode(cache=torch.zeros(4, 0, 576, dtype=torch.bfloat16),
                                                                seqlens=torch.zeros(2, dtype=I32)))
_raw_err("schedule_parts_0", "num_parts", lambda: _ops().mla_schedule(torch.ones(2, dtype=I32), 0))
_raw_err("schedule_seqlens_int64", "seqlens", lambda: _ops().mla_schedule(torch.ones(2, dtype=torch.int64), 4))




# The extension module itself (leankernels._C, below the torch ops): a bad dtype code must be
# an error before any OpenMP region (an exception thrown inside one terminates the process).
def _c_call(fn_name, *args):
    def fn():
        from leankernels import _C

        return getattr(_C, fn_name)(*args)

    return fn


_X = torch.ones(4, 256, dtype=torch.int32)
_W = torch.empty(4, 2)
_ID = torch.empty(4, 2, dtype=I32)
err("c_route_dtype", "logits", _c_call("route", _X.data_ptr(), 4, 4, 256, 256, 0, False, 2, 1, 1, True, 1.0,
                                       _W.data_ptr(), _ID.data_ptr(), -1, 0))
_Q = torch.empty(4, 256, dtype=torch.uint8)
_S = torch.empty(4, 2)
err("c_quant_dtype", "x", _c_call("quantize_fp8", _X.data_ptr(), 4, 1, 4, 256, 0, 256, 1, _Q.data_ptr(),
                                  _S.data_ptr(), False, -1, 0))
_RT = torch.zeros(4, dtype=I32)
err("c_permute_fp8_dtype", "x", _c_call("permute_fp8", _X.data_ptr(), 4, 4, 256, 256, _RT.data_ptr(), 4,
                                        _Q.data_ptr(), _S.data_ptr(), False, -1, 0))
_Y = torch.empty(4, 256)
err("c_unpermute_dtype", "y", _c_call("unpermute", _X.data_ptr(), 4, 4, 256, _ID.data_ptr(), _W.data_ptr(), 4, 2,
                                      _Y.data_ptr(), -1, 0))


# ================================================================================== hypothesis
# Random shapes/values against the public wrappers: each example must either match the
# reference or raise TypeError/ValueError. Run inside the child (crash-safe), seeded.
def _hyp_settings():
    from hypothesis import HealthCheck, settings

    return settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _expect_ok_or_clean(fn):
    try:
        return fn()
    except ERR as e:
        assert "leankernels" in str(e) or any(c.isalpha() for c in str(e)), e
        return None


@case("hyp_grouped_gemm_offs", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()

    @_hyp_settings()
    @given(M=st.integers(0, 12), E=st.integers(1, 3), offs=st.lists(st.integers(-3, 15), min_size=1, max_size=4),
           K=st.sampled_from([16, 130]), N=st.sampled_from([8, 129]), debug=st.booleans())
    def prop(M, E, offs, K, N, debug):
        a, a_s, b, b_s = _gemm_args(M=M, N=N, K=K, E=E)
        offs_t = torch.tensor(offs[:E] + [offs[-1]] * (E - len(offs)), dtype=I32)
        good = offs_t.tolist()
        bad = any(x < 0 for x in good) or good != sorted(good) or good[-1] > M
        out, check = _guarded((M, N), torch.float32)
        try:  # offs values are checked on the host only with LEANKERNELS_DEBUG=1
            _env(lambda: lk.fp8_grouped_gemm(a, a_s, b, b_s, offs_t, out=out), debug)()
        except ValueError as e:
            assert "offs" in str(e) and debug and bad, e
            check()
            return
        assert not (debug and bad), "LEANKERNELS_DEBUG=1 must reject bad offs"
        check()
        # Unchecked bad offs follow the reference rule; rows no expert owns stay untouched (NaN).
        ref = lk.reference.fp8_grouped_gemm(a, a_s, b, b_s, offs_t, out=torch.full((M, N), float("nan")))
        _close(out, ref, 1e-4)

    prop()


@case("hyp_masked_gemm", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()

    @_hyp_settings()
    @given(M=st.integers(0, 5), mm=st.lists(st.integers(-2, 7), min_size=2, max_size=2), debug=st.booleans())
    def prop(M, mm, debug):
        a, a_s, b, b_s = _gemm_args(M=M, N=8, K=16, E=2, masked=True)
        masked_m = torch.tensor(mm, dtype=I32)
        bad = min(mm) < 0 or max(mm) > M
        out, check = _guarded((2, M, 8), torch.float32)
        try:  # masked_m values are checked on the host only with LEANKERNELS_DEBUG=1
            _env(lambda: lk.fp8_grouped_gemm_masked(a, a_s, b, b_s, masked_m, out=out), debug)()
        except ValueError as e:
            assert "masked_m" in str(e) and debug and bad, e
            check()
            return
        assert not (debug and bad), "LEANKERNELS_DEBUG=1 must reject bad masked_m"
        check()
        ref = lk.reference.fp8_grouped_gemm_masked(a, a_s, b, b_s, masked_m, out=torch.full((2, M, 8), float("nan")))
        _close(out, ref, 1e-4)

    prop()


@case("hyp_route_plan_permute", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()

    @_hyp_settings()
    @given(T=st.integers(0, 6), E=st.integers(1, 40), top_k=st.integers(-1, 35), n_group=st.integers(0, 5),
           topk_group=st.integers(0, 5), align=st.integers(0, 3), nan=st.booleans())
    def prop(T, E, top_k, n_group, topk_group, align, nan):
        logits = _rand(T, E, seed=T * 100 + E)
        if nan and T:
            logits[0, 0] = float("nan")
        kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group)
        try:
            w, ids = lk.route(logits, **kw)
        except ERR as e:
            assert any(n in str(e) for n in ("top_k", "n_group", "topk_group", "logits")), e
            return
        rw, rids = lk.reference.route(logits, **kw)
        _same(ids, rids)
        _close(w, rw, 1e-6)
        try:
            p = lk.plan(ids, E - 1 if E > 1 else E, align=align)
        except ValueError as e:
            assert "align" in str(e) and align < 1, e
            return
        rp = lk.reference.plan(ids, E - 1 if E > 1 else E, align=align)
        for g, r in zip(p, rp):
            _same(g, r)
        x = _rand(T, 130, seed=1)
        y = lk.permute(x, p)
        _same(y, lk.reference.permute(x, p.row_token))
        _close(lk.unpermute(y, p, w), lk.reference.unpermute(y, p.token_row, w), 1e-5)

    prop()


@case("hyp_mla_decode", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()
    caches = {fp8: _decode_args(nb=4, bs=8, fp8=fp8) for fp8 in (False, True)}

    @_hyp_settings()
    @given(bt=st.lists(st.integers(-2, 5), min_size=4, max_size=4), sl=st.lists(st.integers(-2, 18), min_size=2,
                                                                                  max_size=2),
           splits=st.integers(1, 5), fp8=st.booleans())
    def prop(bt, sl, splits, fp8):
        q, cache, _, _ = caches[fp8]
        bt_t = torch.tensor(bt, dtype=I32).view(2, 2)
        sl_t = torch.tensor(sl, dtype=I32)
        try:
            out, lse = lk.mla_decode(q, cache, bt_t, sl_t, 0.05, num_splits=splits)
        except ValueError as e:
            assert "seqlens" in str(e) or "block_table" in str(e), e
            return
        rout, rlse = lk.reference.mla_decode(q, cache, bt_t, sl_t, 0.05)
        _close(out.float(), rout.float(), 2e-2)

    prop()


@case("hyp_mla_append_guarded", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()

    @_hyp_settings()
    @given(slots=st.lists(st.integers(-3, 40), min_size=0, max_size=6, unique=True), fp8=st.booleans(),
           pos=st.one_of(st.none(), st.lists(st.integers(-2, 6), min_size=6, max_size=6)), norm=st.booleans(),
           bs=st.integers(1, 9))
    def prop(slots, fp8, pos, norm, bs):
        T = len(slots)
        dt, w = (torch.uint8, 656) if fp8 else (torch.bfloat16, 576)
        buf = torch.full((6, bs, w), 0x7F, dtype=dt) if fp8 else torch.full((6, bs, w), float("nan"), dtype=dt)
        cache = buf[1:5]
        kv_c, k_pe = _append_args(T, seed=T)
        kw = dict(norm_weight=torch.rand(512) if norm else None)
        if pos is not None:
            kw.update(cos=_rand(5, 32), sin=_rand(5, 32, seed=1), positions=torch.tensor(pos[:T], dtype=torch.int64))
        ref = cache.clone()
        sl = torch.tensor(slots, dtype=torch.int64)
        lk.mla_append(cache, kv_c, k_pe, sl, **kw)
        lk.reference.mla_append(ref, kv_c, k_pe, sl, **kw)
        if fp8:
            _same(cache, ref)
        else:
            _close(cache.float(), ref.float(), 1e-2)
        for blk in (buf[0], buf[5]):
            assert bool((blk == 0x7F).all()) if fp8 else bool(torch.isnan(blk).all()), "write outside the cache"

    prop()


@case("hyp_quant_shapes", "ok")
def _():
    from hypothesis import given, strategies as st

    lk = _lk()

    @_hyp_settings()
    @given(shape=st.lists(st.integers(0, 140), min_size=0, max_size=3), block=st.sampled_from([(1, 128), (128, 128)]),
           transpose=st.booleans(), special=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]))
    def prop(shape, block, transpose, special):
        x = _rand(*shape) if shape else torch.tensor(1.5)
        if special is not None and x.numel():
            x.view(-1)[0] = special
        if transpose and x.dim() >= 2:
            x = x.transpose(-1, -2)
        try:
            q, s = lk.quantize_fp8(x, block)
        except ValueError as e:
            assert "x" in str(e) and (x.dim() == 0 or (block[0] == 128 and x.dim() not in (2, 3))), e
            return
        rq, rs = lk.reference.quantize_fp8(x.contiguous(), block)
        _same(q, rq)
        _same(s, rs)
        _same(lk.dequantize_fp8(q, s, block), lk.reference.dequantize_fp8(q, s, block))

    prop()


# =============================================================== one-argument mutation sweep
# Every public op, every argument replaced in turn by each hostile value: the call must either
# succeed or raise TypeError/ValueError whose message names that argument.
def _base_calls():
    lk = _lk()
    a, a_s, b, b_s = _gemm_args()
    ga, ga_s, gb, gb_s = _gemm_args(M=9, E=3)
    ma, ma_s, mb, mb_s = _gemm_args(M=4, E=2, masked=True)
    xq, sq = lk.quantize_fp8(_rand(4, 200))
    ids = _plan_ids()
    p = lk.plan(ids, 4)
    x = _rand(4, 130)
    y = lk.permute(x, p)
    kv_c, k_pe = _append_args()
    q, cache, bt, sl = _decode_args()
    return [
        (lk.quantize_fp8, dict(x=_rand(4, 200), block=(1, 128), scale_fmt="fp32")),
        (lk.dequantize_fp8, dict(x_fp8=xq, scale=sq, block=(1, 128))),
        (lk.fp8_gemm, dict(a=a, a_scale=a_s, b=b, b_scale=b_s, out_dtype=torch.float32)),
        (lk.fp8_grouped_gemm, dict(a=ga, a_scale=ga_s, b=gb, b_scale=gb_s, offs=torch.tensor([2, 2, 9], dtype=I32),
                                   out_dtype=torch.bfloat16, out=torch.empty(9, 136))),
        (lk.fp8_grouped_gemm_masked, dict(a=ma, a_scale=ma_s, b=mb, b_scale=mb_s,
                                          masked_m=torch.tensor([3, 4], dtype=I32), out_dtype=torch.bfloat16,
                                          out=torch.empty(2, 4, 136))),
        (lk.route, dict(logits=_rand(5, 16), top_k=4, score="sigmoid", bias=torch.zeros(16), n_group=4,
                        topk_group=2, renormalize=True, scale=2.5)),
        (lk.plan, dict(ids=ids, num_experts=4, align=2)),
        (lk.permute, dict(x=x, plan=p, quantize=True, scale_fmt="ue8m0")),
        (lk.unpermute, dict(y=y, plan=p, weights=torch.rand(4, 2))),
        (lk.update_bias, dict(bias=torch.zeros(4), counts=p.counts, rate=0.01)),
        (lk.mla_append, dict(cache=_cache(), kv_c=kv_c, k_pe=k_pe, slot_mapping=torch.tensor([0, 5, 9]),
                             norm_weight=torch.ones(512), eps=1e-6, cos=torch.ones(3, 32), sin=torch.zeros(3, 32),
                             positions=None)),
        (lk.mla_decode, dict(q=q, cache=cache, block_table=bt, seqlens=sl, softmax_scale=0.05, causal=True,
                             num_splits=2)),
    ]


def _hostile_values(v):
    vals = [None, 1.5, "x", [1, 2], True, -1, 2**62, torch.tensor(1.0), torch.empty(0),
            torch.ones(3, dtype=torch.float64), torch.ones(2, 3, 4, 5, dtype=torch.int64)]
    if isinstance(v, torch.Tensor):
        vals += [v.to("meta"), v[:0], v.unsqueeze(0), v.reshape(-1)]
        if v.dtype in (torch.int32, torch.int64):
            vals += [v.float(), v.to(torch.int16)]
        elif v.dtype == torch.float8_e4m3fn:
            vals += [v.view(torch.uint8), v.float()]
        else:
            vals += [v.to(torch.int32), v.double(), torch.full_like(v, float("nan"))]
    return vals


@case("mutation_sweep", "ok")
def _():
    bad = []
    for fn, base in _base_calls():  # inputs are shared between calls: only in-place outputs change
        for name in base:
            for hv in _hostile_values(base[name]):
                args = dict(base)
                args[name] = hv
                try:
                    fn(**args)
                except ERR as e:
                    # a shape mismatch between two arguments may name the other one
                    other = "shape" in str(e) and any(n in str(e) for n in base)
                    if name not in str(e) and not other:
                        bad.append(f"{fn.__name__}({name}={_short(hv)}): {type(e).__name__}: {e}")
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{fn.__name__}({name}={_short(hv)}): {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad[:60]) + f"\n({len(bad)} in all)"


def _raw_base_calls():
    ops = _ops()
    a, a_s, b, b_s = _gemm_args()
    ga, ga_s, gb, gb_s = _gemm_args(M=9, E=3)
    ma, ma_s, mb, mb_s = _gemm_args(M=4, E=2, masked=True)
    xq, sq = _lk().quantize_fp8(_rand(4, 200))
    p = _lk().plan(_plan_ids(), 4)
    kv_c, k_pe = _append_args()
    q, cache, bt, sl = _decode_args()
    offs, mm = torch.tensor([2, 2, 9], dtype=I32), torch.tensor([3, 4], dtype=I32)
    koffs = torch.tensor([100, 200], dtype=I32)  # k-grouped (wgrad): a [4, 200], b [136, 200] tokens
    ka, ka_s = _lk().quantize_fp8_transposed(_rand(200, 4), koffs)
    kb, kb_s = _lk().quantize_fp8_transposed(_rand(200, 136), koffs)
    return [
        (ops.quantize_fp8, [_rand(4, 200), 1, False]),
        (ops.dequantize_fp8, [xq, sq, 1]),
        (ops.fp8_gemm, [a, a_s, b, b_s, torch.float32]),
        (ops.fp8_grouped_gemm, [ga, ga_s, gb, gb_s, offs, torch.float32]),
        (ops.fp8_grouped_gemm_out, [ga, ga_s, gb, gb_s, offs, torch.empty(9, 136)]),
        (ops.fp8_grouped_gemm_masked, [ma, ma_s, mb, mb_s, mm, torch.float32]),
        (ops.fp8_grouped_gemm_masked_out, [ma, ma_s, mb, mb_s, mm, torch.empty(2, 4, 136)]),
        (ops.fp8_k_grouped_gemm, [ka, ka_s, kb, kb_s, koffs, torch.float32]),
        (ops.fp8_k_grouped_gemm_out, [ka, ka_s, kb, kb_s, koffs, torch.zeros(2, 4, 136), True]),
        (ops.route, [_rand(5, 16), 4, True, torch.zeros(16), 4, 2, True, 2.5]),
        (ops.plan, [_plan_ids(), 4, 2]),
        (ops.permute, [_rand(4, 130), p.row_token]),
        (ops.permute_fp8, [_rand(4, 130), p.row_token, False]),
        (ops.unpermute, [_rand(p.row_token.shape[0], 130), p.token_row, torch.rand(4, 2)]),
        (ops.update_bias, [torch.zeros(4), p.counts, 0.01]),
        (ops.mla_append, [_cache(), kv_c, k_pe, torch.tensor([0, 5, 9]), torch.ones(512), 1e-6, torch.ones(3, 32),
                          torch.zeros(3, 32), None]),
        (ops.mla_decode, [q, cache, bt, sl, 0.05, True, 2]),
        (ops.mla_schedule, [sl, 4]),
    ]


@case("raw_mutation_sweep", "ok")
def _():
    """Raw ops: any argument replaced by a hostile value must never crash; errors are Python
    exceptions (the dispatcher's own schema errors are RuntimeError)."""
    for fn, base in _raw_base_calls():
        for j in range(len(base)):
            for hv in _hostile_values(base[j]):
                args = list(base)
                args[j] = hv
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001  (memory safety is what is tested here)
                    pass


def _short(v):
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}@{v.device.type}"
    return repr(v)[:20]


# ==================================================================================== the runner
def _run_child(names):
    """Run the named cases; print one JSON line per case (flushed before the next starts)."""
    import faulthandler
    import traceback

    torch.set_num_threads(2)
    faulthandler.enable()  # a crash prints the Python stack of the case to stderr
    for name in names:
        fn, expect, arg = CASES[name]
        print(json.dumps({"start": name}), flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        res = {"name": name}
        try:
            fn()
            res["outcome"] = "returned"
        except AssertionError as e:
            res["outcome"] = "assert"
            res["msg"] = f"{e}\n{traceback.format_exc()[-1500:]}"
        except BaseException as e:  # noqa: BLE001  (reported to the parent)
            res["outcome"] = "raised"
            res["type"] = type(e).__name__
            res["is_clean"] = isinstance(e, ERR)
            res["msg"] = str(e)[:800]
            res["tb"] = traceback.format_exc()[-1200:]
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps(res), flush=True)


_RESULTS: dict = {}


def _results():
    if _RESULTS:
        return _RESULTS
    pending = list(CASES)
    # The child imports the same leankernels this process did (installed or PYTHONPATH=python).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(_lk().__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="2", LEANKERNELS_TEST_PKG_PARENT=pkg_parent)
    while pending:
        proc = subprocess.run([sys.executable, __file__, *pending], capture_output=True, text=True, env=env,
                              timeout=CASE_TIMEOUT_S * 4 + 60 * 3)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            if "start" in d:
                started = d["start"]
            else:
                _RESULTS[d["name"]] = d
                started = None
        if started is None and proc.returncode == 0:
            break
        if started is None:  # died outside a case (import error, ...)
            for n in pending:
                _RESULTS.setdefault(n, {"name": n, "outcome": "died", "msg": proc.stderr[-2000:]})
            break
        _RESULTS[started] = {"name": started, "outcome": "crash", "rc": proc.returncode,
                             "msg": f"child exited with {proc.returncode} (signal/abort/hang)\n{proc.stderr[-2500:]}"}
        pending = pending[pending.index(started) + 1:]
    return _RESULTS


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(name):
    res = _results()[name]
    _, expect, arg = CASES[name]
    out = res["outcome"]
    assert out not in ("crash", "died"), res["msg"]
    if expect == "ok":
        assert out == "returned", res.get("tb") or res.get("msg")
    elif expect == "err":
        assert out == "raised", f"expected a TypeError/ValueError naming {arg!r}; the call {out} ({res.get('msg')})"
        assert res["is_clean"], f"{res['type']} is not TypeError/ValueError: {res['msg']}\n{res['tb']}"
        assert arg in res["msg"], f"message does not name {arg!r}: {res['type']}: {res['msg']}"
    else:  # nocrash
        assert out != "assert", res["msg"]


if __name__ == "__main__":
    sys.path.insert(0, os.environ["LEANKERNELS_TEST_PKG_PARENT"])
    _run_child(sys.argv[1:])
