"""The preference losses (DPO, ORPO, CPO, SimPO), compiled tile by tile of tokens.

The math is the reference backend's (`liger_backends.reference.preference`, whose docstring explains the two
passes); only the two passes over (rows, V) logits, where the time goes, are compiled:

1. forward, per tile (`TOKEN_PASS`): the logits, each token's logsumexp, its logits' row sum and its target logit
   (and nll_target logit), fused by Inductor into one reduction sweep after the matmul;
2. backward, per tile (`GRADIENT_PASS`): the logits again, ``d loss / dz = coef·(onehot(target) − p)``, the tile's
   input gradient and bias gradient; the weight gradient is accumulated outside with an in-place ``addmm_``.

The matrix products run in the weight's dtype (bf16 on a bf16 model), the softmax math in float32, and the weight
gradient accumulates in the weight's dtype, as the triton backend does.

Between them, the per-sequence losses and their derivative run eagerly on (2B,)-sized tensors: the forward is the
reference's own (`make_forward`), given the compiled pass one. A tile holds up to
`liger_inductor.compiler.CHUNK_BYTES` of float32 logits; its row count is a dynamic dimension, so every tile of
every step shares one graph.
"""

from __future__ import annotations

import torch
from liger_backends.reference import preference as reference

from liger_core.spec import FLOAT_DTYPES, KernelSpec

from .compiler import ALL, LEADING, CompiledFunction, chunk_rows, inductor_kernel


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wide: torch.dtype) -> torch.Tensor:
    # The product at the weight's own dtype (the tensor cores' rate: float32 products made a DPO step 13x slower
    # than triton's), the logits then in the wide dtype; the bias arrives in the wide dtype, converted once per call.
    z = (x.to(weight.dtype) @ weight.T).to(wide)
    return z if bias is None else z + bias


def token_math(args: tuple, static: dict):
    """One tile: (logsumexp, row sum of the logits, target logit, nll_target logit or None) per token."""
    x, weight, bias, classes, nll_classes = args
    z = _logits(x, weight, bias, static["wide"])
    picked = z.gather(1, classes.unsqueeze(1)).squeeze(1)
    nll_picked = None if nll_classes is None else z.gather(1, nll_classes.unsqueeze(1)).squeeze(1)
    return torch.logsumexp(z, dim=-1), z.sum(-1), picked, nll_picked


def gradient_math(args: tuple, static: dict):
    """One tile: (grad of x rows, d loss / dz in the weight's dtype, grad of the bias (wide dtype) or None)."""
    x, weight, bias, lse, safe, coef, total, nll_safe, nll_coef = args
    z = _logits(x, weight, bias, static["wide"])
    dz = torch.exp(z - lse[:, None]) * -total[:, None]
    dz = dz.scatter_add(1, safe[:, None], coef[:, None])
    if nll_coef is not None:
        dz = dz.scatter_add(1, nll_safe[:, None], nll_coef[:, None])
    grad_bias = None if bias is None else dz.sum(0)
    dz = dz.to(weight.dtype)
    return (dz @ weight).to(x.dtype), dz, grad_bias


TOKEN_PASS = CompiledFunction("preference_tokens", token_math, {0: LEADING, 3: ALL, 4: ALL})
GRADIENT_PASS = CompiledFunction(
    "preference_gradient", gradient_math, {0: LEADING, 3: ALL, 4: ALL, 5: ALL, 6: ALL, 7: ALL, 8: ALL}
)


def _token_pass(x: torch.Tensor, weight: torch.Tensor, bias, gathers: list[torch.Tensor], wide: torch.dtype):
    """Per token: logsumexp of its logits, their sum, and its logit at each class row of `gathers` (one or two)."""
    rows = x.shape[0] * x.shape[1]
    x2d = x.reshape(rows, x.shape[2])
    b = bias.to(wide) if bias is not None else None
    step = chunk_rows(rows, weight.shape[0])
    lse, row_sum, picked, nll_picked = [], [], [], []
    for start in range(0, max(rows, 1), step):
        stop = min(start + step, rows)
        second = gathers[1][start:stop] if len(gathers) > 1 else None
        tile = TOKEN_PASS((x2d[start:stop], weight, b, gathers[0][start:stop], second), {"wide": wide})
        for out, value in zip((lse, row_sum, picked, nll_picked), tile):
            out.append(value)
    picked_all = [torch.cat(picked)] + ([torch.cat(nll_picked)] if len(gathers) > 1 else [])
    return torch.cat(lse), torch.cat(row_sum), picked_all


def _gradient_tile(x_tile, w, b, lse, safe, coef, total, nll_safe, nll_coef, wide):
    return GRADIENT_PASS((x_tile, w, b, lse, safe, coef, total, nll_safe, nll_coef), {"wide": wide})


backward = reference.make_backward(_gradient_tile, chunk_rows, weight_dtype_gemms=True)


def _kernel(op: str, pairs_fn, extras_fn, always_average: bool) -> KernelSpec:
    forward = reference.make_forward(op, pairs_fn, extras_fn, always_average, token_pass=_token_pass)
    return inductor_kernel(op, forward, backward, dtypes=FLOAT_DTYPES)


DPO_KERNEL = _kernel("fused_linear_dpo", reference._dpo_pairs, reference._dpo_extras, always_average=False)
ORPO_KERNEL = _kernel("fused_linear_orpo", reference._orpo_pairs, reference._orpo_extras, always_average=True)
CPO_KERNEL = _kernel("fused_linear_cpo", reference._cpo_pairs, reference._plain_rewards, always_average=False)
SIMPO_KERNEL = _kernel("fused_linear_simpo", reference._simpo_pairs, reference._plain_rewards, always_average=True)
