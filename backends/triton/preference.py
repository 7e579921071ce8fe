"""fused_linear_dpo, fused_linear_orpo, fused_linear_cpo, fused_linear_simpo in Triton; see
liger_core.operators.preference for the math.

Every one of these losses depends on the logits only through the per-token log-probability of the target token, so
all four run on one "fused linear target log-prob" pass (_target_logprobs.py: chunks of token rows, cuBLAS for the
logits, a Triton row kernel for the log-sum-exp), which never holds more than one chunk of logits:

1. forward: the policy pass gives each token's target log-prob (and nll_target's for ORPO), its log-sum-exp and its
   logits row sum; the reference model's pass (DPO with use_ref_model) runs the same way without any autograd graph;
2. the pairwise loss, the NLL and the aux outputs are plain PyTorch on (B,)-sized per-sequence values, with the loss
   functions of the reference backend; d loss / d (sequence log-prob) comes from ``torch.func.jvp`` on those tiny
   tensors (the reference backend's ``pair_loss_and_slopes``), which gives d loss / d token log-prob per row (the
   NLL's coefficient added);
3. backward: those coefficients, times the incoming gradient, drive the recomputing backward of the pass.

Logits are computed in the input dtype (fp32 accumulation inside the GEMM), softmax math in fp32. No host
synchronisation, nothing data-dependent on the host: it runs under torch.compile(fullgraph=True) and in CUDA graphs.
"""

from __future__ import annotations

import torch

from liger_core.spec import KernelSpec

from ..reference.preference import (
    _cpo_pairs,
    _dpo_extras,
    _dpo_pairs,
    _orpo_extras,
    _orpo_pairs,
    _plain_rewards,
    _sequence_logps,
    _simpo_pairs,
    loss_and_outputs,
)
from ._target_logprobs import backward_pass, forward_pass
from .rms_norm import DTYPES

DPO, ORPO = "fused_linear_dpo", "fused_linear_orpo"


def _make_forward(op: str, pairs_fn, extras_fn, always_average: bool):
    def forward(inputs: tuple, attrs: dict, needs_grad: bool):
        x, weight, target, bias = inputs[:4]
        ignore_index = attrs["ignore_index"]
        compute_nll = attrs["compute_nll_loss"]
        alpha = attrs.get("alpha", 1.0) if compute_nll else 0.0
        average = always_average or attrs["average_log_prob"]
        # ORPO's nll_target replaces target for the NLL term only; unused when there is no NLL term.
        nll_target = inputs[4] if op == ORPO and compute_nll else None
        sequences, length = x.shape[0], x.shape[1]
        pairs, vocab = sequences // 2, weight.shape[0]

        lse, logp, nll_logp, row_sum = forward_pass(x, weight, bias, target, nll_target, ignore_index, True)
        counted = target != ignore_index
        token_logp = logp.view(sequences, length)
        logps, denominator = _sequence_logps(token_logp, counted, average)
        c, r = logps[:pairs], logps[pairs:]

        if op == DPO and attrs["use_ref_model"]:
            ref_input, ref_weight, ref_bias = inputs[4:]
            _, ref_logp, _, _ = forward_pass(ref_input, ref_weight, ref_bias, target, None, ignore_index, False)
            ref_logps, _ = _sequence_logps(ref_logp.view(sequences, length), counted, average)
            ref_c, ref_r = ref_logps[:pairs], ref_logps[pairs:]
        else:
            ref_c = ref_r = torch.zeros((), dtype=torch.float32, device=x.device)

        # NLL over the chosen half: summed negative log-prob of its counted tokens over their count.
        if nll_target is None:
            nll_token_logp, nll_counted = token_logp, counted
        else:
            nll_token_logp, nll_counted = nll_logp.view(sequences, length), nll_target != ignore_index
        nll_count = nll_counted[:pairs].sum().clamp_min(1).to(torch.float32)
        nll = -nll_token_logp[:pairs].sum() / nll_count

        logits_means = row_sum.view(2, pairs * length).sum(1) / (pairs * length * vocab)  # chosen, rejected
        outputs, (d_chosen, d_rejected) = loss_and_outputs(
            pairs_fn, extras_fn, (c, r, ref_c, ref_r), nll, alpha, logits_means, attrs, needs_grad, x.dtype
        )
        if not needs_grad:
            return outputs, None

        # d loss / d token log-prob, per row (the kernel zeroes it at ignored rows): the preference term's from its
        # sequence, the NLL's on the chosen half (against nll_target when given).
        coef = (torch.cat([d_chosen, d_rejected]) / denominator)[:, None].expand(sequences, length)
        nll_coef = torch.cat([(-alpha / nll_count).expand(pairs, length), torch.zeros_like(token_logp[pairs:])])
        if nll_target is None:
            coef, nll_coef = coef + nll_coef, None
        want = (
            x.requires_grad,
            weight.requires_grad,
            bias is not None and bias.requires_grad,
        )
        return outputs, (x, weight, bias, target, nll_target, lse, coef.contiguous(), nll_coef, ignore_index, want)

    return forward


def backward(saved: tuple, grad_outputs: tuple):
    x, weight, bias, target, nll_target, lse, coef, nll_coef, ignore_index, want = saved
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return None, None, None
    scale = grad_loss.to(torch.float32)
    coef = coef * scale
    nll_coef = None if nll_coef is None else nll_coef * scale
    return backward_pass(x, weight, bias, target, nll_target, lse, coef, nll_coef, ignore_index, want)


def _make_supports(op: str):
    def supports(inputs: tuple, attrs: dict) -> list[str]:
        groups = [("", inputs[0], inputs[1], inputs[3])]
        if op == DPO and attrs["use_ref_model"]:
            groups.append(("ref_", *inputs[4:]))
        reasons = []
        for prefix, x, weight, bias in groups:
            for name, t in ((f"{prefix}input", x), (f"{prefix}weight", weight), (f"{prefix}bias", bias)):
                if t is not None and t.dtype not in DTYPES:
                    reasons.append(f"{name} is {t.dtype}; the Triton {op} takes {[str(d) for d in DTYPES]}")
                elif t is not None and t.dtype != x.dtype:
                    reasons.append(
                        f"{name} is {t.dtype} but {prefix}input is {x.dtype}; the Triton {op} runs its GEMMs in the "
                        "input dtype and wants them equal"
                    )
        return reasons

    return supports


def _kernel(op: str, pairs_fn, extras_fn, always_average: bool) -> KernelSpec:
    return KernelSpec(
        op=op,
        forward=_make_forward(op, pairs_fn, extras_fn, always_average),
        backward=backward,
        supports=_make_supports(op),
        devices=("cuda",),
        dtypes=DTYPES,
    )


DPO_KERNEL = _kernel(DPO, _dpo_pairs, _dpo_extras, always_average=False)
ORPO_KERNEL = _kernel(ORPO, _orpo_pairs, _orpo_extras, always_average=True)
CPO_KERNEL = _kernel("fused_linear_cpo", _cpo_pairs, _plain_rewards, always_average=False)
SIMPO_KERNEL = _kernel("fused_linear_simpo", _simpo_pairs, _plain_rewards, always_average=True)
