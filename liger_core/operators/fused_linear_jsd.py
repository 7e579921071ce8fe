"""fused_linear_jsd: ``jsd`` (see that module) between the student and teacher distributions
``log_softmax(student_input @ student_weight.T / temperature)`` and
``log_softmax(teacher_input @ teacher_weight.T / temperature)``, with ``beta = jsd_beta``, without materialising
either (BT, V) logits. Only the student gets gradients. ``accum_dtype`` is the dtype the weight gradient is
accumulated in across token chunks; None lets the kernel choose, as for fused_linear_cross_entropy: the reference
uses float32, the triton kernel the weight's dtype (one rounding per chunk, no float32 copy of the weight gradient).
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_same_device, tensor_key
from .fused_linear_cross_entropy import check_accum_dtype
from .jsd import check_beta, check_labels, make_labels

OP = "fused_linear_jsd"
# (BT, H student, H teacher, V)
SHAPES = {"tiny": (37, 19, 23, 53), "small": (1024, 1024, 2048, 32000), "llama8b": (8192, 2048, 4096, 128256)}


def _check_linear(x_name: str, x: torch.Tensor, w_name: str, w: torch.Tensor) -> None:
    require_float(OP, x_name, x)
    require_dim(OP, x_name, x, 2)
    require_float(OP, w_name, w)
    require_dim(OP, w_name, w, 2)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"{OP}: {w_name!r} must have shape (V, {x.shape[1]}) to match the hidden size of {x_name!r} "
            f"{tuple(x.shape)}, got {tuple(w.shape)}"
        )
    if w.dtype != x.dtype:
        raise TypeError(f"{OP}: {w_name!r} must have the dtype of {x_name!r} ({x.dtype}), got {w.dtype}")
    require_same_device(OP, x_name, x, w_name, w)


def check(inputs: tuple, attrs: dict) -> None:
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    _check_linear("student_input", student_input, "student_weight", student_weight)
    _check_linear("teacher_input", teacher_input, "teacher_weight", teacher_weight)
    if student_weight.shape[0] == 0:
        raise ValueError(
            f"{OP}: 'student_weight' must have at least one row (class), got {tuple(student_weight.shape)}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"{OP}: 'teacher_weight' must have {student_weight.shape[0]} rows, the vocabulary of 'student_weight', "
            f"got {tuple(teacher_weight.shape)}"
        )
    if teacher_input.shape[0] != student_input.shape[0]:
        raise ValueError(
            f"{OP}: 'teacher_input' must have {student_input.shape[0]} rows (tokens), as 'student_input', "
            f"got {tuple(teacher_input.shape)}"
        )
    require_same_device(OP, "student_input", student_input, "teacher_input", teacher_input)
    check_labels(OP, "student_input", student_input.shape[0], student_input, shift_labels)
    check_beta(OP, "jsd_beta", attrs["jsd_beta"])
    if attrs["temperature"] <= 0:
        raise ValueError(f"{OP}: 'temperature' must be > 0, got {attrs['temperature']}")
    check_accum_dtype(OP, attrs["accum_dtype"])


def key(inputs: tuple, attrs: dict) -> tuple:
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    return (
        tensor_key(student_input),
        tensor_key(student_weight),
        tensor_key(teacher_input),
        tensor_key(teacher_weight),
        student_input.shape[1],
        teacher_input.shape[1],
        student_weight.shape[0],
        bucket(student_input.shape[0]),
        None if shift_labels is None else shift_labels.dtype,
        attrs["jsd_beta"] == 0.0,
        attrs["jsd_beta"] == 1.0,
        attrs["temperature"] != 1.0,
        attrs["accum_dtype"],
    )


def make_inputs(device: torch.device, dtype: torch.dtype, size: str, seed: int, with_labels: bool = False, **attrs):
    generator = torch.Generator().manual_seed(seed)
    rows, student_hidden, teacher_hidden, vocab = SHAPES[size]
    student_input = randn((rows, student_hidden), dtype, device, generator)
    student_weight = randn((vocab, student_hidden), dtype, device, generator, scale=2.0 / student_hidden**0.5)
    teacher_input = randn((rows, teacher_hidden), dtype, device, generator)
    teacher_weight = randn((vocab, teacher_hidden), dtype, device, generator, scale=2.0 / teacher_hidden**0.5)
    labels = make_labels(rows, vocab, generator, attrs.get("ignore_index", -100)) if with_labels else None
    return (
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        None if labels is None else labels.to(device),
    ), attrs


SPEC = OpSpec(
    name=OP,
    inputs=(
        InputSpec(name="student_input", differentiable=True),
        InputSpec(name="student_weight", differentiable=True),
        InputSpec(name="teacher_input"),
        InputSpec(name="teacher_weight"),
        InputSpec(name="shift_labels", kind="optional_tensor"),
    ),
    attrs=(
        AttrSpec(name="jsd_beta", type="float", default=0.5),
        AttrSpec(name="ignore_index", type="int", default=-100),
        AttrSpec(name="temperature", type="float", default=1.0),
        AttrSpec(name="accum_dtype", type="dtype", default=None, optional=True),
    ),
    outputs=(OutputSpec(name="loss"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"jsd_beta": 0.0, "with_labels": True},
        {"jsd_beta": 1.0, "temperature": 2.0, "with_labels": True},
        {"jsd_beta": 0.3, "with_labels": True, "ignore_index": 2, "accum_dtype": torch.float32},
    ),
    make_inputs_fn=make_inputs,
)
