"""LigerFusedLinearSimPOLoss: Simple Preference Optimization on the final linear layer."""

from __future__ import annotations

import torch

from ._base import PreferenceLoss


class LigerFusedLinearSimPOLoss(PreferenceLoss):
    """SimPO loss of ``_input @ lin_weight.T + bias`` without materialising the logits.

    Averaged log-probs; ``z = beta·(c − r) − gamma``; per pair ``−(1−ls)·logσ(z) − ls·logσ(−z)``, plus
    ``alpha·nll`` when compute_nll_loss. Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``.
    """

    OP = "fused_linear_simpo"

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(
            compiled,
            chunk_size,
            impl,
            backend,
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll_loss,
            gamma=gamma,
        )

    def forward(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ):
        return self._run((_input, lin_weight, target, bias))
