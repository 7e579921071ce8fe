"""rope in plain PyTorch; autograd differentiates it. See liger_core.operators.rope for the math."""

from __future__ import annotations

import torch

from liger_core.operators.rope import rotated_width
from liger_core.spec import FLOAT_DTYPES, KernelSpec


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int, wide: torch.dtype) -> torch.Tensor:
    x_wide = x.to(wide)
    rotated = x_wide[..., :width]
    half = width // 2
    # rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the rotated features
    out = rotated * cos + torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1) * sin
    if width < x.shape[-1]:
        out = torch.cat((out, x_wide[..., width:]), dim=-1)
    return out.to(x.dtype)


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    q, k, cos, sin = inputs
    wide = torch.promote_types(q.dtype, torch.float32)
    unsqueeze_dim = attrs["unsqueeze_dim"]
    # No gradient to the rotary tables (API.md), even when the caller's require one.
    cos = cos.detach().to(wide).unsqueeze(unsqueeze_dim)
    sin = sin.detach().to(wide).unsqueeze(unsqueeze_dim)
    width = rotated_width(q, attrs)
    return (_rotate(q, cos, sin, width, wide), _rotate(k, cos, sin, width, wide)), None


KERNEL = KernelSpec(op="rope", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
