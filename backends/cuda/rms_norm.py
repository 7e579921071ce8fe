"""rms_norm in CUDA (csrc/rms_norm.cu): ``y = x * rsqrt(mean(x², -1) + eps) * (offset + weight)``, forward and
backward, fp32 math, the reference backend's casting modes.

Rows are the flattened leading dimensions of x, read in place when they have unit column stride. rstd (one fp32 per
row) is kept for the backward, which writes dx into a fresh buffer and reduces dW deterministically (per-block
partial rows, then a fixed-order sum). A weight in a third dtype (neither x's nor fp32) is converted by the binding
so that the kernel computes exactly what the reference does.
"""

from __future__ import annotations

import torch

from ._common import MAX_COLS, compiling, cuda_kernel, dtype_reasons, ext, records_own_graph, rows

CASTING_MODES = {"llama": 0, "gemma": 1, "none": 2}


@torch.library.custom_op("liger_cuda::rms_norm_forward", mutates_args=())
def rms_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return ext().rms_norm_forward(x, weight, eps, offset, casting)


@rms_norm_forward_op.register_fake
def _(x, weight, eps, offset, casting):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("liger_cuda::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, offset: float, casting: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return ext().rms_norm_backward(dy, x, weight, rstd, offset, casting)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, offset, casting):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dw


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight = inputs
    shape = x.shape
    x2d = rows(x, shape[-1])
    mode = CASTING_MODES[attrs["casting_mode"]]
    if records_own_graph(needs_grad):
        y = ext().rms_norm_autograd(x2d, weight, attrs["eps"], attrs["offset"], mode)
        return (y.view(shape),), None
    if compiling():
        y, rstd = rms_norm_forward_op(x2d, weight, attrs["eps"], attrs["offset"], mode)
    else:
        y, rstd = ext().rms_norm_forward(x2d, weight, attrs["eps"], attrs["offset"], mode)
    saved = (x2d, weight, rstd, shape, attrs["offset"], mode) if needs_grad else None
    return (y.view(shape),), saved


def backward(saved: tuple, grad_outputs: tuple):
    x2d, weight, rstd, shape, offset, mode = saved
    dy = grad_outputs[0]
    if dy is None:
        return None, None
    dy2d = rows(dy, shape[-1])
    if compiling():
        dx, dw = rms_norm_backward_op(dy2d, x2d, weight, rstd, offset, mode)
    else:
        dx, dw = ext().rms_norm_backward(dy2d, x2d, weight, rstd, offset, mode)
    return dx.view(shape), (dw if weight is not None else None)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    x, weight = inputs
    reasons = dtype_reasons("rms_norm", x=x, weight=weight)
    if x.dim() >= 1 and x.shape[-1] > MAX_COLS:
        reasons.append(f"hidden size {x.shape[-1]} is over the CUDA rms_norm's limit of {MAX_COLS}")
    if attrs.get("casting_mode") not in CASTING_MODES:
        reasons.append(f"casting_mode {attrs.get('casting_mode')!r} is not one of {list(CASTING_MODES)}")
    return reasons


KERNEL = cuda_kernel("rms_norm", forward, backward, supports, eager_autograd=True)
