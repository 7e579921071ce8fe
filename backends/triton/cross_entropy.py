"""cross_entropy in Triton: the loss and its gradient with respect to the logits in one launch.

One program per row of the (BT, V) logits, all math in fp32:

1. A sweep over the row in BLOCK-wide chunks keeps an online maximum and sum of exponentials (so the log-sum-exp
   never overflows), the sums the label smoothing needs, and the running argmax (first index on ties, as
   torch.argmax gives) of the softcapped logits. The target's logit is one scalar load.
2. When a gradient is wanted, a second sweep over the same row writes d loss / d logits, already
   multiplied by the reduction's coefficient ("mean": 1 / the weight sum of the counted rows for the CE term and
   1 / their count for the z-loss). The backward is then only a scaling by the incoming gradient (a scalar, or one
   value per row for "none"), done in place on that buffer by a kernel that leaves it untouched where the incoming
   gradient is exactly 1 (the common ``loss.backward()``): no host synchronisation, and no memory traffic then.

The second sweep re-reads the row from memory: at (8192, 128256) bf16 forward and backward take 1.56 ms on an H200,
three passes over the logits at ~4.1 TB/s (two reads and a write), not the two an L2 hit would give; keeping fewer
rows in flight so that they stay in L2 was slower (see BLOCK_V's note). Reading each row once needs it held on chip
between the sweeps, 250 KB at V = 128256: more than one SM's shared memory. Spread over the shared memory of a
cluster of blocks (the cuda backend tried it, csrc/cross_entropy.cu) it was no faster in bf16.

The "mean" denominators come from a one-program reduction over the targets before the row kernel, and the batch
loss from a one-program reduction over the per-row terms after it: both stay on the device.

Buffers. A standalone cross_entropy allocates one gradient-sized buffer and never writes the caller's logits
(API.md's in-place rule: the caller may still hold them). ``cross_entropy_forward_into_logits`` writes the gradient
over a logits buffer that its caller hands over; it calls ``torch.autograd.graph.increment_version`` on it unless
the caller says it allocated the buffer itself (the fused-linear cross entropy does, on its chunk logits).

A target outside [0, V) that is not ignore_index is never used as an address: its row's loss is NaN (the batch loss
with it) and its CE term contributes no gradient, exactly as the reference backend behaves.

Under torch.compile the allocating launcher runs as a custom op opaque to Inductor; eagerly it is a plain call (see
rms_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec

from ._scaling import scale_in_place
from .rms_norm import DTYPES, _launch, cast_to, launcher_op, next_power_of_2, sm_count

REDUCTIONS = ("mean", "sum", "none")
# Chunk of a row per step of the sweeps (elements), warps of the row kernel, and ROW_STAGES: steps whose loads are in
# flight at once (Triton's loop pipelining). From benchmarks/tune.py on an H200 at (8192, 128256) bf16, forward and
# backward: (2048, 4, 3) 1.70-1.81 ms over two runs, against 1.77-1.86 for the former (4096, 8, 1); persistent grids
# of 1-4 programs per SM (fewer rows in flight, so that the second sweep could hit L2) and L2 eviction hints were
# slower or no faster (1.82-6.6 ms) and were dropped. Retried with 8-32 warps a program and the second sweep
# reversed: 1.77-4.21 ms against 1.53 (2026-11-29-h200-s11-ce-row-variants.json).
BLOCK_V, ROW_WARPS, ROW_STAGES = 2048, 4, 3
# With fewer rows than fill every SM's 64 warp slots with ROW_WARPS-warp programs (a fused-linear chunk of 1024 rows),
# wider programs keep more loads in flight: at (1024, 128256) bf16, a lean copy of the row kernel took 0.214 ms with
# (4096, 8, 4) against 0.237 with (2048, 4, 3) (2026-11-29-h200-s11-ce-row-variants.json).
FEW_ROWS_BLOCK_V, FEW_ROWS_WARPS, FEW_ROWS_STAGES = 4096, 8, 4
WARP_SLOTS_PER_SM = 64
# The one-program reductions over targets and rows, and the elementwise scaling of the backward.
REDUCE_BLOCK = 1024
# Slots of the per-call statistics buffer (fp32).
CE_COEFFICIENT, Z_COEFFICIENT, INVERSE_COUNT, CLASS_WEIGHT_TOTAL = 0, 1, 2, 3


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def tanh(x):
    """tanh from exp (the interpreter has no libdevice): an odd polynomial near 0, where (1 - e)/(1 + e) with
    e = exp(-2|x|) would lose digits to cancellation; both are within a few fp32 ulps."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def softcapped(x, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x


@triton.jit
def cross_entropy_stats_kernel(
    TARGET, WEIGHT, STATS,
    n_rows, n_cols, ignore_index,
    MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, CLASS_TOTAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: the coefficients of the CE and z-loss terms (1/weight sum and 1/count for "mean", else 1),
    1/count (for the token accuracy) and, when label smoothing meets class weights, the sum of the class weights.
    Divisors that are 0 (every row ignored) count as 1, so nothing becomes NaN."""
    offsets = tl.arange(0, BLOCK)
    weight_sum = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        target = tl.load(TARGET + rows, mask=rows < n_rows, other=0).to(tl.int64)
        counted = (rows < n_rows) & (target != ignore_index)
        count += counted.to(tl.float32)
        if HAS_WEIGHT:
            # An out-of-range class weighs like class 0, as in the reference (its loss is NaN anyway).
            safe_target = tl.where((target >= 0) & (target < n_cols), target, 0)
            weight_sum += tl.load(WEIGHT + safe_target, mask=counted, other=0.0).to(tl.float32)
    total_count = tl.sum(count, axis=0)
    inverse_count = 1.0 / tl.where(total_count > 0, total_count, 1.0)
    if MEAN:
        total_weight = total_count
        if HAS_WEIGHT:
            total_weight = tl.sum(weight_sum, axis=0)
        tl.store(STATS + 0, 1.0 / tl.where(total_weight > 0, total_weight, 1.0))
        tl.store(STATS + 1, inverse_count)
    else:
        tl.store(STATS + 0, 1.0)
        tl.store(STATS + 1, 1.0)
    tl.store(STATS + 2, inverse_count)
    if CLASS_TOTAL:
        class_total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            class_total += tl.load(WEIGHT + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(STATS + 3, tl.sum(class_total, axis=0))


@triton.jit
def cross_entropy_rows_kernel(
    X, GRAD, TARGET, WEIGHT, STATS, UPSTREAM, CE_ROWS, Z_ROWS, PRED,
    n_cols, x_row_stride, grad_row_stride,
    ignore_index, smoothing, z_scale, softcap,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    TOKEN_SCALING: tl.constexpr, ARGMAX: tl.constexpr, STORE_ROWS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    PER_ROW_UPSTREAM: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One program per row. Writes the row's CE term (class-weighted, smoothed, token-scaled; 0 when ignored, NaN
    for an out-of-range target), its z-loss term and its argmax (-1 when ignored) when STORE_ROWS, and
    d(coefficients · terms)/d logits into GRAD when COMPUTE_GRAD (GRAD may be X itself: each chunk is read before
    it is written, by this program only). The coefficients come from STATS, or from UPSTREAM[row] when
    PER_ROW_UPSTREAM (the fused-linear backward of reduction "none")."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_row_stride
    target = tl.load(TARGET + row).to(tl.int64)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    safe_target = tl.where(in_range, target, 0)
    offsets = tl.arange(0, BLOCK)

    # Sweep 1: online max and sum of exp, smoothing sums, argmax. Only the maximum is reduced across the block
    # each step (the shift of the exponentials must be one number); the sums and the argmax stay per lane and are
    # reduced once after the loop, so a step waits on one cross-warp reduction, not three.
    running_max = tl.full([], float("-inf"), tl.float32)
    exp_sums = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_cols = tl.zeros([BLOCK], dtype=tl.int32)
    smooth_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
        cols = start + offsets
        mask = cols < n_cols
        # Masked lanes read 0: they add nothing to the smoothing sums, and -inf keeps them out of max and exp.
        z = softcapped(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        if SMOOTHING:
            if HAS_WEIGHT:
                smooth_sum += z * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                smooth_sum += z
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        exp_sums = exp_sums * tl.exp(running_max - new_max) + tl.exp(z - new_max)
        running_max = new_max
        if ARGMAX:
            better = z > best  # strictly: a lane keeps its earliest column on a tie
            best_cols = tl.where(better, cols, best_cols)
            best = tl.where(better, z, best)
    lse = running_max + tl.log(tl.sum(exp_sums, axis=0))

    z_target = softcapped(tl.load(x_row + safe_target).to(tl.float32), softcap, SOFTCAP)
    nll = lse - z_target
    target_weight = 1.0
    if HAS_WEIGHT:
        target_weight = tl.load(WEIGHT + safe_target).to(tl.float32)
    class_total = 0.0
    if SMOOTHING and HAS_WEIGHT:
        class_total = tl.load(STATS + 3)
    ce = (1.0 - smoothing) * target_weight * nll
    if SMOOTHING:
        if HAS_WEIGHT:
            ce += (smoothing / n_cols) * (lse * class_total - tl.sum(smooth_sum, axis=0))
        else:
            ce += (smoothing / n_cols) * (n_cols * lse - tl.sum(smooth_sum, axis=0))
    token_scale = 1.0
    if TOKEN_SCALING:
        token_scale = tl.exp(-nll)  # p(target), a constant for the gradient
        ce = ce * token_scale

    if STORE_ROWS:
        ce = tl.where(counted, ce, 0.0)
        ce = tl.where(in_range | (target == ignore_index), ce, float("nan"))
        tl.store(CE_ROWS + row, ce)
        tl.store(Z_ROWS + row, tl.where(counted, z_scale * lse * lse, 0.0))
        if ARGMAX:
            # The first column holding the maximum (torch.argmax's tie rule): the smallest of the lanes' earliest.
            best_index = tl.min(tl.where(best == tl.max(best, axis=0), best_cols, n_cols), axis=0)
            tl.store(PRED + row, tl.where(counted, best_index.to(tl.int64), -1))

    if COMPUTE_GRAD:
        # grad = p·p_scale - onehot(target)·target_scale - w_c·class_scale (- uniform without class weights),
        # times the softcap's derivative 1 - (z/c)².
        if PER_ROW_UPSTREAM:
            ce_coefficient = tl.load(UPSTREAM + row).to(tl.float32)
            z_coefficient = ce_coefficient
        else:
            ce_coefficient = tl.load(STATS + 0)
            z_coefficient = tl.load(STATS + 1)
        ce_scale = tl.where(counted & in_range, ce_coefficient * token_scale, 0.0)
        target_scale = (1.0 - smoothing) * target_weight * ce_scale
        p_scale = target_scale
        if HAS_Z:
            p_scale += tl.where(counted, 2.0 * z_scale * lse * z_coefficient, 0.0)
        class_scale = 0.0
        if SMOOTHING:
            class_scale = (smoothing / n_cols) * ce_scale
            if HAS_WEIGHT:
                p_scale += class_scale * class_total
            else:
                p_scale += smoothing * ce_scale
        grad_row = GRAD + row * grad_row_stride
        # Backwards along the row: the chunks sweep 1 read last are the likeliest to be still in L2 (1 % faster at
        # (8192, 128256) bf16).
        n_blocks = tl.cdiv(n_cols, BLOCK)
        for step in tl.range(0, n_blocks, num_stages=STAGES):
            cols = (n_blocks - 1 - step) * BLOCK + offsets
            mask = cols < n_cols
            z = softcapped(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
            grad = tl.exp(z - lse) * p_scale - tl.where(cols == safe_target, target_scale, 0.0)
            if SMOOTHING:
                if HAS_WEIGHT:
                    grad -= class_scale * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    grad -= class_scale
            if SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            tl.store(grad_row + cols, cast_to(grad, GRAD.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_reduce_kernel(
    CE_ROWS, Z_ROWS, PRED, TARGET, STATS, LOSS, Z_LOSS, ACCURACY,
    n_rows, ignore_index,
    HAS_Z: tl.constexpr, RETURN_Z: tl.constexpr, ACCURACY_WANTED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: the batch loss ("mean"/"sum") from the per-row terms, the z-loss and the token accuracy."""
    offsets = tl.arange(0, BLOCK)
    ce_sum = tl.zeros([BLOCK], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK], dtype=tl.float32)
    correct = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        mask = rows < n_rows
        ce_sum += tl.load(CE_ROWS + rows, mask=mask, other=0.0)
        z_sum += tl.load(Z_ROWS + rows, mask=mask, other=0.0)
        if ACCURACY_WANTED:
            target = tl.load(TARGET + rows, mask=mask, other=0).to(tl.int64)
            predicted = tl.load(PRED + rows, mask=mask, other=-1)
            correct += (mask & (target != ignore_index) & (predicted == target)).to(tl.float32)
    z_loss = tl.sum(z_sum, axis=0) * tl.load(STATS + 1)
    loss = tl.sum(ce_sum, axis=0) * tl.load(STATS + 0)
    if HAS_Z:
        loss += z_loss
    tl.store(LOSS, cast_to(loss, LOSS.dtype.element_ty))
    if RETURN_Z:
        tl.store(Z_LOSS, cast_to(z_loss, Z_LOSS.dtype.element_ty))
    if ACCURACY_WANTED:
        tl.store(ACCURACY, tl.sum(correct, axis=0) * tl.load(STATS + 2))


# -- launchers ---------------------------------------------------------------------------------------------------


def row_block(n_cols: int, widest: int | None = None) -> int:
    return max(16, min(BLOCK_V if widest is None else widest, next_power_of_2(max(n_cols, 1))))


def row_launch(n_rows: int, n_cols: int, device: torch.device) -> dict:
    """BLOCK, STAGES and num_warps of the row kernel (one program per row): see FEW_ROWS_BLOCK_V."""
    if n_rows * ROW_WARPS < WARP_SLOTS_PER_SM * sm_count(device):
        return {"BLOCK": row_block(n_cols, FEW_ROWS_BLOCK_V), "STAGES": FEW_ROWS_STAGES, "num_warps": FEW_ROWS_WARPS}
    return {"BLOCK": row_block(n_cols), "STAGES": ROW_STAGES, "num_warps": ROW_WARPS}


def launch_stats(
    target: torch.Tensor, weight: torch.Tensor | None, n_cols: int, ignore_index: int, reduction: str, smoothing: float
) -> torch.Tensor:
    """The fp32 statistics buffer (see the slot constants) for these targets; needs the targets only."""
    stats = torch.ones((4,), dtype=torch.float32, device=target.device)
    has_weight = weight is not None
    _launch(cross_entropy_stats_kernel)[(1,)](
        target, weight if has_weight else stats, stats,
        target.shape[0], n_cols, ignore_index,
        MEAN=reduction == "mean", HAS_WEIGHT=has_weight, CLASS_TOTAL=has_weight and smoothing > 0,
        BLOCK=REDUCE_BLOCK,
    )  # fmt: skip
    return stats


def launch_rows(
    logits: torch.Tensor,
    grad: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    rows: tuple | None,
    upstream: torch.Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_scale: float,
    softcap: float | None,
    token_scaling: bool = False,
) -> None:
    """Run the row kernel on logits (n, V) with unit column stride. `rows` = (ce_rows, z_rows, pred or None) to
    store the per-row terms (None: don't); `grad` (n, V) receives the gradient when given (it may be `logits`);
    `upstream` (n,) gives per-row coefficients instead of the statistics'."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    ce_rows, z_rows, pred = rows if rows is not None else (stats, stats, None)
    compute_grad = grad is not None
    _launch(cross_entropy_rows_kernel)[(n_rows,)](
        logits, grad if compute_grad else logits, target, weight if weight is not None else stats, stats,
        upstream if upstream is not None else stats, ce_rows, z_rows, pred if pred is not None else stats,
        n_cols, logits.stride(0), grad.stride(0) if compute_grad else 0,
        ignore_index, smoothing, z_scale, 1.0 if softcap is None else softcap,
        HAS_WEIGHT=weight is not None, SMOOTHING=smoothing > 0, HAS_Z=z_scale > 0, SOFTCAP=softcap is not None,
        TOKEN_SCALING=token_scaling, ARGMAX=pred is not None, STORE_ROWS=rows is not None,
        COMPUTE_GRAD=compute_grad, PER_ROW_UPSTREAM=upstream is not None, **row_launch(n_rows, n_cols, logits.device),
    )  # fmt: skip


def row_buffers(n_rows: int, device: torch.device, argmax: bool) -> tuple:
    """(ce_rows, z_rows, pred or None) for launch_rows."""
    ce_rows = torch.empty((n_rows,), dtype=torch.float32, device=device)
    z_rows = torch.empty((n_rows,), dtype=torch.float32, device=device)
    pred = torch.empty((n_rows,), dtype=torch.int64, device=device) if argmax else None
    return ce_rows, z_rows, pred


def finish(
    rows: tuple,
    target: torch.Tensor,
    stats: torch.Tensor,
    dtype: torch.dtype,
    ignore_index: int,
    reduction: str,
    z_scale: float,
    return_z_loss: bool,
    return_token_accuracy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, token_accuracy) from the per-row terms; an empty tensor for what was not asked (one each: the
    outputs of a custom op may not alias one another)."""
    ce_rows, z_rows, pred = rows
    device = ce_rows.device

    def empty():
        return torch.empty((0,), dtype=dtype, device=device)

    if reduction == "none":
        loss = (ce_rows + z_rows if z_scale > 0 else ce_rows).to(dtype)
        z_loss = z_rows.to(dtype) if return_z_loss else empty()
        accuracy = empty()
        if return_token_accuracy:
            accuracy = ((pred == target) & (target != ignore_index)).to(torch.float32)
        return loss, z_loss, accuracy
    loss = torch.empty((), dtype=dtype, device=device)
    z_loss = torch.empty((), dtype=dtype, device=device) if return_z_loss else empty()
    accuracy = torch.empty((), dtype=torch.float32, device=device) if return_token_accuracy else empty()
    _launch(cross_entropy_reduce_kernel)[(1,)](
        ce_rows, z_rows, pred if pred is not None else ce_rows, target, stats, loss, z_loss, accuracy,
        ce_rows.shape[0], ignore_index,
        HAS_Z=z_scale > 0, RETURN_Z=return_z_loss, ACCURACY_WANTED=return_token_accuracy, BLOCK=REDUCE_BLOCK,
    )  # fmt: skip
    return loss, z_loss, accuracy


def _cross_entropy(
    logits, grad, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction,
    return_z_loss, return_token_accuracy, return_predicted_tokens,
):  # fmt: skip
    n_rows, n_cols = logits.shape
    argmax = return_token_accuracy or return_predicted_tokens
    stats = launch_stats(target, weight, n_cols, ignore_index, reduction, label_smoothing)
    rows = row_buffers(n_rows, logits.device, argmax)
    launch_rows(
        logits, grad, target, weight, stats, rows, None, ignore_index, label_smoothing, lse_square_scale, softcap
    )
    loss, z_loss, accuracy = finish(
        rows, target, stats, logits.dtype, ignore_index, reduction, lse_square_scale, return_z_loss,
        return_token_accuracy,
    )  # fmt: skip
    pred = rows[2] if return_predicted_tokens else torch.empty((0,), dtype=torch.int64, device=logits.device)
    return loss, z_loss, accuracy, pred


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: str,
    return_z_loss: bool,
    return_token_accuracy: bool,
    return_predicted_tokens: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (BT, V) with unit column stride. Returns (loss, z_loss, token_accuracy, predicted_tokens, grad), an
    empty tensor for each output not asked; grad (BT, V) in the logits' dtype is a fresh buffer holding the
    gradient of the loss for a unit upstream gradient (per row for "none"), when compute_grad."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else None
    outputs = _cross_entropy(
        logits, grad, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction,
        return_z_loss, return_token_accuracy, return_predicted_tokens,
    )  # fmt: skip
    return (*outputs, grad if compute_grad else torch.empty((0,), dtype=logits.dtype, device=logits.device))


def cross_entropy_forward_into_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: str,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    allocated_here: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `cross_entropy_forward`, but the gradient overwrites `logits`, which the caller hands over (API.md's
    in-place rule). Unless the caller allocated the buffer itself (`allocated_here`), its version is bumped, so that
    anyone else who saved it for a backward gets PyTorch's "modified by an inplace operation" error."""
    outputs = _cross_entropy(
        logits, logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction,
        return_z_loss, return_token_accuracy, return_predicted_tokens,
    )  # fmt: skip
    if not allocated_here:
        torch.autograd.graph.increment_version(logits)
    return outputs


cross_entropy_forward_op = launcher_op("cross_entropy_forward", cross_entropy_forward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    logits, target, weight = inputs
    launcher = cross_entropy_forward_op if torch.compiler.is_compiling() else cross_entropy_forward
    loss, z_loss, accuracy, pred, grad = launcher(
        contiguous_rows(logits), target.contiguous(), None if weight is None else weight.detach().contiguous(),
        attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"],
        attrs["reduction"], attrs["return_z_loss"], attrs["return_token_accuracy"], attrs["return_predicted_tokens"],
        needs_grad,
    )  # fmt: skip
    outputs = (
        loss,
        z_loss if attrs["return_z_loss"] else None,
        accuracy if attrs["return_token_accuracy"] else None,
        pred if attrs["return_predicted_tokens"] else None,
    )
    return outputs, ((grad,) if needs_grad else None)


def backward(saved: tuple, grad_outputs: tuple):
    (grad,) = saved
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return (None,)
    return (scale_in_place(grad, grad_loss),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    logits, target, weight = inputs
    reasons = []
    if logits.dtype not in DTYPES:
        reasons.append(f"input is {logits.dtype}; the Triton cross_entropy takes {[str(d) for d in DTYPES]}")
    if logits.dim() == 2 and logits.shape[1] == 0:
        reasons.append("input has no classes (V = 0)")
    if weight is not None and weight.dtype not in DTYPES:
        reasons.append(f"weight is {weight.dtype}; the Triton cross_entropy takes {[str(d) for d in DTYPES]}")
    return reasons


KERNEL = KernelSpec(
    op="cross_entropy",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
