"""DeepSeek-V3 layers on leankernels ops, and their plain-PyTorch twins (leankernels.nn.plain).

    from leankernels.nn import Fp8Linear, MoE, MLAttention
    fc = Fp8Linear.from_float(torch.nn.Linear(4096, 4096, dtype=torch.bfloat16))
"""
from .config import V3, DeepSeekConfig, rope_interleaved, rope_tables
from .layers import DecoderBlock, Fp8Linear, MLAttention, MoE, SwiGLU, slot_mapping
from . import plain

__all__ = ["DeepSeekConfig", "V3", "Fp8Linear", "MoE", "MLAttention", "DecoderBlock", "SwiGLU", "plain",
           "rope_tables", "rope_interleaved", "slot_mapping"]
