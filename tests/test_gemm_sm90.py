"""The Hopper (sm_90a) FP8 GEMM path against leankernels.reference, on an H100/H200.

Calls the raw kernel (_C.sm90_fp8_gemm, csrc/cuda/sm90_fp8_gemm.cu) for the dense, grouped
contiguous and grouped masked layouts: odd shapes (K and N not multiples of 128, M not a
multiple of the tile), experts with no rows, all rows on one expert, rows past offs[-1] and
rows >= masked_m that must stay poisoned, bf16 and fp32 output, CUDA-graph capture. Skipped
without a Hopper GPU and a CUDA build.

compute-sanitizer (memcheck and racecheck; TMA and wgmma run in the async proxy, so also try
synccheck), from the repository root after a CUDA build:

    PYTHONPATH=python compute-sanitizer --tool memcheck  python -m pytest -q -x tests/test_gemm_sm90.py
    PYTHONPATH=python compute-sanitizer --tool racecheck python -m pytest -q -x tests/test_gemm_sm90.py -k "dense or masked"
    PYTHONPATH=python compute-sanitizer --tool synccheck python -m pytest -q -x tests/test_gemm_sm90.py -k dense

(racecheck is slow: the -k filter keeps it to minutes. Expect "ERROR SUMMARY: 0 errors".)
"""
from __future__ import annotations

import itertools

import pytest
import torch

import leankernels
from leankernels import reference
from leankernels._lib import C

from conftest import HAS_CUDA, gemm_diff, poison, randn


def _is_hopper() -> bool:
    return HAS_CUDA and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = pytest.mark.skipif(not (_is_hopper() and C().sm90_available()),
                                reason="needs an sm_90 GPU and a CUDA build with the sm90 kernels")

DEV = "cuda"


# ------------------------------------------------------------------------------ references
def _ref_dense(a, a_s, b, b_s):
    """reference.fp8_gemm when the GEMM family provides it, else the spec from dequantize_fp8."""
    if hasattr(reference, "fp8_gemm"):
        return reference.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32).float()
    x = reference.dequantize_fp8(a, a_s, (1, 128)).double()
    w = reference.dequantize_fp8(b, b_s, (128, 128)).double()
    return (x @ w.T).float()


def _ref_contiguous(a, a_s, b, b_s, offs):
    if hasattr(reference, "fp8_grouped_gemm"):
        return reference.fp8_grouped_gemm(a, a_s, b, b_s, offs, out_dtype=torch.float32).float()
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = _ref_dense(a[start:end], a_s[start:end], b[e], b_s[e])
        start = end
    return out


def _ref_masked(a, a_s, b, b_s, masked_m):
    if hasattr(reference, "fp8_grouped_gemm_masked"):
        return reference.fp8_grouped_gemm_masked(a, a_s, b, b_s, masked_m, out_dtype=torch.float32).float()
    E, M, _ = a.shape
    out = torch.zeros(E, M, b.shape[1], dtype=torch.float32, device=a.device)
    for e, m in enumerate(masked_m.tolist()):
        if m > 0:
            out[e, :m] = _ref_dense(a[e, :m], a_s[e, :m], b[e], b_s[e])
    return out


# ------------------------------------------------------------------------------ helpers
def _inputs(rows_shape, N, K, E=None, seed=0):
    x = randn(*rows_shape, K, seed=seed, device=DEV)
    w = randn(*((E,) if E else ()), N, K, seed=seed + 1, device=DEV, scale=0.05)
    a, a_s = leankernels.quantize_fp8(x, (1, 128))
    b, b_s = leankernels.quantize_fp8(w, (128, 128))
    return a, a_s, b, b_s


def _run(layout, a, a_s, b, b_s, out, M, N, K, G, info=None, config=-1):
    assert C().sm90_fp8_gemm_supported(layout, M, N, K, out.dtype == torch.float32, a.data_ptr(), b.data_ptr(),
                                       out.data_ptr(), G)
    C().sm90_fp8_gemm(layout, a.data_ptr(), a_s.data_ptr(), b.data_ptr(), b_s.data_ptr(), out.data_ptr(),
                      out.dtype == torch.float32, M, N, K, G, 0 if info is None else info.data_ptr(),
                      out.device.index, torch.cuda.current_stream().cuda_stream, config)


def _check(out, ref, out_dtype):
    assert not torch.isnan(out).any(), "a row the kernel owns was not written"
    d = gemm_diff(out.float(), ref)
    assert d < (2e-5 if out_dtype == torch.bfloat16 else 1e-7), d
    tol = (1e-2 if out_dtype == torch.bfloat16 else 1e-4) * max(float(ref.abs().max()), 1e-6)
    assert float((out.float() - ref).abs().max()) <= tol


# ------------------------------------------------------------------------------ dense
DENSE = [(1, 8, 16), (64, 2112, 7168), (100, 264, 272), (129, 1000, 400), (333, 136, 1552), (128, 7168, 2048),
         (4096, 4096, 7168), (77, 24576, 1536)]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K", DENSE)
def test_dense(M, N, K, out_dtype):
    a, a_s, b, b_s = _inputs((M,), N, K, seed=M + N)
    out = poison(torch.empty(M, N, dtype=out_dtype, device=DEV))
    _run("dense", a, a_s, b, b_s, out, M, N, K, 1)
    _check(out, _ref_dense(a, a_s, b, b_s), out_dtype)


# Every compiled tile configuration (the heuristic reaches some only at large shapes), on odd
# sizes with a partial K block, partial M and N tiles and an unaligned expert boundary.
CONFIGS = list(range(len(C().sm90_configs())))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_dense(config, out_dtype):
    M, N, K = 200, 392, 336
    a, a_s, b, b_s = _inputs((M,), N, K, seed=config)
    out = poison(torch.empty(M, N, dtype=out_dtype, device=DEV))
    _run("dense", a, a_s, b, b_s, out, M, N, K, 1, config=config)
    _check(out, _ref_dense(a, a_s, b, b_s), out_dtype)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_grouped(config):
    N, K = 392, 336
    offs_list = [0, 70, 70, 300]
    a, a_s, b, b_s = _inputs((310,), N, K, E=4, seed=config)
    offs = torch.tensor(offs_list, dtype=torch.int32, device=DEV)
    out = poison(torch.empty(310, N, dtype=torch.bfloat16, device=DEV))
    _run("contiguous", a, a_s, b, b_s, out, 310, N, K, 4, offs, config=config)
    assert torch.isnan(out[300:]).all()
    _check(out[:300], _ref_contiguous(a, a_s, b, b_s, offs)[:300], torch.bfloat16)

    masked = [130, 0, 64, 1]
    a, a_s, b, b_s = _inputs((4, 130), N, K, E=4, seed=config + 50)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=DEV)
    out = poison(torch.empty(4, 130, N, dtype=torch.bfloat16, device=DEV))
    _run("masked", a, a_s, b, b_s, out, 130, N, K, 4, masked_m, config=config)
    ref = _ref_masked(a, a_s, b, b_s, masked_m)
    for e, m in enumerate(masked):
        assert torch.isnan(out[e, m:]).all()
        if m:
            _check(out[e, :m], ref[e, :m], torch.bfloat16)


def test_dense_m0_is_a_noop():
    a, a_s, b, b_s = _inputs((0,), 64, 128)
    out = torch.empty(0, 64, dtype=torch.bfloat16, device=DEV)
    _run("dense", a, a_s, b, b_s, out, 0, 64, 128, 1)
    torch.cuda.synchronize()


def test_unsupported_shapes_are_declined():
    t = torch.empty(64, device=DEV)
    p = t.data_ptr()
    assert not C().sm90_fp8_gemm_supported("dense", 64, 100, 128, False, p, p, p, 1)  # N % 8
    assert not C().sm90_fp8_gemm_supported("dense", 64, 128, 120, False, p, p, p, 1)  # K % 16
    assert not C().sm90_fp8_gemm_supported("dense", 64, 128, 128, False, p + 8, p, p, 1)  # alignment
    assert not C().sm90_fp8_gemm_supported("masked", 64, 128, 128, False, p, p, p, 10_000)  # groups


# ------------------------------------------------------------------------------ contiguous
CONTIG = [[0, 37, 128, 1, 300, 0], [512], [0, 0, 0, 200], [129, 127, 256, 64], [1] * 9]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", CONTIG, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("N,K", [(264, 400), (4096, 7168)])
def test_contiguous(sizes, N, K, out_dtype):
    E = len(sizes)
    offs_list = list(itertools.accumulate(sizes))
    M = offs_list[-1] + 13  # rows past offs[-1] must stay untouched
    a, a_s, b, b_s = _inputs((M,), N, K, E=E, seed=E + N)
    offs = torch.tensor(offs_list, dtype=torch.int32, device=DEV)
    out = poison(torch.empty(M, N, dtype=out_dtype, device=DEV))
    _run("contiguous", a, a_s, b, b_s, out, M, N, K, E, offs)
    end = offs_list[-1]
    assert torch.isnan(out[end:]).all(), "rows past offs[-1] were written"
    ref = _ref_contiguous(a, a_s, b, b_s, offs)
    if end:
        _check(out[:end], ref[:end], out_dtype)


def test_contiguous_deepseek_shape():
    E, rows, N, K = 8, 4096, 4096, 7168
    sizes = [rows + (e % 3 - 1) * 77 for e in range(E)]  # unaligned expert boundaries
    offs_list = list(itertools.accumulate(sizes))
    M = offs_list[-1]
    a, a_s, b, b_s = _inputs((M,), N, K, E=E, seed=11)
    offs = torch.tensor(offs_list, dtype=torch.int32, device=DEV)
    out = poison(torch.empty(M, N, dtype=torch.bfloat16, device=DEV))
    _run("contiguous", a, a_s, b, b_s, out, M, N, K, E, offs)
    _check(out, _ref_contiguous(a, a_s, b, b_s, offs), torch.bfloat16)


# ------------------------------------------------------------------------------ masked
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [[0, 1, 200, 77], [200], [0, 0], [64, 128, 65, 129]], ids=str)
@pytest.mark.parametrize("N,K", [(264, 400), (7168, 2048)])
def test_masked(masked, N, K, out_dtype):
    E, M = len(masked), 200
    a, a_s, b, b_s = _inputs((E, M), N, K, E=E, seed=E + 3)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=DEV)
    out = poison(torch.empty(E, M, N, dtype=out_dtype, device=DEV))
    _run("masked", a, a_s, b, b_s, out, M, N, K, E, masked_m)
    ref = _ref_masked(a, a_s, b, b_s, masked_m)
    for e, m in enumerate(masked):
        assert torch.isnan(out[e, m:]).all(), f"expert {e}: rows >= masked_m were written"
        if m:
            _check(out[e, :m], ref[e, :m], out_dtype)


def test_cuda_graph_capture():
    E, M, N, K = 4, 256, 4096, 7168
    a, a_s, b, b_s = _inputs((E, M), N, K, E=E, seed=5)
    masked_m = torch.tensor([256, 3, 0, 100], dtype=torch.int32, device=DEV)
    out = poison(torch.empty(E, M, N, dtype=torch.bfloat16, device=DEV))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _run("masked", a, a_s, b, b_s, out, M, N, K, E, masked_m)  # warm-up (attributes, maps)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _run("masked", a, a_s, b, b_s, out, M, N, K, E, masked_m)
    masked_m.copy_(torch.tensor([17, 256, 1, 0], dtype=torch.int32))  # new counts, same graph
    poison(out)
    g.replay()
    torch.cuda.synchronize()
    ref = _ref_masked(a, a_s, b, b_s, masked_m)
    for e, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[e, m:]).all()
        if m:
            _check(out[e, :m], ref[e, :m], torch.bfloat16)


@pytest.mark.skipif(not hasattr(leankernels, "fp8_gemm"), reason="the GEMM family (issue 3) is not merged here")
def test_public_fp8_gemm_matches_on_hopper():
    # after the lead's merge, leankernels.fp8_gemm dispatches here on sm_90 for supported shapes
    a, a_s, b, b_s = _inputs((256,), 1024, 2048, seed=9)
    out = leankernels.fp8_gemm(a, a_s, b, b_s)
    _check(out, _ref_dense(a, a_s, b, b_s), torch.bfloat16)
