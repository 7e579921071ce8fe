"""jsd in plain PyTorch; autograd differentiates it. See liger_core.operators.jsd for the math.

`jsd_rows`, `jsd_log_q_gradient` and `mean_over_labelled` are reused chunk by chunk by fused_linear_jsd.
"""

from __future__ import annotations

import math

import torch

from liger_core.spec import FLOAT_DTYPES, KernelSpec

from .cross_entropy import safe_divide


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·(log a − log b) per row; a term with a = 0 is 0 (not 0·∞)."""
    a = torch.exp(log_a)
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def jsd_rows(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalised JSD of each row (summed over the vocabulary); beta 0 and 1 are the two KLs."""
    if beta == 0.0:
        return _kl_rows(log_p, log_q)  # forward KL(P‖Q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)  # reverse KL(Q‖P)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def jsd_log_q_gradient(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """d/d(log_q) of ``jsd_rows(log_q, log_p, beta).sum()``, log_q and log_p taken as free variables:
    ``−p`` for beta 0, ``q·(log q − log p + 1)`` for beta 1, else ``(1−beta)·q·(log q − log m)``."""
    q = torch.exp(log_q)
    if beta == 0.0:
        return -torch.exp(log_p)
    if beta == 1.0:
        return torch.where(q > 0, q * (log_q - log_p + 1.0), torch.zeros_like(q))
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    return torch.where(q > 0, (1.0 - beta) * q * (log_q - log_m), torch.zeros_like(q))


def labelled(shift_labels: torch.Tensor | None, rows: int, ignore_index: int, device) -> torch.Tensor:
    """Which rows count: those whose label is not ignore_index (every row without labels)."""
    if shift_labels is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return shift_labels != ignore_index


def mean_over_labelled(row_losses: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The mean of the counted rows' losses; 0 when none counts. Stays on the device."""
    total = torch.where(counted, row_losses, torch.zeros_like(row_losses)).sum()
    return safe_divide(total, counted.sum().to(row_losses.dtype))


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    log_q, log_p, shift_labels = inputs
    wide = torch.promote_types(log_q.dtype, torch.float32)
    rows = jsd_rows(log_q.to(wide), log_p.detach().to(wide), attrs["beta"])  # no gradient to the teacher
    counted = labelled(shift_labels, log_q.shape[0], attrs["ignore_index"], log_q.device)
    return (mean_over_labelled(rows, counted).to(log_q.dtype),), None


KERNEL = KernelSpec(op="jsd", forward=forward, dtypes=FLOAT_DTYPES + (torch.float64,))
