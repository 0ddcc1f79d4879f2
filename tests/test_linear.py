"""Autograd of the FP8 training ops (fp8_linear, fp8_grouped_linear) and of the routing ops.

Each gradient is checked twice on fresh random data: against the written-out FP8 recipe in
reference.py (tight: same quantization, only the summation order differs) and against plain
fp32 PyTorch autograd of the unquantized layer (DeepGEMM's diff metric; FP8's rounding bounds
it, stated per tensor below).
"""
from __future__ import annotations

import pytest
import torch
import leankernels as lk
from leankernels import _ops, reference as R
from conftest import DEVICES, opcheck  # opcheck: float8 inputs, see conftest

RECIPE = 1e-9   # kernel vs the recipe reference (fp32 summation order)
FP32 = 2e-3     # FP8 recipe vs unquantized fp32 autograd (typical 7e-4 per GEMM)


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (37, 130, 200), (300, 256, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_grads(M, N, K, dtype, device):
    g = torch.Generator().manual_seed(M * 7 + N)
    x = _leaf(torch.randn(M, K, generator=g).to(device, dtype))
    w = _leaf(torch.randn(N, K, generator=g).to(device) / K ** 0.5)
    b = _leaf(torch.randn(N, generator=g).to(device))
    y = lk.fp8_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    y.backward(dy)
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    # the recipe, written out
    assert diff(y, R.fp8_linear(x.detach(), w.detach(), b.detach())) < (RECIPE if dtype == torch.float32 else 1e-5)
    dx, dw = R.fp8_linear_grads(x.detach(), w.detach(), dy)
    assert diff(x.grad, dx) < (RECIPE if dtype == torch.float32 else 1e-5)
    assert diff(w.grad, dw) < RECIPE
    torch.testing.assert_close(b.grad, dy.float().sum(0), rtol=1e-5, atol=1e-4)
    # plain fp32 autograd of the unquantized layer
    x2, w2, b2 = _leaf(x.detach().float()), _leaf(w.detach()), _leaf(b.detach())
    (x2 @ w2.T + b2).backward(dy.float())
    assert diff(y, x2 @ w2.T + b2) < FP32
    assert diff(x.grad, x2.grad) < FP32
    assert diff(w.grad, w2.grad) < FP32


def test_fp8_linear_batched_and_no_bias():
    g = torch.Generator().manual_seed(3)
    x = _leaf(torch.randn(2, 3, 5, 256, generator=g))
    w = _leaf(torch.randn(96, 256, generator=g) / 16)
    y = lk.fp8_linear(x, w)
    assert y.shape == (2, 3, 5, 96)
    y.backward(torch.ones_like(y))  # an expanded (stride-0) gradient
    dx, dw = R.fp8_linear_grads(x.detach().reshape(-1, 256), w.detach(), torch.ones(30, 96))
    assert diff(x.grad.reshape(-1, 256), dx) < RECIPE
    assert diff(w.grad, dw) < RECIPE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts", [[0, 1, 129, 0, 7], [256, 0, 0], [1], [3, 128, 127, 130]])
def test_fp8_grouped_linear_grads(counts, device):
    """Experts with 0, 1, odd and >128 rows; rows past offs[-1] get zero output and gradient."""
    g = torch.Generator().manual_seed(sum(counts))
    E, N, K = len(counts), 192, 320
    M = sum(counts) + 5
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(device, torch.int32)
    x = _leaf(torch.randn(M, K, generator=g).to(device))
    w = _leaf(torch.randn(E, N, K, generator=g).to(device) / K ** 0.5)
    y = lk.fp8_grouped_linear(x, w, offs)
    end = int(offs[-1])
    assert torch.all(y[end:] == 0)
    dy = torch.randn(M, N, generator=g).to(device)
    y.backward(dy)
    assert diff(y[:end], R.fp8_grouped_linear(x.detach(), w.detach(), offs)[:end]) < RECIPE
    dx, dw = R.fp8_linear_grads(x.detach(), w.detach(), dy, offs)
    assert diff(x.grad, dx) < RECIPE
    assert torch.all(x.grad[end:] == 0)
    assert diff(w.grad, dw) < RECIPE
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(w.grad[e] == 0), "an expert with no rows gets a zero gradient"
    # plain fp32 autograd
    x2, w2 = _leaf(x.detach()), _leaf(w.detach())
    start, outs = 0, []
    for e in range(E):
        outs.append(x2[start:int(offs[e])] @ w2[e].T)
        start = int(offs[e])
    y2 = torch.cat(outs + [x2.new_zeros(M - end, N)])
    y2.backward(dy)
    assert diff(x.grad, x2.grad) < FP32
    assert diff(w.grad, w2.grad) < FP32


def test_grads_propagate_nan():
    x = _leaf(torch.randn(4, 128))
    w = _leaf(torch.randn(64, 128))
    dy = torch.randn(4, 64)
    dy[1, 3] = float("nan")
    lk.fp8_linear(x, w).backward(dy)
    assert torch.isnan(x.grad[1]).all() and not torch.isnan(x.grad[[0, 2, 3]]).any()
    assert torch.isnan(w.grad[3]).all() and not torch.isnan(w.grad[:3]).any()


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (130, 260), (3, 64, 48), (2, 1, 100), (4, 100, 1), (2, 300, 520)])
def test_dgrad_weight_transpose(shape, monkeypatch):
    """W^T for dgrad: the CPU byte transpose (eager) equals torch's transpose, bit for bit, over
    whole and ragged 16x16 tiles; the scales are transposed too. The torch path (what a
    traced backward runs) gives the same."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    s = torch.rand(*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128), generator=g)
    want = w.view(torch.uint8).transpose(-1, -2).contiguous()
    wt, st = _ops._transpose_blocks(w, s)
    assert wt.dtype == torch.float8_e4m3fn and wt.is_contiguous()
    assert torch.equal(wt.view(torch.uint8), want)
    assert torch.equal(st, s.transpose(-1, -2))
    monkeypatch.setattr(_ops, "direct", lambda *t: False)
    assert torch.equal(_ops._transpose_blocks(w, s)[0].view(torch.uint8), want)


def test_requantize_uses_the_cached_copy():
    """`quantized=` is used as given (a module's cached copy): a stale copy changes y."""
    x = torch.randn(8, 128)
    w = torch.randn(64, 128)
    q = lk.quantize_fp8(w, (128, 128))
    torch.testing.assert_close(lk.fp8_linear(x, w, quantized=q), lk.fp8_linear(x, w))
    stale = lk.quantize_fp8(w * 2, (128, 128))
    assert not torch.allclose(lk.fp8_linear(x, w, quantized=stale), lk.fp8_linear(x, w))


def test_bad_inputs():
    x, w = torch.randn(4, 128), torch.randn(64, 128)
    with pytest.raises(ValueError, match="weight"):
        lk.fp8_linear(x, torch.randn(64, 100))
    with pytest.raises(TypeError, match="x"):
        lk.fp8_linear(x.int(), w)
    with pytest.raises(ValueError, match="bias"):
        lk.fp8_linear(x, w, torch.randn(65))
    with pytest.raises(TypeError, match="quantized"):
        lk.fp8_linear(x, w, quantized=w)
    with pytest.raises(ValueError, match=r"quantized\[1\]"):
        lk.fp8_linear(x, w, quantized=(lk.quantize_fp8(w, (128, 128))[0], torch.ones(2, 2)))
    with pytest.raises(ValueError, match="offs"):
        lk.fp8_grouped_linear(x, torch.randn(3, 64, 128), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="offs"):
        lk.fp8_grouped_linear(x, torch.randn(3, 64, 128), torch.tensor([1, 2, 4]))
    with pytest.raises(ValueError, match="weight"):
        lk.fp8_grouped_linear(x, torch.randn(3, 64, 127), torch.tensor([1, 2, 4], dtype=torch.int32))


def test_opcheck_linear_ops():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 200, generator=g, requires_grad=True)
    w = torch.randn(130, 200, generator=g, requires_grad=True)
    b = torch.randn(130, generator=g, requires_grad=True)
    opcheck(torch.ops.leankernels.fp8_linear.default, (x, w, b, None, None))
    wq, ws = lk.quantize_fp8(w.detach(), (128, 128))
    opcheck(torch.ops.leankernels.fp8_linear.default, (x, w, None, wq, ws))
    wg = torch.randn(3, 64, 200, generator=g, requires_grad=True)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    opcheck(torch.ops.leankernels.fp8_grouped_linear.default, (x, wg, offs, None, None))


# ------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("score,bias,renormalize", [("sigmoid", True, True), ("sigmoid", False, False),
                                                    ("softmax", False, True), ("softmax", False, False)])
def test_route_grad(score, bias, renormalize):
    g = torch.Generator().manual_seed(11)
    T, E, K = 33, 16, 4
    logits = _leaf(torch.randn(T, E, generator=g))
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    w, ids = lk.route(logits, K, score, bias=b, n_group=4, topk_group=2, renormalize=renormalize, scale=2.5)
    gw = torch.randn(T, K, generator=g)
    w.backward(gw)
    # plain autograd through the same choice of experts
    l2 = _leaf(logits.detach())
    s = l2.sigmoid() if score == "sigmoid" else l2.softmax(-1)
    w2 = s.gather(1, ids.long())
    if renormalize:
        w2 = w2 / w2.sum(1, keepdim=True)
    (w2 * 2.5).backward(gw)
    torch.testing.assert_close(logits.grad, l2.grad, rtol=1e-5, atol=1e-6)
    assert ids.grad is None


def _plan(T, E, K, g, dropped=True):
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    if dropped:
        ids[::3, -1] = -1          # expert parallelism: not routed here
    return ids, lk.plan(ids, E)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_unpermute_grads(dtype, device):
    g = torch.Generator().manual_seed(12)
    T, E, K, H = 41, 8, 3, 96
    ids, _ = _plan(T, E, K, g)
    ids = ids.to(device)
    p = lk.plan(ids, E)
    x = _leaf(torch.randn(T, H, generator=g).to(device, dtype))
    wts = _leaf(torch.rand(T, K, generator=g).to(device))
    scale = torch.randn(H, generator=g).to(device, dtype)
    rows = lk.permute(x, p) * scale
    out = lk.unpermute(rows, p, wts)
    gout = torch.randn(T, H, generator=g).to(device, dtype)
    out.backward(gout)
    x2, w2 = _leaf(x.detach().float()), _leaf(wts.detach())
    valid = (ids >= 0)[..., None]
    out2 = torch.where(valid, w2[..., None] * (x2 * scale.float())[:, None, :], 0).sum(1)
    out2.backward(gout.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), x2.grad, **tol)
    torch.testing.assert_close(wts.grad, w2.grad, **tol)
    assert torch.all(wts.grad[::3, -1] == 0), "a dropped (token, k) gets a zero weight gradient"


def _unpermute_grads(y, p, wts, gout, needs=(True, True)):
    y, wts = y.detach().clone().requires_grad_(needs[0]), wts.detach().clone().requires_grad_(needs[1])
    lk.unpermute(y, p, wts).backward(gout)
    return y.grad, wts.grad


@pytest.mark.parametrize("T,E,K,H", [(41, 8, 3, 96), (7, 4, 2, 33), (30, 64, 20, 40), (9, 16, 6, 4100), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_backward_cpu_kernel_matches_torch(T, E, K, H, dtype, monkeypatch, cpu_path):
    """The eager CPU backward of unpermute (one C++ pass) against the torch composite a traced
    backward runs: dy bitwise (w * grad rounded once), dw to fp32 summation order; dropped pairs
    (ids -1) get dw 0, padding rows dy 0; only the gradients asked for; H past one 2048 slice and
    not a multiple of 16, top_k past 16."""
    g = torch.Generator().manual_seed(T * 100 + K)
    ids, _ = _plan(T, E, K, g, dropped=K > 1)
    p = lk.plan(ids, E, align=4)
    y = torch.randn(p.row_token.shape[0], H, generator=g).to(dtype)
    wts = torch.rand(T, K, generator=g)
    gout = torch.randn(T, H, generator=g).to(dtype)
    got = _unpermute_grads(y, p, wts, gout)
    monkeypatch.setattr(_ops, "direct", lambda *t: False)
    want = _unpermute_grads(y, p, wts, gout)
    monkeypatch.undo()
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5 * H ** 0.5)
    assert torch.all(got[1][ids < 0] == 0) and torch.all(got[0][p.row_token < 0] == 0)
    only_dy = _unpermute_grads(y, p, wts, gout, (True, False))
    only_dw = _unpermute_grads(y, p, wts, gout, (False, True))
    assert torch.equal(only_dy[0], got[0]) and only_dy[1] is None
    assert torch.equal(only_dw[1], got[1]) and only_dw[0] is None


def test_unpermute_grad_padding_rows():
    """Padding rows (align > 1) get a zero gradient; gradients are deterministic."""
    g = torch.Generator().manual_seed(13)
    T, E, K, H = 20, 6, 2, 64
    ids, _ = _plan(T, E, K, g, dropped=False)
    p = lk.plan(ids, E, align=8)
    y = _leaf(torch.randn(p.row_token.shape[0], H, generator=g))
    wts = _leaf(torch.rand(T, K, generator=g))
    gout = torch.randn(T, H, generator=g)
    lk.unpermute(y, p, wts).backward(gout)
    assert torch.all(y.grad[p.row_token < 0] == 0)
    first = y.grad.clone()
    y.grad = None
    lk.unpermute(y, p, wts).backward(gout)
    assert torch.equal(first, y.grad)


def test_opcheck_routing_autograd():
    g = torch.Generator().manual_seed(14)
    T, E, K, H = 9, 8, 2, 32
    ids, p = _plan(T, E, K, g)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    opcheck(_ops.permute, (x, p.row_token, p.token_row))
    y = torch.randn(p.row_token.shape[0], H, generator=g, requires_grad=True)
    wts = torch.rand(T, K, generator=g, requires_grad=True)
    opcheck(_ops.unpermute, (y, p.token_row, wts))
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    opcheck(_ops.route, (logits, K, True, torch.zeros(E), 2, 1, True, 2.5))
    opcheck(_ops.route, (logits, K, False, None, 1, 1, False, 1.0))


def test_non_differentiable_ops_say_so():
    """plan and update_bias have no gradient (integer outputs, a between-steps hook)."""
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    p = lk.plan(ids, 4)
    assert not any(t.requires_grad for t in p)
    bias = torch.zeros(4, requires_grad=True)
    with torch.no_grad():
        assert not lk.update_bias(bias, p.counts).requires_grad


def test_forward_only_ops_refuse_grad_inputs_at_forward_time():
    x = torch.randn(4, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="fp8_linear"):
        lk.quantize_fp8(x)
    p = lk.plan(torch.zeros(4, 1, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="quantize=False"):
        lk.permute(x, p, quantize=True)
    with torch.no_grad():
        lk.quantize_fp8(x)
        lk.permute(x, p, quantize=True)
    assert lk.permute(x, p).requires_grad   # the unquantized gather is differentiable


# ------------------------------------------------------------------ SwiGLU of the training layer
def _swiglu_torch(h):
    g, u = h.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(h.dtype)


def _swiglu_operands(R, I, dtype, device, hostile, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(R, 2 * I, generator=g) * 4)
    if hostile:  # every special value as g, and Inf / NaN as u
        special = [float("-inf"), float("inf"), float("nan"), -100.0, -88.0, 95.0, 0.0, -0.0, 1e-30]
        h[0, :min(I, len(special))] = torch.tensor(special[:I])
        h[-1, I:I + min(I, 3)] = torch.tensor([float("inf"), float("nan"), float("-inf")][:I])
    return h.to(dtype).to(device), torch.randn(R, I, generator=g).to(dtype).to(device)


def _close_swiglu(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-30,
                               rtol=1e-4 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,I", [(1, 1), (3, 17), (37, 704), (5, 1000)])
@pytest.mark.parametrize("hostile", [False, True])
def test_silu_mul_matches_torch(device, dtype, R, I, hostile):
    """leankernels::silu_mul and its gradient against torch's F.silu(g) * u (fp32, cast back)
    under autograd: values, NaN positions, Inf; the CPU kernels for fp32/bf16, torch's composite
    elsewhere."""
    h, da = _swiglu_operands(R, I, dtype, device, hostile, seed=R * 1000 + I)
    h1, h2 = _leaf(h), _leaf(h)
    a = _ops.silu_mul(h1)
    want = _swiglu_torch(h2)
    _close_swiglu(a, want, dtype)
    a.backward(da)
    want.backward(da)
    _close_swiglu(h1.grad, h2.grad, dtype)


def test_silu_mul_every_cpu_path(cpu_path):
    for dtype in (torch.float32, torch.bfloat16):
        h, da = _swiglu_operands(9, 300, dtype, "cpu", True, seed=5)
        h2 = _leaf(h)
        want = _swiglu_torch(h2)
        want.backward(da)
        _close_swiglu(_ops.silu_mul(h), want, dtype)
        _close_swiglu(_ops.silu_mul_backward(h, da), h2.grad, dtype)


def test_silu_mul_strided_and_empty():
    h, da = _swiglu_operands(6, 200, torch.bfloat16, "cpu", False, seed=3)
    wide = torch.randn(6, 1000).bfloat16()
    wide[:, 100:500] = h  # a row stride of 1000, unit column stride
    hs = wide[:, 100:500]
    _close_swiglu(_ops.silu_mul(hs), _swiglu_torch(h), torch.bfloat16)
    torch.testing.assert_close(_ops.silu_mul_backward(hs, da), _ops.silu_mul_backward(h, da), rtol=0, atol=0)
    ht = h.t().contiguous().t()  # column stride != 1: copied first
    torch.testing.assert_close(_ops.silu_mul(ht), _ops.silu_mul(h), rtol=0, atol=0)
    assert _ops.silu_mul(torch.randn(0, 8)).shape == (0, 4)
    assert _ops.silu_mul_backward(torch.randn(0, 8), torch.randn(0, 4)).shape == (0, 8)


def test_silu_mul_bad_inputs():
    with pytest.raises(ValueError, match="even last dim"):
        _ops.silu_mul(torch.randn(4, 7))
    with pytest.raises(TypeError, match="h has dtype"):
        _ops.silu_mul(torch.randn(4, 8).to(torch.int32))
    with pytest.raises(ValueError, match="h must have 2 dimensions"):
        _ops.silu_mul(torch.randn(8))
    with pytest.raises(TypeError, match="grad has dtype"):
        _ops.silu_mul_backward(torch.randn(4, 8).bfloat16(), torch.randn(4, 4))
    with pytest.raises(ValueError, match="grad must have shape"):
        _ops.silu_mul_backward(torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_opcheck(device):
    h, da = _swiglu_operands(5, 130, torch.bfloat16, device, False, seed=7)
    opcheck(_ops.silu_mul, (h,))
    opcheck(_ops.silu_mul_backward, (h, da))
    opcheck(_ops.silu_mul, (_leaf(h.float()),))
