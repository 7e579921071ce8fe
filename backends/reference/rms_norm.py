"""rms_norm in plain PyTorch; autograd differentiates it."""

from __future__ import annotations

import torch

from liger_core.spec import FLOAT_DTYPES, KernelSpec


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight = inputs
    eps, offset, mode = attrs["eps"], attrs["offset"], attrs["casting_mode"]
    # fp32 unless the input is fp64 (the conformance tests' ground truth runs in fp64).
    wide = torch.promote_types(x.dtype, torch.float32)
    if mode == "none":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * (offset + weight.to(x.dtype))
    elif mode == "llama":
        x_wide = x.to(wide)
        y = (x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        if weight is not None:
            y = y * (offset + weight)
    else:  # gemma
        x_wide = x.to(wide)
        y = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * (offset + weight.to(wide))
    return (y.to(x.dtype),), None


KERNEL = KernelSpec(op="rms_norm", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
