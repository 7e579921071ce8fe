"""layer_norm in CUDA (csrc/layer_norm.cu): ``F.layer_norm(x, (H,), weight, bias, eps)`` over the last dimension,
forward and backward, fp32 math, output in x's dtype.

The forward keeps mean and rstd (fp32, one each per row) for the backward, which writes dx into a fresh buffer and
reduces dW and dB deterministically (per-block partial rows, then a fixed-order sum), in the parameters' dtypes.
"""

from __future__ import annotations

import torch

from ._common import MAX_COLS, compiling, cuda_kernel, dtype_reasons, ext, records_own_graph, rows


@torch.library.custom_op("liger_cuda::layer_norm_forward", mutates_args=())
def layer_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ext().layer_norm_forward(x, weight, bias, eps)


@layer_norm_forward_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("liger_cuda::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ext().layer_norm_backward(dy, x, weight, bias, mean, rstd)


@layer_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, bias = inputs
    shape = x.shape
    x2d = rows(x, shape[-1])
    if records_own_graph(needs_grad):
        return (ext().layer_norm_autograd(x2d, weight, bias, attrs["eps"]).view(shape),), None
    if compiling():
        y, mean, rstd = layer_norm_forward_op(x2d, weight, bias, attrs["eps"])
    else:
        y, mean, rstd = ext().layer_norm_forward(x2d, weight, bias, attrs["eps"])
    saved = (x2d, weight, bias, mean, rstd, shape) if needs_grad else None
    return (y.view(shape),), saved


def backward(saved: tuple, grad_outputs: tuple):
    x2d, weight, bias, mean, rstd, shape = saved
    dy = grad_outputs[0]
    if dy is None:
        return None, None, None
    dy2d = rows(dy, shape[-1])
    if compiling():
        dx, dw, db = layer_norm_backward_op(dy2d, x2d, weight, bias, mean, rstd)
    else:
        dx, dw, db = ext().layer_norm_backward(dy2d, x2d, weight, bias, mean, rstd)
    return dx.view(shape), dw, (db if bias is not None else None)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    x, weight, bias = inputs
    reasons = dtype_reasons("layer_norm", x=x, weight=weight, bias=bias)
    if x.dim() >= 1 and x.shape[-1] > MAX_COLS:
        reasons.append(f"hidden size {x.shape[-1]} is over the CUDA layer_norm's limit of {MAX_COLS}")
    return reasons


KERNEL = cuda_kernel("layer_norm", forward, backward, supports, eager_autograd=True)
