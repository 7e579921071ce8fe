"""Fused linear JSD for distillation, liger-kernel 0.8 compatible: `LigerJSD` on the student's and teacher's
``log_softmax(x @ W.T / temperature)`` without materialising either (tokens × vocabulary) logits."""

from __future__ import annotations

import torch
from torch import nn

import liger_core
from liger_core.operators.fused_linear_cross_entropy import check_accum_dtype

from ._common import check_attr, resolve_impl
from ._distributed import gather_dtensors
from .jsd import check_beta

OP = "fused_linear_jsd"


def check_fused_jsd_options(owner: str, jsd_beta, ignore_index, temperature, accum_dtype) -> dict:
    checked = {
        "jsd_beta": check_beta(owner, "jsd_beta", OP, "jsd_beta", jsd_beta),
        "ignore_index": check_attr(OP, owner, "ignore_index", ignore_index),
        "temperature": check_attr(OP, owner, "temperature", temperature),
        "accum_dtype": check_attr(OP, owner, "accum_dtype", accum_dtype),
    }
    if checked["temperature"] <= 0:
        raise ValueError(f"{owner}: 'temperature' must be > 0, got {temperature}")
    check_accum_dtype(owner, accum_dtype)
    return checked


def fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels, impl=None, **attrs):
    """Run the operator; DTensor operands (e.g. FSDP2-sharded weights) are gathered first (`gather_dtensors`)."""
    student_input, student_weight, teacher_input, teacher_weight = gather_dtensors(
        student_input, student_weight, teacher_input, teacher_weight
    )
    return liger_core.call(
        OP, student_input, student_weight, teacher_input, teacher_weight, shift_labels, impl=impl, **attrs
    )


class LigerFusedLinearJSD(nn.Module):
    """`LigerJSD` with ``beta=jsd_beta`` between ``log_softmax(student_input @ student_weight.T / temperature)`` (Q)
    and ``log_softmax(teacher_input @ teacher_weight.T / temperature)`` (P), computed chunk by chunk over tokens.

    ``forward(student_input (BT, Hs), student_weight (V, Hs), teacher_input (BT, Ht), teacher_weight (V, Ht),
    shift_labels=None)`` returns a scalar; the teacher gets no gradient. ``accum_dtype=torch.float32`` accumulates
    the weight gradient in float32.
    """

    def __init__(
        self,
        jsd_beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        accum_dtype: torch.dtype | None = None,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        options = check_fused_jsd_options(name, jsd_beta, ignore_index, temperature, accum_dtype)
        for option, value in options.items():
            setattr(self, option, value)
        self.impl = resolve_impl(name, impl, backend)

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_jsd(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            shift_labels,
            impl=self.impl,
            jsd_beta=self.jsd_beta,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            accum_dtype=self.accum_dtype,
        )

    def extra_repr(self) -> str:
        parts = [f"jsd_beta={self.jsd_beta}", f"ignore_index={self.ignore_index}", f"temperature={self.temperature}"]
        if self.accum_dtype is not None:
            parts.append(f"accum_dtype={self.accum_dtype}")
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
