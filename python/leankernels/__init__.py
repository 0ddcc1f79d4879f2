"""leankernels: DeepSeek-V3-style efficiency kernels as PyTorch ops.

FP8 block-scaled quantization and GEMMs, MoE routing, and MLA over a paged latent cache,
each as a C++ CPU kernel and CUDA kernels behind torch.library ops (eager, torch.compile,
CUDA graphs). See README.md for the API and measured figures.
"""
__version__ = "0.1.0"

from ._lib import build_info, cpu_path, cpu_paths, cuda_available, set_cpu_path  # noqa: E402
from .quant import dequantize_fp8, quantize_fp8, quantize_fp8_transposed, silu_mul_quantize_fp8  # noqa: E402
from .routing import RoutePlan, permute, plan, route, unpermute, update_bias  # noqa: E402
from .mla import LatentCache, PagedLatentCache, mla_append, mla_decode  # noqa: E402
from .gemm import fp8_gemm, fp8_grouped_gemm, fp8_grouped_gemm_masked, fp8_k_grouped_gemm  # noqa: E402
from .linear import fp8_grouped_linear, fp8_linear  # noqa: E402
from .memory import to_hugepages  # noqa: E402
from . import nn, reference  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "cuda_available",
    "cpu_path",
    "cpu_paths",
    "set_cpu_path",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_fp8_transposed",
    "silu_mul_quantize_fp8",
    "route",
    "plan",
    "permute",
    "unpermute",
    "update_bias",
    "RoutePlan",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_masked",
    "fp8_linear",
    "fp8_grouped_linear",
    "fp8_k_grouped_gemm",
    "to_hugepages",
    "reference",
    "nn",
    "LatentCache",
    "PagedLatentCache",
    "mla_append",
    "mla_decode",
]
