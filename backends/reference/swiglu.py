"""swiglu in plain PyTorch: ``silu(a) * b`` in fp32; autograd differentiates it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    a, b = inputs
    wide = torch.promote_types(a.dtype, torch.float32)
    return ((F.silu(a.to(wide)) * b.to(wide)).to(a.dtype),), None


KERNEL = KernelSpec(op="swiglu", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
