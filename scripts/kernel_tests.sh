# The test files that exercise the CPU kernels (sourced by .ci/run and scripts/sanitize.sh):
# what runs again on every other CPU path, forced with LEANKERNELS_CPU. The rest of the suite
# (the bench runner, CLI, transformers, training loop, distributed, import and memory checks)
# drives the same kernels through these ops and runs once, on the best path.
# tests/test_gemm_cpu_paths.py is not listed: it switches paths inside one process itself.
KERNEL_TESTS="tests/test_quant.py tests/test_gemm.py tests/test_train_kernels.py tests/test_routing.py tests/test_mla.py tests/test_nn.py
  tests/test_hostile_inputs.py tests/test_compat_deep_gemm.py tests/test_compat_flash_mla.py tests/test_linear.py"
