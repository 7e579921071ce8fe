"""What the gated-activation operators (swiglu, geglu) share: ``y = act(a) * b`` elementwise, same-shape inputs.

``in_place=True`` says the caller hands a and b over (API.md's in-place rule): they are its own intermediates that
nothing else reads after the backward, as the gate and up projections inside our MLP modules are. A kernel may then
write da and db into their storage instead of allocating two more (rows, I) buffers, and bumps their versions, so
any other autograd user of them gets PyTorch's "modified by an inplace operation" error, never a wrong gradient.
Kernels are free to ignore it (the reference does); the functional ``liger_swiglu(a, b)`` never sets it.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_same_device, tensor_key

# (rows..., intermediate): tiny has an odd width; small and llama8b are (BT, I).
SHAPES = {"tiny": (3, 5, 37), "small": (1024, 2816), "llama8b": (8192, 14336)}


def make_check(op: str):
    def check(inputs: tuple, attrs: dict) -> None:
        a, b = inputs
        require_float(op, "a", a)
        require_float(op, "b", b)
        require_dim(op, "a", a, tuple(range(1, 9)))
        if b.shape != a.shape:
            raise ValueError(f"{op}: 'b' must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
        if b.dtype != a.dtype:
            raise TypeError(f"{op}: 'b' must have a's dtype {a.dtype}, got {b.dtype}")
        require_same_device(op, "a", a, "b", b)

    return check


def key(inputs: tuple, attrs: dict) -> tuple:
    a, b = inputs
    width = a.shape[-1]
    return (tensor_key(a), tensor_key(b), width, bucket(a.numel() // max(width, 1)))


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, chunked: bool = False, **attrs):
    """``chunked=True`` makes a and b the two halves of one ``(..., 2I)`` tensor (Phi-3's fused ``gate_up_proj``),
    so that their rows are not contiguous."""
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[size]
    if chunked:
        a, b = randn((*shape[:-1], 2 * shape[-1]), dtype, device, generator, scale=2.0).chunk(2, dim=-1)
    else:
        a = randn(shape, dtype, device, generator, scale=2.0)
        b = randn(shape, dtype, device, generator)
    return (a, b), attrs


def gated_spec(op: str) -> OpSpec:
    return OpSpec(
        name=op,
        inputs=(InputSpec(name="a", differentiable=True), InputSpec(name="b", differentiable=True)),
        attrs=(AttrSpec(name="in_place", type="bool", default=False),),
        outputs=(OutputSpec(name="y"),),
        check=make_check(op),
        key_fn=key,
        cases=({}, {"chunked": True}),
        make_inputs_fn=make_inputs,
    )
