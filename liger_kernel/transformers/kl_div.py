"""KL divergence, liger-kernel 0.8 compatible: ``nn.KLDivLoss`` with an ``eps`` guarding ``log(y_true)``."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import check_attr, resolve_impl


class LigerKLDIVLoss(nn.KLDivLoss):
    """``nn.KLDivLoss`` (``reduction`` "mean" by default, ``log_target`` False) on log-probabilities ``y_pred``.

    Per element ``y_true·(log(max(y_true, eps)) − y_pred)``, or ``exp(y_true)·(y_true − y_pred)`` when
    ``log_target``; reductions "batchmean", "mean", "sum", "none" as ``nn.KLDivLoss``. No gradient to ``y_true``.
    ``impl=``/``backend=`` keywords choose the backend, as for every module of this package.
    """

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        impl, backend = kwargs.pop("impl", None), kwargs.pop("backend", None)
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        self.eps = check_attr("kl_div", name, "eps", eps)
        if self.eps < 0:
            raise ValueError(f"{name}: 'eps' must be >= 0, got {eps}")
        check_attr("kl_div", name, "reduction", self.reduction)
        check_attr("kl_div", name, "log_target", self.log_target)
        self.impl = resolve_impl(name, impl, backend)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return liger_core.call(
            "kl_div", y_pred, y_true, impl=self.impl, reduction=self.reduction, log_target=self.log_target, eps=self.eps
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"log_target={self.log_target}", f"eps={self.eps}"]
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
