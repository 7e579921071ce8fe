"""The fused linear target log-prob pass of the preference losses (preference.py): per token row, the log-probability
``log_softmax(x Wᵀ + b)[target]`` without ever holding more than one chunk of the (rows, V) logits, and the
gradient of any loss that depends on the logits only through those log-probs.

Forward, per chunk of token rows:

1. logits = F.linear(x_chunk, W, b): cuBLAS through torch, in the input dtype, into the loop's one chunk buffer;
2. one Triton program per row sweeps the row in BLOCK-wide pieces with an online maximum and sum of exponentials
   (fp32) and writes the row's log-sum-exp, the log-prob of its target (0 where the target is ignore_index, NaN
   where a counted target lies outside [0, V)), optionally that of a second target (ORPO's nll_target), and the sum
   of the row's logits (for the logits means of the aux outputs).

Backward, given ``coef`` = d loss / d logp per row (and ``second_coef`` for the second target), per chunk:

1. the chunk's logits are recomputed (same GEMM);
2. a Triton program per row overwrites them with ``dlogits = Σ_k coef_k·(onehot(target_k) − softmax)`` using the
   saved log-sum-exp (one sweep; rows whose coefficients are all 0, e.g. ignored ones, are written as zeros without
   being read);
3. grad_x[chunk] = dlogits @ W, grad_W (+)= dlogitsᵀ @ x_chunk (in the weight's dtype, one rounding per chunk, as
   fused_linear_cross_entropy), grad_b += dlogits.sum(0) in fp32.

Memory beyond inputs and gradients: one chunk of logits (CHUNK_BYTES) and a few fp32 values per row. No host
synchronisation. Eagerly the two passes are plain calls; under torch.compile they run as custom ops opaque to Inductor
(see rms_norm.py, cross_entropy.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fused_linear_cross_entropy as flce
from .cross_entropy import ROW_WARPS, row_block
from .fused_linear_cross_entropy import accumulate_weight_gradient
from .rms_norm import _launch, cast_to, launcher_op

# Most bytes one chunk's logits (in the input dtype) may take, per device type: fused_linear_cross_entropy's budget,
# kept apart so that it can be tuned (and patched by tests) on its own. Issue 6 bounds DPO's memory at 1.5 GB (with a
# reference model, x (4, 1024, 4096), V 128256). Measured on an H200 while every chunk still allocated its own logits
# (two chunks alive at once): 35.8 ms / 1285 MiB with 128 MiB chunks, 34.4 ms / 1535 MiB with 256 MiB, i.e. 1034 MiB
# of gradients plus two chunks. With one buffer for the loop, 256 MiB gives 1285 MiB
# (2026-11-29-h200-s6-fused-linear-memory.md; 1.25 GiB again in 2026-11-29-h200-s7-dpo-long-sequence.txt).
CHUNK_BYTES = dict(flce.CHUNK_BYTES)


def chunk_rows(rows: int, vocab: int, itemsize: int, device_type: str) -> int:
    """Token rows per chunk: fused_linear_cross_entropy's rule, with this module's budget."""
    return flce.chunk_rows(rows, vocab, itemsize, device_type, CHUNK_BYTES)


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def target_logprob_rows_kernel(
    LOGITS, TARGET, SECOND, LSE, LOGP, SECOND_LOGP, ROW_SUM,
    row_offset, n_cols, row_stride, ignore_index,
    HAS_SECOND: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row of a chunk; the per-row outputs (and the targets) are indexed from row_offset."""
    row = tl.program_id(0).to(tl.int64)
    out = row_offset + row
    logits = LOGITS + row * row_stride
    offsets = tl.arange(0, BLOCK)
    running_max = tl.full([], float("-inf"), tl.float32)
    exp_sum = tl.zeros([], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
        if ROW_SUMS:
            total += z  # masked lanes read 0
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        exp_sum = exp_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(exp_sum)
    tl.store(LSE + out, lse)
    if ROW_SUMS:
        tl.store(ROW_SUM + out, tl.sum(total, axis=0))

    target = tl.load(TARGET + out).to(tl.int64)
    in_range = (target >= 0) & (target < n_cols)
    logp = tl.load(logits + tl.where(in_range, target, 0)).to(tl.float32) - lse
    logp = tl.where(in_range, logp, float("nan"))
    tl.store(LOGP + out, tl.where(target != ignore_index, logp, 0.0))
    if HAS_SECOND:
        second = tl.load(SECOND + out).to(tl.int64)
        second_in_range = (second >= 0) & (second < n_cols)
        second_logp = tl.load(logits + tl.where(second_in_range, second, 0)).to(tl.float32) - lse
        second_logp = tl.where(second_in_range, second_logp, float("nan"))
        tl.store(SECOND_LOGP + out, tl.where(second != ignore_index, second_logp, 0.0))


@triton.jit
def target_logprob_grad_kernel(
    LOGITS, TARGET, SECOND, LSE, COEF, SECOND_COEF,
    row_offset, n_cols, row_stride, ignore_index,
    HAS_SECOND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row of a chunk: LOGITS[row] := Σ_k coef_k·(onehot(target_k) − softmax(LOGITS[row])), in
    place (each piece is read before it is written, by this program only). A target that is ignore_index or outside
    [0, V) contributes nothing (its log-prob was a constant 0 or NaN)."""
    row = tl.program_id(0).to(tl.int64)
    out = row_offset + row
    logits = LOGITS + row * row_stride
    target = tl.load(TARGET + out).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < n_cols)
    coef = tl.where(valid, tl.load(COEF + out), 0.0)
    target = tl.where(valid, target, -1)  # -1 matches no column
    total = coef
    second_coef = 0.0
    second = target
    if HAS_SECOND:
        second = tl.load(SECOND + out).to(tl.int64)
        second_valid = (second != ignore_index) & (second >= 0) & (second < n_cols)
        second_coef = tl.where(second_valid, tl.load(SECOND_COEF + out), 0.0)
        second = tl.where(second_valid, second, -1)
        total += second_coef
    lse = tl.load(LSE + out)
    live = total != 0.0  # a row with no coefficient is written as zeros without being read
    n_read = tl.where(live, n_cols, 0)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(logits + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        grad = tl.where(live, -total * tl.exp(z - lse), 0.0) + tl.where(cols == target, coef, 0.0)
        if HAS_SECOND:
            grad += tl.where(cols == second, second_coef, 0.0)
        tl.store(logits + cols, cast_to(grad, LOGITS.dtype.element_ty), mask=mask)


# -- the chunk loops -----------------------------------------------------------------------------------------------


def target_logprobs_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    second: torch.Tensor | None,
    ignore_index: int,
    row_sums: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, H) and weight (V, H) with unit column strides, target and second (N,) contiguous. Returns fp32 (N,)
    tensors (lse, logp, second_logp, row_sum); second_logp and row_sum are (0,)-shaped when not asked."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    f32 = {"dtype": torch.float32, "device": x.device}
    lse = torch.empty((n_rows,), **f32)
    logp = torch.empty((n_rows,), **f32)
    second_logp = torch.empty((n_rows if second is not None else 0,), **f32)
    row_sum = torch.empty((n_rows if row_sums else 0,), **f32)
    unused = torch.empty((1,), **f32)  # stands for the outputs not asked (never written): no null or aliased pointer
    step = chunk_rows(n_rows, vocab, x.element_size(), x.device.type)
    buffer = flce.chunk_buffer(n_rows, step, vocab, x.dtype, x.device)
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        logits = flce.chunk_logits(x[start:end], weight, bias, buffer)
        _launch(target_logprob_rows_kernel)[(end - start,)](
            logits, target, second if second is not None else target, lse, logp,
            second_logp if second is not None else unused, row_sum if row_sums else unused,
            start, vocab, logits.stride(0), ignore_index,
            HAS_SECOND=second is not None, ROW_SUMS=row_sums, BLOCK=row_block(vocab), num_warps=ROW_WARPS,
        )  # fmt: skip
    return lse, logp, second_logp, row_sum


def target_logprobs_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    second: torch.Tensor | None,
    lse: torch.Tensor,
    coef: torch.Tensor,
    second_coef: torch.Tensor | None,
    ignore_index: int,
    want_x: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """coef (N,) fp32: d loss / d logp per row (second_coef the same for the second target). Returns (grad_x (N, H),
    grad_weight, grad_bias) in the inputs' dtypes, (0,)-shaped where not wanted."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    device = x.device
    grad_x = torch.empty(x.shape if want_x else (0,), dtype=x.dtype, device=device)
    grad_weight = flce.weight_gradient_buffer(weight.shape if want_weight else (0,), weight.dtype, device, n_rows)
    grad_bias = torch.zeros((vocab if want_bias else 0,), dtype=torch.float32, device=device)
    if want_x or want_weight or want_bias:
        step = chunk_rows(n_rows, vocab, x.element_size(), device.type)
        buffer = flce.chunk_buffer(n_rows, step, vocab, x.dtype, device)
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            x_chunk = x[start:end]
            dlogits = flce.chunk_logits(x_chunk, weight, bias, buffer)  # overwritten in place by the kernel
            _launch(target_logprob_grad_kernel)[(end - start,)](
                dlogits, target, second if second is not None else target, lse, coef,
                second_coef if second_coef is not None else coef,
                start, vocab, dlogits.stride(0), ignore_index,
                HAS_SECOND=second is not None, BLOCK=row_block(vocab), num_warps=ROW_WARPS,
            )  # fmt: skip
            if want_x:
                torch.mm(dlogits, weight, out=grad_x[start:end])
            if want_weight:
                accumulate_weight_gradient(grad_weight, dlogits, x_chunk, first=start == 0)
            if want_bias:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
    return grad_x, grad_weight, grad_bias.to(bias.dtype) if want_bias else grad_bias


target_logprobs_forward_op = launcher_op("target_logprobs_forward", target_logprobs_forward)
target_logprobs_backward_op = launcher_op("target_logprobs_backward", target_logprobs_backward)


def rows(t: torch.Tensor) -> torch.Tensor:
    """A (..., H) tensor as (N, H) with unit column stride."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward_pass(x, weight, bias, target, second, ignore_index: int, row_sums: bool):
    """The forward pass on (..., H) inputs and (...) targets, eagerly or as the custom op under torch.compile. It
    builds no autograd graph: callers differentiate through `backward_pass`."""
    launcher = target_logprobs_forward_op if torch.compiler.is_compiling() else target_logprobs_forward
    with torch.no_grad():
        return launcher(
            rows(x.detach()), rows(weight.detach()), None if bias is None else bias.detach().contiguous(),
            target.reshape(-1).contiguous(), None if second is None else second.reshape(-1).contiguous(),
            ignore_index, row_sums,
        )  # fmt: skip


def backward_pass(x, weight, bias, target, second, lse, coef, second_coef, ignore_index: int, want: tuple):
    """The gradients (x in its own shape, weight, bias; None where not in `want`) for per-row coefficients."""
    launcher = target_logprobs_backward_op if torch.compiler.is_compiling() else target_logprobs_backward
    grad_x, grad_weight, grad_bias = launcher(
        rows(x.detach()), rows(weight.detach()), None if bias is None else bias.detach().contiguous(),
        target.reshape(-1).contiguous(), None if second is None else second.reshape(-1).contiguous(),
        lse, coef.reshape(-1).contiguous(), None if second_coef is None else second_coef.reshape(-1).contiguous(),
        ignore_index, *want,
    )  # fmt: skip
    return (
        grad_x.view(x.shape) if want[0] else None,
        grad_weight if want[1] else None,
        grad_bias if want[2] else None,
    )
