"""swiglu in Triton: ``y = silu(a) * b``, forward and backward, in fp32; the layout is in _gated.py.

silu(a) = a·sigmoid(a); the backward recomputes it: da = dy·b·s·(1 + a·(1 − s)), db = dy·a·s with s = sigmoid(a).
"""

from __future__ import annotations

from liger_core.spec import KernelSpec

from ._gated import DTYPES, make_backward, make_forward, make_supports

KERNEL = KernelSpec(
    op="swiglu",
    forward=make_forward("swiglu"),
    backward=make_backward("swiglu"),
    supports=make_supports("swiglu"),
    devices=("cuda",),
    dtypes=DTYPES,
)
