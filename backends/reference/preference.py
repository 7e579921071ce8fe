"""The preference losses (DPO, ORPO, CPO, SimPO) in plain PyTorch, tiled over tokens. See
liger_core.operators.preference for the math.

Autograd through a loop over token tiles would keep every tile's logits for backward, i.e. the whole (2B·T, V)
logits these operators exist to avoid, so these kernels have their own backward:

1. forward, pass one (tiled): each token's logsumexp, target logit (and nll_target logit) and logits row sum, in
   fp32 (fp64 for fp64 inputs); the reference model's pass runs the same way under ``torch.no_grad``;
2. forward, on those per-sequence values only: the pairwise loss, and its derivative with respect to each
   sequence's log-prob by ``torch.func.jvp`` (`pair_loss_and_slopes`: tiny tensors; works inside the autograd
   bridge, under torch.compile, where ``torch.autograd.grad`` does not, and under saved-tensor hooks, where
   ``torch.func.vjp`` does not). That gives d loss / d token log-prob per token;
3. backward, pass two (tiled, recomputing each tile's logits): with ``p = softmax(z)`` and ``coef`` the derivative
   of the loss with respect to a token's target log-prob, ``d loss / dz = coef·(onehot(target) − p)`` (plus the NLL
   term's, against nll_target), then ``grad_x = dz @ W``, ``grad_W = Σ dzᵀ x``, ``grad_bias = Σ dz``, all scaled by
   the incoming gradient of the loss.

No tensor larger than one tile of (rows, V) logits is ever built; no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from liger_core.opaque import opaque_op
from liger_core.spec import FLOAT_DTYPES, KernelSpec, as_dtype

# Logits elements in one tile: 4 Mi, i.e. 16 MiB in fp32 (32 rows at a 128k vocabulary). Tests patch it.
TILE_ELEMENTS = 1 << 22


def rows_per_tile(vocab: int) -> int:
    return max(1, TILE_ELEMENTS // max(vocab, 1))


# -- the tiled passes --------------------------------------------------------------------------------------------


def _safe_targets(target: torch.Tensor, vocab: int, ignore_index: int):
    """(class to gather, whether the position counts, whether the class is in range), all flat."""
    target = target.reshape(-1)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe = torch.where(in_range & counted, target, torch.zeros_like(target))
    return safe, counted, in_range


def _token_pass(x: torch.Tensor, weight: torch.Tensor, bias, gathers: list[torch.Tensor], wide: torch.dtype):
    """Per token: logsumexp of its logits, their sum, and its logit at each class row of `gathers`."""
    rows = x.shape[0] * x.shape[1]
    x2d = x.reshape(rows, x.shape[2])
    w = weight.to(wide)
    b = bias.to(wide) if bias is not None else None
    step = rows_per_tile(weight.shape[0])
    lse, row_sum, picked = [], [], [[] for _ in gathers]
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        z = x2d[start:stop].to(wide) @ w.T
        if b is not None:
            z = z + b
        lse.append(torch.logsumexp(z, dim=-1))
        row_sum.append(z.sum(-1))
        for out, classes in zip(picked, gathers):
            out.append(z.gather(1, classes[start:stop].unsqueeze(1)).squeeze(1))
        del z  # before the next tile's logits exist: one tile at a time
    return torch.cat(lse), torch.cat(row_sum), [torch.cat(p) for p in picked]


def _token_pass_tensors(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gathers: list[torch.Tensor], wide: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return _token_pass(x, weight, bias, gathers, wide)


# Under torch.compile the tile loops run as opaque ops (pure PyTorch: their own fakes), so that a new sequence
# length does not recompile (liger_core.opaque).
_token_pass_op = opaque_op("liger_reference::preference_token_pass", _token_pass_tensors)


def _default_token_pass(x, weight, bias, gathers, wide):
    run = _token_pass_op if torch.compiler.is_compiling() else _token_pass
    return run(x, weight, bias, gathers, wide)


def _token_logps(picked, lse, counted, in_range, shape):
    """Masked token log-probs (0 where ignored, NaN at a counted class outside the vocabulary), as (2B, T)."""
    logp = picked - lse
    logp = torch.where(in_range | ~counted, logp, torch.full_like(logp, float("nan")))
    return torch.where(counted, logp, torch.zeros_like(logp)).view(shape)


def _sequence_logps(token_logp: torch.Tensor, counted: torch.Tensor, average: bool):
    """Per sequence: sum (or mean over counted tokens) of token log-probs, and the divisor used."""
    counted = counted.view(token_logp.shape)
    if average:
        denominator = counted.sum(-1).clamp_min(1).to(token_logp.dtype)
    else:
        denominator = torch.ones(token_logp.shape[0], dtype=token_logp.dtype, device=token_logp.device)
    return token_logp.sum(-1) / denominator, denominator


# -- the per-pair losses -----------------------------------------------------------------------------------------


def _smoothed_sigmoid(z: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1.0 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def _dpo_pairs(c, r, ref_c, ref_r, attrs):
    beta, ls, loss_type = attrs["beta"], attrs["label_smoothing"], attrs["loss_type"]
    cr, rr = c - ref_c, r - ref_r
    z = beta * (cr - rr)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(z, ls)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type == "ipo":
        return (cr - rr - 1.0 / (2.0 * beta)).pow(2)
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * cr) - 0.5 * F.logsigmoid(-beta * cr) - 0.5 * F.logsigmoid(-beta * rr)
    if loss_type == "robust":
        return (-(1.0 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1.0 - 2.0 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * cr) - F.logsigmoid(-beta * rr)
    if loss_type == "sppo_hard":
        return (cr - 1.0 / (2.0 * beta)).pow(2) + (rr + 1.0 / (2.0 * beta)).pow(2)
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * cr)) + torch.sigmoid(beta * rr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * cr) + (1.0 - torch.sigmoid(beta * (cr - rr)))
    if loss_type == "discopop":
        modulation = torch.sigmoid(z / attrs["discopop_tau"])
        return (1.0 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)
    raise ValueError(f"fused_linear_dpo: unknown loss_type {loss_type!r}")  # the OpSpec's choices stop it earlier


def _dpo_extras(c, r, ref_c, ref_r, attrs):
    return (attrs["beta"] * (c - ref_c), attrs["beta"] * (r - ref_r))


def _log_odds(c, r):
    return (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))


def _orpo_pairs(c, r, ref_c, ref_r, attrs):
    return -attrs["beta"] * F.logsigmoid(_log_odds(c, r))


def _orpo_extras(c, r, ref_c, ref_r, attrs):
    log_odds = _log_odds(c, r)
    return (attrs["beta"] * c, attrs["beta"] * r, F.logsigmoid(log_odds).mean(), log_odds.mean())


def _cpo_pairs(c, r, ref_c, ref_r, attrs):
    return _smoothed_sigmoid(attrs["beta"] * (c - r), attrs["label_smoothing"])


def _simpo_pairs(c, r, ref_c, ref_r, attrs):
    return _smoothed_sigmoid(attrs["beta"] * (c - r) - attrs["gamma"], attrs["label_smoothing"])


def _plain_rewards(c, r, ref_c, ref_r, attrs):
    return (attrs["beta"] * c, attrs["beta"] * r)


# -- forward and backward ----------------------------------------------------------------------------------------


def pair_loss_and_slopes(pairs_fn, c, r, ref_c, ref_r, attrs):
    """The mean over pairs of the preference loss and its derivatives with respect to c and r. Forward mode
    (torch.func.jvp): unlike torch.func.vjp it works under saved-tensor hooks (activation offloading, e.g.
    torch.autograd.graph.save_on_cpu) and, unlike torch.autograd.grad, under torch.compile. Pair i's loss depends on
    c[i] and r[i] only, so one tangent of ones gives every pair's partial derivative at once."""

    def per_pair(chosen, rejected):
        return pairs_fn(chosen, rejected, ref_c, ref_r, attrs)

    ones, zeros = torch.ones_like(c), torch.zeros_like(c)
    losses, d_chosen = torch.func.jvp(per_pair, (c, r), (ones, zeros))
    _, d_rejected = torch.func.jvp(per_pair, (c, r), (zeros, ones))
    pairs = c.shape[0]
    return losses.mean(), d_chosen / pairs, d_rejected / pairs


def loss_and_outputs(pairs_fn, extras_fn, logps: tuple, nll, alpha: float, logits_means, attrs, needs_grad, dtype):
    """The operator's outputs (loss, chosen and rejected log-probs, their mean logits, the NLL, the extras) in
    `dtype` from the per-sequence values ``logps = (c, r, ref_c, ref_r)``, and, when `needs_grad`, d loss / d c and
    d loss / d r (None otherwise)."""
    c, r, ref_c, ref_r = logps
    slopes = (None, None)
    if needs_grad:
        preference, *slopes = pair_loss_and_slopes(pairs_fn, c, r, ref_c, ref_r, attrs)
    else:
        preference = pairs_fn(c, r, ref_c, ref_r, attrs).mean()
    loss = preference + alpha * nll if alpha != 0.0 else preference
    extras = extras_fn(c, r, ref_c, ref_r, attrs)
    nll_out = nll if attrs["compute_nll_loss"] else torch.zeros_like(nll)
    aux = (c, r, logits_means[0], logits_means[1], nll_out, *extras)
    return (as_dtype(loss, dtype),) + tuple(t.detach().to(dtype) for t in aux), tuple(slopes)


def make_forward(op: str, pairs_fn, extras_fn, always_average: bool, token_pass=None):
    """The forward of one of the four operators. ``token_pass`` computes pass one (see the module docstring; the
    signature of `_token_pass`, the default): another backend (the inductor plugin) brings a compiled one and
    shares everything else."""
    token_pass = token_pass or _default_token_pass

    def forward(inputs: tuple, attrs: dict, needs_grad: bool):
        x, weight, target, bias = inputs[:4]
        ref_input = ref_weight = ref_bias = nll_target = None
        if op == "fused_linear_dpo" and attrs["use_ref_model"]:
            ref_input, ref_weight, ref_bias = inputs[4:]
        if op == "fused_linear_orpo":
            nll_target = inputs[4]
        ignore_index = attrs["ignore_index"]
        alpha = attrs.get("alpha", 1.0) if attrs["compute_nll_loss"] else 0.0
        average = always_average or attrs["average_log_prob"]
        wide = torch.promote_types(x.dtype, torch.float32)
        sequences, length = x.shape[0], x.shape[1]
        pairs, vocab = sequences // 2, weight.shape[0]

        safe, counted, in_range = _safe_targets(target, vocab, ignore_index)
        gathers = [safe]
        if nll_target is not None:
            nll_safe, nll_counted, nll_in_range = _safe_targets(nll_target, vocab, ignore_index)
            gathers.append(nll_safe)
        else:
            nll_safe, nll_counted, nll_in_range = safe, counted, in_range
        lse, row_sum, picked = token_pass(x, weight, bias, gathers, wide)
        token_logp = _token_logps(picked[0], lse, counted, in_range, (sequences, length))
        logps, denominator = _sequence_logps(token_logp, counted, average)
        c, r = logps[:pairs], logps[pairs:]

        if ref_input is not None:
            with torch.no_grad():
                ref_lse, _, ref_picked = token_pass(ref_input, ref_weight, ref_bias, [safe], wide)
                ref_token_logp = _token_logps(ref_picked[0], ref_lse, counted, in_range, (sequences, length))
                ref_logps, _ = _sequence_logps(ref_token_logp, counted, average)
            ref_c, ref_r = ref_logps[:pairs], ref_logps[pairs:]
        else:
            ref_c = ref_r = torch.zeros((), dtype=wide, device=x.device)

        # NLL over the chosen half: summed negative log-prob of its counted tokens over their count.
        nll_token_logp = (
            token_logp
            if nll_target is None
            else _token_logps(picked[1], lse, nll_counted, nll_in_range, (sequences, length))
        )
        chosen_counted = nll_counted.view(sequences, length)[:pairs]
        nll_count = chosen_counted.sum().clamp_min(1).to(wide)
        nll = -nll_token_logp[:pairs].sum() / nll_count

        logits_means = row_sum.view(2, pairs * length).sum(1) / (pairs * length * vocab)  # chosen, rejected
        outputs, (d_chosen, d_rejected) = loss_and_outputs(
            pairs_fn, extras_fn, (c, r, ref_c, ref_r), nll, alpha, logits_means, attrs, needs_grad, x.dtype
        )
        if not needs_grad:
            return outputs, None

        # d loss / d token log-prob, per token (0 at ignored positions).
        d_sequence = torch.cat([d_chosen, d_rejected]) / denominator
        coef = torch.where(counted, d_sequence.repeat_interleave(length), torch.zeros_like(lse))
        nll_coef = torch.where(
            nll_counted & (torch.arange(sequences * length, device=x.device) < pairs * length),
            (-alpha / nll_count).expand(sequences * length),
            torch.zeros_like(lse),
        )
        if nll_target is None:
            coef, nll_coef, nll_safe = coef + nll_coef, None, None
        saved = (x, weight, bias, lse, safe, coef, nll_safe, nll_coef)
        return outputs, saved

    return forward


def _gradient_tile(x_tile, w, b, lse, safe, coef, total, nll_safe, nll_coef, wide):
    """One tile of pass two: (grad of the tile's x rows in x's dtype, d loss / dz in the wide dtype, grad of the
    bias or None), with ``d loss / dz = coef·(onehot(target) − p)`` summed over the targets and p = softmax(z)."""
    z = x_tile.to(wide) @ w.T
    if b is not None:
        z = z + b
    dz = torch.exp(z - lse[:, None]) * -total[:, None]
    dz.scatter_add_(1, safe[:, None], coef[:, None])
    if nll_coef is not None:
        dz.scatter_add_(1, nll_safe[:, None], nll_coef[:, None])
    return (dz @ w).to(x_tile.dtype), dz, None if b is None else dz.sum(0)


def _gradient_pass(
    x, weight, bias, lse, safe, coef, total, nll_safe, nll_coef, gradient_tile, tile_rows, weight_dtype_gemms=False
):
    """Pass two over the tiles of tokens: (grad_x, grad_weight, grad_bias or None) in the inputs' dtypes. The
    matrix products run in the wide dtype, or with `weight_dtype_gemms` in the weight's own (the tensor cores' rate;
    the weight gradient then accumulates in that dtype, one rounding per tile)."""
    wide = lse.dtype
    gemm = weight.dtype if weight_dtype_gemms else wide
    rows, hidden = x.shape[0] * x.shape[1], x.shape[2]
    x2d = x.reshape(rows, hidden)
    w = weight.to(gemm)
    b = bias.to(wide) if bias is not None else None
    grad_x = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    grad_w = torch.zeros(w.shape, dtype=gemm, device=x.device)  # our own accumulators, updated in place
    grad_b = torch.zeros(w.shape[0], dtype=wide, device=x.device) if bias is not None else None
    step = tile_rows(rows, weight.shape[0])
    for start in range(0, rows, step):
        tile = slice(start, min(start + step, rows))
        second = (nll_safe[tile], nll_coef[tile]) if nll_coef is not None else (None, None)
        grad_x[tile], dz, tile_grad_b = gradient_tile(
            x2d[tile], w, b, lse[tile], safe[tile], coef[tile], total[tile], *second, wide
        )
        grad_w.addmm_(dz.to(gemm).T, x2d[tile].to(gemm))
        if grad_b is not None:
            grad_b += tile_grad_b
        del dz, tile_grad_b  # before the next tile's exist: one tile of logits at a time
    return grad_x.view(x.shape), grad_w.to(weight.dtype), grad_b.to(bias.dtype) if grad_b is not None else None


def _default_tile_rows(rows: int, vocab: int) -> int:
    return rows_per_tile(vocab)


def _gradient_pass_tensors(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    safe: torch.Tensor,
    coef: torch.Tensor,
    total: torch.Tensor,
    nll_safe: torch.Tensor | None,
    nll_coef: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_w, grad_b = _gradient_pass(
        x, weight, bias, lse, safe, coef, total, nll_safe, nll_coef, _gradient_tile, _default_tile_rows
    )
    return grad_x, grad_w, x.new_empty((0,)) if grad_b is None else grad_b


_gradient_pass_op = opaque_op("liger_reference::preference_gradient_pass", _gradient_pass_tensors)


def make_backward(gradient_tile=None, tile_rows=None, weight_dtype_gemms=False):
    """The backward of the four operators. ``gradient_tile`` computes one tile of pass two (the signature of
    `_gradient_tile`, the default; it receives the weight in the dtype of the products) and ``tile_rows(rows,
    vocab)`` its row count (default `rows_per_tile`): another backend (the inductor plugin) brings compiled ones
    and shares the rest, with its products in the weight's dtype (`weight_dtype_gemms`)."""
    opaque_when_compiling = gradient_tile is None and tile_rows is None
    gradient_tile = gradient_tile or _gradient_tile
    tile_rows = tile_rows or _default_tile_rows

    def backward(saved: tuple, grad_outputs: tuple):
        x, weight, bias, lse, safe, coef, nll_safe, nll_coef = saved
        grad_loss = grad_outputs[0]
        if grad_loss is None:
            return None, None, None
        scale = grad_loss.to(lse.dtype)
        coef = coef * scale
        total = coef
        if nll_coef is not None:
            nll_coef = nll_coef * scale
            total = coef + nll_coef
        if opaque_when_compiling and torch.compiler.is_compiling():
            grad_x, grad_w, grad_b = _gradient_pass_op(x, weight, bias, lse, safe, coef, total, nll_safe, nll_coef)
            return grad_x, grad_w, grad_b if bias is not None else None
        return _gradient_pass(
            x, weight, bias, lse, safe, coef, total, nll_safe, nll_coef, gradient_tile, tile_rows, weight_dtype_gemms
        )

    return backward


backward = make_backward()


def _kernel(op: str, pairs_fn, extras_fn, always_average: bool) -> KernelSpec:
    return KernelSpec(
        op=op,
        forward=make_forward(op, pairs_fn, extras_fn, always_average),
        backward=backward,
        dtypes=FLOAT_DTYPES + (torch.float64,),
    )


DPO_KERNEL = _kernel("fused_linear_dpo", _dpo_pairs, _dpo_extras, always_average=False)
ORPO_KERNEL = _kernel("fused_linear_orpo", _orpo_pairs, _orpo_extras, always_average=True)
CPO_KERNEL = _kernel("fused_linear_cpo", _cpo_pairs, _plain_rewards, always_average=False)
SIMPO_KERNEL = _kernel("fused_linear_simpo", _simpo_pairs, _plain_rewards, always_average=True)
