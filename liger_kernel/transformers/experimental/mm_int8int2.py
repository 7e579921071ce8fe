"""Ternary-weight GEMM (liger-kernel 0.8's ``mm_int8int2``): int8 activations times weights in {-1, 0, 1} packed
four to a byte, through the ``int2_matmul`` operator.

Layout: ``b = pack_weights(w)`` is uint8 ``(K/4, N)``; code ``i`` (bits ``2i..2i+1``) of packed row ``j`` holds
``w[i·K/4 + j] + 1``. ``matmul(a, b)`` returns int32 ``a.int() @ w.int()``. Unlike 0.8.5, `pack_weights` leaves its
argument unchanged and pads missing rows with zero weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import liger_core
from liger_core.operators.int2_matmul import pack_weights, unpack_weights

from .._common import resolve_impl

__all__ = ["matmul", "pack_weights", "unpack_weights"]


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    impl: str | Sequence[str] | None = None,
    backend: str | Sequence[str] | None = None,
) -> torch.Tensor:
    """int32 ``(M, N)`` product of int8 ``a`` ``(M, K)`` and the ternary weights packed in uint8 ``b`` ``(K/4, N)``.

    K must be a multiple of 4 and ``b.shape[0] * 4 == K``. Nothing is differentiable. ``impl=`` (or its legacy alias
    ``backend=``) requires a backend, as the modules' argument does.
    """
    chosen = None if impl is None and backend is None else resolve_impl("matmul", impl, backend)
    return liger_core.call("int2_matmul", a, b, impl=chosen)
