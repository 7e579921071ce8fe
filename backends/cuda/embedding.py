"""embedding in CUDA (csrc/embedding.cu): ``y = weight[indices]`` forward, a dense weight gradient backward.

A dropped index — the padding row (``padding_row`` turns a negative ``padding_idx`` into a row number) or one outside
``[0, N)`` — gives a zero row and no gradient, and is never used as an address. The backward is deterministic: the
kept indices are sorted stably (torch.sort on the device, no host synchronisation), and each run of equal indices
sums its gradient rows in fp32, in token order, into one write of the weight-gradient row. Called eagerly for
training, the forward records the extension's C++ autograd node (``records_own_graph``), as the norms do.
"""

from __future__ import annotations

import torch

from liger_core.operators.embedding import padding_row

from ._common import compiling, cuda_kernel, dtype_reasons, ext, records_own_graph

INDEX_DTYPES = (torch.int64, torch.int32)


@torch.library.custom_op("liger_cuda::embedding_forward", mutates_args=())
def embedding_forward_op(indices: torch.Tensor, weight: torch.Tensor, pad: int) -> torch.Tensor:
    return ext().embedding_forward(indices, weight, pad)


@embedding_forward_op.register_fake
def _(indices, weight, pad):
    return weight.new_empty((indices.shape[0], weight.shape[1]))


@torch.library.custom_op("liger_cuda::embedding_backward", mutates_args=())
def embedding_backward_op(dy: torch.Tensor, indices: torch.Tensor, n_rows: int, pad: int) -> torch.Tensor:
    return ext().embedding_backward(dy, indices, n_rows, pad)


@embedding_backward_op.register_fake
def _(dy, indices, n_rows, pad):
    return dy.new_empty((n_rows, dy.shape[1]))


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    indices, weight = inputs
    n_rows = weight.shape[0]
    pad = padding_row(attrs["padding_idx"], n_rows)
    pad = -1 if pad is None else pad
    flat = indices.reshape(-1).contiguous()
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        weight = weight.contiguous()
    if records_own_graph(needs_grad):
        return (ext().embedding_autograd(flat, weight, pad).view(*indices.shape, weight.shape[1]),), None
    if compiling():
        y = embedding_forward_op(flat, weight, pad)
    else:
        y = ext().embedding_forward(flat, weight, pad)
    saved = (flat, n_rows, pad) if needs_grad else None
    return (y.view(*indices.shape, weight.shape[1]),), saved


def backward(saved: tuple, grad_outputs: tuple):
    flat, n_rows, pad = saved
    dy = grad_outputs[0]
    if dy is None:
        return (None,)
    dy2d = dy.reshape(flat.shape[0], dy.shape[-1])  # explicit sizes: E may be 0
    if dy2d.stride(-1) != 1 and dy2d.shape[-1] > 1:
        dy2d = dy2d.contiguous()
    if compiling():
        return (embedding_backward_op(dy2d, flat, n_rows, pad),)
    return (ext().embedding_backward(dy2d, flat, n_rows, pad),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    indices, weight = inputs
    reasons = dtype_reasons("embedding", weight=weight)
    if indices.dtype not in INDEX_DTYPES:
        reasons.append(f"indices are {indices.dtype}; the CUDA embedding takes int64 or int32")
    if indices.numel() >= 2**31:
        reasons.append(f"{indices.numel()} indices are more than the CUDA embedding's 2**31 - 1")
    if weight.dim() == 2 and weight.shape[0] >= 2**31 - 1:
        reasons.append(f"{weight.shape[0]} rows are more than the CUDA embedding's 2**31 - 2")
    return reasons


KERNEL = cuda_kernel("embedding", forward, backward, supports, eager_autograd=True)
