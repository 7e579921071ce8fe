"""fused_linear_jsd in Triton: ``jsd`` between ``log_softmax(x_s·W_sᵀ / T)`` (student) and
``log_softmax(x_t·W_tᵀ / T)`` (teacher) without materialising either (BT, V) logits; see
liger_core.operators.fused_linear_jsd for the math.

The loss is a scalar, so everything happens in the forward, over chunks of token rows (``chunk_rows``: as many rows
as fit a memory budget for the chunk's two (rows, V) logits blocks):

1. both chunks' logits with ``torch.mm`` in the inputs' dtype (cuBLAS on the GPU; the teacher is detached), each
   into one buffer that every chunk reuses;
2. one Triton program per token row makes three passes over V: the two rows' log-sum-exps of ``logits / T``
   (online max and sum), then the loss and ``Σ_v d loss / d log_q``, then it overwrites the student logits with
   ``d loss / d logits = coef · (g − q·Σg) / T`` (``g = d loss / d log_q``, ``coef`` = 1/number of counted rows, read
   on the device); a row whose label is ``ignore_index`` reads nothing and writes 0;
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
from .jsd import (
    FORWARD_KL,
    INDEX_DTYPES,
    LN2,
    LOG2E,
    REVERSE_KL,
    SMALLEST_NORMAL,
    fast_log2,
    mode_of,
)
from .rms_norm import DTYPES, _launch, cast_to, launcher_op, next_power_of_2

# Bytes one chunk's student and teacher logits may take together (at the inputs' dtype). At (4096, 2048/4096),
# V 128256 bf16 on an H200, 512 MiB (1024 rows) keeps the peak at 1019 MiB, within issue 5's 1.2 GB; 1 GiB was 5 %
# faster at 2.5 GB, 256 MiB 13 % slower (benchmarks/results/2026-11-29-h200-s5-tune.json).
CHUNK_BYTES = 512 * 2**20
# The row kernel's column block, warps and pipelined steps. From benchmarks/tune.py at the shape above, forward and
# backward: (2048, 8, 1) was the fastest or within 0.7 % of it in five sweeps of 6-27 settings, one per version of
# the kernel (2026-11-29-h200-s11-tune-fljsd-*.json, 2026-11-30-h200-s12-tune-fljsd.json: 17.99 ms against 18.03
# for (1024, 4, 1) and 18.16 for (4096, 8, 1)). In the first, the former (4096, 16, 1) took 20.81 ms against 19.12.
BLOCK_COLS = 2048
NUM_WARPS = 8
STAGES = 1
# Smallest "minus infinity" of the online maxima, finite so that a slice that has seen nothing never computes
# inf − inf.
LOWEST = tl.constexpr(-3.0e38)
# log2 of the probability given to the lanes of a partial last column block past the row's end: finite (0 · -inf
# would be NaN in a term), and its probability is exactly 0.
FAR_BELOW = tl.constexpr(-1.0e30)


# -- kernel --------------------------------------------------------------------------------------------------------


@triton.jit
def fused_linear_jsd_rows_kernel(
    STUDENT, TEACHER, LABELS, COEF, ROW_LOSS,
    n_cols, s_row_stride, t_row_stride,
    inverse_temperature, beta, ignore_index,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WANT_GRAD: tl.constexpr,
    SLICES: tl.constexpr, BLOCK_COLS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One row of one chunk per program: the row's loss into ROW_LOSS and, with WANT_GRAD, d loss / d student logits
    written over STUDENT (each element is read before it is written, by the same program).

    Its instructions per column decide whether memory bounds it, so they are kept few (about 52 SASS instructions per
    column of the two rows over the three passes, from 77; 505 µs for a 1024-row bf16 chunk at V 128256 on an H200,
    88 % of copy speed for its 6 reads and 1 write, from 550 µs; a kernel with the same traffic and almost no
    arithmetic took 429 µs; 2026-11-30-h200-s12-fljsd-rows.json, …-s12-fljsd-variants.json):
    - base 2: with lse2 = log2 Σ 2^(logits · log2(e) / T), log2 q = logits · log2(e) / T − lse2 is one FMA, each
      exponential and logarithm one special-function instruction, and natural units come back once per row (ln 2);
    - the loss and gradient passes read full column blocks without masks; only a partial last block is masked.
      With the chunk buffers' rows padded to 16 elements (flce.chunk_buffer), those loads are 16-byte vectors
      whatever V is (the log-sum-exp pass masks every block: with V not a multiple of 16 its loads are scalar);
    - the logits of a GEMM are finite, so unlike the jsd kernel's terms none needs a guard against 0 · -inf;
    - the loss pass keeps two per-lane sums from which the loss and Σg follow per row (`row_sums`).

    With m = beta·p + (1 − beta)·q, the row's divergence is beta·Σ p·(ln p − ln m) + (1 − beta)·Σ q·(ln q − ln m),
    and d loss / d ln q_v = g_v = (1 − beta)·q_v·(ln q_v − ln m_v) (p held fixed). The loss pass accumulates the two
    sums apart (`add_terms`), and the gradient pass writes d loss / d logits = coef · (g − q·Σg) / T
    (`logits_gradient`). beta = 0 and beta = 1 are KL(P‖Q) and KL(Q‖P) (MODE). Both other passes read the two rows
    together, so that two loads per thread are in flight at each step."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_LABELS:
        counted = tl.load(LABELS + row) != ignore_index
    else:
        counted = tl.full([], 1, dtype=tl.int1)
    student = STUDENT + row * s_row_stride
    teacher = TEACHER + row * t_row_stride
    # A block is a (SLICES, BLOCK_COLS / SLICES) tile of the row: with Triton's default layout one warp per slice.
    offsets = tl.arange(0, SLICES)[:, None] * (BLOCK_COLS // SLICES) + tl.arange(0, BLOCK_COLS // SLICES)[None, :]
    full_cols = n_cols - n_cols % BLOCK_COLS

    if counted:
        # pass 1: both rows' base-2 log-sum-exps, online
        scale = inverse_temperature * LOG2E
        maxima_s = tl.full([SLICES], LOWEST, dtype=tl.float32)
        maxima_t = tl.full([SLICES], LOWEST, dtype=tl.float32)
        sums_s = tl.zeros(offsets.shape, dtype=tl.float32)
        sums_t = tl.zeros(offsets.shape, dtype=tl.float32)
        for start in tl.range(0, n_cols, BLOCK_COLS, num_stages=STAGES):
            cols = start + offsets
            inside = cols < n_cols
            s = tl.load(student + cols, mask=inside, other=float("-inf")).to(tl.float32)
            t = tl.load(teacher + cols, mask=inside, other=float("-inf")).to(tl.float32)
            maxima_s, sums_s = online_exp2_sums(maxima_s, sums_s, s, scale)
            maxima_t, sums_t = online_exp2_sums(maxima_t, sums_t, t, scale)
        lse2_s = log2_of_sums(maxima_s, sums_s, scale)
        lse2_t = log2_of_sums(maxima_t, sums_t, scale)

        # pass 2: the loss and Σg, per lane, then per row
        sums_a = tl.zeros(offsets.shape, dtype=tl.float32)
        sums_b = tl.zeros(offsets.shape, dtype=tl.float32)
        for start in tl.range(0, full_cols, BLOCK_COLS, num_stages=STAGES):
            sums_a, sums_b = add_block_terms(
                sums_a, sums_b, student, teacher, start + offsets, n_cols, scale, lse2_s, lse2_t, beta, MODE, False
            )
        if full_cols < n_cols:
            sums_a, sums_b = add_block_terms(
                sums_a, sums_b, student, teacher, full_cols + offsets, n_cols, scale, lse2_s, lse2_t, beta, MODE, True
            )
        loss, grad_sum = row_sums(
            tl.sum(tl.sum(sums_a, axis=1), axis=0), tl.sum(tl.sum(sums_b, axis=1), axis=0), beta, MODE
        )
        tl.store(ROW_LOSS + row, loss * LN2)

        # pass 3: d loss / d logits over the student logits
        if WANT_GRAD:
            factor = tl.load(COEF) * inverse_temperature * LN2  # g and Σg are over ln 2
            for start in tl.range(0, full_cols, BLOCK_COLS, num_stages=STAGES):
                write_block_gradient(
                    student, teacher, start + offsets, n_cols, scale, lse2_s, lse2_t, beta, factor, grad_sum, MODE,
                    False,
                )  # fmt: skip
            if full_cols < n_cols:
                write_block_gradient(
                    student, teacher, full_cols + offsets, n_cols, scale, lse2_s, lse2_t, beta, factor, grad_sum, MODE,
                    True,
                )  # fmt: skip
    else:
        # a row that does not count reads nothing: loss 0, gradient 0
        tl.store(ROW_LOSS + row, 0.0)
        if WANT_GRAD:
            for start in tl.range(0, n_cols, BLOCK_COLS):
                cols = start + offsets
                tl.store(student + cols, tl.zeros(offsets.shape, dtype=STUDENT.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def online_exp2_sums(maxima, sums, x, scale):
    """One block's step of a row's base-2 log-sum-exp of x · scale, x a (SLICES, BLOCK_COLS / SLICES) tile: each
    slice keeps its own running maximum and per-lane sums, so the step reduces across a warp at most and never
    synchronises the block (log2_of_sums combines the slices once). Lanes past the row's end hold -inf: they change
    no maximum and add 0."""
    new_maxima = tl.maximum(maxima, tl.max(x, axis=1))
    # a slice that has seen nothing finite yet shifts by 0: LOWEST · scale could overflow to -inf
    shifts = tl.where(new_maxima > LOWEST, new_maxima * scale, 0.0)
    sums = sums * tl.exp2((maxima - new_maxima) * scale)[:, None] + tl.exp2(x * scale - shifts[:, None])
    return new_maxima, sums


@triton.jit
def log2_of_sums(maxima, sums, scale):
    """log2 Σ 2^(x · scale) over the row, from online_exp2_sums' slices. A slice that saw nothing has sums 0 (and a
    factor of 0 or 1)."""
    top = tl.max(maxima, axis=0)
    total = tl.sum(tl.sum(sums, axis=1) * tl.exp2((maxima - top) * scale), axis=0)
    return top * scale + fast_log2(total)


@triton.jit
def log2_probabilities(LOGITS, cols, n_cols, scale, lse2, MASKED: tl.constexpr):
    """log2 of the probabilities at `cols`: logits · scale − lse2, one FMA. MASKED: columns past the row's end get
    FAR_BELOW (probability 0)."""
    if MASKED:
        inside = cols < n_cols
        logits = tl.load(LOGITS + cols, mask=inside, other=0.0).to(tl.float32)
        log2_probability = tl.where(inside, logits * scale - lse2, FAR_BELOW)
    else:
        log2_probability = tl.load(LOGITS + cols).to(tl.float32) * scale - lse2
    return log2_probability


@triton.jit
def add_block_terms(
    sums_a, sums_b, STUDENT, TEACHER, cols, n_cols, scale, lse2_s, lse2_t, beta,
    MODE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The loss pass's step over one column block of the two rows (add_terms)."""
    log2_q = log2_probabilities(STUDENT, cols, n_cols, scale, lse2_s, MASKED)
    log2_p = log2_probabilities(TEACHER, cols, n_cols, scale, lse2_t, MASKED)
    return add_terms(sums_a, sums_b, log2_q, log2_p, beta, MODE)


@triton.jit
def write_block_gradient(
    STUDENT, TEACHER, cols, n_cols, scale, lse2_s, lse2_t, beta, factor, grad_sum,
    MODE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The gradient pass's step over one column block: d loss / d logits (logits_gradient) over the student row."""
    log2_q = log2_probabilities(STUDENT, cols, n_cols, scale, lse2_s, MASKED)
    log2_p = log2_probabilities(TEACHER, cols, n_cols, scale, lse2_t, MASKED)
    dlogits = cast_to(logits_gradient(log2_q, log2_p, beta, factor, grad_sum, MODE), STUDENT.dtype.element_ty)
    if MASKED:
        tl.store(STUDENT + cols, dlogits, mask=cols < n_cols)
    else:
        tl.store(STUDENT + cols, dlogits)


@triton.jit
def add_terms(sums_a, sums_b, log2_q, log2_p, beta, MODE: tl.constexpr):
    """The per-lane sums of the loss pass, in base 2 (row_sums turns them into the loss and Σg):
    general beta: A = p·(log2 p − log2 m), B = q·(log2 q − log2 m); KL(P‖Q): A = p·(log2 p − log2 q), B = p;
    KL(Q‖P): A = q·(log2 q − log2 p), B = q."""
    if MODE == FORWARD_KL:
        p = tl.exp2(log2_p)
        sums_a += p * (log2_p - log2_q)
        sums_b += p
    elif MODE == REVERSE_KL:
        q = tl.exp2(log2_q)
        sums_a += q * (log2_q - log2_p)
        sums_b += q
    else:
        p = tl.exp2(log2_p)
        q = tl.exp2(log2_q)
        log2_m = log2_mixture(p, q, beta)
        sums_a += p * (log2_p - log2_m)
        sums_b += q * (log2_q - log2_m)
    return sums_a, sums_b


@triton.jit
def row_sums(a, b, beta, MODE: tl.constexpr):
    """(the row's loss, Σ_v g_v), both over ln 2, from add_terms' sums over the row."""
    if MODE == FORWARD_KL:  # g = −p·log2(e)
        loss = a
        grad_sum = -b * LOG2E
    elif MODE == REVERSE_KL:  # g = q·(log2 q − log2 p + log2(e))
        loss = a
        grad_sum = a + b * LOG2E
    else:  # g = (1 − beta)·q·(log2 q − log2 m)
        loss = beta * a + (1.0 - beta) * b
        grad_sum = (1.0 - beta) * b
    return loss, grad_sum


@triton.jit
def logits_gradient(log2_q, log2_p, beta, factor, grad_sum, MODE: tl.constexpr):
    """factor · (g − q·Σg), with g as in row_sums (factor = coef · ln 2 / T)."""
    q = tl.exp2(log2_q)
    if MODE == FORWARD_KL:
        dlogits = factor * (-LOG2E * tl.exp2(log2_p) - q * grad_sum)
    elif MODE == REVERSE_KL:
        dlogits = (factor * q) * (log2_q - log2_p + (LOG2E - grad_sum))
    else:
        log2_m = log2_mixture(tl.exp2(log2_p), q, beta)
        dlogits = q * ((factor * (1.0 - beta)) * (log2_q - log2_m) - factor * grad_sum)
    return dlogits


@triton.jit
def log2_mixture(p, q, beta):
    """log2 of m = beta·p + (1 − beta)·q, floored at the smallest normal float so that it stays finite (and
    lg2.approx exact enough) where p and q are subnormal or 0; such terms are below 1e-37 either way."""
    return fast_log2(tl.maximum(beta * p + (1.0 - beta) * q, SMALLEST_NORMAL))


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
        block_cols = min(BLOCK_COLS, next_power_of_2(vocab))
        _launch(fused_linear_jsd_rows_kernel)[(end - start,)](
            student_logits, teacher_logits, labels[start:end] if shift_labels is not None else labels, coef,
            row_loss[start:end],
            vocab, student_logits.stride(0), teacher_logits.stride(0),
            1.0 / temperature, beta, ignore_index,
            MODE=mode_of(beta), HAS_LABELS=shift_labels is not None, WANT_GRAD=want_x or want_w,
            SLICES=min(NUM_WARPS, block_cols), BLOCK_COLS=block_cols, STAGES=STAGES, num_warps=NUM_WARPS,
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
