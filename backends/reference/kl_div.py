"""kl_div in plain PyTorch; autograd differentiates it. See liger_core.operators.kl_div for the math."""

from __future__ import annotations

import torch

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    y_pred, y_true = inputs
    wide = torch.promote_types(y_pred.dtype, torch.float32)
    pred, true = y_pred.to(wide), y_true.detach().to(wide)  # no gradient to the target
    if attrs["log_target"]:
        loss = torch.exp(true) * (true - pred)
    else:
        loss = true * (torch.log(torch.clamp(true, min=attrs["eps"])) - pred)
    reduction = attrs["reduction"]
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / loss.numel()
    elif reduction == "batchmean":
        loss = loss.sum() / (y_pred.shape[0] if y_pred.dim() else 1)
    return (loss.to(y_pred.dtype),), None


KERNEL = KernelSpec(op="kl_div", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
