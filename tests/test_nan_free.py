"""Weights known to hold no NaN code: the CPU GEMM walks of the avx2 and avx512 paths keep a NaN
mark per weight chunk (a NaN code would otherwise decode as +-480), and skip it for weights the
caller vouches for (cpu/gemm.h b_nan_free). leankernels vouches only for FP8 tensors it scanned
(_ops.fp8_nan_free) and that have not been written in place since (their version counter)."""
from __future__ import annotations

import gc

import pytest
import torch

import leankernels as lk
from leankernels import _ops
from leankernels import reference as ref
from leankernels.nn import DeepSeekConfig, MoE, plain
from conftest import poison, randn

PATHS = lk.cpu_paths()
MARKED = {"avx2", "avx512"}  # the paths whose walks keep a NaN mark


def _clean_bytes(n, seed):
    """n random bytes, none a NaN code."""
    b = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)
    return b.to(torch.uint8)


@pytest.mark.parametrize("n", [0, 1, 31, 65536, 65537, 5 * 65536 + 17])
def test_scan_finds_every_nan_code_anywhere(n):
    """The threaded C++ scan (64 KiB pieces) against torch, one NaN code (0x7f or 0xff) at the
    first byte, the last, a piece's last and next-to-first bytes and the middle."""
    u = _clean_bytes(n, seed=n)
    t = u.view(torch.float8_e4m3fn)
    assert _ops._C.fp8_nan_free(t.data_ptr(), n)
    for i in sorted({0, n - 1, n // 2, 65535, 65537} & set(range(n))):
        for code in (0x7F, 0xFF):
            old = int(u[i])
            u[i] = code
            assert not _ops._C.fp8_nan_free(t.data_ptr(), n), (i, code)
            assert not _ops._C.fp8_nan_free(t.data_ptr() + i, 1)
            assert _ops._C.fp8_nan_free(t.data_ptr(), i)  # the bytes before it
            u[i] = old
    with pytest.raises(ValueError, match="negative size"):
        _ops._C.fp8_nan_free(t.data_ptr(), -1)


def test_trust_follows_writes_and_lifetime():
    """fp8_nan_free trusts a tensor while it is the same object, pointer and version: an
    in-place write (through a view, under no_grad, copy_ as load_state_dict does) ends the trust;
    a dead tensor leaves the cache; inference tensors, non-contiguous ones and other dtypes are
    never trusted."""
    w = _clean_bytes(4096, 1).view(torch.float8_e4m3fn).view(32, 128)
    assert _ops.fp8_nan_free(w) and id(w) in _ops._NAN_FREE
    assert _ops.fp8_nan_free(w, w)  # the cached answer
    w.view(torch.uint8)[3, 5] = 0x7F  # a view shares the version counter
    assert not _ops.fp8_nan_free(w)
    w.view(torch.uint8)[3, 5] = 0x01
    assert _ops.fp8_nan_free(w)
    with torch.no_grad():
        w.copy_(poison(torch.empty_like(w)))  # 0x7f everywhere
    assert not _ops.fp8_nan_free(w)
    w2 = _clean_bytes(4096, 2).view(torch.float8_e4m3fn).view(32, 128)
    assert _ops.fp8_nan_free(w2)
    key = id(w2)
    del w2
    gc.collect()
    assert key not in _ops._NAN_FREE
    clean = _clean_bytes(4096, 3).view(torch.float8_e4m3fn).view(32, 128)
    assert not _ops.fp8_nan_free(clean.t())                      # not contiguous
    assert not _ops.fp8_nan_free(clean.view(torch.uint8))        # not FP8
    assert not _ops.fp8_nan_free(clean, clean.float())
    with torch.inference_mode():
        inf = clean.clone()
    assert not _ops.fp8_nan_free(inf)                            # no version counter


def _launch(a, sa, b, sb, offs, trusted):
    out = poison(torch.empty(a.shape[0], b.shape[1], dtype=torch.float32))
    _ops._gemm_launch(_ops._GEMM_CONTIGUOUS, a, sa, b, sb, offs, a.shape[0], out, trusted)
    return out


@pytest.mark.parametrize("counts,N,K,scale,e", [
    ([1, 0, 2, 3, 4], 264, 2048, None, 0),  # four streams (decode_spread), pre-scaled rows on avx2
    ([1, 2], 141, 2000, 2.0 ** 40, 1),       # a_scale out of the pre-scaled range: per-block scaling
    ([1, 3, 6], 136, 4224, None, 0),        # four adjacent weight rows (decode_item)
    ([4, 3, 6], 136, 4224, 2.0 ** 40, 2),    # the same, per-block scaling, 6 rows in groups of 3
    ([12, 16], 130, 640, None, 1),          # 9-16 rows: the L1 panel (avx2)
    ([2, 1], 77, 1408, float("inf"), 1),    # expert 0: an unsafe scale (that walk stays checked)
])
def test_trusted_walks_match_the_checked_ones_every_path(cpu_path, counts, N, K, scale, e):
    """On NaN-free weights the trusted walks give the checked walks' bits, on every decode walk
    (and against the reference). With a NaN code in a trusted weight row of expert e, the paths
    with a mark give a finite number there (the mark really was skipped: the trust is the
    caller's promise), the others NaN. A finite scale factor multiplies expert e's first row's
    scales, an Inf one expert 0's."""
    E, M = len(counts), sum(counts)
    a, sa = lk.quantize_fp8(randn(M, K, seed=K))
    b, sb = lk.quantize_fp8(randn(E, N, K, seed=N, scale=0.05), (128, 128))
    r0 = sum(counts[:e])
    if scale is not None:
        sa[r0 if scale < float("inf") else 0, 1] *= scale
    offs = torch.tensor(counts).cumsum(0).int()
    checked, trusted = _launch(a, sa, b, sb, offs, False), _launch(a, sa, b, sb, offs, True)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32)
    assert torch.equal(checked.isnan(), want.isnan())
    assert torch.equal(trusted.nan_to_num(), checked.nan_to_num()) and torch.equal(trusted.isnan(), want.isnan())
    fin = want.isfinite()
    torch.testing.assert_close(trusted[fin], want[fin], rtol=1e-4, atol=1e-4 * want[fin].abs().max().item())
    b.view(torch.uint8)[e, N - 1, K // 2] = 0x7F
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32)
    assert want[r0:r0 + counts[e], N - 1].isnan().all()
    assert torch.equal(_launch(a, sa, b, sb, offs, False).isnan(), want.isnan())
    got = _launch(a, sa, b, sb, offs, True)[r0:r0 + counts[e], N - 1]
    assert (got.isfinite() if cpu_path in MARKED else got.isnan()).all(), (cpu_path, got)


CFG = DeepSeekConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=128, n_routed_experts=8,
                     moe_intermediate_size=128, num_experts_per_tok=2, n_group=4, topk_group=2,
                     max_position_embeddings=256)


@pytest.mark.parametrize("where", ["w13", "w2", "shared"])
def test_moe_trusts_its_weights_until_they_are_written(where):
    """nn.MoE's one-call decode forward (layers._Prepared) runs trusted on its scanned weights;
    a NaN code written in place into any of its FP8 weights afterwards (routed gate/up or down,
    the shared experts') reaches the next output as NaN, as on the checked op-by-op path."""
    m = MoE.from_float(plain.make_block(CFG, "cpu", torch.float32, 7).mlp)
    x = randn(1, CFG.hidden_size, seed=8, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)
        first = m(x)
        p = next(iter(m.__dict__["_prepared"].values()))
        assert p.post[-1] is True and len(p.trusted) == 4
        w = {"w13": m.w13, "w2": m.w2, "shared": m.shared_experts.down_proj.weight}[where]
        w.view(torch.uint8)[..., 0] = 0x7F  # every expert's every weight row
        got = m(x)
    assert first.isfinite().all() and got.isnan().all()
