"""layer_norm in plain PyTorch; autograd differentiates it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, bias = inputs
    # fp32 unless the input is fp64 (the conformance tests' ground truth runs in fp64).
    wide = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(
        x.to(wide),
        x.shape[-1:],
        weight.to(wide),
        None if bias is None else bias.to(wide),
        attrs["eps"],
    )
    return (y.to(x.dtype),), None


KERNEL = KernelSpec(op="layer_norm", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
