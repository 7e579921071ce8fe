"""layer_norm in Triton: ``y = (x − mean) · rstd · weight + bias`` over the last dimension, forward and backward.

Rows are the flattened leading dimensions of x. Every sum is in fp32; mean and rstd (one fp32 each per row, in one
(2, rows) buffer) are kept for the backward. weight and bias may have their own dtypes; both are read as fp32, as
the reference backend does. The bias is optional.

The layouts follow rms_norm.py, from the hidden size H alone:

- fused: a whole row sits in registers (H <= MAX_FUSED_FORWARD_COLS forward, MAX_FUSED_BACKWARD_COLS backward).
  Forward runs one program per tile of rows (several rows per tile when H is small), mean and variance by two
  passes over the registers. Backward runs a grid of a few programs per SM, each walking a contiguous block of rows
  and keeping its partial dW and dB in registers.
- chunked: longer rows are walked in CHUNK-wide pieces. Forward makes two passes over its row: shifted sums (the
  shift is the mean of the first chunk, so there is no cancellation however far the mean is from zero), then
  normalise (mostly L2 hits). Backward first computes two fp32 scalars per row, ``mean(g)`` and ``mean(g·x̂)`` with
  ``g = dy·w``, then a 2-D grid (row blocks x column chunks) writes dX and each program's partial dW and dB.

dW and dB are never accumulated with atomics: each program writes one fp32 row per sum into a (programs, sums, H)
buffer, which torch reduces in one sum, so the result is deterministic for a given GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec

from .rms_norm import (
    BACKWARD_CHUNK,
    BACKWARD_CHUNK_PROGRAMS_PER_SM,
    BACKWARD_CHUNK_WARPS,
    DTYPES,
    FORWARD_CHUNK_WARPS,
    MAX_COLS,
    ROW_DOT_CHUNK,
    ROW_DOT_WARPS,
    _launch,
    _rows,
    backward_tile,
    cast_to,
    cdiv,
    forward_chunk,
    forward_tile,
    launcher_op,
    next_power_of_2,
    partition_rows,
    sm_count,
)

# Widest row (power of two) kept whole in registers, as rms_norm's; the backward keeps one more accumulator (dB)
# live than rms_norm's, so its limit is the first thing to check on the GPU (8192 would move 16384 to the chunked
# path). Chunk widths and warps are rms_norm's, swept on an H200 for rms_norm, not yet for layer_norm.
MAX_FUSED_FORWARD_COLS = 16384
MAX_FUSED_BACKWARD_COLS = 16384


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def layer_norm_forward_kernel(
    X, Y, W, B, STATS,
    n_rows, n_cols, x_row_stride, y_row_stride,
    eps,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_ROWS rows, each row whole in registers. STATS is (2, n_rows): mean, then rstd."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    tl.store(STATS + rows, mean, mask=row_mask)
    tl.store(STATS + n_rows + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = centred * rstd[:, None] * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_forward_chunked_kernel(
    X, Y, W, B, STATS,
    n_rows, n_cols, x_row_stride, y_row_stride,
    eps,
    HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """One program per row, too long for registers: shifted sums over chunks, then a second pass normalises."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_row_stride
    y_row = Y + row * y_row_stride
    offsets = tl.arange(0, CHUNK)
    # The shift: the first chunk's mean.
    first = tl.load(x_row + offsets, mask=offsets < n_cols, other=0.0).to(tl.float32)
    shift = tl.sum(first, axis=0) / tl.minimum(n_cols, CHUNK)
    sums = tl.zeros([CHUNK], dtype=tl.float32)
    squares = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offsets
        col_mask = cols < n_cols
        x = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        d = tl.where(col_mask, x - shift, 0.0)
        sums += d
        squares += d * d
    mean_shifted = tl.sum(sums, axis=0) / n_cols
    variance = tl.maximum(tl.sum(squares, axis=0) / n_cols - mean_shifted * mean_shifted, 0.0)
    mean = shift + mean_shifted
    rstd = tl.rsqrt(variance + eps)
    tl.store(STATS + row, mean)
    tl.store(STATS + n_rows + row, rstd)
    for start in range(0, n_cols, CHUNK):
        cols = start + offsets
        col_mask = cols < n_cols
        x = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, cast_to(y, Y.dtype.element_ty), mask=col_mask)


@triton.jit
def layer_norm_backward_kernel(
    DY, X, W, STATS, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    dy_row_stride, x_row_stride, dx_row_stride,
    HAS_BIAS: tl.constexpr, WANT_PARAMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """Each program walks its block of rows, BLOCK_ROWS at a time, whole rows in registers.

    With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂, db = Σ_rows dy.
    The partials stay in registers and are written once, to the program's own rows of DW_PARTIAL (only when
    WANT_PARAMS: frozen parameters, as in LoRA fine-tuning, get none). The weight is re-read per tile (an L1 hit)
    rather than held, which keeps one row-sized tensor fewer live.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    dw = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    db = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for start in range(first_row, end_row, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < end_row
        mask = row_mask[:, None] & col_mask[None, :]
        mean = tl.load(STATS + rows, mask=row_mask, other=0.0)[:, None]
        rstd = tl.load(STATS + n_rows + rows, mask=row_mask, other=0.0)[:, None]
        x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        mean_g = tl.sum(g, axis=1)[:, None] / n_cols
        mean_g_x_hat = tl.sum(g * x_hat, axis=1)[:, None] / n_cols
        dx = rstd * (g - mean_g - x_hat * mean_g_x_hat)
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], cast_to(dx, DX.dtype.element_ty), mask=mask)
        if WANT_PARAMS:
            dw += dy * x_hat
            if HAS_BIAS:
                db += dy
    if WANT_PARAMS:
        partial = DW_PARTIAL + pid.to(tl.int64) * (1 + HAS_BIAS) * n_cols
        tl.store(partial + cols, tl.sum(dw, axis=0), mask=col_mask)
        if HAS_BIAS:
            tl.store(partial + n_cols + cols, tl.sum(db, axis=0), mask=col_mask)


@triton.jit
def layer_norm_backward_row_dot_kernel(
    DY, X, W, STATS, TERMS,
    n_rows, n_cols, dy_row_stride, x_row_stride,
    CHUNK: tl.constexpr,
):  # fmt: skip
    """Chunked backward, first pass: one program per row computes the row's coupling terms into TERMS, (2, n_rows):
    mean(g), then mean(g·x̂)."""
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(STATS + row)
    rstd = tl.load(STATS + n_rows + row)
    g_sum = tl.zeros([CHUNK], dtype=tl.float32)
    g_x_hat_sum = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        col_mask = cols < n_cols
        x = tl.load(X + row * x_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dy_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        g_sum += g
        g_x_hat_sum += g * tl.where(col_mask, x - mean, 0.0)
    tl.store(TERMS + row, tl.sum(g_sum, axis=0) / n_cols)
    tl.store(TERMS + n_rows + row, tl.sum(g_x_hat_sum, axis=0) * rstd / n_cols)


@triton.jit
def layer_norm_backward_chunked_kernel(
    DY, X, W, STATS, TERMS, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    dy_row_stride, x_row_stride, dx_row_stride,
    HAS_BIAS: tl.constexpr, WANT_PARAMS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Chunked backward, second pass: program (i, j) handles row block i, column chunk j."""
    pid_rows = tl.program_id(0)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([CHUNK], dtype=tl.float32)
    db = tl.zeros([CHUNK], dtype=tl.float32)
    first_row = pid_rows.to(tl.int64) * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for row in range(first_row, end_row):
        mean = tl.load(STATS + row)
        rstd = tl.load(STATS + n_rows + row)
        mean_g = tl.load(TERMS + row)
        mean_g_x_hat = tl.load(TERMS + n_rows + row)
        x = tl.load(X + row * x_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dy_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        x_hat = tl.where(col_mask, (x - mean) * rstd, 0.0)
        dx = rstd * (dy * w - mean_g - x_hat * mean_g_x_hat)
        tl.store(DX + row * dx_row_stride + cols, cast_to(dx, DX.dtype.element_ty), mask=col_mask)
        if WANT_PARAMS:
            dw += dy * x_hat
            if HAS_BIAS:
                db += dy
    if WANT_PARAMS:
        partial = DW_PARTIAL + pid_rows.to(tl.int64) * (1 + HAS_BIAS) * n_cols
        tl.store(partial + cols, dw, mask=col_mask)
        if HAS_BIAS:
            tl.store(partial + n_cols + cols, db, mask=col_mask)


# -- launchers (plain calls eagerly, custom ops under torch.compile: see rms_norm.py) ------------------------------


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (rows, H) with unit column stride. Returns y (rows, H) in x's dtype and stats (2, rows) in fp32: mean, then
    rstd."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    stats = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, stats
    has_bias = bias is not None
    b = bias if has_bias else weight  # never read when has_bias is False
    block_cols = next_power_of_2(n_cols)
    if block_cols <= MAX_FUSED_FORWARD_COLS:
        block_rows, num_warps = forward_tile(block_cols, n_rows)
        _launch(layer_norm_forward_kernel)[(cdiv(n_rows, block_rows),)](
            x, y, weight, b, stats,
            n_rows, n_cols, x.stride(0), y.stride(0),
            eps,
            HAS_BIAS=has_bias, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        _launch(layer_norm_forward_chunked_kernel)[(n_rows,)](
            x, y, weight, b, stats,
            n_rows, n_cols, x.stride(0), y.stride(0),
            eps,
            HAS_BIAS=has_bias, CHUNK=forward_chunk(n_cols),
            num_warps=FORWARD_CHUNK_WARPS,
        )  # fmt: skip
    return y, stats


def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, has_bias: bool, want_params: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: (rows, H) with unit column stride; stats from the forward. Returns dx (rows, H) in x's dtype and the
    fp32 sums (1 + has_bias, H): dW, then dB; (0, H) when not `want_params`."""
    n_rows, n_cols = x.shape
    sums = 1 + int(has_bias) if want_params else 0
    # Always a fresh buffer, never dy's (API.md's in-place rule cannot be checked here).
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros((sums, n_cols), dtype=torch.float32, device=x.device)
    block_cols = next_power_of_2(n_cols)
    if block_cols <= MAX_FUSED_BACKWARD_COLS:
        block_rows, num_warps, programs_per_sm = backward_tile(block_cols, n_rows)
        # As rms_norm: at least 4 tiles of rows per program while that still leaves a program for every SM.
        sms = sm_count(x.device)
        target = max(min(sms * programs_per_sm, cdiv(n_rows, 4 * block_rows)), sms)
        rows_per_program, programs = partition_rows(n_rows, block_rows, target)
        partial = torch.empty((programs, sums, n_cols), dtype=torch.float32, device=x.device)
        _launch(layer_norm_backward_kernel)[(programs,)](
            dy, x, weight, stats, dx, partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), x.stride(0), dx.stride(0),
            HAS_BIAS=has_bias, WANT_PARAMS=want_params, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        terms = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)
        _launch(layer_norm_backward_row_dot_kernel)[(n_rows,)](
            dy, x, weight, stats, terms,
            n_rows, n_cols, dy.stride(0), x.stride(0),
            CHUNK=ROW_DOT_CHUNK,
            num_warps=ROW_DOT_WARPS,
        )  # fmt: skip
        chunks = cdiv(n_cols, BACKWARD_CHUNK)
        target = BACKWARD_CHUNK_PROGRAMS_PER_SM * sm_count(x.device)
        rows_per_program, programs = partition_rows(n_rows, 1, cdiv(target, chunks))
        partial = torch.empty((programs, sums, n_cols), dtype=torch.float32, device=x.device)
        _launch(layer_norm_backward_chunked_kernel)[(programs, chunks)](
            dy, x, weight, stats, terms, dx, partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), x.stride(0), dx.stride(0),
            HAS_BIAS=has_bias, WANT_PARAMS=want_params, CHUNK=BACKWARD_CHUNK,
            num_warps=BACKWARD_CHUNK_WARPS,
        )  # fmt: skip
    return dx, partial.sum(dim=0)


layer_norm_forward_op = launcher_op("layer_norm_forward", layer_norm_forward)
layer_norm_backward_op = launcher_op("layer_norm_backward", layer_norm_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None and t.stride(0) != 1 and t.numel() > 1 else t


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, bias = inputs
    # Frozen parameters (LoRA fine-tuning) get no gradients: the backward then skips their partial sums. (Asked of
    # the caller's tensors: a contiguous copy made here, without autograd, never requires a gradient.)
    wants = (weight.requires_grad, bias is not None and bias.requires_grad)
    shape = x.shape
    x2d = _rows(x, shape[-1])
    weight, bias = _vector(weight), _vector(bias)
    launcher = layer_norm_forward_op if torch.compiler.is_compiling() else layer_norm_forward
    y, stats = launcher(x2d, weight, bias, attrs["eps"])
    saved = None
    if needs_grad:
        bias_dtype = None if bias is None else bias.dtype
        saved = (x2d, weight, stats, shape, bias_dtype, wants)
    return (y.view(shape),), saved


def backward(saved: tuple, grad_outputs: tuple):
    x2d, weight, stats, shape, bias_dtype, (want_w, want_b) = saved
    dy = grad_outputs[0]
    if dy is None:
        return None, None, None
    has_bias = bias_dtype is not None
    launcher = layer_norm_backward_op if torch.compiler.is_compiling() else layer_norm_backward
    dx, sums = launcher(_rows(dy, shape[-1]), x2d, weight, stats, has_bias, want_w or want_b)
    dw = sums[0].to(weight.dtype) if want_w else None
    db = sums[1].to(bias_dtype) if want_b else None
    return dx.view(shape), dw, db


def supports(inputs: tuple, attrs: dict) -> list[str]:
    x, weight, bias = inputs
    reasons = []
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            reasons.append(f"{name} is {t.dtype}; the Triton layer_norm takes {[str(d) for d in DTYPES]}")
    if x.dim() >= 1 and x.shape[-1] > MAX_COLS:
        reasons.append(f"hidden size {x.shape[-1]} is over the Triton layer_norm's limit of {MAX_COLS}")
    return reasons


KERNEL = KernelSpec(
    op="layer_norm",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
