"""cross_entropy in plain PyTorch; autograd differentiates it. See liger_core.operators.cross_entropy for the math.

The forward is built from per-row pieces (`softcapped`, `row_terms`, `denominators`, `reduce_rows`, `token_stats`)
that the fused-linear cross entropy reuses chunk by chunk, together with `logits_gradient`, the closed-form gradient
of those rows with respect to the logits (the fused-linear kernel cannot let autograd keep every chunk's logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from liger_core.spec import FLOAT_DTYPES, KernelSpec


class Rows(NamedTuple):
    """Per-row terms of the loss of one block of rows."""

    ce: torch.Tensor  # class-weighted, label-smoothed CE; 0 at ignored rows, NaN at out-of-range targets
    z_loss: torch.Tensor  # s·lse², 0 at ignored rows
    nll: torch.Tensor  # lse - z[target]: -log p(target), unweighted
    lse: torch.Tensor
    counted: torch.Tensor  # target != ignore_index
    valid: torch.Tensor  # counted and the target in [0, V)
    safe_target: torch.Tensor  # the target, 0 where out of range (so that gathers stay in bounds)
    target_weight: torch.Tensor  # weight[target], 1 without class weights


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # 0 rather than NaN when nothing counts (every row ignored), also in the gradient.
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def softcapped(logits: torch.Tensor, softcap: float | None, wide: torch.dtype) -> torch.Tensor:
    """The logits in the computing dtype, mapped to ``c·tanh(x/c)`` when a softcap is given."""
    z = logits.to(wide)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _target_weight(target: torch.Tensor, weight: torch.Tensor | None, vocab: int, wide: torch.dtype):
    in_range = (target >= 0) & (target < vocab)
    safe_target = torch.where(in_range, target, torch.zeros_like(target))
    if weight is None:
        return in_range, safe_target, torch.ones(target.shape, dtype=wide, device=target.device)
    return in_range, safe_target, weight.to(wide)[safe_target]


def row_terms(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, attrs: dict) -> Rows:
    """The loss terms of each row of the (softcapped, widened) logits `z`."""
    ignore_index, smoothing, z_scale = attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"]
    vocab = z.shape[1]
    lse = torch.logsumexp(z, dim=-1)
    counted = target != ignore_index
    in_range, safe_target, target_weight = _target_weight(target, weight, vocab, z.dtype)
    nll = lse - z.gather(1, safe_target.unsqueeze(1)).squeeze(1)

    loss = (1.0 - smoothing) * target_weight * nll
    if smoothing > 0:
        # sum over classes c of weight_c * -log p_c, with -log p_c = lse - z_c
        if weight is None:
            smooth = vocab * lse - z.sum(-1)
        else:
            class_weight = weight.to(z.dtype)
            smooth = lse * class_weight.sum() - (z * class_weight).sum(-1)
        loss = loss + (smoothing / vocab) * smooth
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    # An out-of-range class poisons the loss instead of reading out of bounds.
    loss = torch.where(in_range | ~counted, loss, torch.full_like(loss, float("nan")))
    z_rows = torch.where(counted, z_scale * lse.pow(2), torch.zeros_like(lse))
    return Rows(loss, z_rows, nll, lse, counted, counted & in_range, safe_target, target_weight)


def denominators(target: torch.Tensor, weight: torch.Tensor | None, vocab: int, ignore_index: int, wide: torch.dtype):
    """(sum of the class weights of the counted rows, count of counted rows): what "mean" divides by. They need the
    targets only, so a chunked caller gets them before seeing any logits; both stay on the device."""
    counted = target != ignore_index
    _, _, target_weight = _target_weight(target, weight, vocab, wide)
    return (target_weight * counted).sum(), counted.sum().to(wide)


def reduce_rows(
    ce: torch.Tensor, z_rows: torch.Tensor, weight_sum: torch.Tensor, count: torch.Tensor, reduction: str, z_scale
):
    """(loss, z_loss) of the whole batch from its per-row terms; the z-loss is included in the loss when s > 0."""
    if reduction == "mean":
        loss_out = safe_divide(ce.sum(), weight_sum)
        z_out = safe_divide(z_rows.sum(), count)
    elif reduction == "sum":
        loss_out, z_out = ce.sum(), z_rows.sum()
    else:
        loss_out, z_out = ce, z_rows
    if z_scale > 0:
        loss_out = loss_out + z_out
    return loss_out, z_out


def token_stats(argmax: torch.Tensor, target: torch.Tensor, counted: torch.Tensor, count: torch.Tensor, attrs: dict):
    """(token_accuracy, predicted_tokens) as asked by the return_* flags, else None."""
    token_accuracy = predicted = None
    if attrs["return_token_accuracy"]:
        correct = ((argmax == target) & counted).to(torch.float32)
        token_accuracy = correct if attrs["reduction"] == "none" else safe_divide(correct.sum(), count.float())
    if attrs["return_predicted_tokens"]:
        predicted = torch.where(counted, argmax, torch.full_like(argmax, -1))
    return token_accuracy, predicted


def logits_gradient(
    z: torch.Tensor,
    rows: Rows,
    weight: torch.Tensor | None,
    attrs: dict,
    ce_coefficient: torch.Tensor,
    z_coefficient: torch.Tensor,
) -> torch.Tensor:
    """d/d(logits) of ``sum(ce_coefficient · rows.ce + z_coefficient · rows.z_loss)``, the logits taken before the
    softcap; the coefficients are per row (or scalars). Rows that do not count, or whose target is out of range,
    contribute nothing through the CE term, as autograd of `row_terms` gives."""
    smoothing, z_scale, softcap = attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"]
    vocab = z.shape[1]
    probs = torch.exp(z - rows.lse.unsqueeze(1))
    ce_scale = torch.where(rows.valid, ce_coefficient, torch.zeros_like(rows.lse))
    # (1 - ε)·w_t·(p - onehot(t))
    target_scale = ((1.0 - smoothing) * rows.target_weight * ce_scale).unsqueeze(1)
    grad = probs * target_scale
    grad = grad.scatter_add(1, rows.safe_target.unsqueeze(1), -target_scale)
    if smoothing > 0:
        # (ε/V)·(Σ_c w_c · p - w), with w = 1 without class weights
        if weight is None:
            grad = grad + (smoothing * ce_scale).unsqueeze(1) * (probs - 1.0 / vocab)
        else:
            class_weight = weight.to(z.dtype)
            grad = grad + ((smoothing / vocab) * ce_scale).unsqueeze(1) * (probs * class_weight.sum() - class_weight)
    if z_scale > 0:
        z_scale_rows = torch.where(rows.counted, 2.0 * z_scale * rows.lse * z_coefficient, torch.zeros_like(rows.lse))
        grad = grad + z_scale_rows.unsqueeze(1) * probs
    if softcap is not None:
        grad = grad * (1.0 - (z / softcap).pow(2))
    return grad


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    logits, target, weight = inputs
    wide = torch.promote_types(logits.dtype, torch.float32)
    z = softcapped(logits, attrs["softcap"], wide)
    rows = row_terms(z, target, weight, attrs)
    weight_sum = (rows.target_weight * rows.counted).sum()
    count = rows.counted.sum().to(wide)
    loss_out, z_out = reduce_rows(
        rows.ce, rows.z_loss, weight_sum, count, attrs["reduction"], attrs["lse_square_scale"]
    )

    z_loss = z_out.detach().to(logits.dtype) if attrs["return_z_loss"] else None
    token_accuracy = predicted = None
    if attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]:
        token_accuracy, predicted = token_stats(z.detach().argmax(dim=-1), target, rows.counted, count, attrs)
    return (loss_out.to(logits.dtype), z_loss, token_accuracy, predicted), None


KERNEL = KernelSpec(op="cross_entropy", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
