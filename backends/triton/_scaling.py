"""``y = x · g`` for a gradient ``x`` and a 0-D upstream gradient ``g`` on the device: the backward of the losses whose
forward already computed the gradient for a unit upstream gradient (fused_linear_jsd).

The product is taken in fp32 and rounded once to the output dtype (torch's ``x * g`` with a bf16 ``x`` would round
``g`` to bf16 first). ``g`` is read on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rms_norm import _launch, cast_to

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def scale_kernel(X, G, Y, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(G).to(tl.float32)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, cast_to(x * g, Y.dtype.element_ty), mask=mask)


def scale(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (contiguous, any shape) times the 0-D g, as a new tensor of `dtype`."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        _launch(scale_kernel)[(triton.cdiv(n, BLOCK),)](x, g, y, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


scale_op = torch.library.triton_op("liger_triton::scale_by_gradient", mutates_args=())(scale)


def scale_by_gradient(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (scale_op if torch.compiler.is_compiling() else scale)(x, g, dtype)
