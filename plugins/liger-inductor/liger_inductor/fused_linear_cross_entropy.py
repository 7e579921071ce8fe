"""fused_linear_cross_entropy: compiled chunk by chunk of tokens, so the (BT, V) logits never exist at once.

The math is the reference backend's (`liger_backends.reference.cross_entropy` row helpers and its closed-form
gradient with respect to the logits). One chunk's work, from ``F.linear`` through the softmax, the loss rows and the
gradient of the logits to the chunk's input gradient, is one compiled function (`CHUNK`): Inductor fuses the
elementwise and reduction work over the (rows, V) logits into a few kernels around the two matmuls. The weight
gradient is accumulated outside it with an in-place ``addmm_`` into our own buffer, so no second (V, H) tensor is
made per chunk. The chunk's row count is a dynamic dimension: full chunks and the last, shorter one share one graph.

Autograd cannot differentiate a loop over chunks without keeping every chunk's logits, so, as in the reference:
"mean" and "sum" compute the gradients in the forward, for a unit upstream gradient, and the backward scales them;
"none" recomputes each chunk in the backward with per-row upstream gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from liger_backends.reference import cross_entropy as ce
from liger_backends.reference import fused_linear_cross_entropy as reference

from liger_core.spec import FLOAT_DTYPES

from .compiler import ALL, LEADING, CompiledFunction, chunk_rows, inductor_kernel, weight_accumulation_dtype

# The attributes the chunk math reads; the others (return_* flags, reduction, accum_dtype) stay out of its signature.
CHUNK_ATTRS = ("ignore_index", "label_smoothing", "lse_square_scale", "softcap", "use_token_scaling")


def chunk_math(args: tuple, static: dict):
    """One chunk: (scaled CE rows, z-loss rows, argmax or None, grad of x rows or None, grad of the logits in the
    weight gradient's accumulation dtype or None, grad of the bias (wide dtype) or None)."""
    x, weight, bias, target, ce_weight, ce_coefficient, z_coefficient = args
    z = ce.softcapped(F.linear(x, weight, bias), static["softcap"], static["wide"])
    rows = ce.row_terms(z, target, ce_weight, static)
    # The predicted probability of the target, a constant for the gradient (use_token_scaling).
    scale = torch.exp(-rows.nll) if static["use_token_scaling"] else None
    ce_rows = rows.ce if scale is None else rows.ce * scale
    argmax = z.argmax(dim=-1) if static["stats"] else None
    grad_x = grad_logits = grad_bias = None
    if static["want_x"] or static["want_w"] or static["want_b"]:
        coefficient = ce_coefficient if scale is None else ce_coefficient * scale
        grad = ce.logits_gradient(z, rows, ce_weight, static, coefficient, z_coefficient)
        if static["want_x"]:
            grad_x = grad.to(weight.dtype) @ weight
        if static["want_b"]:
            grad_bias = grad.sum(0)  # in the wide dtype: V values
        if static["want_w"]:
            grad_logits = grad.to(static["acc"])
    return ce_rows, rows.z_loss, argmax, grad_x, grad_logits, grad_bias


# x, target and a per-row coefficient ("none" backward) have the chunk's rows as their token dimension.
CHUNK = CompiledFunction("fused_linear_cross_entropy", chunk_math, {0: LEADING, 3: ALL, 5: ALL, 6: ALL})


def _passes(x, weight, bias, target, ce_weight, attrs, want, ce_coefficient, z_coefficient, stats, upstream=None):
    """Run every chunk; return the per-row CE and z-loss terms, the argmaxes and the accumulated gradients."""
    rows_total, vocab = x.shape[0], weight.shape[0]
    wide = torch.promote_types(x.dtype, torch.float32)
    acc = weight_accumulation_dtype(weight.dtype, attrs["accum_dtype"])
    static = {name: attrs[name] for name in CHUNK_ATTRS}
    static.update(wide=wide, acc=acc, stats=stats, want_x=want[0], want_w=want[1], want_b=want[2])
    # our own accumulators, updated in place
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=x.device) if want[1] else None
    grad_bias = torch.zeros(vocab, dtype=wide, device=x.device) if want[2] else None
    step = chunk_rows(rows_total, vocab)
    ce_rows, z_rows, argmaxes = [], [], []
    for start in range(0, max(rows_total, 1), step):
        stop = min(start + step, rows_total)
        x_chunk = x[start:stop]
        if upstream is not None:  # "none": per-row upstream gradients are the coefficients
            ce_coefficient = z_coefficient = upstream[start:stop]
        args = (x_chunk, weight, bias, target[start:stop], ce_weight, ce_coefficient, z_coefficient)
        chunk_ce, chunk_z, argmax, chunk_grad_x, grad_logits, chunk_grad_bias = CHUNK(args, static)
        ce_rows.append(chunk_ce)
        z_rows.append(chunk_z)
        argmaxes.append(argmax)
        if grad_x is not None:
            grad_x[start:stop] = chunk_grad_x
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), x_chunk.to(acc))
        if grad_bias is not None:
            grad_bias.add_(chunk_grad_bias)
        del chunk_grad_x, grad_logits, chunk_grad_bias  # before the next chunk's exist: one chunk at a time
    return ce_rows, z_rows, argmaxes, (grad_x, grad_weight, grad_bias)


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, target, bias, ce_weight = inputs
    ce_weight = None if ce_weight is None else ce_weight.detach()  # no gradient to the class weights
    vocab = weight.shape[0]
    wide = torch.promote_types(x.dtype, torch.float32)
    reduction = attrs["reduction"]
    weight_sum, count = ce.denominators(target, ce_weight, vocab, attrs["ignore_index"], wide)

    # In "mean"/"sum" the forward also computes the gradients for a unit upstream gradient.
    eager_grads = needs_grad and reduction != "none"
    want = (
        eager_grads and x.requires_grad,
        eager_grads and weight.requires_grad,
        eager_grads and bias is not None and bias.requires_grad,
    )
    ce_coefficient, z_coefficient = reference.unit_coefficients(reduction, weight_sum, count, wide, x.device)
    stats = attrs["return_token_accuracy"] or attrs["return_predicted_tokens"]
    ce_rows, z_rows, argmaxes, grads = _passes(
        x, weight, bias, target, ce_weight, attrs, want, ce_coefficient, z_coefficient, stats
    )

    outputs = reference.finish_outputs(x, target, ce_rows, z_rows, argmaxes, weight_sum, count, attrs)

    if not needs_grad:
        return outputs, None
    dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction != "none":
        return outputs, ("scale", *grads, dtypes)
    want = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return outputs, ("recompute", x, weight, target, bias, ce_weight, want, attrs, dtypes)


def backward(saved: tuple, grad_outputs: tuple) -> tuple:
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return None, None, None
    if saved[0] == "scale":
        _, grad_x, grad_weight, grad_bias, dtypes = saved
        return reference.scaled_gradients((grad_x, grad_weight, grad_bias), dtypes, grad_loss)
    _, x, weight, target, bias, ce_weight, want, attrs, dtypes = saved
    upstream = grad_loss.to(torch.promote_types(x.dtype, torch.float32))
    _, _, _, grads = _passes(x, weight, bias, target, ce_weight, attrs, want, None, None, False, upstream=upstream)
    return tuple(None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, dtypes))


KERNEL = inductor_kernel("fused_linear_cross_entropy", forward, backward, dtypes=FLOAT_DTYPES)
