"""Fused linear cross entropy, liger-kernel 0.8 compatible: the cross entropy of ``_input @ lin_weight.T + bias``
without ever holding the whole (tokens × vocabulary) logits."""

from __future__ import annotations

import torch
from torch import nn

import liger_core
from liger_core.operators.fused_linear_cross_entropy import check_accum_dtype

from ._common import check_attr, resolve_impl
from ._distributed import gather_dtensors
from .cross_entropy import CrossEntropyOutput, check_class_weight, check_options

OP = "fused_linear_cross_entropy"


def check_fused_options(owner: str, accum_dtype, use_token_scaling, **options) -> dict:
    """The cross-entropy option checks plus those of accum_dtype and use_token_scaling."""
    checked = check_options(owner, **options)
    checked["accum_dtype"] = check_attr(OP, owner, "accum_dtype", accum_dtype)
    check_accum_dtype(owner, accum_dtype)
    checked["use_token_scaling"] = check_attr(OP, owner, "use_token_scaling", use_token_scaling)
    return checked


def fused_linear_cross_entropy(_input, lin_weight, target, bias, ce_weight, impl, attrs: dict):
    """Run the operator and apply the return convention: the loss alone unless a ``return_*`` flag is set.
    DTensor operands (e.g. an FSDP2-sharded lm_head weight) are gathered first (`gather_dtensors`)."""
    _input, lin_weight, bias, ce_weight = gather_dtensors(_input, lin_weight, bias, ce_weight)
    loss, z_loss, token_accuracy, predicted_tokens = liger_core.call(
        OP, _input, lin_weight, target, bias, ce_weight, impl=impl, **attrs
    )
    if attrs["return_z_loss"] or attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]:
        return CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)
    return loss


class LigerFusedLinearCrossEntropyLoss(nn.Module):
    """Cross entropy of the logits ``_input @ lin_weight.T + bias``, computed chunk by chunk over the tokens.

    The same loss, options and return convention as `LigerCrossEntropyLoss` (``ce_weight`` is its class weight);
    ``accum_dtype=torch.float32`` accumulates the weight gradient in float32; ``use_token_scaling=True`` multiplies
    each token's CE term (not the z-loss) by its detached predicted probability of the target. ``forward`` takes
    the weight FIRST: ``forward(lin_weight (V, H), _input (BT, H), target (BT,), bias=None)``. ``ce_weight`` is a
    non-persistent buffer: it moves with ``.to()`` and stays out of the state dict.
    """

    def __init__(
        self,
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
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        check_class_weight(name, "ce_weight", ce_weight)
        self.register_buffer("ce_weight", ce_weight, persistent=False)
        options = check_fused_options(
            name,
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
        for option, value in options.items():
            setattr(self, option, value)
        self.impl = resolve_impl(name, impl, backend)

    def forward(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ):
        attrs = {
            "ignore_index": self.ignore_index,
            "lse_square_scale": self.lse_square_scale,
            "label_smoothing": self.label_smoothing,
            "reduction": self.reduction,
            "softcap": self.softcap,
            "return_z_loss": self.return_z_loss,
            "return_token_accuracy": self.return_token_accuracy,
            "return_predicted_tokens": self.return_predicted_tokens,
            "accum_dtype": self.accum_dtype,
            "use_token_scaling": self.use_token_scaling,
        }
        return fused_linear_cross_entropy(_input, lin_weight, target, bias, self.ce_weight, self.impl, attrs)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for option in ("lse_square_scale", "label_smoothing"):
            if getattr(self, option):
                parts.append(f"{option}={getattr(self, option)}")
        for option in ("softcap", "accum_dtype"):
            if getattr(self, option) is not None:
                parts.append(f"{option}={getattr(self, option)}")
        parts += [
            f"{flag}=True"
            for flag in ("return_z_loss", "use_token_scaling", "return_token_accuracy", "return_predicted_tokens")
            if getattr(self, flag)
        ]
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
