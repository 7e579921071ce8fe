"""fused_linear_jsd: compiled chunk by chunk of tokens, so neither (BT, V) logits exists at once.

The math is the reference backend's (`liger_backends.reference.jsd`: the divergence of each row and its closed-form
gradient with respect to the student's log-probabilities). One chunk, from both ``F.linear``s through the two
log-softmaxes, the divergence rows and the gradient of the student's logits to the chunk's input gradient, is one
compiled function; the student weight's gradient is accumulated outside it with an in-place ``addmm_``. The loss is a
scalar, so the forward computes the gradients for a unit upstream gradient and the backward scales them. The
teacher gets no gradient and is never tracked by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from liger_backends.reference import fused_linear_jsd as reference_fljsd
from liger_backends.reference import jsd
from liger_backends.reference.cross_entropy import safe_divide

from liger_core.spec import FLOAT_DTYPES, as_dtype

from .compiler import ALL, LEADING, CompiledFunction, chunk_rows, inductor_kernel, weight_accumulation_dtype


def chunk_math(args: tuple, static: dict):
    """One chunk: (divergence rows, grad of the student input rows or None, grad of the student logits in the weight
    gradient's accumulation dtype or None)."""
    x, weight, teacher_x, teacher_weight, row_coefficient = args
    wide, beta, temperature = static["wide"], static["beta"], static["temperature"]
    log_q = torch.log_softmax(F.linear(x, weight).to(wide) / temperature, dim=-1)
    log_p = torch.log_softmax(F.linear(teacher_x, teacher_weight).to(wide) / temperature, dim=-1)
    losses = jsd.jsd_rows(log_q, log_p, beta)
    grad_x = grad_logits = None
    if static["want_x"] or static["want_w"]:
        grad_log_q = jsd.jsd_log_q_gradient(log_q, log_p, beta) * row_coefficient[:, None]
        # through log_softmax, then the division by the temperature
        grad = (grad_log_q - torch.exp(log_q) * grad_log_q.sum(-1, keepdim=True)) / temperature
        if static["want_x"]:
            grad_x = grad.to(weight.dtype) @ weight
        if static["want_w"]:
            grad_logits = grad.to(static["acc"])
    return losses, grad_x, grad_logits


CHUNK = CompiledFunction("fused_linear_jsd", chunk_math, {0: LEADING, 2: LEADING, 4: ALL})


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    teacher_input, teacher_weight = teacher_input.detach(), teacher_weight.detach()
    rows_total, vocab = student_input.shape[0], student_weight.shape[0]
    wide = torch.promote_types(student_input.dtype, torch.float32)
    acc = weight_accumulation_dtype(student_weight.dtype, attrs["accum_dtype"])
    counted = jsd.labelled(shift_labels, rows_total, attrs["ignore_index"], student_input.device)
    row_coefficient = safe_divide(counted.to(wide), counted.sum().to(wide))  # d loss / d row loss

    want_x = needs_grad and student_input.requires_grad
    want_w = needs_grad and student_weight.requires_grad
    static = {
        "beta": attrs["jsd_beta"],
        "temperature": attrs["temperature"],
        "wide": wide,
        "acc": acc,
        "want_x": want_x,
        "want_w": want_w,
    }
    # our own accumulators, updated in place
    grad_x = torch.empty_like(student_input, memory_format=torch.contiguous_format) if want_x else None
    grad_weight = torch.zeros(student_weight.shape, dtype=acc, device=student_input.device) if want_w else None

    step = chunk_rows(rows_total, vocab, heads=2)  # a student and a teacher block of logits per chunk
    losses = []
    for start in range(0, max(rows_total, 1), step):
        stop = min(start + step, rows_total)
        x_chunk = student_input[start:stop]
        args = (x_chunk, student_weight, teacher_input[start:stop], teacher_weight, row_coefficient[start:stop])
        chunk_losses, chunk_grad_x, grad_logits = CHUNK(args, static)
        losses.append(chunk_losses)
        if want_x:
            grad_x[start:stop] = chunk_grad_x
        if want_w:
            grad_weight.addmm_(grad_logits.t(), x_chunk.to(acc))
        del chunk_grad_x, grad_logits  # before the next chunk's exist: one chunk at a time

    loss = as_dtype(jsd.mean_over_labelled(torch.cat(losses), counted), student_input.dtype)
    if not needs_grad:
        return (loss,), None
    return (loss,), (grad_x, grad_weight, student_input.dtype, student_weight.dtype)


# The gradients are computed in the forward: the reference's backward (a scaling) is the same.
KERNEL = inductor_kernel("fused_linear_jsd", forward, reference_fljsd.backward, dtypes=FLOAT_DTYPES)
