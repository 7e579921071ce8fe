"""Functional forms of the preference losses: ``liger_fused_linear_{dpo,orpo,cpo,simpo}``.

As liger-kernel's ``*Function.apply``, they take the input first: ``(_input, weight, target, bias=None, ...)`` (the
modules take the weight first), then the call's extra tensors, then the options in the constructors' order; passing
options by keyword is the portable way. They return ``(loss, aux)`` like the modules.
"""

from __future__ import annotations

import torch

from ._base import check_options, run


def liger_fused_linear_dpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
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
):
    """`LigerFusedLinearDPOLoss` as a function (input first)."""
    attrs = check_options(
        "fused_linear_dpo",
        "liger_fused_linear_dpo",
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
    return run("fused_linear_dpo", (_input, weight, target, bias, ref_input, ref_weight, ref_bias), None, attrs)


def liger_fused_linear_orpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    nll_target: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compute_nll_loss: bool = True,
    compiled: bool = True,
    chunk_size: int = 1,
):
    """`LigerFusedLinearORPOLoss` as a function (input first)."""
    attrs = check_options(
        "fused_linear_orpo",
        "liger_fused_linear_orpo",
        ignore_index=ignore_index,
        beta=beta,
        compute_nll_loss=compute_nll_loss,
    )
    return run("fused_linear_orpo", (_input, weight, target, bias, nll_target), None, attrs)


def liger_fused_linear_cpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = True,
    compiled: bool = True,
    average_log_prob: bool = False,
    chunk_size: int = 1,
):
    """`LigerFusedLinearCPOLoss` as a function (input first)."""
    attrs = check_options(
        "fused_linear_cpo",
        "liger_fused_linear_cpo",
        ignore_index=ignore_index,
        beta=beta,
        alpha=alpha,
        label_smoothing=label_smoothing,
        compute_nll_loss=compute_nll_loss,
        average_log_prob=average_log_prob,
    )
    return run("fused_linear_cpo", (_input, weight, target, bias), None, attrs)


def liger_fused_linear_simpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = True,
    compiled: bool = True,
    gamma: float = 0.5,
    chunk_size: int = 1,
):
    """`LigerFusedLinearSimPOLoss` as a function (input first)."""
    attrs = check_options(
        "fused_linear_simpo",
        "liger_fused_linear_simpo",
        ignore_index=ignore_index,
        beta=beta,
        alpha=alpha,
        label_smoothing=label_smoothing,
        compute_nll_loss=compute_nll_loss,
        gamma=gamma,
    )
    return run("fused_linear_simpo", (_input, weight, target, bias), None, attrs)
