"""rms_norm in Triton: ``y = x * rsqrt(mean(x², -1) + eps) * (offset + weight)``, forward and backward.

Rows are the flattened leading dimensions of x. Every sum is taken in fp32; rstd (one fp32 per row) is kept for the
backward. The casting modes follow the reference backend exactly (see ``effective_weight`` and ``normalise``).

Two layouts, chosen on the host from the hidden size H alone:

- fused: a whole row sits in registers (H <= MAX_FUSED_FORWARD_COLS forward, MAX_FUSED_BACKWARD_COLS backward).
  Forward runs one program per tile of rows (several rows per tile when H is small); backward runs a grid of a few
  programs per SM, each walking a contiguous block of rows and keeping its partial dW in registers.
- chunked: larger rows are walked in CHUNK-wide pieces. Forward makes two passes over its row (sum of squares, then
  normalise; the second pass mostly hits L2). Backward first computes one fp32 scalar per row, ``mean(dn * n)``,
  then a 2-D grid (row blocks x column chunks) writes dX and each program's partial dW.

dW is never accumulated with atomics: each program writes one fp32 row of a (programs, H) buffer, which torch sums,
so the result is deterministic for a given GPU.

Under torch.compile the launchers run as custom ops opaque to Inductor; eagerly they are
plain calls (see the launchers' comment). Either way they allocate and return their outputs and never write their
inputs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from liger_core.opaque import opaque_op
from liger_core.spec import KernelSpec

# casting_mode as a compile-time constant of the kernels.
LLAMA = tl.constexpr(0)
GEMMA = tl.constexpr(1)
NONE = tl.constexpr(2)
CASTING_MODES = {"llama": 0, "gemma": 1, "none": 2}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest row (power of two) kept whole in registers. Above it, a thread would hold more than 32 fp32 values of each
# live tensor (forward: x and weight; backward: x, dy, weight and the dW accumulator) and spill.
MAX_FUSED_FORWARD_COLS = 16384
MAX_FUSED_BACKWARD_COLS = 16384
# Chunk widths and warps of the chunked kernels, from a sweep on an H200 at H = 18432 .. 262144.
FORWARD_CHUNKS, FORWARD_CHUNK_WARPS = (16384, 8192), 16
ROW_DOT_CHUNK, ROW_DOT_WARPS = 8192, 16
BACKWARD_CHUNK, BACKWARD_CHUNK_WARPS, BACKWARD_CHUNK_PROGRAMS_PER_SM = 2048, 8, 4
# The chunked path has no inherent limit; this is as far as it is tested, with headroom.
MAX_COLS = 1 << 20


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)``, rounding to nearest even. The interpreter truncates fp32 -> bf16 (triton 3.9), which doubles
    the error on the CPU, so there the rounding is done on the bits first (NaN payloads aside, this is exact RTNE)."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def effective_weight(w, offset, CASTING: tl.constexpr, X_DTYPE: tl.constexpr):
    """``offset + weight`` as fp32, rounded where the reference rounds it."""
    if CASTING == LLAMA:
        # torch computes `offset + weight` in weight's dtype.
        return cast_to(w.to(tl.float32) + offset, w.dtype).to(tl.float32)
    elif CASTING == GEMMA:
        return w.to(tl.float32) + offset
    else:
        # "none": weight cast to x's dtype, the sum rounded to x's dtype.
        return cast_to(cast_to(w, X_DTYPE).to(tl.float32) + offset, X_DTYPE).to(tl.float32)


@triton.jit
def normalise(x, rstd, w, CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, X_DTYPE: tl.constexpr):
    """The output in fp32 (the caller casts it to x's dtype); `w` is `effective_weight`'s result."""
    n = x * rstd
    if CASTING != GEMMA:
        # llama and none round the normalised x to x's dtype before the weight multiply. The product of two values
        # of at most 11 significant bits is exact in fp32, so one final rounding matches torch's op in either dtype.
        n = cast_to(n, X_DTYPE).to(tl.float32)
    if HAS_WEIGHT:
        n = n * w
    return n


@triton.jit
def rms_norm_forward_kernel(
    X, Y, W, RSTD,
    n_rows, n_cols, x_row_stride, y_row_stride,
    eps, offset,
    CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_ROWS rows, each row whole in registers."""
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = 1.0
    if HAS_WEIGHT:
        w = effective_weight(tl.load(W + cols, mask=col_mask, other=0.0), offset, CASTING, X_DTYPE)[None, :]
    y = normalise(x, rstd[:, None], w, CASTING, HAS_WEIGHT, X_DTYPE)
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], cast_to(y, X_DTYPE), mask=mask)


@triton.jit
def rms_norm_forward_chunked_kernel(
    X, Y, W, RSTD,
    n_cols, x_row_stride, y_row_stride,
    eps, offset,
    CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """One program per row, too long for registers: sum of squares over chunks, then a second pass normalises."""
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_row_stride
    y_row = Y + row * y_row_stride
    squares = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        squares += x * x
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        col_mask = cols < n_cols
        x = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = 1.0
        if HAS_WEIGHT:
            w = effective_weight(tl.load(W + cols, mask=col_mask, other=0.0), offset, CASTING, X_DTYPE)
        y = normalise(x, rstd, w, CASTING, HAS_WEIGHT, X_DTYPE)
        tl.store(y_row + cols, cast_to(y, X_DTYPE), mask=col_mask)


@triton.jit
def rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    dy_row_stride, x_row_stride, dx_row_stride,
    offset,
    CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, WANT_DW: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """Each program walks its block of rows, BLOCK_ROWS at a time, whole rows in registers.

    With n = x·rstd and dn = dy·(offset + w): dx = rstd·(dn − n·mean(dn·n)), dw = Σ_rows dy·n.
    The program's dW partial stays in registers and is written once, to its own row of DW_PARTIAL (only when
    WANT_DW: a frozen weight, as in LoRA fine-tuning, gets none).
    """
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    w = 1.0
    if HAS_WEIGHT:
        w = effective_weight(tl.load(W + cols, mask=col_mask, other=0.0), offset, CASTING, X_DTYPE)[None, :]
    dw = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for start in range(first_row, end_row, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < end_row
        mask = row_mask[:, None] & col_mask[None, :]
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        n = x * rstd
        dn = dy
        if WANT_DW:
            dw += dy * n
        if HAS_WEIGHT:
            dn = dy * w
        mean_dn_n = tl.sum(dn * n, axis=1)[:, None] / n_cols
        dx = rstd * (dn - n * mean_dn_n)
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], cast_to(dx, X_DTYPE), mask=mask)
    if WANT_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@triton.jit
def rms_norm_backward_row_dot_kernel(
    DY, X, W, RSTD, MEAN_DN_N,
    n_cols, dy_row_stride, x_row_stride,
    offset,
    CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Chunked backward, first pass: one program per row computes mean(dn·n), the row's only coupling term."""
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        col_mask = cols < n_cols
        x = tl.load(X + row * x_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        dn = tl.load(DY + row * dy_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            dn = dn * effective_weight(tl.load(W + cols, mask=col_mask, other=0.0), offset, CASTING, X_DTYPE)
        acc += dn * x
    rstd = tl.load(RSTD + row)
    tl.store(MEAN_DN_N + row, tl.sum(acc, axis=0) * rstd / n_cols)


@triton.jit
def rms_norm_backward_chunked_kernel(
    DY, X, W, RSTD, MEAN_DN_N, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    dy_row_stride, x_row_stride, dx_row_stride,
    offset,
    CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr, WANT_DW: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Chunked backward, second pass: program (i, j) handles row block i, column chunk j."""
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    pid_rows = tl.program_id(0)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    col_mask = cols < n_cols
    w = 1.0
    if HAS_WEIGHT:
        w = effective_weight(tl.load(W + cols, mask=col_mask, other=0.0), offset, CASTING, X_DTYPE)
    dw = tl.zeros([CHUNK], dtype=tl.float32)
    first_row = pid_rows.to(tl.int64) * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for row in range(first_row, end_row):
        rstd = tl.load(RSTD + row)
        mean_dn_n = tl.load(MEAN_DN_N + row)
        x = tl.load(X + row * x_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dy_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        n = x * rstd
        dn = dy
        if WANT_DW:
            dw += dy * n
        if HAS_WEIGHT:
            dn = dy * w
        dx = rstd * (dn - n * mean_dn_n)
        tl.store(DX + row * dx_row_stride + cols, cast_to(dx, X_DTYPE), mask=col_mask)
    if WANT_DW:
        tl.store(DW_PARTIAL + pid_rows.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


# Whether @triton.jit gave interpreted functions (TRITON_INTERPRET=1 when triton decorated them).
INTERPRETED = tl.constexpr(not isinstance(rms_norm_forward_kernel, triton.runtime.JITFunction))


# -- launch heuristics ---------------------------------------------------------------------------------------------


def forward_tile(block_cols: int, n_rows: int) -> tuple[int, int]:
    """(rows per program, num_warps) of the fused forward: tiles of about 4096 elements, 16 per thread (two 16-byte
    loads of bf16) on 4 to 16 warps. Within 3% of the best of 1..128 rows and 4..32 warps at every H from 64 to
    16384 on an H200, about 3.8 TB/s (90% of a device-to-device copy)."""
    block_rows = _rows_per_tile(block_cols, n_rows, 4096)
    return block_rows, max(4, min(16, block_rows * block_cols // 512))


def backward_tile(block_cols: int, n_rows: int) -> tuple[int, int, int]:
    """(rows per tile, num_warps, programs per SM) of the fused backward.

    From a sweep on an H200 (1..64 rows per tile, 4..32 warps, 1..16 programs per SM, H from 64 to 16384): 8
    elements per thread and 32 resident warps per SM, on tiles of 4096 elements for rows up to 256 wide and of one
    row (at least 1024 elements) beyond: the backward keeps four tensors live (x, dy, weight, dW), so it wants fewer
    elements per thread than the forward. More programs than fit on an SM would only add waves and dW partial rows.
    A 16384-wide row runs on 16 warps, one program per SM (on 32 warps a thread may hold only 64 registers).
    """
    block_rows = _rows_per_tile(block_cols, n_rows, 4096 if block_cols <= 256 else 1024)
    elements = block_rows * block_cols
    if elements > 8192:
        return block_rows, 16, 1
    num_warps = max(4, min(32, elements // 256))
    return block_rows, num_warps, max(1, 32 // num_warps)


def forward_chunk(n_cols: int) -> int:
    """The widest chunk that does not pad the row more than a narrower one would."""
    return min(FORWARD_CHUNKS, key=lambda chunk: cdiv(n_cols, chunk) * chunk)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the host. Triton's own is a ``constexpr_function`` in recent releases: a host call costs
    microseconds (it unwraps its arguments and imports on every call), and the launchers make several per step."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for the host (0 for 0, as Triton's), without its per-call cost (see ``cdiv``)."""
    n = int(n)  # a launcher's fake run may hand over a symbolic size (see launcher_op)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def previous_power_of_2(n: int) -> int:
    """The largest power of two not above `n` (1 for n <= 1): block sizes and warp counts must be powers of two."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def _rows_per_tile(block_cols: int, n_rows: int, tile_elements: int) -> int:
    return max(1, min(tile_elements // block_cols, next_power_of_2(max(n_rows, 1))))


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(
            index if index is not None else torch.cuda.current_device()
        ).multi_processor_count
    return 4  # the interpreter on the CPU runs programs one after another: any small number will do


def sm_count(device: torch.device) -> int:
    return _sm_count(device.type, device.index)


def partition_rows(n_rows: int, rows_per_step: int, programs: int) -> tuple[int, int]:
    """(rows each program walks, a multiple of rows_per_step; number of programs), no program left empty."""
    programs = max(1, min(programs, cdiv(n_rows, rows_per_step)))
    rows_per_program = cdiv(cdiv(n_rows, programs), rows_per_step) * rows_per_step
    return rows_per_program, cdiv(n_rows, rows_per_program)


# -- launchers ---------------------------------------------------------------------------------------------------
# Eagerly the launchers are called as plain functions: going through the custom-op dispatcher costs tens of
# microseconds of host time per call, more than the kernels themselves take on the GPU at Llama shapes. Under
# torch.compile they run as custom ops opaque to Inductor (``launcher_op``): the compiled graph calls the launcher
# with real tensors, exactly as eagerly. (With torch.library.triton_op, which lets Inductor inline the kernels, the
# compiled Llama training step hit an illegal memory access on the H200 and the jsd and kl_div compile tests failed;
# the causes were not isolated. An opaque op runs the same code as eager mode.)

# The tensor types a kernel can be launched on directly; tracing also hands code FakeTensors or FunctionalTensors.
_REAL_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def traced(tensor: torch.Tensor) -> bool:
    """Whether torch.compile is tracing the code that sees `tensor`: Dynamo's frame (``is_compiling()``), or a fake
    run of a custom op, outside the traced frame, where ``is_compiling()`` is False."""
    return type(tensor) not in _REAL_TENSOR_TYPES or torch.compiler.is_compiling()


class _TritonLauncher:
    """``_launch(kernel)[grid](*args, **meta)``: ``kernel[grid](...)``, except on fake tensors (a launcher run as a
    custom op's fake implementation, to learn its outputs' shapes): they hold no data, so there is nothing to launch.
    Every kernel's first argument is a tensor."""

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        kernel = self.kernel

        def launch(*args, **meta):
            if isinstance(args[0], FakeTensor):
                return None
            return kernel[grid](*args, **meta)

        return launch


def _launch(kernel) -> _TritonLauncher:
    return _TritonLauncher(kernel)


def launcher_op(name: str, launcher):
    """`launcher` as the custom op ``liger_triton::<name>`` opaque to torch.compile (``liger_core.opaque``): it
    allocates its outputs, launches kernels and returns the outputs; on fake tensors its launches are skipped
    (``_launch``). Called only while compiling."""
    return opaque_op(f"liger_triton::{name}", launcher)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting_mode: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (rows, H) with unit column stride. Returns y (rows, H) in x's dtype and rstd (rows,) in fp32."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    has_weight = weight is not None
    w = weight if has_weight else x  # never read when has_weight is False
    block_cols = next_power_of_2(n_cols)
    if block_cols <= MAX_FUSED_FORWARD_COLS:
        block_rows, num_warps = forward_tile(block_cols, n_rows)
        _launch(rms_norm_forward_kernel)[(cdiv(n_rows, block_rows),)](
            x, y, w, rstd,
            n_rows, n_cols, x.stride(0), y.stride(0),
            eps, offset,
            CASTING=casting_mode, HAS_WEIGHT=has_weight, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        _launch(rms_norm_forward_chunked_kernel)[(n_rows,)](
            x, y, w, rstd,
            n_cols, x.stride(0), y.stride(0),
            eps, offset,
            CASTING=casting_mode, HAS_WEIGHT=has_weight, CHUNK=forward_chunk(n_cols),
            num_warps=FORWARD_CHUNK_WARPS,
        )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: int,
    want_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: (rows, H) with unit column stride. Returns dx (rows, H) in x's dtype and dw in weight's dtype,
    (0,)-shaped when there is no weight or `want_dw` is False (a custom op cannot return None)."""
    n_rows, n_cols = x.shape
    # Always a fresh buffer, never dy's: whether anyone else can still observe dy (API.md's in-place rule) is not
    # knowable here, so `in_place` is honoured by allocating.
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    has_weight = weight is not None
    want_dw = want_dw and has_weight
    w = weight if has_weight else x  # never read when has_weight is False
    if not want_dw:
        dw = torch.empty((0,), dtype=x.dtype, device=x.device)
    elif n_rows == 0:
        dw = torch.zeros((n_cols,), dtype=weight.dtype, device=x.device)
    if n_rows == 0:
        return dx, dw
    block_cols = next_power_of_2(n_cols)
    if block_cols <= MAX_FUSED_BACKWARD_COLS:
        block_rows, num_warps, programs_per_sm = backward_tile(block_cols, n_rows)
        # Each program walks a contiguous block of rows and writes one fp32 row of dW partials: at least 4 tiles of
        # rows each while that still leaves a program for every SM, so the partials stay small next to dX.
        sms = sm_count(x.device)
        target = max(min(sms * programs_per_sm, cdiv(n_rows, 4 * block_rows)), sms)
        rows_per_program, programs = partition_rows(n_rows, block_rows, target)
        dw_partial = torch.empty((programs if want_dw else 0, n_cols), dtype=torch.float32, device=x.device)
        _launch(rms_norm_backward_kernel)[(programs,)](
            dy, x, w, rstd, dx, dw_partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), x.stride(0), dx.stride(0),
            offset,
            CASTING=casting_mode, HAS_WEIGHT=has_weight, WANT_DW=want_dw, BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols, num_warps=num_warps,
        )  # fmt: skip
    else:
        mean_dn_n = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        _launch(rms_norm_backward_row_dot_kernel)[(n_rows,)](
            dy, x, w, rstd, mean_dn_n,
            n_cols, dy.stride(0), x.stride(0),
            offset,
            CASTING=casting_mode, HAS_WEIGHT=has_weight, CHUNK=ROW_DOT_CHUNK,
            num_warps=ROW_DOT_WARPS,
        )  # fmt: skip
        chunks = cdiv(n_cols, BACKWARD_CHUNK)
        # A few programs per SM over the 2-D grid; the row blocks set how many dW partial rows there are.
        target = BACKWARD_CHUNK_PROGRAMS_PER_SM * sm_count(x.device)
        rows_per_program, programs = partition_rows(n_rows, 1, cdiv(target, chunks))
        dw_partial = torch.empty((programs if want_dw else 0, n_cols), dtype=torch.float32, device=x.device)
        _launch(rms_norm_backward_chunked_kernel)[(programs, chunks)](
            dy, x, w, rstd, mean_dn_n, dx, dw_partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), x.stride(0), dx.stride(0),
            offset,
            CASTING=casting_mode, HAS_WEIGHT=has_weight, WANT_DW=want_dw, CHUNK=BACKWARD_CHUNK,
            num_warps=BACKWARD_CHUNK_WARPS,
        )  # fmt: skip
    if want_dw:
        dw = dw_partial.sum(dim=0).to(weight.dtype)
    return dx, dw


rms_norm_forward_op = launcher_op("rms_norm_forward", rms_norm_forward)
rms_norm_backward_op = launcher_op("rms_norm_backward", rms_norm_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, H) view with unit column stride; a copy only when no such view exists."""
    rows = t.reshape(-1, n_cols)
    if rows.stride(-1) != 1 and n_cols > 1:
        rows = rows.contiguous()
    return rows


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight = inputs
    # A frozen weight (LoRA fine-tuning) gets no dW: the backward then skips its partial sums and their reduction.
    # (Asked of the caller's weight: a contiguous copy made here, without autograd, never requires a gradient.)
    want_dw = weight is not None and weight.requires_grad
    shape = x.shape
    x2d = _rows(x, shape[-1])
    if weight is not None and weight.stride(0) != 1 and weight.numel() > 1:
        weight = weight.contiguous()
    mode = CASTING_MODES[attrs["casting_mode"]]
    launcher = rms_norm_forward_op if torch.compiler.is_compiling() else rms_norm_forward
    y, rstd = launcher(x2d, weight, attrs["eps"], attrs["offset"], mode)
    saved = (x2d, weight, rstd, shape, attrs["offset"], mode, want_dw) if needs_grad else None
    return (y.view(shape),), saved


def backward(saved: tuple, grad_outputs: tuple):
    x2d, weight, rstd, shape, offset, mode, want_dw = saved
    dy = grad_outputs[0]
    if dy is None:
        return None, None
    launcher = rms_norm_backward_op if torch.compiler.is_compiling() else rms_norm_backward
    dx, dw = launcher(_rows(dy, shape[-1]), x2d, weight, rstd, offset, mode, want_dw)
    return dx.view(shape), (dw if want_dw else None)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    x, weight = inputs
    reasons = []
    if x.dtype not in DTYPES:
        reasons.append(f"x is {x.dtype}; the Triton rms_norm takes {[str(d) for d in DTYPES]}")
    if weight is not None and weight.dtype not in DTYPES:
        reasons.append(f"weight is {weight.dtype}; the Triton rms_norm takes {[str(d) for d in DTYPES]}")
    if x.dim() >= 1 and x.shape[-1] > MAX_COLS:
        reasons.append(f"hidden size {x.shape[-1]} is over the Triton rms_norm's limit of {MAX_COLS}")
    if attrs.get("casting_mode") not in CASTING_MODES:
        reasons.append(f"casting_mode {attrs.get('casting_mode')!r} is not one of {list(CASTING_MODES)}")
    return reasons


KERNEL = KernelSpec(
    op="rms_norm",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
