"""rms_norm: ``y = x * rsqrt(mean(x², -1) + eps) * (offset + weight)``, over the last dimension.

casting_mode "llama": rstd in fp32, the normalised x cast back to the input dtype before the weight multiply;
"gemma": everything in fp32, cast back at the end; "none": the input dtype throughout. The output has x's dtype.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_same_device, tensor_key

CASTING_MODES = ("llama", "gemma", "none")
SHAPES = {"tiny": (3, 5, 37), "small": (1024, 1024), "llama8b": (8192, 4096)}


def check(inputs: tuple, attrs: dict) -> None:
    x, weight = inputs
    require_float("rms_norm", "x", x)
    require_dim("rms_norm", "x", x, tuple(range(1, 9)))
    if x.shape[-1] == 0:
        raise ValueError("rms_norm: 'x' must have a non-empty last (hidden) dimension")
    if weight is not None:
        require_float("rms_norm", "weight", weight)
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"rms_norm: 'weight' must have shape ({x.shape[-1]},) to match x's hidden size, "
                f"got {tuple(weight.shape)}"
            )
        require_same_device("rms_norm", "x", x, "weight", weight)
    if attrs["eps"] < 0:
        raise ValueError(f"rms_norm: 'eps' must be >= 0, got {attrs['eps']}")


def key(inputs: tuple, attrs: dict) -> tuple:
    x, weight = inputs
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        tensor_key(x),
        x.shape[-1],  # exact: kernels choose block sizes from it
        bucket(rows),
        None if weight is None else weight.dtype,
        attrs["casting_mode"],
        attrs["offset"] != 0.0,
        attrs["in_place"],
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, with_weight: bool = True, **attrs):
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[size]
    x = randn(shape, dtype, device, generator)
    weight = (1.0 + randn(shape[-1:], dtype, device, generator, scale=0.1)) if with_weight else None
    return (x, weight), attrs


SPEC = OpSpec(
    name="rms_norm",
    inputs=(
        InputSpec(name="x", differentiable=True),
        InputSpec(name="weight", kind="optional_tensor", differentiable=True),
    ),
    attrs=(
        AttrSpec(name="eps", type="float", default=1e-6),
        AttrSpec(name="offset", type="float", default=0.0),
        AttrSpec(name="casting_mode", type="str", default="llama", choices=CASTING_MODES),
        AttrSpec(name="in_place", type="bool", default=True),
    ),
    outputs=(OutputSpec(name="y"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"casting_mode": "gemma", "offset": 1.0},
        {"casting_mode": "none", "eps": 1e-5},
        {"with_weight": False},
    ),
    make_inputs_fn=make_inputs,
)
