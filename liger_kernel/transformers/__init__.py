"""The model kernels of liger-kernel 0.8's ``liger_kernel.transformers``, served by the liger_core dispatcher."""

from .cross_entropy import CrossEntropyOutput, LigerCrossEntropyLoss
from .functional import (
    liger_cross_entropy,
    liger_fused_linear_cross_entropy,
    liger_fused_linear_jsd,
    liger_geglu,
    liger_jsd,
    liger_kl_div,
    liger_layer_norm,
    liger_rms_norm,
    liger_rope,
    liger_swiglu,
)
from .fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
from .fused_linear_jsd import LigerFusedLinearJSD
from .geglu import LigerGEGLUMLP
from .jsd import LigerJSD
from .kl_div import LigerKLDIVLoss
from .layer_norm import LigerLayerNorm
from .rms_norm import LigerRMSNorm, LigerRMSNormForGemma, LigerRMSNormForGemma2, LigerRMSNormForGemma3
from .rope import liger_rotary_pos_emb
from .swiglu import LigerSwiGLUMLP

__all__ = [
    "LigerFusedLinearCrossEntropyLoss",
    "LigerFusedLinearJSD",
    "LigerJSD",
    "LigerKLDIVLoss",
    "liger_fused_linear_cross_entropy",
    "liger_fused_linear_jsd",
    "liger_jsd",
    "liger_kl_div",
    "CrossEntropyOutput",
    "LigerCrossEntropyLoss",
    "LigerGEGLUMLP",
    "LigerLayerNorm",
    "LigerRMSNorm",
    "LigerRMSNormForGemma",
    "LigerRMSNormForGemma2",
    "LigerRMSNormForGemma3",
    "LigerSwiGLUMLP",
    "liger_cross_entropy",
    "liger_geglu",
    "liger_layer_norm",
    "liger_rms_norm",
    "liger_rope",
    "liger_rotary_pos_emb",
    "liger_swiglu",
]
