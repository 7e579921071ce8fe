"""What the CUDA swiglu and geglu share (csrc/gated.cuh): ``y = act(a) * b`` elementwise, forward and backward.

Rows are the flattened leading dimensions; a and b may have row strides other than the width (the two halves of one
fused ``gate_up`` projection) and are read in place. When every operand is contiguous the kernels walk them as one
flat array. The backward recomputes the activation from a and b (nothing else is saved) and writes da and db in one
pass into fresh buffers.
"""

from __future__ import annotations

import torch

from ._common import compiling, dtype_reasons, ext, records_own_graph, rows

ACTIVATIONS = {"swiglu": 0, "geglu": 1}


@torch.library.custom_op("liger_cuda::gated_forward", mutates_args=())
def gated_forward_op(a: torch.Tensor, b: torch.Tensor, activation: int) -> torch.Tensor:
    return ext().gated_forward(a, b, activation)


@gated_forward_op.register_fake
def _(a, b, activation):
    return a.new_empty(a.shape)


@torch.library.custom_op("liger_cuda::gated_backward", mutates_args=())
def gated_backward_op(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return ext().gated_backward(dy, a, b, activation)


@gated_backward_op.register_fake
def _(dy, a, b, activation):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def make_forward(op: str):
    activation = ACTIVATIONS[op]

    def forward(inputs: tuple, attrs: dict, needs_grad: bool):
        a, b = inputs
        shape = a.shape
        if a.numel() == 0:
            if records_own_graph(needs_grad):
                return (a * b,), None  # no elements: any differentiable product gives the (empty) gradients
            return (torch.empty(shape, dtype=a.dtype, device=a.device),), ((a, b, shape) if needs_grad else None)
        a2d, b2d = rows(a, shape[-1]), rows(b, shape[-1])
        if records_own_graph(needs_grad):
            return (ext().gated_autograd(a2d, b2d, activation).view(shape),), None
        if compiling():
            y = gated_forward_op(a2d, b2d, activation)
        else:
            y = ext().gated_forward(a2d, b2d, activation)
        return (y.view(shape),), ((a2d, b2d, shape) if needs_grad else None)

    return forward


def make_backward(op: str):
    activation = ACTIVATIONS[op]

    def backward(saved: tuple, grad_outputs: tuple):
        a2d, b2d, shape = saved
        dy = grad_outputs[0]
        if dy is None:
            return None, None
        if a2d.numel() == 0:
            return torch.zeros_like(a2d), torch.zeros_like(b2d)
        dy2d = rows(dy, shape[-1])
        if compiling():
            da, db = gated_backward_op(dy2d, a2d, b2d, activation)
        else:
            da, db = ext().gated_backward(dy2d, a2d, b2d, activation)
        return da.view(shape), db.view(shape)

    return backward


def make_supports(op: str):
    def supports(inputs: tuple, attrs: dict) -> list[str]:
        a, b = inputs
        return dtype_reasons(op, a=a, b=b)

    return supports
