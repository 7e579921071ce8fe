"""cross_entropy in CUDA (csrc/cross_entropy.cu): the loss, its optional outputs and the gradient with respect to
the logits in one forward; every option of the operator (class weights, ignore_index, label smoothing, z-loss,
softcap, the three reductions, token accuracy, predicted tokens).

The forward writes d loss / d logits (for a unit upstream gradient) into one fresh buffer and never the caller's
logits (API.md's in-place rule: the caller may still hold them). The backward scales that buffer by the incoming
gradient in place when eager — a no-op kernel when it is exactly 1, as for ``loss.backward()`` — and bumps its
version; under torch.compile it is an out-of-place multiply that Inductor fuses.
"""

from __future__ import annotations

import torch

from ._common import MAX_COLS, compiling, cuda_kernel, dtype_reasons, ext

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


@torch.library.custom_op("liger_cuda::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: int,
    return_z_loss: bool,
    return_token_accuracy: bool,
    return_predicted_tokens: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ext().cross_entropy_forward(
        logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction,
        return_z_loss, return_token_accuracy, return_predicted_tokens, compute_grad,
    )  # fmt: skip


@cross_entropy_forward_op.register_fake
def _(
    logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction,
    return_z_loss, return_token_accuracy, return_predicted_tokens, compute_grad,
):  # fmt: skip
    rows = logits.shape[0]
    shape = (rows,) if reduction == REDUCTIONS["none"] else ()
    loss = logits.new_empty(shape)
    z_loss = logits.new_empty(shape if return_z_loss else (0,))
    accuracy = logits.new_empty(shape if return_token_accuracy else (0,), dtype=torch.float32)
    pred = logits.new_empty((rows,) if return_predicted_tokens else (0,), dtype=torch.int64)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return loss, z_loss, accuracy, pred, grad


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    logits, target, weight = inputs
    args = (
        contiguous_rows(logits), target, None if weight is None else weight.detach(),
        attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"],
        REDUCTIONS[attrs["reduction"]], attrs["return_z_loss"], attrs["return_token_accuracy"],
        attrs["return_predicted_tokens"], needs_grad,
    )  # fmt: skip
    if compiling():
        loss, z_loss, accuracy, pred, grad = cross_entropy_forward_op(*args)
    else:
        loss, z_loss, accuracy, pred, grad = ext().cross_entropy_forward(*args)
    outputs = (
        loss,
        z_loss if attrs["return_z_loss"] else None,
        accuracy if attrs["return_token_accuracy"] else None,
        pred if attrs["return_predicted_tokens"] else None,
    )
    return outputs, ((grad,) if needs_grad else None)


def scale(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """grad (our own buffer) times upstream (a scalar, or one value per row), in place when eager."""
    if compiling():
        factor = upstream.reshape(-1, 1) if upstream.dim() > 0 else upstream
        return (grad.float() * factor.float()).to(grad.dtype)  # fp32 product, as eagerly (Inductor fuses it)
    ext().cross_entropy_scale_(grad, upstream)
    torch.autograd.graph.increment_version(grad)
    return grad


def backward(saved: tuple, grad_outputs: tuple):
    (grad,) = saved
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return (None,)
    return (scale(grad, grad_loss),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    logits, target, weight = inputs
    reasons = dtype_reasons("cross_entropy", input=logits, weight=weight)
    if logits.dim() == 2 and logits.shape[1] == 0:
        reasons.append("input has no classes (V = 0)")
    if logits.dim() == 2 and logits.shape[1] > MAX_COLS:
        reasons.append(f"vocabulary {logits.shape[1]} is over the CUDA cross_entropy's limit of {MAX_COLS}")
    if attrs.get("reduction") not in REDUCTIONS:
        reasons.append(f"reduction {attrs.get('reduction')!r} is not one of {list(REDUCTIONS)}")
    return reasons


KERNEL = cuda_kernel("cross_entropy", forward, backward, supports)
