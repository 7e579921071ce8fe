"""LigerFusedLinearDPOLoss: Direct Preference Optimization (and its TRL loss types) on the final linear layer."""

from __future__ import annotations

import torch

from ._base import PreferenceLoss


class LigerFusedLinearDPOLoss(PreferenceLoss):
    """DPO loss of ``_input @ lin_weight.T + bias`` without materialising the logits.

    ``_input (2B, T, H)`` holds the B chosen sequences, then the B rejected ones; ``target (2B, T)`` is shifted.
    With ``use_ref_model`` the reference log-probs come from ``ref_input``/``ref_weight``/``ref_bias`` (no
    gradient). ``loss_type`` is one of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard,
    apo_zero, apo_down, discopop (API.md). Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``. ``compiled`` and ``chunk_size`` are
    accepted for compatibility.
    """

    OP = "fused_linear_dpo"

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
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
            compute_nll_loss=compute_nll_loss,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ):
        return self._run((_input, lin_weight, target, bias, ref_input, ref_weight, ref_bias))
