"""kl_div: ``nn.KLDivLoss`` on log-probabilities ``y_pred`` against ``y_true``.

Per element ``y_true·(log(max(y_true, eps)) − y_pred)``, or ``exp(y_true)·(y_true − y_pred)`` when ``log_target``.
Reductions as ``nn.KLDivLoss``: "batchmean" is the sum divided by ``y_pred.size(0)`` (the plain sum for a 0-D
input), "mean" the sum divided by the number of elements, "sum", and "none" (the elementwise loss, shaped like the
input). The output has y_pred's dtype; no gradient flows to ``y_true``.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_float, require_same_device, tensor_key

OP = "kl_div"
REDUCTIONS = ("batchmean", "mean", "sum", "none")
SHAPES = {"tiny": (3, 7, 37), "small": (1024, 32000), "llama8b": (8192, 128256)}


def check(inputs: tuple, attrs: dict) -> None:
    y_pred, y_true = inputs
    require_float(OP, "y_pred", y_pred)
    require_float(OP, "y_true", y_true)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"{OP}: 'y_true' must have the shape of 'y_pred' {tuple(y_pred.shape)}, got {tuple(y_true.shape)}"
        )
    require_same_device(OP, "y_pred", y_pred, "y_true", y_true)
    if attrs["eps"] < 0:
        raise ValueError(f"{OP}: 'eps' must be >= 0, got {attrs['eps']}")


def key(inputs: tuple, attrs: dict) -> tuple:
    y_pred, y_true = inputs
    return (
        tensor_key(y_pred),
        y_pred.shape[-1] if y_pred.dim() else 1,
        bucket(y_pred.numel()),
        y_true.dtype,
        y_true.is_contiguous(),
        attrs["reduction"],
        attrs["log_target"],
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, **attrs):
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[size]
    y_pred = torch.log_softmax(randn(shape, torch.float32, torch.device("cpu"), generator, scale=2.0), -1)
    target_logits = randn(shape, torch.float32, torch.device("cpu"), generator, scale=2.0)
    y_true = (
        torch.log_softmax(target_logits, -1) if attrs.get("log_target", False) else torch.softmax(target_logits, -1)
    )
    return (y_pred.to(device=device, dtype=dtype), y_true.to(device=device, dtype=dtype)), attrs


SPEC = OpSpec(
    name=OP,
    inputs=(InputSpec(name="y_pred", differentiable=True), InputSpec(name="y_true")),
    attrs=(
        AttrSpec(name="reduction", type="str", default="mean", choices=REDUCTIONS),
        AttrSpec(name="log_target", type="bool", default=False),
        AttrSpec(name="eps", type="float", default=1e-10),
    ),
    outputs=(OutputSpec(name="loss"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"log_target": True, "reduction": "batchmean"},
        {"reduction": "none"},
        {"reduction": "sum", "eps": 1e-6},
    ),
    make_inputs_fn=make_inputs,
)
