"""jsd in Triton: the generalised Jensen-Shannon divergence between student ``log_q`` and teacher ``log_p`` rows.

See liger_core.operators.jsd for the math. Every term is elementwise given the two log-probabilities (there is no
softmax here), so the work is cut into (BLOCK_ROWS, BLOCK_COLS) tiles of the (BT, V) inputs and a grid of a few
programs per SM walks them: each program keeps an fp32 register accumulator of its tiles' loss terms and writes one
partial, which torch sums (deterministic for a given grid). Rows whose label is ``ignore_index`` are masked off
before their loads, so they cost no reads and give 0 loss and 0 gradient. The mean's denominator, the number of
counted rows, stays on the device: its reciprocal (0 when no row counts) is a 0-D fp32 tensor the kernel reads.

The gradient with respect to log_q needs only the element's own two values, the 1/count coefficient and the upstream
gradient. It is written by the forward launch, ``coef · d term / d log_q``, while the inputs are in registers, and
the backward multiplies it by the upstream gradient in place (``_scaling``; nothing to do for ``loss.backward()``).
Traffic per element: 2 reads and 1 write, against 2 reads in the forward plus 2 reads and 1 write in a backward that
recomputed it; the price is the gradient buffer existing from the forward on instead of from the backward on.
``GRADIENT_IN_FORWARD = False`` selects the recomputing backward (kept: it is what a retained graph would need).

The elementwise math is in base 2 (``jsd_terms_base2``); fused_linear_jsd shares ``fast_log2`` and the modes but
arranges its own terms (its logits are finite, so it needs none of the guards against 0 · -inf that log-probabilities
of exactly 0 need here). Under torch.compile the launchers run as custom ops opaque to Inductor; eagerly they are
plain calls (see rms_norm.py's launchers for why). They never write their inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec

from ._scaling import scale_by_gradient
from .rms_norm import DTYPES, INTERPRETED, _launch, cast_to, cdiv, launcher_op, next_power_of_2, sm_count

# beta's special cases as a compile-time constant of the kernels.
FORWARD_KL = tl.constexpr(0)  # beta = 0: KL(P‖Q)
REVERSE_KL = tl.constexpr(1)  # beta = 1: KL(Q‖P)
GENERAL = tl.constexpr(2)
SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)  # of float32
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

INPUT_DTYPES = DTYPES + (torch.float64,)  # log_p is only read (and rounded to fp32, as the reference does)
INDEX_DTYPES = (torch.int64, torch.int32)
# Where the gradient is computed (see the module docstring).
GRADIENT_IN_FORWARD = True
# Elements of one tile, the widest column block, the grid, and STAGES: tiles whose loads are in flight at once
# (Triton's loop pipelining). From benchmarks/tune.py on an H200, beta 0.5 forward+backward at (4096, 128256) fp32:
# 1.62 ms with (8192, 16 warps, 3 stages), against 1.82 ms for the former (4096, 8 warps, no pipelining).
TILE = 8192
MAX_BLOCK_COLS = 4096
NUM_WARPS = 16
PROGRAMS_PER_SM = 8
STAGES = 3


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def fast_log2(x):
    """log2 through the special-function unit's ``lg2.approx`` (relative error about 2^-22), where ``tl.log2`` and
    ``tl.log`` compile to libdevice's accurate versions, some 25 instructions each. Subnormal inputs count as 0
    (``.ftz``: without it ptxas adds a rescaling test around every logarithm), so callers floor x at
    SMALLEST_NORMAL where it could be subnormal."""
    if INTERPRETED:
        log2 = tl.log2(tl.where(x < SMALLEST_NORMAL, 0.0, x))
    else:
        log2 = tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return log2


@triton.jit
def jsd_terms_base2(log2_q, log2_p, beta, MODE: tl.constexpr):
    """Per element, in fp32, from the base-2 logarithms of q and p: (its term of the row's divergence, d term / d ln q
    with p held fixed), both divided by ln 2. Base 2 is the special-function unit's: each exponential and logarithm
    is one instruction.

    A term whose weight (p or q) is 0 is 0, not 0·∞, as in the reference; so an element loaded as -inf (a masked
    lane) contributes 0 to both."""
    if MODE == FORWARD_KL:
        p = tl.exp2(log2_p)
        loss = tl.where(p > 0, p * (log2_p - log2_q), 0.0)
        grad = -p * LOG2E
    elif MODE == REVERSE_KL:
        q = tl.exp2(log2_q)
        diff = log2_q - log2_p
        loss = tl.where(q > 0, q * diff, 0.0)
        grad = tl.where(q > 0, q * (diff + LOG2E), 0.0)
    else:
        p = tl.exp2(log2_p)
        q = tl.exp2(log2_q)
        # m = beta·p + (1 − beta)·q, floored at the smallest normal float so that log m stays finite where p and q
        # are subnormal or 0 (such terms are below 1e-37 either way; where both are 0 the masks below give 0).
        log2_m = fast_log2(tl.maximum(beta * p + (1.0 - beta) * q, SMALLEST_NORMAL))
        q_part = tl.where(q > 0, q * (log2_q - log2_m), 0.0)
        loss = beta * tl.where(p > 0, p * (log2_p - log2_m), 0.0) + (1.0 - beta) * q_part
        grad = (1.0 - beta) * q_part
    return loss, grad


@triton.jit
def jsd_terms(log_q, log_p, beta, MODE: tl.constexpr):
    """jsd_terms_base2 from natural logarithms, in natural units: (the element's term, d term / d log_q)."""
    loss, grad = jsd_terms_base2(log_q * LOG2E, log_p * LOG2E, beta, MODE)
    return loss * LN2, grad * LN2


@triton.jit
def counted_rows(LABELS, rows, n_rows, ignore_index, HAS_LABELS: tl.constexpr):
    """Which of `rows` exist and count (label != ignore_index; every row without labels)."""
    row_mask = rows < n_rows
    if HAS_LABELS:
        labels = tl.load(LABELS + rows, mask=row_mask, other=ignore_index)
        row_mask = row_mask & (labels != ignore_index)
    return row_mask


@triton.jit
def jsd_kernel(
    LOG_Q, LOG_P, LABELS, COEF, G, PARTIALS, GRAD,
    n_rows, n_cols, q_row_stride, p_row_stride, grad_row_stride,
    beta, ignore_index,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WANT_LOSS: tl.constexpr, WANT_GRAD: tl.constexpr,
    HAS_G: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program i walks tiles i, i + programs, ...; it writes its loss partial (WANT_LOSS) and the gradient of its
    tiles, ``coef · [g ·] d term / d log_q`` (WANT_GRAD; zero on rows that do not count)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    tiles = tl.cdiv(n_rows, BLOCK_ROWS) * col_blocks
    coef = 0.0
    if WANT_GRAD:
        coef = tl.load(COEF)
        if HAS_G:
            coef = coef * tl.load(G).to(tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for tile in tl.range(pid, tiles, programs, num_stages=STAGES):
        rows = (tile // col_blocks).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        counted = counted_rows(LABELS, rows, n_rows, ignore_index, HAS_LABELS)
        mask = counted[:, None] & col_mask[None, :]
        log_q = tl.load(LOG_Q + rows[:, None] * q_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        log_p = tl.load(LOG_P + rows[:, None] * p_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        loss, grad = jsd_terms(log_q, log_p, beta, MODE)
        if WANT_LOSS:
            acc += tl.where(mask, loss, 0.0)
        if WANT_GRAD:
            store_mask = (rows < n_rows)[:, None] & col_mask[None, :]
            grad = tl.where(mask, grad * coef, 0.0)
            tl.store(
                GRAD + rows[:, None] * grad_row_stride + cols[None, :],
                cast_to(grad, GRAD.dtype.element_ty),
                mask=store_mask,
            )
    if WANT_LOSS:
        tl.store(PARTIALS + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


# -- launch heuristics ---------------------------------------------------------------------------------------------


def mode_of(beta: float) -> int:
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def tile_shape(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): a row's columns in blocks of at most MAX_BLOCK_COLS, rows filling a TILE."""
    block_cols = min(next_power_of_2(max(n_cols, 1)), MAX_BLOCK_COLS)
    block_rows = max(1, min(TILE // block_cols, next_power_of_2(max(n_rows, 1))))
    return block_rows, block_cols


def grid_size(n_rows: int, n_cols: int, block_rows: int, block_cols: int, device: torch.device) -> int:
    tiles = cdiv(n_rows, block_rows) * cdiv(n_cols, block_cols)
    return max(1, min(tiles, PROGRAMS_PER_SM * sm_count(device)))


# -- launchers -----------------------------------------------------------------------------------------------------


def jsd_forward(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    shift_labels: torch.Tensor | None,
    beta: float,
    ignore_index: int,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_q, log_p: (BT, V) with unit column stride. Returns the loss (0-D, log_q's dtype), 1/count (0-D fp32, 0
    when no row counts) and, when `want_grad`, ``coef · d loss_sum / d log_q`` in log_q's dtype (else (0,))."""
    n_rows, n_cols = log_q.shape
    device = log_q.device
    if shift_labels is None:
        count = torch.full((), n_rows, dtype=torch.float32, device=device)
    else:
        count = (shift_labels != ignore_index).sum().to(torch.float32)
    coef = torch.where(count > 0, 1.0 / torch.clamp(count, min=1.0), torch.zeros_like(count))
    grad = torch.empty((n_rows, n_cols) if want_grad else (0,), dtype=log_q.dtype, device=device)
    if n_rows == 0 or n_cols == 0:
        return torch.zeros((), dtype=log_q.dtype, device=device), coef, grad.zero_()
    block_rows, block_cols = tile_shape(n_rows, n_cols)
    programs = grid_size(n_rows, n_cols, block_rows, block_cols, device)
    partials = torch.empty((programs,), dtype=torch.float32, device=device)
    labels = shift_labels if shift_labels is not None else log_q  # never read without labels
    _launch(jsd_kernel)[(programs,)](
        log_q, log_p, labels, coef, coef, partials, grad,
        n_rows, n_cols, log_q.stride(0), log_p.stride(0), n_cols,
        beta, ignore_index,
        MODE=mode_of(beta), HAS_LABELS=shift_labels is not None, WANT_LOSS=True, WANT_GRAD=want_grad,
        HAS_G=False, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, STAGES=STAGES,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    loss = (partials.sum() * coef).to(log_q.dtype)
    return loss, coef, grad


def jsd_backward(
    grad_loss: torch.Tensor,
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    shift_labels: torch.Tensor | None,
    coef: torch.Tensor,
    beta: float,
    ignore_index: int,
) -> torch.Tensor:
    """``grad_loss · coef · d loss_sum / d log_q`` from the inputs, in log_q's dtype."""
    n_rows, n_cols = log_q.shape
    grad = torch.empty((n_rows, n_cols), dtype=log_q.dtype, device=log_q.device)
    if grad.numel() == 0:
        return grad
    block_rows, block_cols = tile_shape(n_rows, n_cols)
    programs = grid_size(n_rows, n_cols, block_rows, block_cols, log_q.device)
    labels = shift_labels if shift_labels is not None else log_q  # never read without labels
    no_partials = torch.empty((0,), dtype=torch.float32, device=log_q.device)
    _launch(jsd_kernel)[(programs,)](
        log_q, log_p, labels, coef, grad_loss, no_partials, grad,
        n_rows, n_cols, log_q.stride(0), log_p.stride(0), n_cols,
        beta, ignore_index,
        MODE=mode_of(beta), HAS_LABELS=shift_labels is not None, WANT_LOSS=False, WANT_GRAD=True,
        HAS_G=True, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, STAGES=STAGES,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad


jsd_forward_op = launcher_op("jsd_forward", jsd_forward)
jsd_backward_op = launcher_op("jsd_backward", jsd_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t itself when its columns are contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    log_q, log_p, shift_labels = inputs
    log_q, log_p = _unit_columns(log_q), _unit_columns(log_p.detach())  # no gradient to the teacher
    if shift_labels is not None:
        shift_labels = shift_labels.contiguous()
    beta, ignore_index = attrs["beta"], attrs["ignore_index"]
    grad_in_forward = needs_grad and GRADIENT_IN_FORWARD
    launcher = jsd_forward_op if torch.compiler.is_compiling() else jsd_forward
    loss, coef, grad = launcher(log_q, log_p, shift_labels, beta, ignore_index, grad_in_forward)
    if not needs_grad:
        return (loss,), None
    if grad_in_forward:
        return (loss,), (True, grad)
    return (loss,), (False, log_q, log_p, shift_labels, coef, beta, ignore_index)


def backward(saved: tuple, grad_outputs: tuple):
    (grad_loss,) = grad_outputs
    if grad_loss is None:
        return (None,)
    if saved[0]:
        grad = saved[1]
        return (scale_by_gradient(grad, grad_loss, grad.dtype),)
    _, log_q, log_p, shift_labels, coef, beta, ignore_index = saved
    launcher = jsd_backward_op if torch.compiler.is_compiling() else jsd_backward
    return (launcher(grad_loss, log_q, log_p, shift_labels, coef, beta, ignore_index),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    log_q, log_p, shift_labels = inputs
    reasons = []
    if log_q.dtype not in DTYPES:
        reasons.append(f"log_q is {log_q.dtype}; the Triton jsd takes {[str(d) for d in DTYPES]}")
    if log_p.dtype not in INPUT_DTYPES:
        reasons.append(f"log_p is {log_p.dtype}; the Triton jsd takes {[str(d) for d in INPUT_DTYPES]}")
    if shift_labels is not None and shift_labels.dtype not in INDEX_DTYPES:
        reasons.append(f"shift_labels is {shift_labels.dtype}; the Triton jsd takes int64 or int32")
    return reasons


KERNEL = KernelSpec(
    op="jsd",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
