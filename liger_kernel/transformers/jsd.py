"""Generalised Jensen-Shannon divergence for distillation, liger-kernel 0.8 compatible."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import check_attr, resolve_impl


def check_beta(owner: str, name: str, op: str, attr: str, beta) -> float:
    beta = check_attr(op, owner, attr, beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{owner}: {name!r} must be in [0, 1], got {beta}")
    return beta


class LigerJSD(nn.Module):
    """``beta·KL(P‖M) + (1−beta)·KL(Q‖M)`` with ``M = beta·P + (1−beta)·Q``, summed over the vocabulary and averaged
    over the rows whose ``shift_labels`` are not ``ignore_index``; ``beta=0`` is the forward KL(P‖Q) and ``beta=1``
    the reverse KL(Q‖P). ``forward(log_q, log_p, shift_labels=None)`` takes the student's (Q) and the teacher's (P)
    log-probabilities, (BT, V) each; only ``log_q`` gets a gradient. Returns a scalar.
    """

    def __init__(
        self, beta: float = 0.5, ignore_index: int = -100, impl: str | None = None, backend: str | None = None
    ):
        super().__init__()
        name = type(self).__name__
        self.beta = check_beta(name, "beta", "jsd", "beta", beta)
        self.ignore_index = check_attr("jsd", name, "ignore_index", ignore_index)
        self.impl = resolve_impl(name, impl, backend)

    def forward(
        self, log_q: torch.Tensor, log_p: torch.Tensor, shift_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return liger_core.call(
            "jsd", log_q, log_p, shift_labels, impl=self.impl, beta=self.beta, ignore_index=self.ignore_index
        )

    def extra_repr(self) -> str:
        parts = [f"beta={self.beta}", f"ignore_index={self.ignore_index}"]
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
