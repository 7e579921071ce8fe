"""fused_linear_jsd in plain PyTorch, chunked over tokens so neither (BT, V) logits exists at once.

See liger_core.operators.fused_linear_jsd for the math; the divergence is the reference jsd's (its helpers are
called on each chunk). The loss is always a scalar, so the forward computes, chunk by chunk, the loss and the
gradient with respect to the student's chunk logits, accumulating the gradients of student_input and
student_weight; the backward multiplies them by the incoming gradient. Gradients are accumulated in float32 (or
``accum_dtype`` when wider) and cast to the inputs' dtypes in the backward, as in fused_linear_cross_entropy.
The teacher gets no gradient and is never tracked by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_core.opaque import opaque_op
from liger_core.spec import FLOAT_DTYPES, KernelSpec, as_dtype

from . import jsd
from .cross_entropy import safe_divide
from .fused_linear_cross_entropy import accumulation_dtype, chunk_rows, scaled_gradients


def _forward_tensors(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    shift_labels: torch.Tensor | None,
    jsd_beta: float,
    ignore_index: int,
    temperature: float,
    accum_dtype: torch.dtype | None,
    want_x: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_weight): the gradients for a unit upstream gradient in the accumulation dtype, (0,)-shaped
    when not wanted."""
    beta = jsd_beta
    rows_total, vocab = student_input.shape[0], student_weight.shape[0]
    wide = torch.promote_types(student_input.dtype, torch.float32)
    acc = accumulation_dtype(wide, accum_dtype)
    counted = jsd.labelled(shift_labels, rows_total, ignore_index, student_input.device)
    row_coefficient = safe_divide(counted.to(wide), counted.sum().to(wide))  # d loss / d row loss

    # our own accumulators, updated in place
    grad_x = torch.zeros(student_input.shape if want_x else (0,), dtype=acc, device=student_input.device)
    grad_weight = torch.zeros(student_weight.shape if want_w else (0,), dtype=acc, device=student_input.device)

    step = chunk_rows(rows_total, vocab, heads=2)  # a student and a teacher block of logits per chunk
    losses = []
    for start in range(0, max(rows_total, 1), step):
        x_chunk = student_input[start : start + step]
        log_q = torch.log_softmax(F.linear(x_chunk, student_weight).to(wide) / temperature, dim=-1)
        teacher_logits = F.linear(teacher_input[start : start + step], teacher_weight).to(wide)
        log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
        losses.append(jsd.jsd_rows(log_q, log_p, beta))
        if want_x or want_w:
            grad_log_q = jsd.jsd_log_q_gradient(log_q, log_p, beta) * row_coefficient[start : start + step, None]
            # through log_softmax, then the division by the temperature
            grad_logits = (grad_log_q - torch.exp(log_q) * grad_log_q.sum(-1, keepdim=True)) / temperature
            if want_x:
                grad_x[start : start + x_chunk.shape[0]] = grad_logits.to(student_weight.dtype) @ student_weight
            if want_w:
                grad_weight.addmm_(grad_logits.to(acc).t(), x_chunk.to(acc))
            del grad_log_q, grad_logits
        del log_q, teacher_logits, log_p  # before the next chunk's logits exist: one chunk at a time

    loss = as_dtype(jsd.mean_over_labelled(torch.cat(losses), counted), student_input.dtype)
    return loss, grad_x, grad_weight


# Under torch.compile the chunk loop runs as one opaque op (pure PyTorch: its own fake), so that a new number of
# tokens does not recompile (liger_core.opaque).
_forward_op = opaque_op("liger_reference::fused_linear_jsd_forward", _forward_tensors)


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    want_x = needs_grad and student_input.requires_grad
    want_w = needs_grad and student_weight.requires_grad
    run = _forward_op if torch.compiler.is_compiling() else _forward_tensors
    # The teacher gets no gradient.
    loss, grad_x, grad_weight = run(
        student_input, student_weight, teacher_input.detach(), teacher_weight.detach(), shift_labels,
        **attrs, want_x=want_x, want_w=want_w,
    )  # fmt: skip
    if not needs_grad:
        return (loss,), None
    grads = (grad_x if want_x else None, grad_weight if want_w else None)
    return (loss,), (*grads, student_input.dtype, student_weight.dtype)


def backward(saved: tuple, grad_outputs: tuple) -> tuple:
    grad_x, grad_weight, x_dtype, weight_dtype = saved
    (grad_loss,) = grad_outputs
    if grad_loss is None:
        return None, None
    return scaled_gradients((grad_x, grad_weight), (x_dtype, weight_dtype), grad_loss)


KERNEL = KernelSpec(op="fused_linear_jsd", forward=forward, backward=backward, dtypes=FLOAT_DTYPES + (torch.float64,))
