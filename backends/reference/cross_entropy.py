"""cross_entropy in plain PyTorch; autograd differentiates it. See liger_core.operators.cross_entropy for the math."""

from __future__ import annotations

import torch

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # 0 rather than NaN when nothing counts (every row ignored), also in the gradient.
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    logits, target, weight = inputs
    ignore_index, smoothing, reduction = attrs["ignore_index"], attrs["label_smoothing"], attrs["reduction"]
    z_scale, softcap = attrs["lse_square_scale"], attrs["softcap"]
    vocab = logits.shape[1]
    wide = torch.promote_types(logits.dtype, torch.float32)

    z = logits.to(wide)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe_target = torch.where(in_range, target, torch.zeros_like(target))
    nll = lse - z.gather(1, safe_target.unsqueeze(1)).squeeze(1)

    target_weight = weight.to(wide)[safe_target] if weight is not None else torch.ones_like(nll)
    loss = (1.0 - smoothing) * target_weight * nll
    if smoothing > 0:
        # sum over classes c of weight_c * -log p_c, with -log p_c = lse - z_c
        if weight is None:
            smooth = vocab * lse - z.sum(-1)
        else:
            class_weight = weight.to(wide)
            smooth = lse * class_weight.sum() - (z * class_weight).sum(-1)
        loss = loss + (smoothing / vocab) * smooth
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    # An out-of-range class poisons the loss instead of reading out of bounds.
    loss = torch.where(in_range | ~counted, loss, torch.full_like(loss, float("nan")))
    z_rows = torch.where(counted, z_scale * lse.pow(2), torch.zeros_like(lse))

    count = counted.sum().to(wide)
    if reduction == "mean":
        loss_out = _safe_divide(loss.sum(), (target_weight * counted).sum())
        z_out = _safe_divide(z_rows.sum(), count)
    elif reduction == "sum":
        loss_out, z_out = loss.sum(), z_rows.sum()
    else:
        loss_out, z_out = loss, z_rows
    if z_scale > 0:
        loss_out = loss_out + z_out

    z_loss = z_out.detach().to(logits.dtype) if attrs["return_z_loss"] else None
    token_accuracy = predicted = None
    if attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]:
        argmax = z.detach().argmax(dim=-1)
        if attrs["return_token_accuracy"]:
            correct = ((argmax == target) & counted).to(torch.float32)
            token_accuracy = correct if reduction == "none" else _safe_divide(correct.sum(), count.float())
        if attrs["return_predicted_tokens"]:
            predicted = torch.where(counted, argmax, torch.full_like(argmax, -1))
    return (loss_out.to(logits.dtype), z_loss, token_accuracy, predicted), None


KERNEL = KernelSpec(op="cross_entropy", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
