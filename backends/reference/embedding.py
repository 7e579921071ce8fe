"""embedding in plain PyTorch; autograd differentiates it. See liger_core.operators.embedding for the rules."""

from __future__ import annotations

import torch

from liger_core.operators.embedding import padding_row
from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    indices, weight = inputs
    num_embeddings = weight.shape[0]
    keep = (indices >= 0) & (indices < num_embeddings)
    pad = padding_row(attrs["padding_idx"], num_embeddings)
    if pad is not None:
        keep = keep & (indices != pad)
    # Dropped rows read row 0 (always in bounds) and are zeroed, so they send it no gradient either.
    safe = torch.where(keep, indices, torch.zeros_like(indices))
    # The gather in fp32, so that the gradient of repeated indices accumulates in fp32 (API.md).
    wide = torch.promote_types(weight.dtype, torch.float32)
    rows = weight.to(wide).index_select(0, safe.reshape(-1)).reshape(*indices.shape, weight.shape[1])
    y = torch.where(keep.unsqueeze(-1), rows, torch.zeros((), dtype=wide, device=weight.device))
    return (y.to(weight.dtype),), None


KERNEL = KernelSpec(op="embedding", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
