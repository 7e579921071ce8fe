"""`AutoLigerKernelForCausalLM`: transformers' ``AutoModelForCausalLM`` that patches what it loads."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from .monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance, patcher_options


def _split_options(kwargs: dict) -> dict:
    """Pop the patcher options (rope, rms_norm, swiglu, ...) out of `kwargs`; the rest goes to transformers."""
    names = {name for model_type in MODEL_TYPE_TO_APPLY_LIGER_FN for name in patcher_options(model_type)}
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}


class AutoLigerKernelForCausalLM(AutoModelForCausalLM):
    """``AutoModelForCausalLM`` whose ``from_pretrained`` and ``from_config`` patch the model they build with the
    liger_kernel patcher of its ``config.model_type`` (in place, keeping the loaded weights; the classes of
    transformers are left alone). The patcher options (``rope=``, ``rms_norm=``, ``swiglu=``/``geglu=``,
    ``cross_entropy=``, ``fused_linear_cross_entropy=``) may be passed along with transformers' own arguments. An
    unsupported model type is loaded unpatched, with a warning listing the supported ones."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        options = _split_options(kwargs)
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        _apply_liger_kernel_to_instance(model, **options)
        return model

    @classmethod
    def from_config(cls, config, **kwargs):
        options = _split_options(kwargs)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        _apply_liger_kernel_to_instance(model, **options)
        return model
