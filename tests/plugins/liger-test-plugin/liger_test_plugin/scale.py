"""A new operator brought by a plugin: ``y = x * factor``."""

import torch

from liger_core.spec import AttrSpec, InputSpec, OpSpec, OutputSpec


def check(inputs, attrs):
    (x,) = inputs
    if not x.is_floating_point():
        raise TypeError(f"scale: 'x' must be a floating-point tensor, got {x.dtype}")


def make_inputs(device, dtype, size, seed, **attrs):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 3, generator=generator).to(device, dtype),), attrs


SPEC = OpSpec(
    name="scale",
    inputs=(InputSpec(name="x", differentiable=True),),
    attrs=(AttrSpec(name="factor", type="float", default=2.0),),
    outputs=(OutputSpec(name="y"),),
    check=check,
    key_fn=lambda inputs, attrs: (inputs[0].dtype, inputs[0].device.type),
    make_inputs_fn=make_inputs,
    reference_backend="testplug",
)
