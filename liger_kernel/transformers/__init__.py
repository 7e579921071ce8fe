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
from .monkey_patch import (
    MODEL_TYPE_TO_APPLY_LIGER_FN,
    _apply_liger_kernel_to_instance,
    apply_liger_kernel_to_gemma,
    apply_liger_kernel_to_gemma2,
    apply_liger_kernel_to_llama,
    apply_liger_kernel_to_mistral,
    apply_liger_kernel_to_mixtral,
    apply_liger_kernel_to_phi3,
    apply_liger_kernel_to_qwen2,
    apply_liger_kernel_to_qwen3,
)
from .rms_norm import LigerRMSNorm, LigerRMSNormForGemma, LigerRMSNormForGemma2, LigerRMSNormForGemma3
from .rope import liger_rotary_pos_emb
from .swiglu import LigerPhi3SwiGLUMLP, LigerSwiGLUMLP

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

# Hugging Face integration (transformers is imported only when AutoLigerKernelForCausalLM is asked for)
__all__ += [
    "AutoLigerKernelForCausalLM",
    "LigerPhi3SwiGLUMLP",
    "MODEL_TYPE_TO_APPLY_LIGER_FN",
    "_apply_liger_kernel_to_instance",
    "apply_liger_kernel_to_gemma",
    "apply_liger_kernel_to_gemma2",
    "apply_liger_kernel_to_llama",
    "apply_liger_kernel_to_mistral",
    "apply_liger_kernel_to_mixtral",
    "apply_liger_kernel_to_phi3",
    "apply_liger_kernel_to_qwen2",
    "apply_liger_kernel_to_qwen3",
]


def __getattr__(name):
    if name == "AutoLigerKernelForCausalLM":
        from .auto_model import AutoLigerKernelForCausalLM

        return AutoLigerKernelForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
