"""int2_matmul: a ternary-weight GEMM, ``c = a.int() @ w.int()``, with the weights packed four to a byte.

``a`` is int8 ``(M, K)``; ``b`` is uint8 ``(K/4, N)`` holding the weights ``w`` in {-1, 0, 1} as 2-bit codes
``w + 1``: code ``i`` (bits ``2i..2i+1``) of packed row ``j`` is the weight of row ``i·K/4 + j``. So the four
"planes" ``(b >> 2i) & 3`` are four contiguous blocks of K/4 rows of ``w``, which lets a kernel unpack one plane at a
time. The output is int32 ``(M, N)``; nothing is differentiable.

The packing functions live here too, so the public API (`liger_kernel.transformers.experimental`), this spec's
input maker and the kernels share one definition of the layout. The code 3 means no weight; it decodes as 2, and
`LIGER_KERNEL_CHECKS=1` makes it a ValueError in `matmul` and `unpack_weights` (finding it reads the data).
"""

from __future__ import annotations

import torch

from .. import env
from ..spec import InputSpec, OpSpec, OutputSpec
from ._common import bucket, require_dim, require_same_device, tensor_key

CODES_PER_BYTE = 4  # 2-bit codes in one uint8
SHAPES = {"tiny": (5, 12, 7), "small": (1024, 1024, 1024), "llama8b": (8192, 4096, 4096)}  # M, K, N
_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)  # integer dtypes with few CPU kernels


# -- packing -----------------------------------------------------------------------------------------------------


def _check_bits(owner: str, bits) -> None:
    if isinstance(bits, bool) or bits != 2:
        raise ValueError(f"{owner}: only bits=2 (ternary weights, four per byte) is supported, got bits={bits!r}")


def _has_invalid_codes(packed: torch.Tensor) -> torch.Tensor:
    """Whether any 2-bit code is 3 (both of its bits set): a 0-dim bool tensor, so the caller decides to sync."""
    return ((packed & (packed >> 1)) & 0x55).any()


def pack_weights(w: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Pack ternary weights ``w`` (any integer dtype, values in {-1, 0, 1}, shape ``(K, N)`` or ``(K,)``) into uint8
    ``(ceil(K/4), N)`` (or ``(ceil(K/4),)``), code ``i`` of packed row ``j`` holding row ``i·ceil(K/4) + j`` as
    ``w + 1``. Rows past K are padded with zero weights. ``w`` is not modified. Values outside {-1, 0, 1} are a
    ValueError (this reads the data: packing is done once, not in a training step)."""
    _check_bits("pack_weights", bits)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"pack_weights: 'w' must be a tensor, got {type(w).__name__}")
    if w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
        raise TypeError(f"pack_weights: 'w' must be an integer tensor with values in {{-1, 0, 1}}, got {w.dtype}")
    require_dim("pack_weights", "w", w, (1, 2))
    if w.dtype.is_signed:
        bad = (w < -1) | (w > 1)
    elif w.dtype in _UNSIGNED_WIDE:
        wide = w.to(torch.int64)  # uint64 beyond 2^63 wraps negative, which the check below still rejects
        bad = (wide < 0) | (wide > 1)
    else:
        bad = w > 1
    if bool(bad.any()):
        found = sorted(set(w[bad].to(torch.int64).flatten()[:5].tolist()))
        raise ValueError(f"pack_weights: 'w' must hold only -1, 0 and 1, found {found}")
    rows = -(-w.shape[0] // CODES_PER_BYTE)
    codes = (w.to(torch.int8) + 1).to(torch.uint8)  # a new tensor: the caller's w stays as it was
    missing = rows * CODES_PER_BYTE - w.shape[0]
    if missing:
        padding = torch.ones((missing, *w.shape[1:]), dtype=torch.uint8, device=w.device)  # code 1: weight 0
        codes = torch.cat([codes, padding])
    planes = codes.reshape(CODES_PER_BYTE, rows, *w.shape[1:])
    return planes[0] | (planes[1] << 2) | (planes[2] << 4) | (planes[3] << 6)


def unpack_plane(packed: torch.Tensor, index: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights stored in code `index` of every byte of `packed`, as `dtype`: rows ``index·rows + j``."""
    return ((packed >> (2 * index)) & 3).to(dtype) - 1


def unpack_weights(packed: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """The inverse of `pack_weights`: int32 ``(4·rows, ...)``, padded rows included (as zero weights)."""
    _check_bits("unpack_weights", bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"unpack_weights: 'packed' must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_weights: 'packed' must be a uint8 tensor of 2-bit codes, got {packed.dtype}")
    require_dim("unpack_weights", "packed", packed, (1, 2))
    if env.checks_enabled() and bool(_has_invalid_codes(packed)):
        raise ValueError("unpack_weights: 'packed' holds the 2-bit code 3, which encodes no weight in {-1, 0, 1}")
    planes = [unpack_plane(packed, i, torch.int32) for i in range(CODES_PER_BYTE)]
    return torch.cat(planes)


# -- the operator ------------------------------------------------------------------------------------------------


def check(inputs: tuple, attrs: dict) -> None:
    a, b = inputs
    if a.dtype != torch.int8:
        raise TypeError(f"int2_matmul: 'a' must be an int8 tensor, got {a.dtype}")
    if b.dtype != torch.uint8:
        raise TypeError(
            f"int2_matmul: 'b' must be a uint8 tensor of packed 2-bit weights (pack_weights), got {b.dtype}"
        )
    require_dim("int2_matmul", "a", a, 2)
    require_dim("int2_matmul", "b", b, 2)
    k = a.shape[1]
    if k % CODES_PER_BYTE:
        raise ValueError(f"int2_matmul: the inner dimension K of 'a' {tuple(a.shape)} must be a multiple of 4, got {k}")
    if b.shape[0] * CODES_PER_BYTE != k:
        raise ValueError(
            f"int2_matmul: 'b' must have shape (K/4, N) = ({k // CODES_PER_BYTE}, N) to match 'a' {tuple(a.shape)}, "
            f"got {tuple(b.shape)}"
        )
    require_same_device("int2_matmul", "a", a, "b", b)
    if env.checks_enabled() and bool(_has_invalid_codes(b)):  # reads the data: synchronises, so only on request
        raise ValueError("int2_matmul: 'b' holds the 2-bit code 3, which encodes no weight in {-1, 0, 1}")


def key(inputs: tuple, attrs: dict) -> tuple:
    a, b = inputs
    return (
        tensor_key(a),
        tensor_key(b),
        a.shape[1],  # exact: kernels tile K and N
        b.shape[1],
        bucket(a.shape[0]),
        a.is_contiguous(),
        b.is_contiguous(),
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, **attrs):
    if dtype != torch.int8:
        raise ValueError(f"int2_matmul: inputs are made for dtype torch.int8 only, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    m, k, n = SHAPES[size]
    a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8)
    w = torch.randint(-1, 2, (k, n), generator=generator, dtype=torch.int8)
    return (a.to(device), pack_weights(w).to(device)), attrs


SPEC = OpSpec(
    name="int2_matmul",
    inputs=(InputSpec(name="a"), InputSpec(name="b")),
    outputs=(OutputSpec(name="c", differentiable=False),),
    check=check,
    key_fn=key,
    make_inputs_fn=make_inputs,
    dtypes=(torch.int8,),
    error_floor={torch.int8: 0.0},
)
