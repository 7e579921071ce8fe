"""fused_linear_jsd in Triton: ``jsd`` between ``log_softmax(x_s·W_sᵀ / T)`` (student) and
``log_softmax(x_t·W_tᵀ / T)`` (teacher) without materialising either (BT, V) logits; see
liger_core.operators.fused_linear_jsd for the math.

The loss is a scalar, so everything happens in the forward, over chunks of token rows (``chunk_rows``: as many rows
as fit a memory budget for the chunk's two (rows, V) logits blocks):

1. both chunks' logits with ``torch.mm`` in the inputs' dtype (cuBLAS on the GPU; the teacher is detached), each
   into one buffer that every chunk reuses;
2. one Triton program per block of rows makes three passes over V: the two rows' log-sum-exps of ``logits / T``
   (online max and sum), then the loss terms and ``Σ_v d loss / d log_q``, then it overwrites the student logits
   with ``d loss / d logits = coef · (g − q·Σg) / T`` (``g = d loss / d log_q``, ``coef`` = 1/number of counted rows,
   read on the device; 0 on rows whose label is ``ignore_index``);
3. ``grad_x[chunk] = dlogits @ W_s`` and ``grad_W_s += dlogits.T @ x_chunk``, accumulated as
   fused_linear_cross_entropy accumulates its weight gradient: in the weight's dtype by default (one rounding per
   chunk, and no float32 copy of the (V, H) gradient: 0.5 GB at V 128256, H 2048 in bf16), in ``accum_dtype`` when
   that is wider. With bf16/fp16 operands and a float32 accumulator on the GPU the GEMM reads bf16/fp16 and adds in
   fp32 (``torch.addmm(..., out_dtype=torch.float32)``, torch >= 2.10; an older torch rounds each chunk's product to
   the inputs' dtype before the fp32 sum); on the CPU the operands are widened to the accumulator's dtype.

The backward multiplies both gradients by the incoming scalar (``_scaling``: fp32 product, one rounding). Eagerly the
forward is a plain call; under torch.compile it is one opaque ``torch.library.custom_op`` (the chunk loop, cuBLAS
GEMMs and Triton launches run eagerly inside it), so Dynamo traces it without a graph break. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec

from ._scaling import scale_by_gradient
from .fused_linear_cross_entropy import (
    accumulate_weight_gradient,
    chunk_buffer,
    chunk_logits,
    weight_accumulation_dtype,
    weight_gradient_buffer,
)
from .jsd import INDEX_DTYPES, LN2, LOG2E, counted_rows, jsd_terms_base2, mode_of
from .rms_norm import DTYPES, _launch, cast_to, cdiv, launcher_op, next_power_of_2

# Bytes one chunk's student and teacher logits may take together (at the inputs' dtype). At (4096, 2048/4096),
# V 128256 bf16 on an H200, 512 MiB (1024 rows) keeps the peak at 1019 MiB, within issue 5's 1.2 GB; 1 GiB was 5 %
# faster at 2.5 GB, 256 MiB 13 % slower (benchmarks/results/2026-11-29-h200-s5-tune.json).
CHUNK_BYTES = 512 * 2**20
# Rows per program, the row kernel's column block, warps and pipelined steps. From benchmarks/tune.py at the shape
# above, forward and backward: (2048, 8, 1) was the fastest or within 0.7 % of it in four sweeps of 6-27 settings,
# one per version of the kernel (2026-11-29-h200-s11-tune-fljsd-*.json). In the first, the former (4096, 16, 1)
# took 20.81 ms against 19.12.
BLOCK_ROWS = 1
BLOCK_COLS = 2048
NUM_WARPS = 8
STAGES = 1
# Smallest "minus infinity" of the online maximum, finite so that masked rows never compute inf − inf.
LOWEST = tl.constexpr(-3.0e38)


# -- kernel --------------------------------------------------------------------------------------------------------


@triton.jit
def fused_linear_jsd_rows_kernel(
    STUDENT, TEACHER, LABELS, COEF, ROW_LOSS,
    n_rows, n_cols, s_row_stride, t_row_stride,
    inverse_temperature, beta, ignore_index,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WANT_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Rows of one chunk: the loss of each row into ROW_LOSS and, with WANT_GRAD, d loss / d student logits written
    over STUDENT (each element is read before it is written, by the same program).

    The kernel is bound by its instructions per element, not by its memory traffic, so it works in base 2 (see
    jsd_terms_base2): log2 q = logits · log2(e) / T − lse2 is one FMA per element, and the natural units come back
    once per row (ln 2). Masked lanes are loaded as -inf, which every term turns into 0 without a select."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    counted = counted_rows(LABELS, rows, n_rows, ignore_index, HAS_LABELS)
    student = STUDENT + rows[:, None] * s_row_stride
    teacher = TEACHER + rows[:, None] * t_row_stride
    scale = inverse_temperature * LOG2E

    # pass 1: base-2 log-sum-exp of both rows of logits · scale. Only the maxima are reduced across the block at
    # each step (the exponentials' shift must be one number per row); the sums stay per lane until the loop ends.
    max_s = tl.full([BLOCK_ROWS], LOWEST, dtype=tl.float32)
    max_t = tl.full([BLOCK_ROWS], LOWEST, dtype=tl.float32)
    sums_s = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    sums_t = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in tl.range(0, n_cols, BLOCK_COLS, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = counted[:, None] & (cols < n_cols)[None, :]
        s = tl.load(student + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(teacher + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max_s = tl.maximum(max_s, tl.max(s, axis=1))
        new_max_t = tl.maximum(max_t, tl.max(t, axis=1))
        # a row that has seen nothing finite yet shifts by 0: LOWEST · scale could overflow to -inf
        shift_s = tl.where(new_max_s > LOWEST, new_max_s * scale, 0.0)
        shift_t = tl.where(new_max_t > LOWEST, new_max_t * scale, 0.0)
        sums_s = sums_s * tl.exp2((max_s - new_max_s) * scale)[:, None] + tl.exp2(s * scale - shift_s[:, None])
        sums_t = sums_t * tl.exp2((max_t - new_max_t) * scale)[:, None] + tl.exp2(t * scale - shift_t[:, None])
        max_s = new_max_s
        max_t = new_max_t
    # rows that do not count were never read (their sums are 0): their log-sum-exps are set to 0
    sum_s = tl.sum(sums_s, axis=1)
    sum_t = tl.sum(sums_t, axis=1)
    lse2_s = tl.where(counted, max_s * scale + tl.log2(tl.where(counted, sum_s, 1.0)), 0.0)
    lse2_t = tl.where(counted, max_t * scale + tl.log2(tl.where(counted, sum_t, 1.0)), 0.0)

    # pass 2: the loss terms and Σ_v d loss / d log_q, both over ln 2
    loss_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    grad_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in tl.range(0, n_cols, BLOCK_COLS, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = counted[:, None] & (cols < n_cols)[None, :]
        s = tl.load(student + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(teacher + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        loss, grad = jsd_terms_base2(s * scale - lse2_s[:, None], t * scale - lse2_t[:, None], beta, MODE)
        loss_acc += loss
        grad_acc += grad
    tl.store(ROW_LOSS + rows, tl.where(counted, tl.sum(loss_acc, axis=1) * LN2, 0.0), mask=rows < n_rows)

    # pass 3: through log_softmax and the temperature, d loss / d logits = coef · (g − q·Σg) / T, with g and Σg
    # over ln 2 (hence the factor ln 2 in `factor`). Rows that do not count get q = g = 0, so 0.
    if WANT_GRAD:
        factor = tl.load(COEF) * inverse_temperature * LN2
        grad_sum = tl.sum(grad_acc, axis=1)[:, None]
        row_exists = (rows < n_rows)[:, None]
        for start in tl.range(0, n_cols, BLOCK_COLS, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_COLS)
            col_mask = (cols < n_cols)[None, :]
            mask = counted[:, None] & col_mask
            s = tl.load(student + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(teacher + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            log2_q = s * scale - lse2_s[:, None]
            _, grad = jsd_terms_base2(log2_q, t * scale - lse2_t[:, None], beta, MODE)
            dlogits = factor * (grad - tl.exp2(log2_q) * grad_sum)
            tl.store(student + cols[None, :], cast_to(dlogits, STUDENT.dtype.element_ty), mask=row_exists & col_mask)


# -- launchers -----------------------------------------------------------------------------------------------------


def chunk_rows(n_rows: int, vocab: int, student_itemsize: int, teacher_itemsize: int) -> int:
    """Token rows per chunk: its two (rows, V) logits blocks within CHUNK_BYTES, a multiple of 64 rows (whole
    tensor-core tiles for the GEMMs) when at least that many fit; at least 1."""
    rows = CHUNK_BYTES // max(vocab * (student_itemsize + teacher_itemsize), 1)
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, max(n_rows, 1)))


def fused_linear_jsd_forward(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    shift_labels: torch.Tensor | None,
    beta: float,
    ignore_index: int,
    temperature: float,
    accum_dtype: torch.dtype,
    want_x: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the loss (0-D, student_input's dtype), grad_x (BT, Hs) in student_input's dtype and grad_W (V, Hs) in
    `accum_dtype`, both for a unit upstream gradient ((0,)-shaped when not wanted)."""
    n_rows, vocab = student_input.shape[0], student_weight.shape[0]
    device = student_input.device
    if shift_labels is None:
        count = torch.full((), n_rows, dtype=torch.float32, device=device)
    else:
        count = (shift_labels != ignore_index).sum().to(torch.float32)
    coef = torch.where(count > 0, 1.0 / torch.clamp(count, min=1.0), torch.zeros_like(count))
    grad_x = torch.empty(student_input.shape if want_x else (0,), dtype=student_input.dtype, device=device)
    grad_w = weight_gradient_buffer(student_weight.shape if want_w else (0,), accum_dtype, device, n_rows)
    row_loss = torch.empty((n_rows,), dtype=torch.float32, device=device)
    if n_rows == 0:
        return torch.zeros((), dtype=student_input.dtype, device=device), grad_x, grad_w
    labels = shift_labels if shift_labels is not None else row_loss  # never read without labels
    step = chunk_rows(n_rows, vocab, student_input.element_size(), teacher_input.element_size())
    # One buffer each for the student's and the teacher's chunk logits, reused by every chunk (flce.chunk_buffer).
    student_buffer = chunk_buffer(n_rows, step, vocab, student_input.dtype, device)
    teacher_buffer = chunk_buffer(n_rows, step, vocab, teacher_input.dtype, device)
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        x_chunk = student_input[start:end]
        student_logits = chunk_logits(x_chunk, student_weight, None, student_buffer)
        teacher_logits = chunk_logits(teacher_input[start:end], teacher_weight, None, teacher_buffer)
        _launch(fused_linear_jsd_rows_kernel)[(cdiv(end - start, BLOCK_ROWS),)](
            student_logits, teacher_logits, labels[start:end] if shift_labels is not None else labels, coef,
            row_loss[start:end],
            end - start, vocab, student_logits.stride(0), teacher_logits.stride(0),
            1.0 / temperature, beta, ignore_index,
            MODE=mode_of(beta), HAS_LABELS=shift_labels is not None, WANT_GRAD=want_x or want_w,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=min(BLOCK_COLS, next_power_of_2(vocab)), STAGES=STAGES,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        dlogits = student_logits  # overwritten by the kernel
        if want_x:
            torch.matmul(dlogits, student_weight, out=grad_x[start:end])
        if want_w:
            accumulate_weight_gradient(grad_w, dlogits, x_chunk, first=start == 0)
    loss = (row_loss.sum() * coef).to(student_input.dtype)
    return loss, grad_x, grad_w


fused_linear_jsd_forward_op = launcher_op("fused_linear_jsd_forward", fused_linear_jsd_forward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the GEMMs take any layout, the chunk slicing wants rows)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    accum_dtype = weight_accumulation_dtype(student_weight.dtype, attrs["accum_dtype"])
    want_x = needs_grad and student_input.requires_grad
    want_w = needs_grad and student_weight.requires_grad
    launcher = fused_linear_jsd_forward_op if torch.compiler.is_compiling() else fused_linear_jsd_forward
    loss, grad_x, grad_w = launcher(
        _rows(student_input.detach()),
        student_weight.detach(),
        _rows(teacher_input.detach()),  # no gradient to the teacher
        teacher_weight.detach(),
        None if shift_labels is None else shift_labels.contiguous(),
        attrs["jsd_beta"],
        attrs["ignore_index"],
        attrs["temperature"],
        accum_dtype,
        want_x,
        want_w,
    )
    if not needs_grad:
        return (loss,), None
    return (loss,), (
        grad_x if want_x else None,
        grad_w if want_w else None,
        student_input.dtype,
        student_weight.dtype,
    )


def backward(saved: tuple, grad_outputs: tuple):
    grad_x, grad_w, x_dtype, w_dtype = saved
    (grad_loss,) = grad_outputs
    if grad_loss is None:
        return None, None
    return (
        None if grad_x is None else scale_by_gradient(grad_x, grad_loss, x_dtype),
        None if grad_w is None else scale_by_gradient(grad_w, grad_loss, w_dtype),
    )


def supports(inputs: tuple, attrs: dict) -> list[str]:
    student_input, student_weight, teacher_input, teacher_weight, shift_labels = inputs
    reasons = []
    for name, t in (
        ("student_input", student_input),
        ("student_weight", student_weight),
        ("teacher_input", teacher_input),
        ("teacher_weight", teacher_weight),
    ):
        if t.dtype not in DTYPES:
            reasons.append(f"{name} is {t.dtype}; the Triton fused_linear_jsd takes {[str(d) for d in DTYPES]}")
    if shift_labels is not None and shift_labels.dtype not in INDEX_DTYPES:
        reasons.append(f"shift_labels is {shift_labels.dtype}; the Triton fused_linear_jsd takes int64 or int32")
    return reasons


KERNEL = KernelSpec(
    op="fused_linear_jsd",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
