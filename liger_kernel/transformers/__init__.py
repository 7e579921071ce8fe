"""The model kernels of liger-kernel 0.8's ``liger_kernel.transformers``, served by the liger_core dispatcher."""

from .cross_entropy import CrossEntropyOutput, LigerCrossEntropyLoss
from .functional import liger_cross_entropy, liger_rms_norm
from .rms_norm import LigerRMSNorm, LigerRMSNormForGemma, LigerRMSNormForGemma2, LigerRMSNormForGemma3

__all__ = [
    "CrossEntropyOutput",
    "LigerCrossEntropyLoss",
    "LigerRMSNorm",
    "LigerRMSNormForGemma",
    "LigerRMSNormForGemma2",
    "LigerRMSNormForGemma3",
    "liger_cross_entropy",
    "liger_rms_norm",
]
