"""Cross entropy, liger-kernel 0.8 compatible: ``F.cross_entropy`` plus softcap, z-loss and token statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import liger_core
from liger_core.operators.cross_entropy import check_options as check_loss_options

from ._common import check_attr, resolve_impl


@dataclass
class CrossEntropyOutput:
    """What the cross-entropy losses return when a ``return_*`` flag is set; ``None`` for what was not asked."""

    loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def check_class_weight(owner: str, argument: str, weight) -> None:
    """A class-weight argument is None or a 1-D floating-point tensor (its length is checked at the call)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{owner}: {argument!r} must be a 1-D tensor of class weights or None, got {type(weight)}")
    if weight.dim() != 1:
        raise ValueError(f"{owner}: {argument!r} must be 1-D (one weight per class), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{owner}: {argument!r} must be a floating-point tensor, got {weight.dtype}")


def check_options(owner: str, **options) -> dict:
    """Type, choice and range checks of the cross-entropy options, so that a bad one fails before any data."""
    checked = {name: check_attr("cross_entropy", owner, name, value) for name, value in options.items()}
    check_loss_options(owner, checked)  # the operator's own range checks, run now rather than at the first call
    return checked


def cross_entropy(_input, target, weight, impl, attrs: dict):
    """Run the operator and apply the return convention: the loss alone unless a ``return_*`` flag is set."""
    loss, z_loss, token_accuracy, predicted_tokens = liger_core.call(
        "cross_entropy", _input, target, weight, impl=impl, **attrs
    )
    if attrs["return_z_loss"] or attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]:
        return CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)
    return loss


class LigerCrossEntropyLoss(nn.Module):
    """Hard-label cross entropy over ``_input (BT, V)`` logits and ``target (BT,)`` classes.

    Equal to ``F.cross_entropy`` with the same ``weight``, ``ignore_index``, ``label_smoothing`` and ``reduction``;
    ``softcap=c`` maps the logits to ``c·tanh(x/c)`` first; ``lse_square_scale=s`` adds the z-loss ``s·lse²``.
    Returns the loss, or a `CrossEntropyOutput` when a ``return_*`` flag is set. ``weight`` is a buffer, so it moves
    with ``.to()``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        check_class_weight(name, "weight", weight)
        self.register_buffer("weight", weight)
        options = check_options(
            name,
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

    @property
    def ce_weight(self) -> torch.Tensor | None:  # the name LigerFusedLinearCrossEntropyLoss uses
        return self.weight

    def forward(self, _input: torch.Tensor, target: torch.Tensor):
        attrs = {
            "ignore_index": self.ignore_index,
            "lse_square_scale": self.lse_square_scale,
            "label_smoothing": self.label_smoothing,
            "reduction": self.reduction,
            "softcap": self.softcap,
            "return_z_loss": self.return_z_loss,
            "return_token_accuracy": self.return_token_accuracy,
            "return_predicted_tokens": self.return_predicted_tokens,
        }
        return cross_entropy(_input, target, self.weight, self.impl, attrs)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for option in ("lse_square_scale", "label_smoothing"):
            if getattr(self, option):
                parts.append(f"{option}={getattr(self, option)}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        parts += [
            f"{flag}=True"
            for flag in ("return_z_loss", "return_token_accuracy", "return_predicted_tokens")
            if getattr(self, flag)
        ]
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
