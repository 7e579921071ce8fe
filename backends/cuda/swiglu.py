"""swiglu in CUDA: ``y = silu(a) * b``, forward and backward, fp32 math; the layout is in _gated.py."""

from __future__ import annotations

from ._common import cuda_kernel
from ._gated import make_backward, make_forward, make_supports

KERNEL = cuda_kernel(
    "swiglu", make_forward("swiglu"), make_backward("swiglu"), make_supports("swiglu"), eager_autograd=True
)
