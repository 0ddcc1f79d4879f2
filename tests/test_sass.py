"""The Hopper kernels compile for sm_90a into the instructions they were written for.

Runs without a GPU: nvcc compiles csrc/cuda/sm90_*.cu to a cubin (-gencode
arch=compute_90a,code=sm_90a, the flags CMake uses for lk_cuda_sm90) and cuobjdump -sass
disassembles it. Checked per kernel instantiation: QGMMA (FP8 wgmma) of the right shape, TMA
loads (UTMALDG) and stores (UTMASTG), setmaxnreg in the warp-specialised configurations, no
local memory (STL/LDL) and ptxas reporting no spills, no ignored setmaxnreg (C7508), no
serialised wgmma and no fences injected by ptxas (C7517/C7519). Also assembles every PTX
wrapper of csrc/cuda/sm90/ once, the unused ones included. Skipped unless nvcc, cuobjdump and nvdisasm are found (PATH, CUDA_HOME, or
the pip packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm); about 10-20 s on 2 cores.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", name))
    for site in sys.path:
        cands += glob.glob(os.path.join(site, "nvidia", "*", "bin", name))
        cands += glob.glob(os.path.join(site, "nvidia", "*", "*", "bin", name))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


NVCC, CUOBJDUMP, NVDISASM = _tool("nvcc"), _tool("cuobjdump"), _tool("nvdisasm")
pytestmark = pytest.mark.skipif(not (NVCC and CUOBJDUMP and NVDISASM),
                                reason="needs nvcc, cuobjdump and nvdisasm (pip: nvidia-cuda-cuobjdump, "
                                       "nvidia-cuda-nvdisasm)")

SOURCES = sorted((ROOT / "csrc" / "cuda").glob("sm90_*.cu"))
KERNEL = re.compile(r"sm90_fp8_gemm_kernelILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELb([01])E")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source name: (ptxas log, {mangled kernel name: SASS text})}"""
    out = {}
    tmp = tmp_path_factory.mktemp("sass")
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(NVDISASM), os.environ.get("PATH", "")]))
    for src in SOURCES:
        cubin = tmp / (src.stem + ".cubin")
        cmd = [NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"),
               "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v,-warn-spills", "-cubin", str(src), "-o", str(cubin)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr[-4000:]}"
        sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, env=env)
        assert sass.returncode == 0, sass.stderr
        funcs = {}
        for block in re.split(r"\n\s*Function : ", sass.stdout)[1:]:
            name, _, body = block.partition("\n")
            funcs[name.strip()] = body
        out[src.name] = (res.stdout + res.stderr, funcs)
    return out


def test_sources_exist():
    assert any(s.name == "sm90_fp8_gemm.cu" for s in SOURCES)


def test_every_config_is_compiled(compiled):
    from leankernels._lib import C  # the scheduler's config table must match the instantiations
    _, funcs = compiled["sm90_fp8_gemm.cu"]
    built = {tuple(int(x) for x in KERNEL.search(n).groups()) for n in funcs if KERNEL.search(n)}
    want = {(bm, bn, w, s, f) for bm, bn, w, s in C().sm90_configs() for f in (0, 1)}
    assert built == want


def test_gemm_sass_has_qgmma_and_tma(compiled):
    _, funcs = compiled["sm90_fp8_gemm.cu"]
    kernels = {n: b for n, b in funcs.items() if KERNEL.search(n)}
    assert kernels
    for name, body in kernels.items():
        bm, bn, wgs, split, f32 = (int(x) for x in KERNEL.search(name).groups())
        wg_n = bn // split
        shapes = set(re.findall(r"QGMMA\.(\d+x\d+x\d+)\.F32\.E4M3\.E4M3", body))
        assert shapes == {f"64x{wg_n}x32"}, (name, shapes)
        assert len(re.findall(r"\bQGMMA\.", body)) >= 4, name  # 4 k32 steps per 128-wide K block
        assert "UTMALDG" in body, name
        assert "UTMASTG" in body, name
        assert not re.search(r"\b(STL|LDL)\b", body), f"local memory (spills) in {name}"
        if wgs == 2:
            assert "USETMAXREG" in body, name


def test_ptxas_reports_no_spills(compiled):
    for src, (log, _) in compiled.items():
        entries = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert entries, log[-2000:]
        for frame, st, ld in entries:
            assert (int(frame), int(st), int(ld)) == (0, 0, 0), f"{src}: stack/spills\n{log[-4000:]}"
        assert "C7508" not in log, f"{src}: setmaxnreg ignored\n{log}"
        assert "serialized" not in log.lower(), f"{src}: wgmma serialised\n{log}"
        # C7517/C7519: ptxas had to inject warpgroup.wait/arrive (accumulators touched unfenced)
        assert "injected" not in log, f"{src}: ptxas injected wgmma fences\n{log}"
        regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
        assert regs and max(regs) <= 255


# Every PTX wrapper of csrc/cuda/sm90/ assembled once (the GEMM kernel uses only some of them,
# and unused inline functions never reach ptxas).
WRAPPERS_CU = r"""
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"
using namespace lk::cuda::sm90;
template <int N>
__device__ void mma_all(uint64_t da, uint64_t db, float* d) { WgmmaFp8<N>::mma(da, db, d, true); }
__global__ void __launch_bounds__(384, 1) all_wrappers(const __grid_constant__ CUtensorMap map, float* out) {
  __shared__ __align__(1024) uint8_t tile[8192];
  __shared__ uint64_t bar;
  if (threadIdx.x >= 256) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 256) {
      mbar_init(&bar, 1);
      mbar_fence_init();
      tma_prefetch_map(&map);
      mbar_arrive_expect_tx(&bar, 2048);
      tma_load_2d(tile, &map, &bar, 0, 0);
      tma_load_3d(tile + 4096, &map, &bar, 0, 0, 0);
      mbar_wait(&bar, 0);
      mbar_arrive(&bar);
      fence_proxy_async_smem();
      tma_store_2d(&map, tile, 0, 0);
      tma_store_3d(&map, tile, 0, 0, 0);
      tma_store_commit();
      tma_store_wait_read<0>();
      tma_store_wait<0>();
    }
  } else {
    setmaxnreg_inc<232>();
    float d[128] = {};
    const uint64_t da = smem_desc_k128_sw128(tile), db = smem_desc_k128_sw128(tile + 4096);
    wgmma_fence();
#define LK_N(n) mma_all<n>(da, db, d);
    LK_N(16) LK_N(32) LK_N(48) LK_N(64) LK_N(80) LK_N(96) LK_N(112) LK_N(128)
    LK_N(144) LK_N(160) LK_N(176) LK_N(192) LK_N(208) LK_N(224) LK_N(240) LK_N(256)
    wgmma_commit();
    wgmma_wait<0>();
    named_barrier_sync(1, 256);
    float acc = 0.f;
    for (int i = 0; i < 128; ++i) acc += d[i];
    out[threadIdx.x] = acc;
  }
}
"""


def test_every_ptx_wrapper_assembles(tmp_path):
    src = tmp_path / "wrappers.cu"
    src.write_text(WRAPPERS_CU)
    cmd = [NVCC, "-std=c++17", "-O3", "-I", str(ROOT / "csrc"), "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
           str(src), "-o", str(tmp_path / "wrappers.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(NVDISASM), os.environ.get("PATH", "")]))
    sass = subprocess.run([CUOBJDUMP, "-sass", str(tmp_path / "wrappers.cubin")], capture_output=True, text=True,
                          env=env).stdout
    shapes = set(re.findall(r"QGMMA\.64x(\d+)x32", sass))
    assert shapes == {str(n) for n in range(16, 257, 16)}
    for op in ("UTMALDG.2D", "UTMALDG.3D", "UTMASTG.2D", "UTMASTG.3D", "UTMACCTL.PF", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK"):
        assert op in sass, op



# The portable kernels (every csrc/cuda/*.cu but the sm90_ ones), for the machine-code archs
# CMake builds them for (LEANKERNELS_CUDA_ARCHS: sm_80, sm_89): no local memory in any function.
PORTABLE = sorted(s for s in (ROOT / "csrc" / "cuda").glob("*.cu") if not s.name.startswith("sm90_"))


def _sass_functions(cubin: Path) -> dict:
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(NVDISASM), os.environ.get("PATH", "")]))
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    assert sass.returncode == 0, sass.stderr
    return {name.strip(): body for name, _, body in
            (block.partition("\n") for block in re.split(r"\n\s*Function : ", sass.stdout)[1:])}


@pytest.mark.parametrize("arch", ["80", "89"])
@pytest.mark.parametrize("src", PORTABLE, ids=[s.name for s in PORTABLE])
def test_portable_kernels_use_no_local_memory(src, arch, tmp_path):
    cubin = tmp_path / (src.stem + ".cubin")
    cmd = [NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"),
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-warn-spills", "-cubin", str(src), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr[-4000:]}"
    assert "spill" not in res.stderr, res.stderr
    funcs = _sass_functions(cubin)
    assert funcs, f"no kernels in {src.name}"
    for name, body in funcs.items():
        assert not re.search(r"\b(STL|LDL)\b", body), f"local memory (spills) in {name} for sm_{arch}"


def test_sm90_file_refuses_other_archs(tmp_path):
    """Compiled for plain sm_90 (no wgmma/setmaxnreg) the Hopper kernel would be empty and write
    nothing: the build must fail instead."""
    src = ROOT / "csrc" / "cuda" / "sm90_fp8_gemm.cu"
    cmd = [NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"),
           "-gencode=arch=compute_90,code=sm_90", "-cubin", str(src), "-o", str(tmp_path / "x.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "sm_90a only" in res.stderr, res.stderr[-2000:]
