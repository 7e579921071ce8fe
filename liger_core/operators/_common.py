"""Checks and key helpers shared by the operator specs. Every check names the argument and what was expected."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def bucket(n: int) -> int:
    """Round up to a power of two, so that shapes share autotune decisions without one per size."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """dtype, device type, bucketed shape and whether the last dimension is contiguous."""
    if t is None:
        return None
    return (t.dtype, t.device.type, tuple(bucket(s) for s in t.shape), t.dim() == 0 or t.stride(-1) == 1)


def require_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOATS:
        raise TypeError(f"{op}: {name!r} must be a floating-point tensor (float32, bfloat16, float16), got {t.dtype}")


def require_index(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name!r} must be an int64 or int32 tensor of indices, got {t.dtype}")


def require_dim(op: str, name: str, t: torch.Tensor, dims: int | tuple[int, ...]) -> None:
    allowed = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in allowed:
        expected = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{op}: {name!r} must be {expected}, got shape {tuple(t.shape)}")


def require_same_device(op: str, first: str, a: torch.Tensor, second: str, b: torch.Tensor | None) -> None:
    if b is not None and a.device != b.device:
        raise ValueError(f"{op}: {second!r} is on {b.device} but {first!r} is on {a.device}; put them on one device")


def randn(shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator, scale: float = 1.0):
    """Normal random data drawn on the CPU, then moved: the same seed gives the same data on every device."""
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)
