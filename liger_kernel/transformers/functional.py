"""Functional forms of the public operators (liger-kernel 0.8's ``liger_kernel.transformers.functional``)."""

from __future__ import annotations

import torch

import liger_core

from .cross_entropy import CrossEntropyOutput, check_options, cross_entropy
from .fused_linear_cross_entropy import check_fused_options, fused_linear_cross_entropy
from .fused_linear_jsd import check_fused_jsd_options, fused_linear_jsd
from .jsd import check_beta
from .rope import liger_rotary_pos_emb


def liger_rms_norm(
    X: torch.Tensor,
    W: torch.Tensor | None,
    eps: float,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = True,
) -> torch.Tensor:
    """``X * rsqrt(mean(X², -1) + eps) * (offset + W)`` in X's dtype; see `LigerRMSNorm` for ``casting_mode``."""
    return liger_core.call("rms_norm", X, W, eps=eps, offset=offset, casting_mode=casting_mode, in_place=in_place)


def liger_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    """`LigerCrossEntropyLoss` as a function. ``size_average`` and ``reduce`` are accepted and ignored (as 0.8.5)."""
    attrs = check_options(
        "liger_cross_entropy",
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        label_smoothing=label_smoothing,
        reduction=reduction,
        softcap=softcap,
        return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens,
    )
    return cross_entropy(input, target, weight, None, attrs)


def liger_fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype | None = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    chunk_mem_const: int = 1,
) -> torch.Tensor | CrossEntropyOutput:
    """`LigerFusedLinearCrossEntropyLoss` as a function, INPUT first (the module takes the weight first).

    ``chunk_mem_const`` is accepted for signature compatibility and ignored: how the tokens are chunked is the
    backend's business.
    """
    attrs = check_fused_options(
        "liger_fused_linear_cross_entropy",
        accum_dtype=accum_dtype,
        use_token_scaling=use_token_scaling,
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        label_smoothing=label_smoothing,
        reduction=reduction,
        softcap=softcap,
        return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens,
    )
    return fused_linear_cross_entropy(input, weight, target, bias, ce_weight, None, attrs)


def liger_kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=True,
    reduce=True,
    reduction: str = "mean",
    log_target: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """`LigerKLDIVLoss` as a function. ``size_average`` and ``reduce`` are accepted and ignored (as 0.8.5)."""
    return liger_core.call("kl_div", input, target, reduction=reduction, log_target=log_target, eps=eps)


def liger_jsd(
    input: torch.Tensor,
    target: torch.Tensor,
    shift_labels: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`LigerJSD` as a function: ``input`` the student's log-probabilities, ``target`` the teacher's."""
    beta = check_beta("liger_jsd", "beta", "jsd", "beta", beta)
    return liger_core.call("jsd", input, target, shift_labels, beta=beta, ignore_index=ignore_index)


def liger_fused_linear_jsd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    shift_labels: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`LigerFusedLinearJSD` as a function."""
    attrs = check_fused_jsd_options("liger_fused_linear_jsd", jsd_beta, ignore_index, temperature, accum_dtype)
    return fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels, **attrs)


def liger_layer_norm(X: torch.Tensor, W: torch.Tensor, B: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm(X, X.shape[-1:], W, B, eps)`` computed in fp32, returned in X's dtype."""
    return liger_core.call("layer_norm", X, W, B, eps=eps)


def liger_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids=None,
    unsqueeze_dim: int = 1,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`liger_rotary_pos_emb`: Hugging Face's ``apply_rotary_pos_emb``, optionally on the first ``rotary_dim``
    features only; ``position_ids`` is accepted and unused."""
    return liger_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim, rotary_dim)


def liger_swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` computed in fp32, returned in a's dtype."""
    return liger_core.call("swiglu", a, b)


def liger_geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``gelu(a, approximate="tanh") * b`` computed in fp32, returned in a's dtype."""
    return liger_core.call("geglu", a, b)
