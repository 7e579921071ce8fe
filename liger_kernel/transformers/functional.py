"""Functional forms of the public operators (liger-kernel 0.8's ``liger_kernel.transformers.functional``)."""

from __future__ import annotations

import torch

import liger_core

from .cross_entropy import CrossEntropyOutput, check_options, cross_entropy


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
