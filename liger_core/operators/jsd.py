"""jsd: generalised Jensen-Shannon divergence between student and teacher distributions given as log-probabilities.

With ``P`` the teacher (``log_p``), ``Q`` the student (``log_q``) and ``M = beta·P + (1−beta)·Q``, each row's loss is
``beta·KL(P‖M) + (1−beta)·KL(Q‖M)`` summed over the vocabulary; ``beta=0`` is defined as the forward ``KL(P‖Q)`` and
``beta=1`` as the reverse ``KL(Q‖P)`` (the general formula would give 0 there). The result is the mean over the rows
whose ``shift_labels`` differ from ``ignore_index`` (over all rows without labels; 0 when every row is ignored), in
log_q's dtype. Only ``log_q`` gets a gradient.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_index, require_same_device, tensor_key

OP = "jsd"
SHAPES = {"tiny": (37, 53), "small": (1024, 32000), "llama8b": (8192, 128256)}


def check_beta(op: str, name: str, beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{op}: {name!r} must be in [0, 1], got {beta}")


def check_labels(op: str, first: str, rows: int, reference: torch.Tensor, shift_labels: torch.Tensor | None) -> None:
    if shift_labels is None:
        return
    require_index(op, "shift_labels", shift_labels)
    if shift_labels.shape != (rows,):
        raise ValueError(
            f"{op}: 'shift_labels' must have shape ({rows},), one label per row of {first!r}, "
            f"got {tuple(shift_labels.shape)}"
        )
    require_same_device(op, first, reference, "shift_labels", shift_labels)


def check(inputs: tuple, attrs: dict) -> None:
    log_q, log_p, shift_labels = inputs
    require_float(OP, "log_q", log_q)
    require_dim(OP, "log_q", log_q, 2)
    require_float(OP, "log_p", log_p)
    if log_p.shape != log_q.shape:
        raise ValueError(f"{OP}: 'log_p' must have the shape of 'log_q' {tuple(log_q.shape)}, got {tuple(log_p.shape)}")
    require_same_device(OP, "log_q", log_q, "log_p", log_p)
    check_labels(OP, "log_q", log_q.shape[0], log_q, shift_labels)
    check_beta(OP, "beta", attrs["beta"])


def key(inputs: tuple, attrs: dict) -> tuple:
    log_q, log_p, shift_labels = inputs
    return (
        tensor_key(log_q),
        tensor_key(log_p),
        log_q.shape[1],
        bucket(log_q.shape[0]),
        None if shift_labels is None else shift_labels.dtype,
        attrs["beta"] == 0.0,
        attrs["beta"] == 1.0,
    )


def make_labels(rows: int, vocab: int, generator: torch.Generator, ignore_index: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.25] = ignore_index
    return labels


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, with_labels: bool = False, **attrs):
    generator = torch.Generator().manual_seed(seed)
    rows, vocab = SHAPES[size]
    cpu = torch.device("cpu")
    log_q = torch.log_softmax(randn((rows, vocab), torch.float32, cpu, generator, scale=2.0), -1)
    log_p = torch.log_softmax(randn((rows, vocab), torch.float32, cpu, generator, scale=2.0), -1)
    labels = make_labels(rows, vocab, generator, attrs.get("ignore_index", -100)) if with_labels else None
    return (
        log_q.to(device=device, dtype=dtype),
        log_p.to(device=device, dtype=dtype),
        None if labels is None else labels.to(device),
    ), attrs


SPEC = OpSpec(
    name=OP,
    inputs=(
        InputSpec(name="log_q", differentiable=True),
        InputSpec(name="log_p"),
        InputSpec(name="shift_labels", kind="optional_tensor"),
    ),
    attrs=(
        AttrSpec(name="beta", type="float", default=0.5),
        AttrSpec(name="ignore_index", type="int", default=-100),
    ),
    outputs=(OutputSpec(name="loss"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"beta": 0.0, "with_labels": True},
        {"beta": 1.0, "with_labels": True},
        {"beta": 0.5, "with_labels": True, "ignore_index": 2},
    ),
    make_inputs_fn=make_inputs,
)
