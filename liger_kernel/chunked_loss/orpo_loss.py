"""LigerFusedLinearORPOLoss: Odds Ratio Preference Optimization on the final linear layer."""

from __future__ import annotations

import torch

from ._base import PreferenceLoss


class LigerFusedLinearORPOLoss(PreferenceLoss):
    """ORPO loss of ``_input @ lin_weight.T + bias`` without materialising the logits.

    Averaged log-probs c, r; ``log_odds = (c − r) − (log1p(−exp(c)) − log1p(−exp(r)))``; loss
    ``nll (when compute_nll_loss) + mean(−beta·logσ(log_odds))``. ``nll_target``, when given, replaces ``target`` for
    the NLL term only. Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``.
    """

    OP = "fused_linear_orpo"

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(
            compiled, chunk_size, impl, backend, ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        nll_target: torch.Tensor | None = None,
    ):
        return self._run((_input, lin_weight, target, bias, nll_target))
