"""geglu in Triton: ``y = gelu(a, approximate="tanh") * b``, forward and backward, in fp32; the layout is in
_gated.py.

gelu_tanh(a) = ½a(1 + tanh(z)) = a·sigmoid(2z) with z = √(2/π)(a + 0.044715a³), so no tanh is evaluated; the backward
recomputes it: da = dy·b·(s + 2a·s(1 − s)·dz/da), db = dy·a·s with s = sigmoid(2z).
"""

from __future__ import annotations

from liger_core.spec import KernelSpec

from ._gated import DTYPES, make_backward, make_forward, make_supports

KERNEL = KernelSpec(
    op="geglu",
    forward=make_forward("geglu"),
    backward=make_backward("geglu"),
    supports=make_supports("geglu"),
    devices=("cuda",),
    dtypes=DTYPES,
)
