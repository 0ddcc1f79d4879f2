"""The eager fast path: a public op called eagerly runs its implementation directly (no
torch.library dispatch), while anything that needs the op boundary (a dispatch or function mode,
torch.compile, autograd, FakeTensor/meta inputs, the profiler, ...) still goes through
``torch.ops.leankernels.*``; both paths give bitwise the same results.

The op boundary is observed two ways: a TorchDispatchMode that records every ``func`` it sees,
and counters wrapped around ``_ops.<op>`` (the torch.library entry the wrappers call) and
``_ops.<op>_impl`` (the implementation both paths end in), or for the decode-size ops the helper
that every ``_impl`` call runs in (``_RUNS_IN``).
"""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import leankernels as lk
from leankernels import _ops
from conftest import randn

FP8 = torch.float8_e4m3fn


class Recorder(TorchDispatchMode):
    """Passes every op through, remembering which leankernels ops it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "leankernels":
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


class FunctionRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------ the op table
def _moe():
    logits = randn(3, 64, seed=1)
    bias = randn(64, seed=2, scale=0.05)
    w, ids = lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
    p = lk.plan(ids, 64, align=2)
    x = randn(3, 300, seed=3, dtype=torch.bfloat16)
    y = randn(p.row_token.shape[0], 300, seed=4, dtype=torch.bfloat16)
    return logits, bias, w, ids, p, x, y


def _gemm():
    a, sa = lk.quantize_fp8(randn(10, 200, seed=5))
    b, sb = lk.quantize_fp8(randn(3, 136, 200, seed=6, scale=0.05), (128, 128))
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    mm = torch.tensor([2, 0, 1], dtype=torch.int32)
    a3, sa3 = lk.quantize_fp8(randn(3, 2, 200, seed=7))
    return a, sa, b, sb, offs, a3, sa3, mm


def _mla():
    cache = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    kv_c, k_pe = randn(3, 512, seed=8), randn(3, 64, seed=9)
    w = randn(512, seed=10).abs() + 0.5
    ang = randn(3, 32, seed=11)
    slots = torch.tensor([0, 17, 40])
    q = randn(2, 1, 8, 576, seed=12, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([18, 9], dtype=torch.int32)
    return cache, kv_c, k_pe, w, ang.cos(), ang.sin(), slots, q, table, seqlens


def _cases():
    """(name of the _ops entry, call of the public API returning a tuple of tensors)."""
    logits, bias, w, ids, p, x, y = _moe()
    a, sa, b, sb, offs, a3, sa3, mm = _gemm()
    cache, kv_c, k_pe, nw, cos, sin, slots, q, table, seqlens = _mla()

    def append():
        c = cache.clone()
        lk.mla_append(c, kv_c, k_pe, slots, norm_weight=nw, cos=cos, sin=sin)
        return (c,)

    def grouped_out():
        out = torch.full((10, 136), float("nan"))
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)
        return (out,)

    def masked_out():
        out = torch.full((3, 2, 136), float("nan"))
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, mm, out=out)
        return (out,)

    koffs = torch.tensor([100, 200], dtype=torch.int32)  # k-grouped (wgrad): 200 tokens, 2 experts
    ka, ksa = lk.quantize_fp8_transposed(torch.randn(200, 8, generator=torch.Generator().manual_seed(5)), koffs)
    kb, ksb = lk.quantize_fp8_transposed(torch.randn(200, 24, generator=torch.Generator().manual_seed(6)), koffs)

    def k_grouped_out():
        out = torch.ones(2, 8, 24)
        lk.fp8_k_grouped_gemm(ka, ksa, kb, ksb, koffs, out=out, accumulate=True)
        return (out,)

    return [
        ("route", lambda: lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)),
        ("plan", lambda: tuple(lk.plan(ids, 64, align=2))),
        ("permute", lambda: (lk.permute(x, p),)),
        ("permute_fp8", lambda: lk.permute(x, p, quantize=True)),
        ("unpermute", lambda: (lk.unpermute(y, p, w),)),
        ("update_bias", lambda: (lk.update_bias(bias, p.counts, 1e-3),)),
        ("quantize_fp8", lambda: lk.quantize_fp8(x)),
        ("dequantize_fp8", lambda: (lk.dequantize_fp8(a, sa),)),
        ("fp8_gemm", lambda: (lk.fp8_gemm(a, sa, b[0], sb[0]),)),
        ("fp8_grouped_gemm", lambda: (lk.fp8_grouped_gemm(a, sa, b, sb, offs),)),
        ("fp8_grouped_gemm_out", grouped_out),
        ("fp8_grouped_gemm_masked", lambda: (lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, mm),)),
        ("fp8_grouped_gemm_masked_out", masked_out),
        ("fp8_k_grouped_gemm", lambda: (lk.fp8_k_grouped_gemm(ka, ksa, kb, ksb, koffs),)),
        ("fp8_k_grouped_gemm_out", k_grouped_out),
        ("mla_append", append),
        ("mla_decode", lambda: lk.mla_decode(q, cache, table, seqlens, 0.1)),
    ]


CASES = _cases()


# The helper every run of these ops' _impl goes through, which the eager fast paths call
# directly with the shapes they already read (CPU, or [T, K] rows for quantize_fp8).
_RUNS_IN = {"route": "route_rows", "permute_fp8": "permute_fp8_rows", "unpermute": "unpermute_rows",
            "quantize_fp8": "quantize_rows"}


@contextlib.contextmanager
def counting(monkeypatch, name):
    """Count calls of _ops.<name> (the torch.library entry) and runs of its implementation:
    calls of _ops.<name>_impl, or of the helper in _RUNS_IN that every such call goes through."""
    calls = {"op": 0, "impl": 0}
    impl_name = _RUNS_IN.get(name, name + "_impl")
    op, impl = getattr(_ops, name), getattr(_ops, impl_name)

    def op_counted(*args, **kwargs):
        calls["op"] += 1
        return op(*args, **kwargs)

    def impl_counted(*args, **kwargs):
        calls["impl"] += 1
        return impl(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_ops, name, op_counted)
        m.setattr(_ops, impl_name, impl_counted)
        yield calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes (fp8 / bf16 / NaN-safe comparison)."""
    return t.detach().contiguous().view(torch.uint8)


def _assert_bitwise(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(_bits(g), _bits(w))


# ------------------------------------------------------------------------------ the two paths
@pytest.mark.parametrize("name,call", CASES, ids=[c[0] for c in CASES])
def test_eager_skips_the_dispatch_and_modes_see_the_op(name, call, monkeypatch):
    with counting(monkeypatch, name) as calls:
        eager = call()
        assert calls == {"op": 0, "impl": 1}, f"eager {name} must call the implementation directly: {calls}"
        with Recorder() as mode:
            seen = call()
        assert calls["op"] == 1 and calls["impl"] == 2, calls  # the op, whose body runs the impl
    assert getattr(torch.ops.leankernels, name).default in mode.seen
    _assert_bitwise(eager, seen)


def test_cpu_outputs_stay_on_the_cpu_whatever_the_default_device_at_import():
    """The fast paths' CPU outputs come from templates made at import: a default device set then
    (here meta) must not move them, or the C++ would write through a non-CPU pointer."""
    code = "\n".join([
        "import torch",
        "torch.set_default_device('meta')",
        "import leankernels as lk",
        "from leankernels import reference as ref",
        "torch.set_default_device(None)",
        "x, y = torch.randn(2, 256).bfloat16(), torch.randn(8, 256).bfloat16()",
        "q, s = lk.quantize_fp8(x)",
        "w, ids = lk.route(torch.randn(2, 64), 4)",
        "p = lk.plan(ids, 64)",
        "q2, s2 = lk.permute(x, p, quantize=True)",
        "o = lk.unpermute(y, p, w)",
        "assert all(t.is_cpu for t in (q, s, w, ids, q2, s2, o, *p))",
        "qr, sr = ref.quantize_fp8(x)",
        "assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)",
        "print('ok')",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-3000:])


@pytest.mark.parametrize("name,call", CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_torch_function_mode_sees_the_op(name, call, monkeypatch):
    with counting(monkeypatch, name) as calls:
        eager = call()
        with FunctionRecorder() as mode:
            seen = call()
        assert calls["op"] == 1, calls
    assert any(str(f).startswith(f"leankernels.{name}.") for f in mode.seen)
    _assert_bitwise(eager, seen)


def test_torch_compile_fullgraph_sees_the_ops():
    """Under torch.compile the wrappers trace into the graph as the torch.library ops."""
    logits, bias, w, ids, p, x, y = _moe()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def moe(logits, bias, x):
        w, ids = lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
        p = lk.plan(ids, 64, align=2)
        q, s = lk.permute(x, p, quantize=True)
        yq = lk.dequantize_fp8(q, s).to(torch.bfloat16)
        return lk.unpermute(yq, p, w), lk.quantize_fp8(x)

    eager = moe(logits, bias, x)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend=backend)(logits, bias, x)
    ops = torch.ops.leankernels
    for op in (ops.route, ops.plan, ops.permute_fp8, ops.dequantize_fp8, ops.unpermute, ops.quantize_fp8):
        assert op.default in targets, (op, targets)
    _assert_bitwise((eager[0], *eager[1]), (compiled[0], *compiled[1]))


def test_autograd_goes_through_the_op(monkeypatch):
    """An input that requires grad (grad mode on) takes the op path: autograd sees the op and
    runs its registered backward (test_linear.py checks the gradient). Under no_grad the fast
    path is back."""
    logits = randn(2, 16, seed=13).requires_grad_()
    with counting(monkeypatch, "route") as calls:
        w, ids = lk.route(logits, 2)
        assert calls["op"] == 1 and w.grad_fn is not None
        w.sum().backward()
        assert logits.grad is not None and logits.grad.shape == logits.shape
        with torch.no_grad():
            w2, ids2 = lk.route(logits, 2)
        assert calls["op"] == 1 and calls["impl"] == 2 and w2.grad_fn is None
    _assert_bitwise((w, ids), (w2, ids2))


# ------------------------------------------------------------------------------ the one-expression checks
# route, plan, permute, unpermute and quantize_fp8 check a plain eager CPU call in one expression
# before the argument-by-argument checks (which name the bad argument): a T=1 decode call then
# costs ~1 us less. Anything that expression does not accept takes the full checks.
def _decode_calls(dtype=torch.bfloat16, H=300, align=1, ue8m0=False):
    logits, bias, _, _, _, _, _ = _moe()
    w, ids = lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
    p = lk.plan(ids, 64, align=align)
    x = randn(3, H, seed=3, dtype=dtype)
    y = randn(p.row_token.shape[0], H, seed=4, dtype=dtype)
    fmt = "ue8m0" if ue8m0 else "fp32"
    return {
        "route": lambda: lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5),
        "route_softmax": lambda: lk.route(logits, 6),
        "plan": lambda: tuple(lk.plan(ids, 64, align=align)),
        "permute": lambda: (lk.permute(x, p),),
        "permute_fp8": lambda: lk.permute(x, p, quantize=True, scale_fmt=fmt),
        "unpermute": lambda: (lk.unpermute(y, p, w),),
        "quantize_fp8": lambda: lk.quantize_fp8(x, scale_fmt=fmt),
        "silu_mul_quantize_fp8": lambda: lk.silu_mul_quantize_fp8(y[:, :2 * (H // 2)], scale_fmt=fmt),
        "silu_mul_quantize_fp8_contiguous": lambda: lk.silu_mul_quantize_fp8(x[:, :2 * (H // 2)].contiguous(),
                                                                            scale_fmt=fmt),
    }


@pytest.mark.parametrize("dtype,H,align,ue8m0", [(torch.bfloat16, 300, 1, False), (torch.float32, 256, 4, True),
                                                 (torch.float16, 7168, 1, False)])
def test_decode_calls_take_the_one_expression_checks(dtype, H, align, ue8m0, monkeypatch):
    from leankernels import _checks
    calls = {"tensor": 0}
    tensor = _checks.tensor

    def counted(*args, **kwargs):
        calls["tensor"] += 1
        return tensor(*args, **kwargs)

    fast = {n: c() for n, c in _decode_calls(dtype, H, align, ue8m0).items()}
    for name, call in _decode_calls(dtype, H, align, ue8m0).items():
        with monkeypatch.context() as m:
            m.setattr(_checks, "tensor", counted)
            got = call()
        assert calls["tensor"] == 0, f"{name} took the argument-by-argument checks"
        assert all(type(t) is torch.Tensor and not t.requires_grad for t in got)
        with Recorder():  # the op path: the same bits
            _assert_bitwise(got, call())
        _assert_bitwise(got, fast[name])
        assert all(g.data_ptr() != f.data_ptr() for g, f in zip(got, fast[name]))  # fresh outputs


def test_just_outside_the_one_expression_checks():
    """Inputs the one-expression checks leave to the full checks: the same result as the plain
    call (converted, copied or widened) or the same named error."""
    logits, bias, w, ids, p, x, y = _moe()
    base = lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 2.5)
    _assert_bitwise(lk.route(logits, 4, "sigmoid", bias.half(), 4, 2, True, 2.5),  # widened
                    lk.route(logits, 4, "sigmoid", bias.half().float(), 4, 2, True, 2.5))
    _assert_bitwise(lk.route(logits, 4, "sigmoid", bias, 4, 2, True, 5 / 2), base)
    _assert_bitwise(lk.route(logits, 4, "sigmoid", torch.stack([bias, bias], 1)[:, 0], 4, 2, True, 2.5), base)  # strided
    with pytest.raises(ValueError, match="scale"):
        lk.route(logits, 4, "sigmoid", bias, 4, 2, True, float("inf"))
    with pytest.raises(ValueError, match="2 experts per group"):
        lk.route(logits, 4, "sigmoid", bias, 64, 8, True, 2.5)
    with pytest.raises(ValueError, match="bias"):
        lk.route(logits, 4, "sigmoid", bias[:63], 4, 2, True, 2.5)
    _assert_bitwise(tuple(lk.plan(ids.long(), 64)), tuple(lk.plan(ids, 64)))
    _assert_bitwise(tuple(lk.plan(ids.t().contiguous().t(), 64)), tuple(lk.plan(ids, 64)))
    with pytest.raises(ValueError, match="num_experts"):
        lk.plan(ids, 2**31)
    _assert_bitwise(lk.permute(x, tuple(p), quantize=True), lk.permute(x, p, quantize=True))  # a plain tuple
    with pytest.raises(TypeError, match="quantize"):
        lk.permute(x, p, quantize=1)
    with pytest.raises(ValueError, match="tokens"):
        lk.permute(x[:2], p)
    _assert_bitwise((lk.unpermute(y, p, w.half()),), (lk.unpermute(y, p, w.half().float()),))
    with pytest.raises(ValueError, match="weights"):
        lk.unpermute(y, p, w[:, :3])
    with pytest.raises(ValueError, match="rows"):
        lk.unpermute(y[1:], p, w)
    _assert_bitwise(lk.quantize_fp8(x, [1, 128]), lk.quantize_fp8(x))
    _assert_bitwise(lk.quantize_fp8(x, (1, 128)), lk.quantize_fp8(x))
    _assert_bitwise([t[0] for t in lk.quantize_fp8(x[None])], lk.quantize_fp8(x))  # 3-D
    _assert_bitwise(lk.quantize_fp8(x.t().contiguous().t()), lk.quantize_fp8(x))  # column-major
    with pytest.raises(ValueError, match="scale_fmt"):
        lk.quantize_fp8(x, scale_fmt="e8m0")
    h = randn(3, 256, seed=14, dtype=torch.bfloat16)
    _assert_bitwise(lk.silu_mul_quantize_fp8(torch.cat([h, h], 1)[:, :256]), lk.silu_mul_quantize_fp8(h))  # strided
    _assert_bitwise([t[0] for t in lk.silu_mul_quantize_fp8(h[None])], lk.silu_mul_quantize_fp8(h))  # 3-D
    with pytest.raises(ValueError, match="h must be"):
        lk.silu_mul_quantize_fp8(h[:, :255])
    with pytest.raises(ValueError, match="scale_fmt"):
        lk.silu_mul_quantize_fp8(h, scale_fmt="e8m0")


# ------------------------------------------------------------------------------ when direct() is False
def test_direct_conditions():
    x = randn(2, 3)
    assert _ops.direct(x) and _ops.direct(x, None) and _ops.direct(torch.nn.Parameter(x, requires_grad=False))
    assert not _ops.direct(x.to("meta"))
    assert not _ops.direct(x, x.to_sparse())
    req = x.clone().requires_grad_()
    assert not _ops.direct(x, req)
    with torch.no_grad():
        assert _ops.direct(x, req)
    with torch.inference_mode():
        assert _ops.direct(x)
    with Recorder():
        assert not _ops.direct(x)
    with FunctionRecorder():
        assert not _ops.direct(x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(x)
    assert not _ops.direct(fake)  # a FakeTensor outside its mode: a subclass
    with torch.autograd.profiler.profile():
        assert not _ops.direct(x)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        assert not _ops.direct(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(_ops.direct(t)) or t)(x)
    assert seen == [False]
    torch.jit.trace(lambda t: (seen.append(_ops.direct(t)), t * 2)[1], (x,), check_trace=False)
    assert seen[-1] is False
    assert _ops.direct(x)  # and back to the fast path after all of them


def test_meta_and_fake_inputs_take_the_op_path():
    """Meta and fake tensors get shapes from the fake kernels through the op, as before."""
    logits = randn(3, 64, seed=1)
    w, ids = lk.route(logits.to("meta"), 4)
    assert w.device.type == "meta" and w.shape == (3, 4) and ids.dtype == torch.int32
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        q, s = lk.quantize_fp8(mode.from_tensor(randn(4, 300)))
    assert q.shape == (4, 300) and s.shape == (4, 3) and q.dtype == FP8


# ------------------------------------------------------------------------------ leankernels.nn
# An inference forward on the CPU checks its operands once and calls the implementations
# (nn/layers.py, _fp8_weight_ok): no public function and no torch.library op in between. The
# first MoE forward takes the public functions (they check route's arguments); later ones not.
from leankernels.nn import DeepSeekConfig, Fp8Linear, MoE, plain  # noqa: E402
from leankernels.nn import layers as _layers  # noqa: E402

NN_CFG = DeepSeekConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=128, n_routed_experts=8,
                        moe_intermediate_size=128, num_experts_per_tok=2, n_group=4, topk_group=2,
                        max_position_embeddings=256)
_PUBLIC = ("fp8_gemm", "fp8_grouped_gemm", "quantize_fp8", "silu_mul_quantize_fp8", "permute", "plan", "route",
           "unpermute")


@contextlib.contextmanager
def counting_public(monkeypatch):
    """Count the calls nn/layers.py makes to the public functions."""
    calls = {n: 0 for n in _PUBLIC}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        for n in _PUBLIC:
            m.setattr(_layers, n, counted(n, getattr(_layers, n)))
        yield calls


def _nn_moe(seed=40, dtype=torch.bfloat16):
    return MoE.from_float(plain.make_block(NN_CFG, "cpu", torch.float32, seed).mlp, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_inference_forward_calls_the_implementations(dtype, monkeypatch):
    m = _nn_moe(dtype=dtype)
    x = randn(2, 9, NN_CFG.hidden_size, seed=41, dtype=torch.bfloat16)
    with torch.no_grad(), counting_public(monkeypatch) as calls:
        first = m(x)
        # the routed experts' first forward: public functions; the shared experts: never
        assert calls["route"] == 1 and calls["permute"] == 1 and calls["fp8_grouped_gemm"] == 2
        assert calls["fp8_gemm"] == 0 and calls["silu_mul_quantize_fp8"] == 1
        counts = dict(calls)
        with counting(monkeypatch, "route") as ops_calls:
            second = m(x)
        assert calls == counts, "the second forward called a public function"
        assert ops_calls == {"op": 0, "impl": 1}
        with Recorder() as rec:
            third = m(x)  # a dispatch mode still sees every op
    assert {f.__name__.split(".")[0] for f in rec.seen} >= {"route", "plan", "permute_fp8", "fp8_grouped_gemm",
                                                             "silu_mul_quantize_fp8", "unpermute", "quantize_fp8",
                                                             "fp8_gemm"}
    _assert_bitwise((second, third), (first, first))


def test_moe_inference_forward_checks_what_it_skips(monkeypatch):
    """Operands the implementations would misread send the forward back to the public
    functions, which raise or convert as before."""
    m = _nn_moe(seed=42)
    x = randn(7, NN_CFG.hidden_size, seed=43)
    with torch.no_grad():
        m(x)
        # a bias of another dtype: the public route widens it
        bias = m.e_score_correction_bias
        m.e_score_correction_bias = bias.bfloat16()
        with counting_public(monkeypatch) as calls:
            got = m(x)
        assert calls["route"] == 1
        m.e_score_correction_bias = bias.bfloat16().float()
        with counting_public(monkeypatch) as calls:
            _assert_bitwise((m(x),), (got,))
        assert calls["route"] == 0
        m.e_score_correction_bias = bias
        # a subclass's own route and experts are called
        seen = []

        class Traced(MoE):
            def route(self, x):
                seen.append("route")
                return super().route(x)
        t = Traced(NN_CFG)
        t.load_state_dict(m.state_dict())
        t(x)
        t(x)
        assert seen == ["route", "route"]
        # Module.to(dtype) converts the FP8 buffers too: a clear error, not a misread
        m.to(torch.bfloat16)
        with pytest.raises(TypeError, match="float8_e4m3fn"):
            m(x)


def test_moe_inference_forward_runs_the_shared_experts_beside_the_routed(monkeypatch):
    """The eager MoE forward at decode sizes is one C++ call (cpu/moe.h) that runs the shared
    experts' steps itself, interleaved with the routed ones, bitwise as routed experts + the
    shared module's own forward (with one token it reads the token's quantized row from permute
    instead of quantizing x again); no Python-level quantize or GEMM runs. A hook on the shared
    experts, or a SwiGLU subclass with its own forward, gets the module called."""
    m = _nn_moe(seed=45)
    H = NN_CFG.hidden_size
    real = _ops._C.moe_decode
    with torch.no_grad():
        for T in (1, 5):
            x = randn(T, H, seed=46 + T, dtype=torch.bfloat16)
            m(x)  # the first forward checks route's arguments
            fused = []
            with counting(monkeypatch, "quantize_fp8") as q, counting(monkeypatch, "fp8_gemm") as g, \
                    monkeypatch.context() as mp:
                mp.setattr(_ops._C, "moe_decode", lambda *a: fused.append(a[2]) or real(*a))
                got = m(x)
            assert q == {"op": 0, "impl": 0} and g == {"op": 0, "impl": 0}, (T, q, g)
            assert fused == [T]
            want = m._add_shared(m.experts(x, *m.route(x)), m.shared_experts(x))
            _assert_bitwise((got,), (want,))
        x = randn(3, H, seed=50, dtype=torch.bfloat16)
        want = m(x)
        seen = []
        handle = m.shared_experts.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        _assert_bitwise((m(x),), (want,))
        handle.remove()
        assert seen == [(3, H)]

        class Own(type(m.shared_experts)):
            def forward(self, x):
                seen.append("own")
                return super().forward(x)
        m.shared_experts.__class__ = Own
        _assert_bitwise((m(x),), (want,))
        assert seen[-1] == "own"


def test_fp8_linear_inference_forward_calls_the_implementations(monkeypatch):
    lin = torch.nn.Linear(300, 136, bias=False)
    f = Fp8Linear.from_float(lin, torch.float32)
    x = randn(3, 5, 300, seed=44)
    with torch.no_grad(), counting_public(monkeypatch) as calls:
        got = f(x)
        assert all(v == 0 for v in calls.values())
    a, s = lk.quantize_fp8(x.reshape(-1, 300))
    _assert_bitwise((got,), (lk.fp8_gemm(a, s, f.weight, f.weight_scale_inv, torch.float32).view(3, 5, 136),))
    fb = Fp8Linear.from_float(torch.nn.Linear(300, 136, bias=True), torch.float32)
    with torch.no_grad(), counting_public(monkeypatch) as calls:
        fb(x)  # a bias: the public functions
        assert calls["fp8_gemm"] == 1
    f.weight_scale_inv = f.weight_scale_inv[:1]  # a wrong scale shape: the public check names it
    with torch.no_grad(), pytest.raises(ValueError, match="b_scale"):
        f(x)
