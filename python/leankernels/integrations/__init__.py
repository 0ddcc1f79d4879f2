"""Integrations of leankernels with model libraries.

``leankernels.integrations.transformers``: Hugging Face transformers (>= 5.13). Importing it
registers the ``"leankernels"`` experts implementation, so
``from_pretrained(..., experts_implementation="leankernels")`` runs MoE experts on the
FP8 grouped GEMM and the routing ops; ``patch_deepseek(model)`` also swaps DeepSeek-V2/V3's
router and attention (latent cache + ``mla_decode``). Nothing here is imported by
``import leankernels``: transformers stays an optional dependency.
"""
