"""geglu in CUDA: ``y = gelu(a, approximate="tanh") * b``, forward and backward, fp32 math (layout: _gated.py)."""

from __future__ import annotations

from liger_core.spec import KernelSpec

from ._common import DTYPES, MIN_CAPABILITY
from ._gated import make_backward, make_forward, make_supports

KERNEL = KernelSpec(
    op="geglu",
    forward=make_forward("geglu"),
    backward=make_backward("geglu"),
    supports=make_supports("geglu"),
    devices=("cuda",),
    dtypes=DTYPES,
    min_capability=MIN_CAPABILITY,
)
