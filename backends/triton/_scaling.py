"""Scaling a gradient computed in the forward (for a unit upstream gradient) by the upstream gradient, in the
backward: cross_entropy, fused_linear_cross_entropy, jsd and fused_linear_jsd compute their input gradients while
the inputs are at hand in the forward, and their backward only multiplies.

`scale_in_place` multiplies our own buffer in place (eagerly): a block whose factors are all exactly 1, the usual
``loss.backward()``, is left alone without being read, so the whole backward then costs one launch. The factor is
read on the device: no host synchronisation. The buffer's version is bumped, so a second backward through the same
graph (``retain_graph=True``) raises autograd's "modified by an inplace operation" error instead of scaling twice.
Under torch.compile it is an out-of-place product, which Inductor fuses.

The product is taken in fp32 and rounded once to the buffer's dtype (torch's ``x * g`` with a bf16 ``x`` would
round ``g`` to bf16 first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import as_dtype

from .rms_norm import cast_to, cdiv, sm_count, traced

BLOCK = 4096
NUM_WARPS = 8
# The grid: at most this many programs per SM, each striding over the buffer. One program per BLOCK elements would
# launch a quarter of a million programs for a (8192, 128256) gradient, each reading the factor and leaving when it
# is 1: tens of microseconds for nothing.
PROGRAMS_PER_SM = 4


@triton.jit
def scale_in_place_kernel(BUF, UPSTREAM, numel, n_cols, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """BUF *= upstream (a scalar, or one value per row of n_cols), in place, BLOCK elements at a time, the programs
    striding over the buffer; a block whose factors are all exactly 1 is left alone without being read."""
    if PER_ROW:
        stop = numel
    else:
        factor = tl.load(UPSTREAM).to(tl.float32)
        stop = tl.where(factor == 1.0, 0, numel)  # the whole grid agrees: nothing to do
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, stop, step):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < numel
        if PER_ROW:
            g = tl.load(UPSTREAM + offsets // n_cols, mask=mask, other=1.0).to(tl.float32)
            wanted = tl.max((g != 1.0).to(tl.int32), axis=0) > 0
        else:
            g = factor
            wanted = True
        if wanted:
            x = tl.load(BUF + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(BUF + offsets, cast_to(x * g, BUF.dtype.element_ty), mask=mask)


# -- launchers -----------------------------------------------------------------------------------------------------


def scale_in_place(buffer: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """buffer (contiguous, our own) times upstream (a scalar, or one value per row of buffer), in place when eager
    (version bumped: saved copies of it are stale); out of place under torch.compile, where Inductor fuses it."""
    per_row = upstream.dim() > 0
    if traced(buffer):
        factor = upstream.reshape(-1, *([1] * (buffer.dim() - 1))) if per_row else upstream
        return (buffer.float() * factor.float()).to(buffer.dtype)  # fp32 product, as eagerly (Inductor fuses it)
    numel = buffer.numel()
    if numel == 0:
        return buffer
    upstream = upstream.contiguous()  # an expanded upstream has stride 0
    n_cols = buffer.shape[-1] if per_row else 1
    programs = min(cdiv(numel, BLOCK), PROGRAMS_PER_SM * sm_count(buffer.device))
    scale_in_place_kernel[(programs,)](
        buffer, upstream, numel, n_cols, PER_ROW=per_row, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    torch.autograd.graph.increment_version(buffer)
    return buffer


def scale_by_gradient(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (our own contiguous buffer) times the 0-D g, returned in `dtype`: in place when x already has it."""
    return as_dtype(scale_in_place(x, g), dtype)
