"""layer_norm: ``F.layer_norm(x, (H,), weight, bias, eps)`` over the last dimension, in fp32, output in x's dtype.

``weight`` is required; ``bias`` is an optional tensor. Both have shape ``(H,)`` and get gradients.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_same_device, tensor_key

SHAPES = {"tiny": (3, 5, 37), "small": (1024, 1024), "llama8b": (8192, 4096)}


def check(inputs: tuple, attrs: dict) -> None:
    x, weight, bias = inputs
    require_float("layer_norm", "x", x)
    require_dim("layer_norm", "x", x, tuple(range(1, 9)))
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError("layer_norm: 'x' must have a non-empty last (hidden) dimension")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        require_float("layer_norm", name, param)
        if param.shape != (hidden,):
            raise ValueError(
                f"layer_norm: {name!r} must have shape ({hidden},) to match x's hidden size, got {tuple(param.shape)}"
            )
        require_same_device("layer_norm", "x", x, name, param)
    if attrs["eps"] < 0:
        raise ValueError(f"layer_norm: 'eps' must be >= 0, got {attrs['eps']}")


def key(inputs: tuple, attrs: dict) -> tuple:
    x, weight, bias = inputs
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        tensor_key(x),
        x.shape[-1],  # exact: kernels choose block sizes from it
        bucket(rows),
        weight.dtype,
        None if bias is None else bias.dtype,
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, with_bias: bool = True, **attrs):
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[size]
    # An offset mean and a non-unit spread, so that both the centring and the scaling matter.
    x = (randn(shape, torch.float32, torch.device("cpu"), generator, scale=2.0) + 0.5).to(device=device, dtype=dtype)
    weight = 1.0 + randn(shape[-1:], dtype, device, generator, scale=0.1)
    bias = randn(shape[-1:], dtype, device, generator, scale=0.1) if with_bias else None
    return (x, weight, bias), attrs


SPEC = OpSpec(
    name="layer_norm",
    inputs=(
        InputSpec(name="x", differentiable=True),
        InputSpec(name="weight", differentiable=True),
        InputSpec(name="bias", kind="optional_tensor", differentiable=True),
    ),
    attrs=(AttrSpec(name="eps", type="float", default=1e-6),),
    outputs=(OutputSpec(name="y"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"with_bias": False},
        {"eps": 1e-2},
    ),
    make_inputs_fn=make_inputs,
)
