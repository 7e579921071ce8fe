"""geglu in CUDA: ``y = gelu(a, approximate="tanh") * b``, forward and backward, fp32 math (layout: _gated.py)."""

from __future__ import annotations

from ._common import cuda_kernel
from ._gated import make_backward, make_forward, make_supports

KERNEL = cuda_kernel(
    "geglu", make_forward("geglu"), make_backward("geglu"), make_supports("geglu"), eager_autograd=True
)
