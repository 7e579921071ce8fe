"""int2_matmul in plain PyTorch: the exact int32 product of int8 ``a`` and the ternary weights packed in ``b``.

The weights are unpacked one code plane at a time (a plane is K/4 contiguous rows of w), in slices of at most
`CHUNK_ROWS` rows, so memory stays at one (slice × N) block of weights and one (M × slice) block of ``a`` in the
compute dtype, whatever K is. Each slice is one matmul; the int32 results are summed.

Exactness. On the CPU the slices are multiplied in int32: integer arithmetic, exact by construction (like
``a.int() @ w.int()``, it would wrap only past 2^31, i.e. for K beyond 16M). Other devices (CUDA has no integer
matmul for int32/int64) multiply in float32: every product |a·w| <= 128 is an integer, and a slice sums at most
`CHUNK_ROWS` = 4096 of them, so every partial sum is an integer of magnitude <= 128·4096 = 2^19 < 2^24, which float32
holds exactly whatever the summation order. TF32 or bf16 matmul modes do not change this: int8 values and ternary
weights need at most 8 significant bits, which both formats hold, and tensor cores accumulate in float32. The
per-slice results are converted to int32 exactly and summed in int32.
"""

from __future__ import annotations

import torch

from liger_core.operators.int2_matmul import CODES_PER_BYTE, unpack_plane
from liger_core.spec import KernelSpec

CHUNK_ROWS = 4096  # packed rows (weight rows per plane) per matmul: bounds memory, and keeps float32 sums < 2^24


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.int32 if device.type == "cpu" else torch.float32


def ternary_matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a.int() @ w.int()`` with w unpacked from ``b`` slice by slice, each slice multiplied in `dtype`."""
    rows = b.shape[0]
    out = None
    for plane in range(CODES_PER_BYTE):
        for start in range(0, rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, rows)
            weights = unpack_plane(b[start:stop], plane, dtype)
            activations = a[:, plane * rows + start : plane * rows + stop].to(dtype)
            part = (activations @ weights).to(torch.int32)
            out = part if out is None else out.add_(part)
    if out is None:  # K = 0: the empty sum
        out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int32, device=a.device)
    return out


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    a, b = inputs
    return (ternary_matmul(a, b, compute_dtype(a.device)),), None


KERNEL = KernelSpec(op="int2_matmul", forward=forward, dtypes=(torch.int8,))
