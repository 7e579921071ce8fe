"""geglu in plain PyTorch: ``gelu(a, approximate="tanh") * b`` in fp32; autograd differentiates it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    a, b = inputs
    wide = torch.promote_types(a.dtype, torch.float32)
    return ((F.gelu(a.to(wide), approximate="tanh") * b.to(wide)).to(a.dtype),), None


KERNEL = KernelSpec(op="geglu", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
