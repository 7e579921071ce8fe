"""What the Triton swiglu and geglu share: ``y = act(a) * b`` elementwise, forward and backward, ``act`` a
compile-time choice (SILU or GELU_TANH).

Both operators are purely memory-bound: the forward reads a and b and writes y; the backward reads a, b and dy and
writes da and db in one pass, recomputing the activation (nothing but a and b is saved). All math is in fp32;
outputs are in the inputs' dtype.

Layout. Rows are the flattened leading dimensions, columns the intermediate size I. a and b may be views with a row
stride other than I (the two halves of one fused ``gate_up`` projection): they are read in place, never copied.

- flat: when every operand's rows are contiguous the tensors are walked as one long row, in 1-D blocks of
  FLAT_BLOCK elements (no tail per row, one tail in all).
- rows: otherwise a program covers a (BLOCK_ROWS, BLOCK_COLS) tile, BLOCK_COLS the width among ROW_BLOCKS that pads
  a row least and BLOCK_ROWS filling the tile to about TILE elements when rows are short. Programs are numbered
  row-block-major, so neighbouring programs read neighbouring memory.

Either way a program's columns are contiguous and start on a multiple of the block, so loads and stores vectorise
(Triton specialises the row strides and pointers on divisibility by 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rms_norm import DTYPES, _launch, _rows, cast_to, cdiv, launcher_op, next_power_of_2, traced

SILU = tl.constexpr(0)
GELU_TANH = tl.constexpr(1)
ACTIVATIONS = {"swiglu": 0, "geglu": 1}

# Elements per program: 16 per thread on 8 warps (two 16-byte loads of bf16 per operand). Starting points from the
# register budget, to be swept on an H200 (see the report of issue 4).
FLAT_BLOCK, FLAT_WARPS = 4096, 8
ROW_BLOCKS = (4096, 2048, 1024)
TILE = 4096


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def _gate(a, ACTIVATION: tl.constexpr):
    """(act(a), act'(a)) in fp32. gelu_tanh(a) = ½a(1 + tanh(z)) = a·sigmoid(2z), z = k(a + c·a³): no tanh needed
    (the interpreter has none), and sigmoid saturates cleanly at both ends. The constants are written out (a
    constexpr global times a tensor misbehaves under the interpreter): 2k = 2·√(2/π) and c = 0.044715."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    else:
        a2 = a * a
        s = tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a2 * a))
        return a * s, s + 1.5957691216057308 * a * s * (1.0 - s) * (1.0 + 0.134145 * a2)


@triton.jit
def _tile(n_rows, n_cols, col_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's first row and column (int64) and the (BLOCK_ROWS, BLOCK_COLS) in-bounds mask."""
    pid = tl.program_id(0)
    row0 = (pid // col_blocks).to(tl.int64) * BLOCK_ROWS
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_COLS
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (row0 + rows < n_rows)[:, None] & (col0 + cols < n_cols)[None, :]
    return row0, col0, rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def gated_forward_kernel(
    A, B, Y,
    n_rows, n_cols, col_blocks,
    a_row_stride, b_row_stride, y_row_stride,
    ACTIVATION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    row0, col0, rows, cols, mask = _tile(n_rows, n_cols, col_blocks, BLOCK_ROWS, BLOCK_COLS)
    a_tile = A + row0 * a_row_stride + col0
    b_tile = B + row0 * b_row_stride + col0
    y_tile = Y + row0 * y_row_stride + col0
    a = tl.load(a_tile + rows * a_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_tile + rows * b_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _gate(a, ACTIVATION)
    tl.store(y_tile + rows * y_row_stride + cols, cast_to(act * b, Y.dtype.element_ty), mask=mask)


@triton.jit
def gated_backward_kernel(
    DY, A, B, DA, DB,
    n_rows, n_cols, col_blocks,
    dy_row_stride, a_row_stride, b_row_stride, d_row_stride,
    ACTIVATION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """da = dy·b·act'(a), db = dy·act(a); DA and DB share one row stride (both are fresh, contiguous)."""
    row0, col0, rows, cols, mask = _tile(n_rows, n_cols, col_blocks, BLOCK_ROWS, BLOCK_COLS)
    dy_tile = DY + row0 * dy_row_stride + col0
    a_tile = A + row0 * a_row_stride + col0
    b_tile = B + row0 * b_row_stride + col0
    d_offsets = row0 * d_row_stride + col0 + rows * d_row_stride + cols
    dy = tl.load(dy_tile + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_tile + rows * a_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_tile + rows * b_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _gate(a, ACTIVATION)
    tl.store(DA + d_offsets, cast_to(dy * b * act_grad, DA.dtype.element_ty), mask=mask)
    tl.store(DB + d_offsets, cast_to(dy * act, DB.dtype.element_ty), mask=mask)


# -- launch heuristics ---------------------------------------------------------------------------------------------


def row_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) of the rows layout: the block width that pads a row least (the widest on
    ties), then as many rows as fill about TILE elements; 16 elements per thread, 1 to 8 warps."""
    block_cols = min(
        (min(block, next_power_of_2(n_cols)) for block in ROW_BLOCKS),
        key=lambda block: (cdiv(n_cols, block) * block, -block),
    )
    block_rows = max(1, min(TILE // block_cols, next_power_of_2(n_rows)))
    return block_rows, block_cols, max(1, min(8, block_rows * block_cols // 512))


def flat_tile(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the flat layout."""
    block = min(FLAT_BLOCK, next_power_of_2(numel))
    return block, max(1, min(FLAT_WARPS, block // 512))


def _layout(n_rows: int, n_cols: int, *operands: torch.Tensor) -> tuple[tuple, tuple, int, dict]:
    """(shape as seen by the kernel, grid, col_blocks, launch options) of a (rows, I) problem whose operands have
    unit column stride: the flat layout when every operand's rows are contiguous, else the rows layout."""
    if n_rows == 1 or all(t.stride(0) == n_cols for t in operands):
        block, num_warps = flat_tile(n_rows * n_cols)
        shape = (1, n_rows * n_cols)
        options = {"BLOCK_ROWS": 1, "BLOCK_COLS": block, "num_warps": num_warps}
    else:
        block_rows, block_cols, num_warps = row_tile(n_rows, n_cols)
        shape = (n_rows, n_cols)
        options = {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols, "num_warps": num_warps}
    col_blocks = cdiv(shape[1], options["BLOCK_COLS"])
    return shape, (cdiv(shape[0], options["BLOCK_ROWS"]) * col_blocks,), col_blocks, options


# -- launchers (plain calls eagerly, custom ops under torch.compile: see rms_norm.py) ------------------------------


def gated_forward(a: torch.Tensor, b: torch.Tensor, activation: int) -> torch.Tensor:
    """a, b: (rows, I) with unit column stride, any row strides. Returns y (rows, I), contiguous, in a's dtype."""
    n_rows, n_cols = a.shape
    y = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device)
    if y.numel() == 0:
        return y
    (rows, cols), grid, col_blocks, options = _layout(n_rows, n_cols, a, b)
    _launch(gated_forward_kernel)[grid](
        a, b, y,
        rows, cols, col_blocks,
        a.stride(0), b.stride(0), y.stride(0),
        ACTIVATION=activation, **options,
    )  # fmt: skip
    return y


def _launch_backward(dy, a, b, da, db, activation: int) -> None:
    """Writes da and db ((rows, I), unit column stride, one row stride for both) from dy, a and b. Each element is
    read before the same program writes it, so da and db may be a and b themselves."""
    n_rows, n_cols = a.shape
    if a.numel() == 0:
        return
    (rows, cols), grid, col_blocks, options = _layout(n_rows, n_cols, dy, a, b, da, db)
    _launch(gated_backward_kernel)[grid](
        dy, a, b, da, db,
        rows, cols, col_blocks,
        dy.stride(0), a.stride(0), b.stride(0), da.stride(0),
        ACTIVATION=activation, **options,
    )  # fmt: skip


def gated_backward(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, a, b: (rows, I) with unit column stride. Returns da and db, fresh and contiguous, in a's dtype."""
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(b.shape, dtype=b.dtype, device=a.device)
    _launch_backward(dy, a, b, da, db, activation)
    return da, db


def gated_backward_into_inputs(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, written over a and b (handed over by the caller: one row stride, no overlap), whose versions are
    bumped so that any other autograd user of them errors. Eager only."""
    _launch_backward(dy, a, b, a, b, activation)
    torch.autograd.graph.increment_version(a)
    torch.autograd.graph.increment_version(b)
    return a, b


gated_forward_op = launcher_op("gated_forward", gated_forward)
gated_backward_op = launcher_op("gated_backward", gated_backward)


# -- the kernel contract, for either operator ----------------------------------------------------------------------


def make_forward(op: str):
    activation = ACTIVATIONS[op]

    def forward(inputs: tuple, attrs: dict, needs_grad: bool):
        a, b = inputs
        shape = a.shape
        if a.numel() == 0:
            return (torch.empty(shape, dtype=a.dtype, device=a.device),), ((a, b, shape, False) if needs_grad else None)
        a2d, b2d = _rows(a, shape[-1]), _rows(b, shape[-1])
        launcher = gated_forward_op if torch.compiler.is_compiling() else gated_forward
        y = launcher(a2d, b2d, activation)
        # Gradients into a's and b's storage (see the operator's in_place): eagerly only, and only where one row
        # stride serves both and they do not overlap (two halves of one projection do not).
        into_inputs = (
            attrs.get("in_place", False)
            and not traced(a2d)
            and a2d.stride(0) == b2d.stride(0)
            and a2d.data_ptr() != b2d.data_ptr()
        )
        return (y.view(shape),), ((a2d, b2d, shape, into_inputs) if needs_grad else None)

    return forward


def make_backward(op: str):
    activation = ACTIVATIONS[op]

    def backward(saved: tuple, grad_outputs: tuple):
        a2d, b2d, shape, into_inputs = saved
        dy = grad_outputs[0]
        if dy is None:
            return None, None
        if a2d.numel() == 0:
            return torch.zeros(shape, dtype=a2d.dtype, device=a2d.device), torch.zeros(
                shape, dtype=b2d.dtype, device=b2d.device
            )
        if torch.compiler.is_compiling():
            launcher = gated_backward_op
        else:
            launcher = gated_backward_into_inputs if into_inputs else gated_backward
        da, db = launcher(_rows(dy, shape[-1]), a2d, b2d, activation)
        return da.view(shape), db.view(shape)

    return backward


def make_supports(op: str):
    def supports(inputs: tuple, attrs: dict) -> list[str]:
        reasons = []
        for name, t in zip(("a", "b"), inputs):
            if t.dtype not in DTYPES:
                reasons.append(f"{name} is {t.dtype}; the Triton {op} takes {[str(d) for d in DTYPES]}")
        return reasons

    return supports
