"""embedding in Triton: ``y = weight[indices]`` forward, a dense weight gradient backward.

A dropped index — the padding row (``padding_row`` turns a negative ``padding_idx`` into a row number) or one
outside ``[0, N)`` — gives a zero row and no gradient, and its address is never formed: it reads row 0 under a mask
that is false, so nothing out of bounds is touched. Rows of the flattened indices are tokens, columns the embedding
dim E; a program covers a (BLOCK_TOKENS, BLOCK_COLS) tile, BLOCK_COLS contiguous columns of each gathered row, so
loads and stores vectorise.

Backward. Repeated indices accumulate in fp32 and are rounded once to the weight's dtype; the gradient is dense
((N, E), zeros where no index points). Two paths:

- atomics (default). An fp32 weight: ``tl.atomic_add`` straight into the zeroed fp32 gradient. A bf16/fp16 weight:
  a dense fp32 buffer of the whole table would cost 2·N·E·4 bytes of traffic and memory (2 GiB at Llama-3's 128256 x
  4096) for a result that touches only the rows indexed, so the sums are gathered in a (tokens, E) fp32 buffer
  instead: each distinct index picks an owner (its last token, by ``atomic_max``), every token adds its gradient row
  into its owner's row of the buffer with fp32 atomics, and the owners write their sums, rounded once, into the
  zeroed gradient. Three small launches; the order of the fp32 additions is not fixed, so neither are the bits.
- deterministic, used when ``torch.are_deterministic_algorithms_enabled()`` (the OpSpec has no attribute for it; it
  is read when the backward runs, and under torch.compile at trace time, where Dynamo guards on it): the indices are
  sorted with ``torch.sort(stable=True)`` (dropped ones keyed past the last row, so they sort to the end and are
  skipped), and the program at the start of each run of equal indices sums the run's gradient rows in a fixed order,
  BLOCK_RUN rows at a time, and writes the row once. A very long run (one token repeated thousands of times) is
  walked by one program per column block, slower but still correct.

No host synchronisation on either path. Under torch.compile the launchers run as custom ops opaque to Inductor;
eagerly they are plain calls (see rms_norm.py's launchers for why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.operators.embedding import padding_row
from liger_core.spec import KernelSpec

from .rms_norm import DTYPES, _launch, _rows, cast_to, cdiv, launcher_op, next_power_of_2

INDEX_DTYPES = (torch.int64, torch.int32)
# Elements of one program's tile and the widest column block: a row of E <= MAX_BLOCK_COLS is one block; wider rows
# are split, so any E works. Untuned: to be swept on an H200.
TILE = 4096
MAX_BLOCK_COLS = 2048
# Gradient rows a program of the deterministic path sums per step, and its widest column block (the step's tile stays
# at TILE elements, 16 per thread on 8 warps).
BLOCK_RUN = 8
MAX_SORTED_BLOCK_COLS = TILE // BLOCK_RUN


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING: tl.constexpr):
    """(index as int64, whether it is kept): in [0, n_rows), not the padding row, a real token."""
    token_mask = tokens < n_tokens
    index = tl.load(INDICES + tokens, mask=token_mask, other=-1).to(tl.int64)
    keep = token_mask & (index >= 0) & (index < n_rows)
    if HAS_PADDING:
        keep = keep & (index != pad)
    return tl.where(keep, index, 0), keep


@triton.jit
def embedding_forward_kernel(
    INDICES, W, Y,
    n_tokens, n_rows, n_cols, w_row_stride, pad,
    HAS_PADDING: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """Program (i, j): tokens block i, column block j. Dropped tokens store zeros."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    index, keep = kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING)
    rows = tl.load(W + index[:, None] * w_row_stride + cols[None, :], mask=keep[:, None] & col_mask[None, :], other=0.0)
    store_mask = (tokens < n_tokens)[:, None] & col_mask[None, :]
    tl.store(Y + tokens[:, None] * n_cols + cols[None, :], rows, mask=store_mask)


@triton.jit
def embedding_backward_atomic_kernel(
    INDICES, DY, DW,
    n_tokens, n_rows, n_cols, dy_row_stride, pad,
    HAS_PADDING: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """fp32 weight: DW[index] += dy for every kept token, with fp32 atomics."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    index, keep = kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING)
    mask = keep[:, None] & col_mask[None, :]
    dy = tl.load(DY + tokens[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(DW + index[:, None] * n_cols + cols[None, :], dy, mask=mask, sem="relaxed")


@triton.jit
def embedding_claim_rows_kernel(
    INDICES, OWNER, n_tokens, n_rows, pad, HAS_PADDING: tl.constexpr, BLOCK_TOKENS: tl.constexpr
):
    """OWNER[index] = the last token holding that index (OWNER starts at -1)."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    index, keep = kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING)
    tl.atomic_max(OWNER + index, tokens.to(tl.int32), mask=keep, sem="relaxed")


@triton.jit
def embedding_gather_sums_kernel(
    INDICES, OWNER, DY, SUMS,
    n_tokens, n_rows, n_cols, dy_row_stride, pad,
    HAS_PADDING: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """SUMS[owner of index] += dy (fp32 atomics); SUMS is (tokens, E), zeroed."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    index, keep = kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING)
    owner = tl.load(OWNER + index, mask=keep, other=0).to(tl.int64)
    mask = keep[:, None] & col_mask[None, :]
    dy = tl.load(DY + tokens[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(SUMS + owner[:, None] * n_cols + cols[None, :], dy, mask=mask, sem="relaxed")


@triton.jit
def embedding_write_owned_rows_kernel(
    INDICES, OWNER, SUMS, DW,
    n_tokens, n_rows, n_cols, pad,
    HAS_PADDING: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """Each owner token writes its index's fp32 sum, rounded once, into the zeroed gradient."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    index, keep = kept_indices(INDICES, tokens, n_tokens, n_rows, pad, HAS_PADDING)
    owner = tl.load(OWNER + index, mask=keep, other=-1).to(tl.int64)
    mask = (keep & (owner == tokens))[:, None] & col_mask[None, :]
    sums = tl.load(SUMS + tokens[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + index[:, None] * n_cols + cols[None, :], cast_to(sums, DW.dtype.element_ty), mask=mask)


@triton.jit
def embedding_backward_sorted_kernel(
    SORTED, ORDER, DY, DW,
    n_tokens, n_rows, n_cols, dy_row_stride,
    BLOCK_RUN: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """Program (p, j): if sorted position p starts a run of equal kept indices, sum that run's gradient rows over
    column block j in a fixed order (BLOCK_RUN rows per step) and write the row of DW once."""
    start = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    index = tl.load(SORTED + start).to(tl.int64)
    previous = tl.load(SORTED + start - 1, mask=start > 0, other=-1)
    if (index < n_rows) & (previous != index):
        acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        position = start
        more = start >= 0  # true; a tensor, as the loop reassigns it
        while more:
            positions = position + tl.arange(0, BLOCK_RUN)
            in_run = tl.load(SORTED + positions, mask=positions < n_tokens, other=-1) == index
            tokens = tl.load(ORDER + positions, mask=in_run, other=0)
            dy = tl.load(
                DY + tokens[:, None] * dy_row_stride + cols[None, :],
                mask=in_run[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(dy.to(tl.float32), axis=0)
            # A run is contiguous: if the whole step matched, it may go on.
            more = tl.sum(in_run.to(tl.int32), axis=0) == BLOCK_RUN
            position += BLOCK_RUN
        tl.store(DW + index * n_cols + cols, cast_to(acc, DW.dtype.element_ty), mask=col_mask)


# -- launch heuristics ---------------------------------------------------------------------------------------------


def embedding_tile(n_tokens: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_TOKENS, BLOCK_COLS, num_warps): column blocks up to MAX_BLOCK_COLS wide, tokens filling the tile to
    about TILE elements, 4 to 8 warps (16 elements per thread at full tiles)."""
    block_cols = min(next_power_of_2(n_cols), MAX_BLOCK_COLS)
    block_tokens = max(1, min(TILE // block_cols, next_power_of_2(max(n_tokens, 1))))
    return block_tokens, block_cols, max(4, min(8, block_tokens * block_cols // 512))


# -- launchers ---------------------------------------------------------------------------------------------------


def embedding_forward(indices: torch.Tensor, weight: torch.Tensor, pad: int) -> torch.Tensor:
    """indices: flat (tokens,), int64 or int32, contiguous; weight (N, E) with unit column stride; pad < 0: none.
    Returns (tokens, E) in weight's dtype."""
    n_tokens = indices.shape[0]
    n_rows, n_cols = weight.shape
    y = torch.empty((n_tokens, n_cols), dtype=weight.dtype, device=weight.device)
    if n_tokens == 0 or n_cols == 0:
        return y
    block_tokens, block_cols, num_warps = embedding_tile(n_tokens, n_cols)
    grid = (cdiv(n_tokens, block_tokens), cdiv(n_cols, block_cols))
    _launch(embedding_forward_kernel)[grid](
        indices, weight, y,
        n_tokens, n_rows, n_cols, weight.stride(0), pad,
        HAS_PADDING=pad >= 0, BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )  # fmt: skip
    return y


def embedding_backward(
    dy: torch.Tensor, indices: torch.Tensor, n_rows: int, weight_dtype: torch.dtype, pad: int, deterministic: bool
) -> torch.Tensor:
    """dy: (tokens, E) with unit column stride. Returns the dense (n_rows, E) weight gradient in weight_dtype."""
    n_tokens, n_cols = dy.shape
    dw = torch.zeros((n_rows, n_cols), dtype=weight_dtype, device=dy.device)
    if n_tokens == 0 or n_cols == 0:
        return dw
    has_padding = pad >= 0
    block_tokens, block_cols, num_warps = embedding_tile(n_tokens, n_cols)
    grid = (cdiv(n_tokens, block_tokens), cdiv(n_cols, block_cols))
    if deterministic:
        keep = (indices >= 0) & (indices < n_rows)
        if has_padding:
            keep = keep & (indices != pad)
        keys = torch.where(keep, indices, torch.full_like(indices, n_rows))
        sorted_keys, order = torch.sort(keys, stable=True)
        sorted_block_cols = min(next_power_of_2(n_cols), MAX_SORTED_BLOCK_COLS)
        _launch(embedding_backward_sorted_kernel)[(n_tokens, cdiv(n_cols, sorted_block_cols))](
            sorted_keys, order, dy, dw,
            n_tokens, n_rows, n_cols, dy.stride(0),
            BLOCK_RUN=BLOCK_RUN, BLOCK_COLS=sorted_block_cols,
            num_warps=max(4, min(8, BLOCK_RUN * sorted_block_cols // 512)),
        )  # fmt: skip
    elif weight_dtype == torch.float32:
        _launch(embedding_backward_atomic_kernel)[grid](
            indices, dy, dw,
            n_tokens, n_rows, n_cols, dy.stride(0), pad,
            HAS_PADDING=has_padding, BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        owner = torch.full((n_rows,), -1, dtype=torch.int32, device=dy.device)
        sums = torch.zeros((n_tokens, n_cols), dtype=torch.float32, device=dy.device)
        claim_block = 1024
        _launch(embedding_claim_rows_kernel)[(cdiv(n_tokens, claim_block),)](
            indices, owner, n_tokens, n_rows, pad, HAS_PADDING=has_padding, BLOCK_TOKENS=claim_block, num_warps=4
        )
        _launch(embedding_gather_sums_kernel)[grid](
            indices, owner, dy, sums,
            n_tokens, n_rows, n_cols, dy.stride(0), pad,
            HAS_PADDING=has_padding, BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
        _launch(embedding_write_owned_rows_kernel)[grid](
            indices, owner, sums, dw,
            n_tokens, n_rows, n_cols, pad,
            HAS_PADDING=has_padding, BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    return dw


embedding_forward_op = launcher_op("embedding_forward", embedding_forward)
embedding_backward_op = launcher_op("embedding_backward", embedding_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    indices, weight = inputs
    n_rows = weight.shape[0]
    pad = padding_row(attrs["padding_idx"], n_rows)
    pad = -1 if pad is None else pad
    flat = indices.reshape(-1).contiguous()
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        weight = weight.contiguous()
    launcher = embedding_forward_op if torch.compiler.is_compiling() else embedding_forward
    y = launcher(flat, weight, pad)
    saved = (flat, indices.shape, n_rows, weight.dtype, pad) if needs_grad else None
    return (y.view(*indices.shape, weight.shape[1]),), saved


def backward(saved: tuple, grad_outputs: tuple):
    flat, shape, n_rows, weight_dtype, pad = saved
    dy = grad_outputs[0]
    if dy is None:
        return (None,)
    dy = _rows(dy, dy.shape[-1])
    launcher = embedding_backward_op if torch.compiler.is_compiling() else embedding_backward
    return (launcher(dy, flat, n_rows, weight_dtype, pad, torch.are_deterministic_algorithms_enabled()),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    indices, weight = inputs
    reasons = []
    if weight.dtype not in DTYPES:
        reasons.append(f"weight is {weight.dtype}; the Triton embedding takes {[str(d) for d in DTYPES]}")
    if indices.dtype not in INDEX_DTYPES:
        reasons.append(f"indices are {indices.dtype}; the Triton embedding takes int64 or int32")
    if indices.numel() >= 2**31:
        reasons.append(f"{indices.numel()} indices are more than the Triton embedding's 2**31 - 1")
    return reasons


KERNEL = KernelSpec(
    op="embedding",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
