"""rope in Triton: Hugging Face's ``apply_rotary_pos_emb`` with ``rotate_half``, forward and backward, q and k in one
launch.

With R = rotary_dim (the head size when None), x1 = x[..., :R/2], x2 = x[..., R/2:R] and cos/sin split the same way
into halves c1, c2 and s1, s2, the forward is

    y1 = x1·c1 − x2·s1,    y2 = x2·c2 + x1·s2,    y[..., R:] = x[..., R:]

and its transpose, the backward, is ``dx1 = g1·c1 + g2·s2, dx2 = g2·c2 − g1·s1`` (the pass-through features copy
their gradient). When the halves of cos/sin are equal, as in every rotary table Hugging Face builds, that is the same
rotation with sin negated; the kernel uses the exact transpose so that any cos/sin is differentiated correctly.
cos and sin get no gradient. Math in fp32, outputs in q's dtype.

Layout. q and k are seen as (B, T, H, D) views (``transpose(1, 2)`` of the (B, H, T, D) logical shape when
unsqueeze_dim is 1): every kernel address is ``b·stride_b + t·stride_t + h·stride_h + d``, so the (B, T, H, D)
memory that Hugging Face's ``view(...).transpose(1, 2)`` leaves is read as it is, never copied. Only a head
dimension without unit stride (a broadcast gradient, say) is copied first. Outputs are allocated with
``torch.empty_like``, which keeps a dense input's strides: a transposed view gives a transposed-layout output, as
cheap to write as a contiguous one, and the gradients of q and k take q's and k's layouts, so autograd's
transpose-and-view back into the projection output needs no copy either. A non-dense input (a strided slice of a
fused qkv projection) gives a contiguous output.

Grid: (blocks of BLOCK_T tokens, head blocks of q followed by head blocks of k). A program loads the cos/sin rows of
its tokens once and rotates BLOCK_H heads of them, as a (BLOCK_T, BLOCK_H, BLOCK_HALF) tile: tokens along the
slowest axis, the head features along the fastest, so loads and stores of each half are contiguous and vectorise
(R/2, D and the strides' divisibility are compile-time facts). Short heads get several tokens per program.

Under torch.compile the launchers run as custom ops opaque to Inductor; eagerly they are plain calls (see
rms_norm.py's launchers for why). They allocate their outputs and never write their inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.operators.rope import rotated_width
from liger_core.spec import KernelSpec

from .rms_norm import DTYPES, _launch, cast_to, cdiv, launcher_op, next_power_of_2, previous_power_of_2

# Elements of one program's tile (both halves and the pass-through, over its tokens and heads), and the largest head
# size served (a whole head sits in one tile; no model comes near it).
TILE = 4096
MAX_HEAD_DIM = 4096


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def rope_rotate_heads(
    X, Y, batch, seq, row_mask, first_head, n_heads,
    x_stride_b, x_stride_t, x_stride_h, y_stride_b, y_stride_t, y_stride_h,
    cos1, cos2, sin1, sin2,
    BACKWARD: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """Rotates heads [first_head, first_head + BLOCK_H) of the program's tokens; cos/sin are (BLOCK_T, 1, BLOCK_HALF)
    fp32 tiles."""
    heads = (first_head + tl.arange(0, BLOCK_H)).to(tl.int64)
    halves = tl.arange(0, BLOCK_HALF)[None, None, :]
    head_mask = row_mask[:, None, None] & (heads < n_heads)[None, :, None]
    x = X + (batch * x_stride_b + seq * x_stride_t)[:, None, None] + heads[None, :, None] * x_stride_h
    y = Y + (batch * y_stride_b + seq * y_stride_t)[:, None, None] + heads[None, :, None] * y_stride_h
    mask = head_mask & (halves < HALF)
    x1 = tl.load(x + halves, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF + halves, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y + halves, cast_to(y1, Y.dtype.element_ty), mask=mask)
    tl.store(y + HALF + halves, cast_to(y2, Y.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        # Features past the rotary width pass through (their gradient too), bit for bit.
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, None, :]
        rest_mask = head_mask & (rest < HEAD_DIM)
        tl.store(y + rest, tl.load(x + rest, mask=rest_mask, other=0.0), mask=rest_mask)


@triton.jit
def rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,
    n_rows, n_seq, n_q_heads, n_k_heads, q_head_blocks, cos_stride_b,
    q_stride_b, q_stride_t, q_stride_h, k_stride_b, k_stride_t, k_stride_h,
    qo_stride_b, qo_stride_t, qo_stride_h, ko_stride_b, ko_stride_t, ko_stride_h,
    BACKWARD: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """Program (i, j): tokens [i·BLOCK_T, (i+1)·BLOCK_T) of the flattened (B, T), head block j of q, or of k once j
    passes q's head blocks. cos/sin are contiguous (1 or B, T, R); cos_stride_b is 0 when they are shared."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    batch = rows // n_seq
    seq = rows % n_seq
    halves = tl.arange(0, BLOCK_HALF)[None, None, :]
    table = (batch * cos_stride_b + seq * (2 * HALF))[:, None, None] + halves
    table_mask = row_mask[:, None, None] & (halves < HALF)
    cos1 = tl.load(COS + table, mask=table_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + HALF + table, mask=table_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + table, mask=table_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + HALF + table, mask=table_mask, other=0.0).to(tl.float32)
    head_block = tl.program_id(1)
    if head_block < q_head_blocks:
        rope_rotate_heads(
            Q, Q_OUT, batch, seq, row_mask, head_block * BLOCK_H, n_q_heads,
            q_stride_b, q_stride_t, q_stride_h, qo_stride_b, qo_stride_t, qo_stride_h,
            cos1, cos2, sin1, sin2,
            BACKWARD, HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
        )  # fmt: skip
    else:
        rope_rotate_heads(
            K, K_OUT, batch, seq, row_mask, (head_block - q_head_blocks) * BLOCK_H, n_k_heads,
            k_stride_b, k_stride_t, k_stride_h, ko_stride_b, ko_stride_t, ko_stride_h,
            cos1, cos2, sin1, sin2,
            BACKWARD, HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
        )  # fmt: skip


# -- launch heuristics ---------------------------------------------------------------------------------------------


def rope_tile(n_rows: int, q_heads: int, k_heads: int, head_dim: int, rotary_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_PASS, num_warps): tiles of about TILE elements. BLOCK_H covers the smaller head
    count (k's under GQA) so that k's blocks are not mostly masked; the rest of the tile goes to more tokens, which
    also shares each token's cos/sin row between more heads. 4 to 8 warps, 16 elements per thread at full tiles
    (two 16-byte bf16 loads). Untuned: to be swept on an H200."""
    block_half = next_power_of_2(rotary_dim // 2)
    block_pass = next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 0
    head_elements = 2 * block_half + block_pass
    heads = min(h for h in (q_heads, k_heads) if h > 0) if max(q_heads, k_heads) > 0 else 1
    # With a partial rotation head_elements need not be a power of two (rotary_dim 8 of 128: 8 + 128), so the
    # quotients are rounded down to one: Triton takes only powers of two for blocks and warp counts.
    block_h = max(1, min(next_power_of_2(heads), previous_power_of_2(TILE // head_elements)))
    block_t = max(1, min(previous_power_of_2(TILE // (block_h * head_elements)), next_power_of_2(max(n_rows, 1))))
    num_warps = previous_power_of_2(max(4, min(8, block_t * block_h * head_elements // 512)))
    return block_t, block_h, block_pass, num_warps


# -- launchers ---------------------------------------------------------------------------------------------------


def _heads_last(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """The (B, T, H, D) view of q/k (a view, never a copy)."""
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def _unit_feature_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    unsqueeze_dim: int,
    rotary_dim: int,
    backward: bool,
) -> None:
    q4, k4 = _heads_last(q, unsqueeze_dim), _heads_last(k, unsqueeze_dim)
    qo4, ko4 = _heads_last(q_out, unsqueeze_dim), _heads_last(k_out, unsqueeze_dim)
    batch, seq, q_heads, head_dim = q4.shape
    k_heads = k4.shape[2]
    n_rows = batch * seq
    if n_rows == 0 or q_heads + k_heads == 0:
        return
    # The rotary tables are small next to q and k (one row per token, not per head): made contiguous, they share
    # one set of strides; a batch of one is broadcast with a zero stride.
    cos, sin = cos.contiguous(), sin.contiguous()
    cos_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    block_t, block_h, block_pass, num_warps = rope_tile(n_rows, q_heads, k_heads, head_dim, rotary_dim)
    q_head_blocks = cdiv(q_heads, block_h)
    grid = (cdiv(n_rows, block_t), q_head_blocks + cdiv(k_heads, block_h))
    _launch(rope_kernel)[grid](
        q4, k4, qo4, ko4, cos, sin,
        n_rows, seq, q_heads, k_heads, q_head_blocks, cos_stride_b,
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
        qo4.stride(0), qo4.stride(1), qo4.stride(2), ko4.stride(0), ko4.stride(1), ko4.stride(2),
        BACKWARD=backward, HALF=rotary_dim // 2, HEAD_DIM=head_dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=next_power_of_2(rotary_dim // 2), BLOCK_PASS=block_pass,
        num_warps=num_warps,
    )  # fmt: skip


def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k with unit feature stride. Returns the rotated q and k, in the inputs' dtype and (dense) layouts."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _rope(q, k, cos, sin, q_out, k_out, unsqueeze_dim, rotary_dim, False)
    return q_out, k_out


def rope_backward(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_stride: list[int],
    k_stride: list[int],
    unsqueeze_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with unit feature stride. Returns dq, dk with the strides of the forward's outputs."""
    dq = torch.empty_strided(dq_out.shape, q_stride, dtype=dq_out.dtype, device=dq_out.device)
    dk = torch.empty_strided(dk_out.shape, k_stride, dtype=dk_out.dtype, device=dk_out.device)
    _rope(dq_out, dk_out, cos, sin, dq, dk, unsqueeze_dim, rotary_dim, True)
    return dq, dk


rope_forward_op = launcher_op("rope_forward", rope_forward)
rope_backward_op = launcher_op("rope_backward", rope_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    q, k, cos, sin = inputs
    rotary_dim = rotated_width(q, attrs)
    unsqueeze_dim = attrs["unsqueeze_dim"]
    # No gradient to the rotary tables (API.md), even when the caller's require one.
    cos, sin = cos.detach(), sin.detach()
    launcher = rope_forward_op if torch.compiler.is_compiling() else rope_forward
    q_out, k_out = launcher(_unit_feature_stride(q), _unit_feature_stride(k), cos, sin, unsqueeze_dim, rotary_dim)
    saved = None
    if needs_grad:
        # The gradients take the outputs' strides (for a dense q, q's own: see the module docstring).
        # An input that needs no gradient gets none computed (the bridge would drop it).
        strides = (list(q_out.stride()), list(k_out.stride()))
        saved = (cos, sin, *strides, q.requires_grad, k.requires_grad, unsqueeze_dim, rotary_dim)
    return (q_out, k_out), saved


def _no_heads(like: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A view of `like` with zero heads: stands in for a missing upstream gradient; the launch does no work for it."""
    return like.narrow(unsqueeze_dim, 0, 0)


def backward(saved: tuple, grad_outputs: tuple):
    cos, sin, q_stride, k_stride, q_needs_grad, k_needs_grad, unsqueeze_dim, rotary_dim = saved
    dq_out = _unit_feature_stride(grad_outputs[0]) if q_needs_grad and grad_outputs[0] is not None else None
    dk_out = _unit_feature_stride(grad_outputs[1]) if k_needs_grad and grad_outputs[1] is not None else None
    if dq_out is None and dk_out is None:
        return None, None
    dq_in = dq_out if dq_out is not None else _no_heads(dk_out, unsqueeze_dim)
    dk_in = dk_out if dk_out is not None else _no_heads(dq_out, unsqueeze_dim)
    launcher = rope_backward_op if torch.compiler.is_compiling() else rope_backward
    dq, dk = launcher(
        dq_in,
        dk_in,
        cos,
        sin,
        q_stride if dq_out is not None else list(dq_in.stride()),
        k_stride if dk_out is not None else list(dk_in.stride()),
        unsqueeze_dim,
        rotary_dim,
    )
    return (dq if dq_out is not None else None), (dk if dk_out is not None else None)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    q, k, cos, sin = inputs
    reasons = []
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in DTYPES:
            reasons.append(f"{name} is {t.dtype}; the Triton rope takes {[str(d) for d in DTYPES]}")
    if q.dim() == 4 and q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head size {q.shape[-1]} is over the Triton rope's limit of {MAX_HEAD_DIM}")
    if attrs.get("unsqueeze_dim") not in (1, 2):
        reasons.append(f"unsqueeze_dim {attrs.get('unsqueeze_dim')!r} is not 1 or 2")
    return reasons


KERNEL = KernelSpec(
    op="rope",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
