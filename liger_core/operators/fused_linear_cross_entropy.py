"""fused_linear_cross_entropy: cross_entropy of the logits ``input @ weight.T + bias`` without holding them.

The loss, its options and its outputs are those of ``cross_entropy`` (see that module) on the logits
``F.linear(input, weight, bias)``; ``ce_weight`` is its class weight. Extra options: ``accum_dtype`` (the dtype the
weight gradient is accumulated in across token chunks; None lets the kernel choose: the reference uses float32, the
triton kernel the weight's dtype, which saves a float32 copy of the weight gradient) and ``use_token_scaling``
(each row's CE term, not its z-loss, is multiplied by the detached predicted probability of its target, the
probability after the softcap). Kernels never materialise the whole (BT, V) logits.

Unlike ``cross_entropy`` (which returns its loss in the logits' dtype, as ``F.cross_entropy`` does), the loss and
z-loss come out in float32 (float64 for float64 inputs) whatever the input dtype: there are no low-precision logits
here, and the patched Hugging Face forwards must report the loss their unpatched models report (they upcast the
logits and return a float32 loss; liger-kernel's fused loss is float32 too).
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import FLOATS, bucket, randn, require_dim, require_float, require_index, require_same_device, tensor_key
from .cross_entropy import REDUCTIONS, check_options, check_targets

OP = "fused_linear_cross_entropy"
# (BT, H, V)
SHAPES = {"tiny": (37, 19, 53), "small": (1024, 1024, 32000), "llama8b": (8192, 4096, 128256)}


def check_accum_dtype(op: str, accum_dtype) -> None:
    if accum_dtype is not None and accum_dtype not in FLOATS:
        raise TypeError(f"{op}: 'accum_dtype' must be a floating-point dtype or None, got {accum_dtype}")


def check(inputs: tuple, attrs: dict) -> None:
    x, weight, target, bias, ce_weight = inputs
    require_float(OP, "input", x)
    require_dim(OP, "input", x, 2)
    require_float(OP, "weight", weight)
    require_dim(OP, "weight", weight, 2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{OP}: 'weight' must have shape (V, {x.shape[1]}) to match the hidden size of input "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: 'weight' must have at least one row (class), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: 'weight' must have the dtype of 'input' ({x.dtype}), got {weight.dtype}")
    require_same_device(OP, "input", x, "weight", weight)
    require_index(OP, "target", target)
    if target.shape != x.shape[:1]:
        raise ValueError(
            f"{OP}: 'target' must have shape ({x.shape[0]},), one class per row of input {tuple(x.shape)}, "
            f"got {tuple(target.shape)}"
        )
    require_same_device(OP, "input", x, "target", target)
    vocab = weight.shape[0]
    if bias is not None:
        require_float(OP, "bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"{OP}: 'bias' must have shape ({vocab},), one per row of weight, got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{OP}: 'bias' must have the dtype of 'input' ({x.dtype}), got {bias.dtype}")
        require_same_device(OP, "input", x, "bias", bias)
    if ce_weight is not None:
        require_float(OP, "ce_weight", ce_weight)
        if ce_weight.shape != (vocab,):
            raise ValueError(
                f"{OP}: 'ce_weight' must have shape ({vocab},), one per class, got {tuple(ce_weight.shape)}"
            )
        require_same_device(OP, "input", x, "ce_weight", ce_weight)
    check_options(OP, attrs)
    check_accum_dtype(OP, attrs["accum_dtype"])
    check_targets(OP, target, vocab, attrs["ignore_index"])


def key(inputs: tuple, attrs: dict) -> tuple:
    x, weight, target, bias, ce_weight = inputs
    return (
        tensor_key(x),
        tensor_key(weight),
        x.shape[1],
        weight.shape[0],
        bucket(x.shape[0]),
        target.dtype,
        bias is not None,
        None if ce_weight is None else ce_weight.dtype,
        attrs["reduction"],
        attrs["label_smoothing"] > 0,
        attrs["lse_square_scale"] > 0,
        attrs["softcap"] is not None,
        attrs["return_z_loss"],
        attrs["return_token_accuracy"],
        attrs["return_predicted_tokens"],
        attrs["accum_dtype"],
        attrs["use_token_scaling"],
    )


def make_inputs(
    device: torch.device,
    dtype: torch.dtype,
    size: str,
    seed: int,
    with_bias: bool = False,
    with_ce_weight: bool = False,
    **attrs,
):
    generator = torch.Generator().manual_seed(seed)
    rows, hidden, vocab = SHAPES[size]
    x = randn((rows, hidden), dtype, device, generator)
    # logits of standard deviation about 2, as a trained head gives
    weight = randn((vocab, hidden), dtype, device, generator, scale=2.0 / hidden**0.5)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < 0.1] = attrs.get("ignore_index", -100)
    bias = randn((vocab,), dtype, device, generator, scale=0.5) if with_bias else None
    ce_weight = (
        torch.rand(vocab, generator=generator).add(0.5).to(device=device, dtype=dtype) if with_ce_weight else None
    )
    return (x, weight, target.to(device), bias, ce_weight), attrs


SPEC = OpSpec(
    name=OP,
    inputs=(
        InputSpec(name="input", differentiable=True),
        InputSpec(name="weight", differentiable=True),
        InputSpec(name="target"),
        InputSpec(name="bias", kind="optional_tensor", differentiable=True),
        InputSpec(name="ce_weight", kind="optional_tensor"),
    ),
    attrs=(
        AttrSpec(name="ignore_index", type="int", default=-100),
        AttrSpec(name="lse_square_scale", type="float", default=0.0),
        AttrSpec(name="label_smoothing", type="float", default=0.0),
        AttrSpec(name="reduction", type="str", default="mean", choices=REDUCTIONS),
        AttrSpec(name="softcap", type="float", default=None, optional=True),
        AttrSpec(name="return_z_loss", type="bool", default=False),
        AttrSpec(name="return_token_accuracy", type="bool", default=False),
        AttrSpec(name="return_predicted_tokens", type="bool", default=False),
        AttrSpec(name="accum_dtype", type="dtype", default=None, optional=True),
        AttrSpec(name="use_token_scaling", type="bool", default=False),
    ),
    outputs=(
        OutputSpec(name="loss"),
        OutputSpec(name="z_loss", differentiable=False),
        OutputSpec(name="token_accuracy", differentiable=False),
        OutputSpec(name="predicted_tokens", differentiable=False),
    ),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"with_bias": True, "with_ce_weight": True, "label_smoothing": 0.1},
        {"reduction": "none", "lse_square_scale": 1e-3, "return_z_loss": True},
        {"softcap": 3.0, "return_token_accuracy": True, "return_predicted_tokens": True, "ignore_index": 3},
        {"reduction": "sum", "use_token_scaling": True, "accum_dtype": torch.float32, "with_bias": True},
    ),
    make_inputs_fn=make_inputs,
)
