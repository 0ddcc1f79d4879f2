"""API-compatible shims so engines written against other kernel libraries can swap imports.

    from leankernels.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache
    from leankernels.compat import deep_gemm      # fp8_gemm_nt, m_grouped_fp8_gemm_nt_{contiguous,masked}
"""
