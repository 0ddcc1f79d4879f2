"""leankernels.nn: each layer against the same layer written in plain PyTorch (leankernels.nn.plain).

Bounds (DeepGEMM's diff metric, conftest.gemm_diff):
  Fp8Linear: < 1e-3 (one FP8 GEMM: DeepGEMM's own bar); bit-exact against reference.fp8_gemm.
  MoE: < 5e-3 (two chained FP8 GEMMs plus the FP8 re-quantized SwiGLU output, ~2e-3 measured),
       same expert choice as the plain gate.
  MLAttention with bf16 projections (isolates absorption, RoPE and the cache): bf16 cache < 2e-4,
       FP8 cache < 3e-3; with Fp8Linear projections (four chained FP8 GEMMs): < 1.5e-2.
"""
from __future__ import annotations

import pytest
import torch

import leankernels as lk
from leankernels import reference as ref
from leankernels.nn import DecoderBlock, DeepSeekConfig, Fp8Linear, MLAttention, MoE, plain

from conftest import DEVICES, gemm_diff, randn, requires_cuda

CFG = DeepSeekConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=128, n_routed_experts=8,
                     moe_intermediate_size=128, num_experts_per_tok=2, n_group=4, topk_group=2,
                     max_position_embeddings=256)


def _block(cfg=CFG, device="cpu", seed=0):
    return plain.make_block(cfg, device, torch.float32, seed)


# ------------------------------------------------------------------------------ Fp8Linear
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(4, 256, 384), (33, 200, 130)])
def test_fp8_linear_matches_linear(device, bias, shape):
    M, N, K = shape
    lin = torch.nn.Linear(K, N, bias=bias, device=device)
    with torch.no_grad():
        lin.weight.copy_(randn(N, K, seed=1, device=device, scale=K ** -0.5))
        if bias:
            lin.bias.copy_(randn(N, seed=2, device=device))
    fc = Fp8Linear.from_float(lin)
    assert fc.weight.dtype == torch.float8_e4m3fn and fc.dtype == torch.float32
    x = randn(2, M, K, seed=3, device=device)
    with torch.no_grad():
        y = fc(x)
    assert y.shape == (2, M, N) and y.dtype == torch.float32
    assert gemm_diff(y, lin(x).detach()) < 1e-3
    # exactly the specification: quantize x 1x128, fp8_gemm against the 128x128 weight
    a, s = ref.quantize_fp8(x.reshape(-1, K))
    want = ref.fp8_gemm(a, s, fc.weight, fc.weight_scale_inv, torch.float32)
    if bias:
        want = want + lin.bias.detach().float()
    torch.testing.assert_close(y.reshape(-1, N), want, rtol=1e-5, atol=1e-5)


def test_fp8_linear_loading_and_errors():
    w = randn(256, 128, seed=4, dtype=torch.bfloat16)
    fc = Fp8Linear.from_weight(w)
    assert fc.dtype == torch.bfloat16
    q, s = lk.quantize_fp8(w, (128, 128))
    fc2 = Fp8Linear.from_fp8(q, s)
    x = randn(3, 128, seed=5, dtype=torch.bfloat16)
    assert torch.equal(fc(x), fc2(x))
    torch.testing.assert_close(fc.dequantized_weight(), lk.dequantize_fp8(q, s, (128, 128)))
    with pytest.raises(ValueError, match="x"):
        fc(randn(3, 64, seed=6))
    with pytest.raises(TypeError, match="linear"):
        Fp8Linear.from_float(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        Fp8Linear.from_fp8(q, s[:1])
    with pytest.raises(TypeError, match="dtype"):
        Fp8Linear(128, 128, dtype=torch.float16)


# ------------------------------------------------------------------------------------ MoE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_moe_matches_plain(device, gate):
    cfg = CFG if gate == "sigmoid" else CFG.replace(scoring_func="softmax", n_group=1, topk_group=1,
                                                    norm_topk_prob=False, routed_scaling_factor=1.0)
    pm = _block(cfg, device, seed=7).mlp
    m = MoE.from_float(pm, dtype=torch.float32)
    x = randn(2, 37, cfg.hidden_size, seed=8, device=device)
    with torch.no_grad():
        want = pm(x)
        got = m(x)
        w_ref, ids_ref = pm.gate(x.reshape(-1, cfg.hidden_size))
        w, ids = m.route(x.reshape(-1, cfg.hidden_size))
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(ids.long().sort(-1).values, ids_ref.sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.long().argsort(-1)), w_ref.gather(1, ids_ref.argsort(-1)), rtol=1e-5, atol=1e-6)
    assert gemm_diff(got, want) < 5e-3


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_moe_decode_sizes_match_plain(gate):
    """At decode sizes (<= 16 tokens on the CPU) the router logits come from gate_logits, not
    F.linear: the same expert choice as the plain gate and the same bounds; the first forward
    (public functions) and the later ones (the ops' implementations) agree bitwise."""
    cfg = CFG if gate == "sigmoid" else CFG.replace(scoring_func="softmax", n_group=1, topk_group=1)
    pm = _block(cfg, seed=11).mlp
    m = MoE.from_float(pm, dtype=torch.float32)
    for T in (1, 3, 16):
        x = randn(T, cfg.hidden_size, seed=12 + T)
        with torch.no_grad():
            want, got, again = pm(x), m(x), m(x)
            w_ref, ids_ref = pm.gate(x)
            w, ids = m.route(x)
        assert torch.equal(ids.long().sort(-1).values, ids_ref.sort(-1).values)
        torch.testing.assert_close(w.gather(1, ids.long().argsort(-1)), w_ref.gather(1, ids_ref.argsort(-1)),
                                   rtol=1e-5, atol=1e-6)
        assert gemm_diff(got, want) < 5e-3
        assert torch.equal(got, again)


class _OpByOpMoE(MoE):
    """MoE whose forward takes the public ops step by step (an overridden route disables the
    eager CPU path and its fused C++ call)."""

    def route(self, x):
        return super().route(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_moe_fused_decode_equals_op_by_op(monkeypatch, dtype, shared, gate):
    """At decode sizes (<= 16 tokens) the CPU forward is one C++ call (cpu/moe.h): bitwise the
    op-by-op forward (public route, plan, permute, GEMMs, SiLU x up, unpermute, shared add),
    bf16 and fp32 outputs, with and without shared experts, bf16 and fp32 inputs; the fused
    call really ran; 17 tokens take the op-by-op path."""
    from leankernels import _ops

    cfg = CFG if gate == "sigmoid" else CFG.replace(scoring_func="softmax", n_group=1, topk_group=1,
                                                    norm_topk_prob=False, routed_scaling_factor=1.0)
    if not shared:
        cfg = cfg.replace(n_shared_experts=0)
    pm = _block(cfg, seed=31).mlp
    fused, ops = MoE.from_float(pm, dtype=dtype), _OpByOpMoE.from_float(pm, dtype=dtype)
    assert (fused.shared_experts is not None) == shared
    calls = []
    real = _ops._C.moe_decode
    monkeypatch.setattr(_ops._C, "moe_decode", lambda *a: calls.append(a[2]) or real(*a))
    with torch.inference_mode():
        for T, xdt in ((1, torch.bfloat16), (2, torch.float32), (5, torch.bfloat16), (16, torch.float32),
                       (17, torch.bfloat16)):
            x = randn(T, cfg.hidden_size, seed=40 + T).to(xdt)
            fused(x)                                  # the first forward checks route's arguments
            got, want = fused(x), ops(x)
            assert got.dtype == dtype and torch.equal(got, want), (T, xdt)
            got2 = fused(x.view(1, T, -1))            # prepared per input shape (_Prepared)
            assert got2.shape == (1, T, cfg.hidden_size) and torch.equal(got2[0], want), (T, xdt)
    assert sorted(set(calls)) == [1, 2, 5, 16]   # every call after the first, up to 16 tokens
    assert calls.count(1) == 2 and calls.count(16) == 3   # (the first forward of all: the public ops)


def test_moe_prepared_decode_follows_every_change(monkeypatch):
    """The prepared one-call forward (layers._Prepared) runs only while what it was prepared
    from holds: re-bound or reloaded weights (setattr, the module's dicts as loaders write them,
    ``.data =``, ``_apply``), a new out dtype, a hook on the shared experts, grad mode with a
    weight that requires grad. Each change gives the result of the changed layer (against the
    op-by-op forward of a layer built from the same weights), never a stale one; each output is
    a fresh tensor."""
    from leankernels import _ops

    pm, pm2 = _block(seed=51).mlp, _block(seed=52).mlp
    m = MoE.from_float(pm)
    other = MoE.from_float(pm2)
    calls = []
    real = _ops._C.moe_decode
    monkeypatch.setattr(_ops._C, "moe_decode", lambda *a: calls.append(1) or real(*a))
    x = randn(1, 1, CFG.hidden_size, seed=53, dtype=torch.bfloat16)

    with torch.no_grad():
        ref = _OpByOpMoE.from_float(pm)
        m(x)
        outs = [m(x) for _ in range(3)]
        assert len({o.data_ptr() for o in outs}) == 3 and all(torch.equal(o, outs[0]) for o in outs)
        base = ref(x)
        assert torch.equal(outs[0], base)
        n = len(calls)
        poison = outs[0].clone()
        outs[1].fill_(float("nan"))                # an output the caller keeps: not reused
        assert torch.equal(m(x), base) and torch.equal(outs[0], poison) and len(calls) == n + 1

        def check(expected, label):
            assert torch.equal(m(x), expected), label
            assert torch.equal(m(x), expected), label   # and again, once re-prepared

        # weights re-bound or reloaded: results follow the new weights
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            old = getattr(m, name)
            m._buffers[name] = getattr(other, name).clone()          # as loaders write them
            assert not torch.equal(m(x), base), name
            m._buffers[name] = old
            check(base, name)
            setattr(m, name, getattr(other, name).clone())           # setattr
            assert not torch.equal(m(x), base), name
            setattr(m, name, old)
            check(base, name)
        old = m.gate_weight.data
        m.gate_weight.data = other.gate_weight.data.clone()          # .data = (same Parameter)
        mixed = _OpByOpMoE.from_float(pm)
        mixed.gate_weight.data = other.gate_weight.data.clone()
        check(mixed(x), "gate .data")
        m.gate_weight.data = old
        check(base, "gate back")
        sw = m.shared_experts.gate_up_proj
        old = sw.weight
        sw.weight = other.shared_experts.gate_up_proj.weight.clone()
        mixed = _OpByOpMoE.from_float(pm)
        mixed.shared_experts.gate_up_proj.weight = other.shared_experts.gate_up_proj.weight.clone()
        check(mixed(x), "shared gate_up")
        sw.weight = old
        check(base, "shared back")
        sh = m.shared_experts
        m.shared_experts = other.shared_experts
        mixed = _OpByOpMoE.from_float(pm)
        mixed.shared_experts = other.shared_experts
        check(mixed(x), "shared module")
        m.shared_experts = sh
        check(base, "shared module back")
        # the output dtype
        m.dtype = torch.float32
        got = m(x)
        assert got.dtype == torch.float32
        ref32 = _OpByOpMoE.from_float(pm)
        ref32.dtype = torch.float32
        assert torch.equal(got, ref32(x))
        m.dtype = torch.bfloat16
        check(base, "dtype back")
        # _apply: a dtype cast of the buffers re-binds them
        m.float()   # fp8 buffers stay fp8 only if _apply skips them: either way the result follows
        try:
            got = m(x)
        except Exception as e:  # the checked path's error is fine; a crash or a stale result is not
            got = e
        m2 = MoE.from_float(pm)
        m2.float()
        try:
            exp = m2(x)
        except Exception as e:
            exp = e
        if isinstance(exp, torch.Tensor):
            assert torch.equal(got, exp)
        else:
            assert type(got) is type(exp)
    # a hook on the shared experts runs (the prepared call would skip it)
    m = MoE.from_float(pm)
    seen = []
    with torch.no_grad():
        m(x)
        m(x)
        h = m.shared_experts.register_forward_hook(lambda mod, i, o: seen.append(1))
        assert torch.equal(m(x), base) and seen == [1]
        h.remove()
        assert torch.equal(m(x), base) and seen == [1]
    # outputs made in inference mode are inference tensors, the others are not (as torch.empty's)
    m = MoE.from_float(pm)
    with torch.inference_mode():
        m(x)
        assert m(x).is_inference()
    with torch.no_grad():
        out = m(x)
        assert not out.is_inference() and torch.equal(out, base)
        out.add_(1)   # an inference tensor would refuse this outside inference mode
    with torch.inference_mode():
        assert m(x).is_inference()
    # the layer's class changed (a subclass with its own route): its route runs
    with torch.no_grad():
        n = len(calls)
        m.__class__ = _OpByOpMoE
        assert torch.equal(m(x), base) and len(calls) == n
        m.__class__ = MoE
        assert torch.equal(m(x), base) and len(calls) == n + 1
    # grad mode and a weight that requires grad: the checked path decides (as before)
    m.gate_weight.requires_grad_(True)
    with torch.enable_grad():
        n = len(calls)
        try:
            r = m(x)
        except Exception:
            r = None
        assert len(calls) == n or (r is not None and torch.equal(r.detach(), base))


def test_moe_from_weights_matches_from_float_and_bf16_out():
    pm = _block(seed=9).mlp
    ex = [(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight) for e in pm.experts]
    sh = pm.shared_experts
    m1 = MoE.from_float(pm)
    m2 = MoE.from_weights(CFG, pm.gate.weight, ex, pm.gate.e_score_correction_bias,
                          (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight))
    x = randn(5, CFG.hidden_size, seed=10, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
        assert m1(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="experts"):
        MoE.from_weights(CFG, pm.gate.weight, ex[:-1])


def test_state_dict_round_trip():
    pb = _block(seed=27)
    moe, attn = MoE.from_float(pb.mlp), MLAttention.from_float(pb.self_attn)
    moe2, attn2 = MoE(CFG), MLAttention(CFG)
    moe2.load_state_dict(moe.state_dict())
    attn2.load_state_dict(attn.state_dict())
    attn2._absorb_weights()
    x = randn(1, 5, CFG.hidden_size, seed=28)
    table = torch.tensor([[0]], dtype=torch.int32)
    c1, c2 = lk.LatentCache(1, 16), lk.LatentCache(1, 16)
    with torch.no_grad():
        assert torch.equal(moe(x), moe2(x))
        assert torch.equal(attn(x, c1, table, 0), attn2(x, c2, table, 0))
    assert not any(p.requires_grad for p in list(moe.parameters()) + list(attn.parameters()))


# ---------------------------------------------------------------------------- MLAttention
def _run_attn(pa, attn, x, S, cache, table, mode="auto"):
    """Prefill S tokens then decode the rest one by one; per-step diffs against the plain MLA."""
    B, T, _ = x.shape
    pa.reset_cache(B, T)
    diffs = [gemm_diff(attn(x[:, :S], cache, table, 0, mode).float(), pa(x[:, :S], 0))]
    for i in range(S, T):
        diffs.append(gemm_diff(attn(x[:, i:i + 1], cache, table, i).float(), pa(x[:, i:i + 1], i)))
    return diffs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("fp8_proj", [False, True])
def test_mla_prefill_and_decode_match_plain(device, fp8_cache, fp8_proj):
    pa = _block(device=device, seed=11).self_attn
    attn = MLAttention.from_float(pa, fp8=fp8_proj, dtype=torch.float32)
    B, S, T, bs = 2, 21, 25, 16
    cache = lk.LatentCache(6, bs, fp8=fp8_cache, device=device)
    table = torch.tensor([[4, 0], [1, 5]], dtype=torch.int32, device=device)   # scattered blocks
    x = randn(B, T, CFG.hidden_size, seed=12, device=device)
    bar = 1.5e-2 if fp8_proj else (3e-3 if fp8_cache else 2e-4)
    with torch.no_grad():
        diffs = _run_attn(pa, attn, x, S, cache, table)
    assert max(diffs) < bar, diffs
    # the same prefill through the absorbed path (mla_decode with s_q = S, causal)
    cache2 = lk.LatentCache(6, bs, fp8=fp8_cache, device=device)
    with torch.no_grad():
        diffs = _run_attn(pa, attn, x, S, cache2, table, mode="absorb")
    assert max(diffs) < bar, diffs
    # both paths wrote the same cache rows
    assert torch.equal(cache.kv, cache2.kv)


def test_mla_ragged_batch_decode():
    """Sequences at different lengths decode together (start as a tensor)."""
    pa = _block(seed=13).self_attn
    attn = MLAttention.from_float(pa, fp8=False, dtype=torch.float32)
    lens = [7, 19]
    cache = lk.LatentCache(4, 16)
    table = torch.tensor([[2, 3], [0, 1]], dtype=torch.int32)
    xs = [randn(1, n + 1, CFG.hidden_size, seed=14 + i) for i, n in enumerate(lens)]
    want = []
    with torch.no_grad():
        for i, n in enumerate(lens):
            attn(xs[i][:, :n], cache, table[i:i + 1], 0)
            pa.reset_cache(1, n + 1)
            pa(xs[i][:, :n], 0)
            want.append(pa(xs[i][:, n:], n))
        x = torch.cat([xs[0][:, -1:], xs[1][:, -1:]])
        got = attn(x, cache, table, torch.tensor(lens))
    for i in range(2):
        assert gemm_diff(got[i:i + 1].float(), want[i]) < 2e-4


def test_mla_errors():
    pa = _block(seed=15).self_attn
    attn = MLAttention.from_float(pa)
    cache = lk.LatentCache(2, 16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    x = randn(1, 3, CFG.hidden_size, seed=16)
    with pytest.raises(ValueError, match="mode"):
        attn(x, cache, table, 0, mode="fast")
    with pytest.raises(ValueError, match="decompress"):
        attn(x, cache, table, 4, mode="decompress")
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAttention(CFG.replace(kv_lora_rank=256))
    with pytest.raises(ValueError, match="x must be"):
        attn(x[0], cache, table, 0)
    with pytest.raises(TypeError, match="block_table"):
        attn(x, cache, table.long(), 0)
    with pytest.raises(ValueError, match="block_table"):
        attn(x, cache, table.repeat(2, 1), 0)
    with pytest.raises(ValueError, match="start"):
        attn(x, cache, table, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x must have last dim"):
        MoE.from_float(_block(seed=22).mlp)(randn(3, 64, seed=23))


# ------------------------------------------------------------------------------ the block
def test_decoder_block_matches_plain():
    """Per token, the block's update agrees with the plain block (the demo's check): the median
    token within 1e-2 and at least 90% of them (the rest: FP8 noise flipped a near-tie of the gate)."""
    pb = _block(seed=17)
    ob = DecoderBlock.from_float(pb, dtype=torch.float32)
    B, S, T = 2, 24, 28
    cache = lk.LatentCache(4, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    x = randn(B, T, CFG.hidden_size, seed=18)
    pb.reset_cache(B, T)
    with torch.no_grad():
        outs = [(ob(x[:, :S], cache, table, 0), pb(x[:, :S], 0))]
        for i in range(S, T):
            outs.append((ob(x[:, i:i + 1], cache, table, i), pb(x[:, i:i + 1], i)))
        yo = torch.cat([o for o, _ in outs], 1)
        yr = torch.cat([r for _, r in outs], 1)
    d = torch.tensor([gemm_diff(a - xx, b - xx) for a, b, xx in zip(yo.flatten(0, 1), yr.flatten(0, 1), x.flatten(0, 1))])
    assert float(d.median()) < 1e-2
    assert float((d < 1e-2).double().mean()) >= 0.9


def test_torch_compile_fullgraph():
    """MoE and the absorbed MLA path trace into one graph (no host sync, no graph break)."""
    pb = _block(seed=19)
    moe = MoE.from_float(pb.mlp)
    attn = MLAttention.from_float(pb.self_attn)
    x = randn(9, CFG.hidden_size, seed=20)
    xa = randn(1, 3, CFG.hidden_size, seed=21)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    c1, c2 = lk.LatentCache(4, 16), lk.LatentCache(4, 16)
    with torch.no_grad():
        assert torch.equal(torch.compile(moe, fullgraph=True)(x), moe(x))
        got = torch.compile(attn, fullgraph=True)(xa, c1.kv, table, torch.tensor([5]))
        want = attn(xa, c2.kv, table, torch.tensor([5]))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(c1.kv, c2.kv)


@requires_cuda
def test_cuda_graph_decode_step():
    """A whole decode step of the block (MLA absorbed path + MoE) captures in a CUDA graph and
    replays to the eager result (positions on the device, no host sync)."""
    pb = _block(device="cuda", seed=24)
    ob = DecoderBlock.from_float(pb)
    B, P = 2, 7
    cache = lk.LatentCache(4, 16, device="cuda")
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    x = randn(B, P + 1, CFG.hidden_size, seed=25, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ob(x[:, :P], cache, table, 0)
        static_x = x[:, P:].clone()
        start = torch.full((B,), P, dtype=torch.int64, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):                      # warm-up (rewrites the same cache row)
                ob(static_x, cache, table, start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ob(static_x, cache, table, start)
        static_x.copy_(randn(B, 1, CFG.hidden_size, seed=26, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        want = ob(static_x, cache, table, start)
    assert torch.equal(y, want)
