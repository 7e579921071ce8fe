"""fused_linear_cross_entropy in plain PyTorch, chunked over tokens so the (BT, V) logits never exist at once.

See liger_core.operators.fused_linear_cross_entropy for the math; the loss terms are those of the reference
cross_entropy (its per-row helpers are called on each chunk). Autograd cannot differentiate a loop over chunks
without keeping every chunk's logits for backward, so this kernel has its own backward:

- "mean" and "sum": the forward computes, chunk by chunk, the loss and the gradient of the loss with respect to the
  chunk's logits, and accumulates from it the gradients of input (BT, H), weight (V, H) and bias (V,). The backward
  only multiplies them by the incoming scalar gradient.
- "none": the incoming gradient differs per row and is unknown in the forward, so the backward recomputes each
  chunk's logits and does the same accumulation with per-row coefficients.

Precision: the matmuls run in the input dtype (as ``F.linear`` in the model would), the softmax math in float32
(float64 for float64 inputs). Gradients are accumulated in float32, or in ``accum_dtype`` when that is wider, and
cast to each input's dtype in the backward after scaling; so ``accum_dtype=torch.float32`` is what the reference
always does. No host synchronisation: the chunking depends on shapes only and the "mean" denominators stay on the
device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_core.opaque import opaque_op
from liger_core.spec import FLOAT_DTYPES, KernelSpec, as_dtype

from . import cross_entropy as ce

# Rows per chunk are chosen so that one chunk's float32 logits take at most about this many bytes.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(rows: int, vocab: int, itemsize: int = 4, heads: int = 1) -> int:
    """How many token rows one chunk holds (at least 1), for `heads` sets of (rows, vocab) logits per chunk."""
    return max(1, min(max(rows, 1), CHUNK_BYTES // max(vocab * itemsize * heads, 1)))


def accumulation_dtype(wide: torch.dtype, accum_dtype: torch.dtype | None) -> torch.dtype:
    return wide if accum_dtype is None else torch.promote_types(wide, accum_dtype)


def _chunk(x_chunk, weight, bias, target_chunk, ce_weight, attrs, wide):
    """The logits of one chunk (softcapped, widened), its loss rows and the token-scaling factors (or None)."""
    z = ce.softcapped(F.linear(x_chunk, weight, bias), attrs["softcap"], wide)
    rows = ce.row_terms(z, target_chunk, ce_weight, attrs)
    # The predicted probability of the target, a constant for the gradient.
    scale = torch.exp(-rows.nll) if attrs["use_token_scaling"] else None
    return z, rows, scale


def _accumulators(x, weight, want: tuple, acc: torch.dtype) -> tuple:
    """Zeroed (grad_x, grad_weight, grad_bias) in the accumulation dtype, None for those not wanted."""
    return (
        torch.zeros(x.shape, dtype=acc, device=x.device) if want[0] else None,
        torch.zeros(weight.shape, dtype=acc, device=x.device) if want[1] else None,
        torch.zeros(weight.shape[0], dtype=acc, device=x.device) if want[2] else None,
    )


def _accumulate(z, rows, x_chunk, weight, ce_weight, attrs, ce_coefficient, z_coefficient, grads, start, acc):
    """Add one chunk's share to the gradient accumulators ``grads = (grad_x, grad_weight, grad_bias)`` (our own
    tensors, so they are updated in place); the chunk's rows start at row `start`."""
    grad_logits = ce.logits_gradient(z, rows, ce_weight, attrs, ce_coefficient, z_coefficient)
    grad_x, grad_weight, grad_bias = grads
    if grad_x is not None:
        grad_x[start : start + x_chunk.shape[0]] = grad_logits.to(weight.dtype) @ weight
    grad_logits = grad_logits.to(acc)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), x_chunk.to(acc))
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


def unit_coefficients(reduction: str, weight_sum, count, wide: torch.dtype, device) -> tuple:
    """d loss / d (CE term, z-loss term) of one row for a unit upstream gradient: 1 / the class-weight sum and
    1 / the count of counted rows for "mean" (0 when there are none), 1 for "sum" and "none"."""
    if reduction == "mean":
        return ce.safe_divide(torch.ones_like(weight_sum), weight_sum), ce.safe_divide(torch.ones_like(count), count)
    one = torch.ones((), dtype=wide, device=device)
    return one, one


def scaled_gradients(grads: tuple, dtypes: tuple, grad_loss: torch.Tensor) -> tuple:
    """Gradients computed in the forward for a unit upstream gradient, times the incoming scalar one, each cast to
    its input's dtype (None stays None)."""
    return tuple(
        None if grad is None else (grad * grad_loss.to(grad.dtype)).to(dtype) for grad, dtype in zip(grads, dtypes)
    )


def finish_outputs(x, target, ce_rows, z_rows, argmaxes, weight_sum, count, attrs: dict) -> tuple:
    """(loss, z_loss, token_accuracy, predicted_tokens) from the chunks' per-row terms (and argmaxes when asked).
    The loss is float32 (float64 for float64 inputs), as Hugging Face's: see the operator's docstring."""
    loss_out, z_out = ce.reduce_rows(
        torch.cat(ce_rows), torch.cat(z_rows), weight_sum, count, attrs["reduction"], attrs["lse_square_scale"]
    )
    loss_dtype = torch.promote_types(x.dtype, torch.float32)
    z_loss = z_out.to(loss_dtype) if attrs["return_z_loss"] else None
    token_accuracy = predicted = None
    if attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]:
        token_accuracy, predicted = ce.token_stats(
            torch.cat(argmaxes), target, target != attrs["ignore_index"], count, attrs
        )
    return (as_dtype(loss_out, loss_dtype), z_loss, token_accuracy, predicted)


def _forward_pass(x, weight, target, bias, ce_weight, attrs: dict, want: tuple) -> tuple[tuple, tuple]:
    """(outputs, (grad_x, grad_weight, grad_bias)): the loss and its optional outputs, and for "mean"/"sum" the
    gradients for a unit upstream gradient of the inputs in `want` (None for the others), in the accumulation
    dtype."""
    rows_total, vocab = x.shape[0], weight.shape[0]
    wide = torch.promote_types(x.dtype, torch.float32)
    acc = accumulation_dtype(wide, attrs["accum_dtype"])
    reduction = attrs["reduction"]
    weight_sum, count = ce.denominators(target, ce_weight, vocab, attrs["ignore_index"], wide)
    # In "mean"/"sum" the forward also computes the gradients for a unit upstream gradient.
    want = want if reduction != "none" else (False, False, False)
    grads = _accumulators(x, weight, want, acc)
    ce_coefficient, z_coefficient = unit_coefficients(reduction, weight_sum, count, wide, x.device)

    step = chunk_rows(rows_total, vocab)
    ce_rows, z_rows, argmaxes = [], [], []
    stats = attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]
    for start in range(0, max(rows_total, 1), step):
        x_chunk, target_chunk = x[start : start + step], target[start : start + step]
        z, rows, scale = _chunk(x_chunk, weight, bias, target_chunk, ce_weight, attrs, wide)
        ce_rows.append(rows.ce if scale is None else rows.ce * scale)
        z_rows.append(rows.z_loss)
        if stats:
            argmaxes.append(z.argmax(dim=-1))
        if any(want):
            chunk_coefficient = ce_coefficient if scale is None else ce_coefficient * scale
            _accumulate(z, rows, x_chunk, weight, ce_weight, attrs, chunk_coefficient, z_coefficient, grads, start, acc)
        del z, rows  # before the next chunk's logits exist: one chunk at a time
    return finish_outputs(x, target, ce_rows, z_rows, argmaxes, weight_sum, count, attrs), grads


def _forward_tensors(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    ignore_index: int,
    lse_square_scale: float,
    label_smoothing: float,
    reduction: str,
    softcap: float | None,
    return_z_loss: bool,
    return_token_accuracy: bool,
    return_predicted_tokens: bool,
    accum_dtype: torch.dtype | None,
    use_token_scaling: bool,
    want_x: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_forward_pass` with its outputs all tensors (empty for the Nones), for the opaque op below. Under
    torch.compile the chunk loop runs as that op: the same code as eager mode, and no recompilation at each new number
    of tokens (liger_core.opaque). (Traced instead, it gave all-zero gradients with a right loss on torch 2.11 CUDA,
    a bug not isolated.)"""
    attrs = dict(
        ignore_index=ignore_index, lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
        reduction=reduction, softcap=softcap, return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
        accum_dtype=accum_dtype, use_token_scaling=use_token_scaling,
    )  # fmt: skip
    outputs, grads = _forward_pass(x, weight, target, bias, ce_weight, attrs, (want_x, want_weight, want_bias))
    # One empty tensor per missing output: the outputs of a custom op may not alias one another.
    return tuple(x.new_empty((0,)) if t is None else t for t in (*outputs, *grads))


# Pure PyTorch: it runs on fake tensors as it is.
_forward_op = opaque_op("liger_reference::fused_linear_cross_entropy_forward", _forward_tensors)


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, target, bias, ce_weight = inputs
    ce_weight = None if ce_weight is None else ce_weight.detach()  # no gradient to the class weights
    want = (
        needs_grad and x.requires_grad,
        needs_grad and weight.requires_grad,
        needs_grad and bias is not None and bias.requires_grad,
    )
    if torch.compiler.is_compiling():
        results = _forward_op(
            x, weight, target, bias, ce_weight, **attrs, want_x=want[0], want_weight=want[1], want_bias=want[2]
        )
        asked = (True, attrs["return_z_loss"], attrs["return_token_accuracy"], attrs["return_predicted_tokens"])
        outputs = tuple(out if wanted else None for out, wanted in zip(results[:4], asked))
        eager_grads = attrs["reduction"] != "none"
        grads = tuple(grad if wanted and eager_grads else None for grad, wanted in zip(results[4:], want))
    else:
        outputs, grads = _forward_pass(x, weight, target, bias, ce_weight, attrs, want)

    if not needs_grad:
        return outputs, None
    if attrs["reduction"] != "none":
        dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return outputs, ("scale", *grads, dtypes)
    return outputs, ("recompute", x, weight, target, bias, ce_weight, want, attrs)


def backward(saved: tuple, grad_outputs: tuple) -> tuple:
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return None, None, None
    if saved[0] == "scale":
        _, grad_x, grad_weight, grad_bias, dtypes = saved
        return scaled_gradients((grad_x, grad_weight, grad_bias), dtypes, grad_loss)
    _, x, weight, target, bias, ce_weight, want, attrs = saved
    rows_total, vocab = x.shape[0], weight.shape[0]
    wide = torch.promote_types(x.dtype, torch.float32)
    acc = accumulation_dtype(wide, attrs["accum_dtype"])
    grads = _accumulators(x, weight, want, acc)
    step = chunk_rows(rows_total, vocab)
    for start in range(0, max(rows_total, 1), step):
        x_chunk, target_chunk = x[start : start + step], target[start : start + step]
        z, rows, scale = _chunk(x_chunk, weight, bias, target_chunk, ce_weight, attrs, wide)
        upstream = grad_loss[start : start + step].to(wide)
        ce_coefficient = upstream if scale is None else upstream * scale
        _accumulate(z, rows, x_chunk, weight, ce_weight, attrs, ce_coefficient, upstream, grads, start, acc)
        del z, rows  # one chunk at a time, as in the forward
    dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    return tuple(None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, dtypes))


KERNEL = KernelSpec(
    op="fused_linear_cross_entropy", forward=forward, backward=backward, dtypes=FLOAT_DTYPES + (torch.float64,)
)
