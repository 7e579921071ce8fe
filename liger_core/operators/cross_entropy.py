"""cross_entropy: hard-label cross entropy over the last dimension of (BT, V) logits.

Equal to ``F.cross_entropy(logits, target, weight, ignore_index=, label_smoothing=, reduction=)``, with:
``softcap=c`` mapping logits to ``c·tanh(x/c)`` first; ``lse_square_scale=s`` adding the z-loss ``s·lse²`` of each
non-ignored row (not class-weighted; "mean" divides it by the count of non-ignored rows); a loss of 0, not NaN, when
every row is ignored. Outputs: the loss; the z-loss, token accuracy and predicted tokens when asked (else None).
A target outside [0, V) that is not ignore_index gives a NaN loss (a ValueError under LIGER_KERNEL_CHECKS=1).
"""

from __future__ import annotations

import torch

from .. import env
from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_index, require_same_device, tensor_key

REDUCTIONS = ("mean", "sum", "none")
SHAPES = {"tiny": (37, 53), "small": (1024, 32000), "llama8b": (8192, 128256)}


def check(inputs: tuple, attrs: dict) -> None:
    logits, target, weight = inputs
    require_float("cross_entropy", "input", logits)
    require_dim("cross_entropy", "input", logits, 2)
    require_index("cross_entropy", "target", target)
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: 'target' must have shape ({logits.shape[0]},), one class per row of input "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    require_same_device("cross_entropy", "input", logits, "target", target)
    if weight is not None:
        require_float("cross_entropy", "weight", weight)
        if weight.shape != logits.shape[1:]:
            raise ValueError(f"cross_entropy: 'weight' must have shape ({logits.shape[1]},), got {tuple(weight.shape)}")
        require_same_device("cross_entropy", "input", logits, "weight", weight)
    check_options("cross_entropy", attrs)
    check_targets("cross_entropy", target, logits.shape[1], attrs["ignore_index"])


def check_options(op: str, attrs: dict) -> None:
    """Range checks of the loss options, shared with fused_linear_cross_entropy."""
    if not 0.0 <= attrs["label_smoothing"] <= 1.0:
        raise ValueError(f"{op}: 'label_smoothing' must be in [0, 1], got {attrs['label_smoothing']}")
    if attrs["lse_square_scale"] < 0:
        raise ValueError(f"{op}: 'lse_square_scale' must be >= 0, got {attrs['lse_square_scale']}")
    if attrs["softcap"] is not None and attrs["softcap"] <= 0:
        raise ValueError(f"{op}: 'softcap' must be > 0 or None, got {attrs['softcap']}")


def check_targets(op: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Under LIGER_KERNEL_CHECKS=1 only: every target is a class in [0, vocab) or ignore_index (reads the data)."""
    if env.checks_enabled():  # reads the data: synchronises, so only on request
        out_of_range = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(out_of_range.any()):
            bad = target[out_of_range][:5].tolist()
            raise ValueError(
                f"{op}: 'target' holds classes outside [0, {vocab}) that are not ignore_index={ignore_index}: {bad}"
            )


def key(inputs: tuple, attrs: dict) -> tuple:
    logits, target, weight = inputs
    return (
        tensor_key(logits),
        logits.shape[1],
        bucket(logits.shape[0]),
        target.dtype,
        weight is not None,
        attrs["reduction"],
        attrs["label_smoothing"] > 0,
        attrs["lse_square_scale"] > 0,
        attrs["softcap"] is not None,
        attrs["return_z_loss"],
        attrs["return_token_accuracy"],
        attrs["return_predicted_tokens"],
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, with_weight: bool = False, **attrs):
    generator = torch.Generator().manual_seed(seed)
    rows, vocab = SHAPES[size]
    logits = randn((rows, vocab), dtype, device, generator, scale=2.0)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    ignored = torch.rand(rows, generator=generator) < 0.1
    target[ignored] = attrs.get("ignore_index", -100)
    weight = torch.rand(vocab, generator=generator).add(0.5).to(device=device, dtype=dtype) if with_weight else None
    return (logits, target.to(device), weight), attrs


SPEC = OpSpec(
    name="cross_entropy",
    inputs=(
        InputSpec(name="input", differentiable=True),
        InputSpec(name="target"),
        InputSpec(name="weight", kind="optional_tensor"),
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
        {"reduction": "sum", "label_smoothing": 0.1, "with_weight": True},
        {"reduction": "none", "softcap": 30.0, "lse_square_scale": 1e-4, "return_z_loss": True},
        {"return_token_accuracy": True, "return_predicted_tokens": True, "ignore_index": 3},
    ),
    make_inputs_fn=make_inputs,
)
