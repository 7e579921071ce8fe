"""swiglu in CUDA: ``y = silu(a) * b``, forward and backward, fp32 math; the layout is in _gated.py."""

from __future__ import annotations

from liger_core.spec import KernelSpec

from ._common import DTYPES, MIN_CAPABILITY
from ._gated import make_backward, make_forward, make_supports

KERNEL = KernelSpec(
    op="swiglu",
    forward=make_forward("swiglu"),
    backward=make_backward("swiglu"),
    supports=make_supports("swiglu"),
    devices=("cuda",),
    dtypes=DTYPES,
    min_capability=MIN_CAPABILITY,
)
