"""Trainable modules (Fp8Linear, MoE, MLAttention with trainable=True) and the train job."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leankernels as lk
from leankernels import _train
from leankernels.nn import layers, plain
from leankernels.nn.config import DeepSeekConfig

CFG = DeepSeekConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=None, qk_nope_head_dim=32, v_head_dim=32,
                     n_routed_experts=8, moe_intermediate_size=128, num_experts_per_tok=2, n_group=2, topk_group=1,
                     max_position_embeddings=256)
LAYER = 6e-3   # FP8 layer (bf16 output) vs the plain fp32 layer, DeepGEMM's diff metric


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _trainable_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def block():
    return plain.make_block(CFG, "cpu", torch.float32, seed=3)


def test_trainable_parameter_counts(block):
    lin = nn.Linear(256, 96, bias=True)
    assert _trainable_count(layers.Fp8Linear.from_float(lin, trainable=True)) == _trainable_count(lin)
    assert _trainable_count(layers.Fp8Linear.from_float(lin)) == 0
    assert _trainable_count(layers.MoE.from_float(block.mlp, trainable=True)) == _trainable_count(block.mlp)
    assert _trainable_count(layers.MoE.from_float(block.mlp)) == 0
    attn = layers.MLAttention.from_float(block.self_attn, trainable=True)
    assert _trainable_count(attn) == _trainable_count(block.self_attn)


def test_moe_grads_match_plain_layer(block):
    g = torch.Generator().manual_seed(1)
    moe = layers.MoE.from_float(block.mlp, dtype=torch.float32, trainable=True)
    x = torch.randn(96, 256, generator=g).requires_grad_()
    y = moe(x)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref = plain.make_block(CFG, "cpu", torch.float32, seed=3).mlp
    x2 = x.detach().clone().requires_grad_()
    y2 = ref(x2)
    y2.backward(dy)
    assert diff(y, y2) < LAYER
    assert diff(x.grad, x2.grad) < LAYER
    assert diff(moe.gate_weight.grad, ref.gate.weight.grad) < LAYER
    w13 = torch.stack([torch.cat([e.gate_proj.weight.grad, e.up_proj.weight.grad]) for e in ref.experts])
    w2 = torch.stack([e.down_proj.weight.grad for e in ref.experts])
    assert diff(moe.w13_master.grad, w13) < LAYER
    assert diff(moe.w2_master.grad, w2) < LAYER
    sh = moe.shared_experts
    assert diff(sh.down_proj.master_weight.grad, ref.shared_experts.down_proj.weight.grad) < LAYER
    assert torch.equal(moe.load_counts.sum(), torch.tensor(96 * CFG.num_experts_per_tok))


def test_one_sgd_step_moves_like_the_plain_layer(block):
    """The same SGD step on both layers changes their outputs the same way."""
    g = torch.Generator().manual_seed(2)
    ours = layers.MoE.from_float(block.mlp, dtype=torch.float32, trainable=True)
    ref = plain.make_block(CFG, "cpu", torch.float32, seed=3).mlp
    x = torch.randn(128, 256, generator=g)
    target = torch.randn(128, 256, generator=g)
    deltas = []
    for m in (ours, ref):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        with torch.no_grad():
            before = m(x).float()
        loss = (m(x).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            deltas.append(m(x).float() - before)
    assert deltas[0].abs().max() > 0
    assert diff(deltas[0], deltas[1]) < 0.05, "the FP8 step moves the output like the plain step"


def test_fp8_copy_requantized_only_when_master_changes(block, monkeypatch):
    moe = layers.MoE.from_float(block.mlp, trainable=True)
    calls = []
    real = layers.quantize_fp8
    monkeypatch.setattr(layers, "quantize_fp8", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(16, 256)
    moe(x)
    moe(x)
    assert not calls, "unchanged masters are not re-quantized"
    before = moe.w13.view(torch.uint8).clone()
    with torch.no_grad():
        moe.w13_master.add_(0.05 * torch.randn_like(moe.w13_master))
    moe(x)
    assert len(calls) == 1, "only the changed master is re-quantized"
    assert not torch.equal(before, moe.w13.view(torch.uint8))
    q, s = real(moe.w13_master.detach(), (128, 128))
    assert torch.equal(q.view(torch.uint8), moe.w13.view(torch.uint8)) and torch.equal(s, moe.w13_scale)


def test_balance_moves_bias_against_load(block):
    moe = layers.MoE.from_float(block.mlp, trainable=True)
    bias0 = moe.e_score_correction_bias.clone()
    moe(torch.randn(64, 256))
    counts = moe.balance(rate=0.01)
    assert int(counts.sum()) == 64 * CFG.num_experts_per_tok and int(moe.load_counts.sum()) == 0
    moved = moe.e_score_correction_bias - bias0
    mean = counts.double().mean()
    assert torch.all(moved[counts.double() > mean] < 0) and torch.all(moved[counts.double() < mean] > 0)
    with pytest.raises(RuntimeError, match="trainable"):
        layers.MoE.from_float(block.mlp).balance()


def test_inference_modules_refuse_grad_inputs(block):
    x = torch.randn(4, 256, requires_grad=True)
    for m in (layers.Fp8Linear.from_float(nn.Linear(256, 64)), layers.MoE.from_float(block.mlp)):
        with pytest.raises(RuntimeError, match="trainable=True"):
            m(x)
        with torch.no_grad():
            m(x)
    attn = layers.MLAttention.from_float(block.self_attn)
    with pytest.raises(RuntimeError, match="trainable=True"):
        attn(x.view(1, 4, 256))
    with pytest.raises(ValueError, match="bf16 F.grouped_mm"):
        layers.MoE.from_float(block.mlp, fp8_experts=False)


def test_mla_prefill_grads_match_plain(block):
    g = torch.Generator().manual_seed(4)
    attn = layers.MLAttention.from_float(block.self_attn, fp8=True, dtype=torch.float32, trainable=True)
    x = torch.randn(2, 24, 256, generator=g).requires_grad_()
    y = attn(x)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref = plain.make_block(CFG, "cpu", torch.float32, seed=3).self_attn
    ref.reset_cache(2, 24)
    x2 = x.detach().clone().requires_grad_()
    y2 = ref(x2)
    y2.backward(dy)
    assert diff(y, y2) < LAYER
    assert diff(x.grad, x2.grad) < LAYER
    assert diff(attn.o_proj.master_weight.grad, ref.o_proj.weight.grad) < LAYER
    assert diff(attn.kv_b_proj.weight.grad, ref.kv_b_proj.weight.grad) < 2e-2   # a bf16 weight
    with pytest.raises(ValueError, match="decompress"):
        attn(x, None, mode="absorb")


def test_torch_compile_training_step(block):
    torch._dynamo.reset()
    moe = layers.MoE.from_float(block.mlp, dtype=torch.float32, trainable=True)
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(32, 256)

    def loss_fn(x):
        return moe(x).float().pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = loss_fn(x)
    loss = compiled(x)
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-6)
    loss.backward()
    grad = moe.w13_master.grad.clone()
    moe.zero_grad()
    loss_fn(x).backward()
    # inductor fuses the elementwise steps (SwiGLU) and may round an ulp differently, which can
    # move an FP8 code: far below FP8's own error (~1e-3), not bitwise (1.2e-9 seen on torch 2.4)
    assert diff(grad, moe.w13_master.grad) < 1e-6
    opt.step()
    assert torch.isfinite(compiled(x))


def test_train_job_runs(tmp_path):
    """A few steps of the train job (the real check, FP8 within 3% of bf16, is `train --quick`
    in CI): the JSON holds what the issue asks for and the losses fall."""
    out = tmp_path / "train.json"
    logs = []
    r = _train.main(steps=8, layers_n=1, batch=4, seq=64, json_path=str(out), log=logs.append)
    data = json.loads(out.read_text())
    for name in ("fp8", "bf16", "fp8_no_balance"):
        assert len(data[name]["loss"]) == 8 and data[name]["tokens_per_s"] > 0
        assert data[name]["loss"][-1] < data[name]["loss"][0]
    assert abs(r["fp8_vs_bf16_loss_gap"]) < 0.1
    assert any("held-out loss" in line for line in logs)
    assert _train.corpus(10_000)[:1] and len(_train.corpus(10_000)) == 10_000


def test_mla_absorbed_weights_follow_a_trained_kv_b_proj(block):
    attn = layers.MLAttention.from_float(block.self_attn, fp8=True, dtype=torch.float32, trainable=True)
    attn(torch.randn(1, 8, 256)).float().pow(2).mean().backward()
    with torch.no_grad():
        for p in attn.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    cache = lk.LatentCache(4, 16)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    with torch.no_grad():
        attn(torch.randn(1, 1, 256), cache, table, 0)        # the absorbed (decode) path
    cfg = CFG
    w = attn.kv_b_proj.weight.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, 512)
    assert torch.equal(attn.w_uk, w[:, :cfg.qk_nope_head_dim])
