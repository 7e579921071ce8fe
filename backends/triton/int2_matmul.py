"""int2_matmul in Triton: ``c = a @ w`` for int8 ``a`` (M, K) and ternary weights ``w`` (K, N) read from the packed
uint8 ``b`` (K/4, N), exact int32 output (M, N). Nothing is differentiable, so there is no backward.

The layout (see liger_core.operators.int2_matmul): code ``i`` (bits ``2i..2i+1``) of packed row ``j`` is weight row
``i·K/4 + j``, stored as ``w + 1``. So one packed tile of rows ``j .. j+BLOCK_K`` holds four int8 weight tiles, one per
code plane, and plane ``i`` multiplies the columns ``i·K/4 + j ..`` of ``a``. The K loop walks blocks of packed rows:
each packed tile is loaded once, unpacked in registers (shift, mask, minus one) and fed to four ``tl.dot``s of int8
operands accumulating in int32 (the int8 tensor-core rate on Hopper). The weights cross memory at 2 bits each.

Exactness: every product is an integer with |a·w| <= 128 and the accumulator is int32, so the result is exact up to
K = 2^24 (where the reference, like ``a.int() @ w.int()``, would wrap too).

On a GPU the unpacking runs on four bytes at once in 32-bit registers (inline PTX: shift, mask, then ``c - 1`` per
byte as ``(c + 0x7F) ^ 0x80``, which never carries into the next byte): 0.42 ms at M 8192, K = N = 4096, against 0.49
byte by byte. The interpreter, which has no PTX, runs the same arithmetic byte by byte.

Reordering the columns of ``a`` so that a byte's four codes meet four consecutive K positions (one product per packed
tile instead of four) takes fewer instructions but was slower on the H200: 0.54 ms against 0.42 at M 8192, 31 µs
against 13 at M 16 (2026-11-29-h200-s7-tune-int2-first.json).

Decode sizes gain nothing from leaving the tensor cores: a kernel that multiplied each packed byte by its four
activations in one ``dp4a`` took 11.4 µs of GPU time at M 1, K = N = 8192, against 11.7 for 16-row tensor-core tiles
(2026-11-29-h200-s7-tune-int2.json), and was dropped.

Tiling, chosen on the host from M alone (`tile`):

- decode (M <= 16): BLOCK_M = 16 (the smallest tensor-core tile), long BLOCK_K, since reading the packed weights
  is the whole cost. When the output tiles are too few to occupy every SM, K is split among
  programs (`split_k`) that add their int32 partials with atomics into a zeroed output: integer addition is
  associative, so the result is the same whatever the order (deterministic, unlike a float split-K).
- medium (M <= 64): 64 x 64 tiles, weights on the left (see the kernel's WEIGHTS_LEFT).
- large: 256 x 128 output tiles, 64 packed rows (256 weight rows) per step, weights on the left, programs grouped
  along M so that a group's weight tiles stay in L2 (GROUP_M from 1 to 32 made no measurable difference).

Every edge is masked (M, N, and K/4 not multiples of the blocks); when K/4 is a multiple of BLOCK_K the K mask is
compiled out. Any strides are accepted (the pointers carry them), so nothing is copied.

Under torch.compile the launcher runs as a custom op opaque to Inductor; eagerly it is a plain call (see rms_norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.operators.int2_matmul import CODES_PER_BYTE
from liger_core.spec import KernelSpec

from .rms_norm import INTERPRETED, _launch, cdiv, launcher_op, sm_count

GROUP_M = 8  # output-tile rows per L2 group in the large-M tiling
MIN_K_BLOCKS_PER_SPLIT = 2  # a split-K program walks at least this many BLOCK_K steps
SPLIT_K_PROGRAMS_PER_SM = 2  # split-K aims at this many programs per SM
MAX_K = 1 << 24  # past it an int32 sum of K products of magnitude <= 128 could overflow


# -- unpacking -----------------------------------------------------------------------------------------------------

# Four bytes per 32-bit register: plane i of each byte, minus one, as four int8. A byte's code c is in {0, 1, 2, 3}, so
# c + 0x7F is at most 0x82 (no carry into the next byte) and (c + 0x7F) ^ 0x80 is c - 1 in two's complement.
_PLANES_MINUS_ONE_PTX = tl.constexpr("""{
.reg .b32 t;
and.b32 t, $4, 0x03030303; add.u32 t, t, 0x7F7F7F7F; xor.b32 $0, t, 0x80808080;
shr.b32 t, $4, 2; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; xor.b32 $1, t, 0x80808080;
shr.b32 t, $4, 4; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; xor.b32 $2, t, 0x80808080;
shr.b32 t, $4, 6; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; xor.b32 $3, t, 0x80808080;
}""")


@triton.jit
def weight_planes(packed):
    """The four int8 weight tiles (code i minus one, for i = 0..3) of a uint8 tile of packed bytes."""
    if INTERPRETED:
        w0 = (packed & 3).to(tl.int8) - 1
        w1 = ((packed >> 2) & 3).to(tl.int8) - 1
        w2 = ((packed >> 4) & 3).to(tl.int8) - 1
        w3 = (packed >> 6).to(tl.int8) - 1
    else:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            _PLANES_MINUS_ONE_PTX, "=r,=r,=r,=r,r", [packed],
            dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4,
        )  # fmt: skip
    return w0, w1, w2, w3


# -- the kernel ----------------------------------------------------------------------------------------------------


@triton.jit
def accumulate(acc, w, a, WEIGHTS_LEFT: tl.constexpr):
    """acc + a @ w, or acc + wᵀ @ aᵀ (the transposed tile) when WEIGHTS_LEFT; int32."""
    if WEIGHTS_LEFT:
        acc = tl.dot(tl.trans(w), tl.trans(a), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def int2_matmul_kernel(
    A, B, C,
    M, N, K4, k_span,
    stride_am, stride_ak, stride_plane, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, WEIGHTS_LEFT: tl.constexpr,
):  # fmt: skip
    """Program (t, s) computes output tile t over packed rows ``s·k_span .. (s+1)·k_span`` (all of K/4 when
    SPLIT_K == 1). k_span is a multiple of BLOCK_K; EVEN_K: K/4 is one too, so no packed row is ever out of range.
    stride_plane = K/4 · stride_ak: from one code plane's slice of `a` to the next.

    WEIGHTS_LEFT computes the transposed tile, ``wᵀ @ aᵀ``, and transposes it back before the store. Hopper's wgmma
    takes its left operand from registers but its right one only from shared memory: with the unpacked weights on
    the left they go to the tensor cores from the registers they were unpacked in, and the int8 activations, K-major
    as int8 wgmma wants both operands, are the shared-memory operand."""
    # Output tiles in groups of GROUP tile rows, column-major within a group: neighbouring programs share weights.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    # Packed rows of this program; column j of `a` plane i is i·K4 + j.
    k_start = tl.program_id(1) * k_span
    k_stop = tl.minimum(k_start + k_span, K4)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + (k_start + ks).to(tl.int64)[None, :] * stride_ak
    b_ptrs = B + (k_start + ks).to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn

    if WEIGHTS_LEFT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k_start, k_stop, BLOCK_K):
        if EVEN_K:
            a_mask = row_mask[:, None]
            packed = tl.load(b_ptrs, mask=col_mask[None, :], other=0)
        else:
            k_mask = (k + ks) < k_stop
            a_mask = row_mask[:, None] & k_mask[None, :]
            packed = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0)
        # Rows past K/4 hold code 0 (weight -1) here, but their `a` columns load as 0.
        w0, w1, w2, w3 = weight_planes(packed)
        acc = accumulate(acc, w0, tl.load(a_ptrs, mask=a_mask, other=0), WEIGHTS_LEFT)
        acc = accumulate(acc, w1, tl.load(a_ptrs + stride_plane, mask=a_mask, other=0), WEIGHTS_LEFT)
        acc = accumulate(acc, w2, tl.load(a_ptrs + 2 * stride_plane, mask=a_mask, other=0), WEIGHTS_LEFT)
        acc = accumulate(acc, w3, tl.load(a_ptrs + 3 * stride_plane, mask=a_mask, other=0), WEIGHTS_LEFT)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if WEIGHTS_LEFT:
        acc = tl.trans(acc)

    c_ptrs = C + rows.to(tl.int64)[:, None] * stride_cm + cols.to(tl.int64)[None, :] * stride_cn
    c_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


# -- launch heuristics ---------------------------------------------------------------------------------------------


def tile(m: int) -> tuple[int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K in packed rows, num_warps, num_stages, weights_left) of the tensor-core kernel for M
    rows of `a`, from `benchmarks/tune.py --only int2` on an H200 (2026-11-29-h200-s7-tune-int2-*.json): at M 8192,
    K = N = 4096, weights-left 256 x 128 x 64 tiles take 0.42 ms; at M 64 (K = N = 8192) weights-left 64 x 64 x 64
    tiles 0.042-0.057 ms; at M 1, 128-column weights-right tiles 11.7 µs of GPU time (64 columns: 13.4), at M 16
    13.4 µs (64 columns: 13.3)."""
    if m <= 16:
        return 16, 128, 128, 4, 4, False
    if m <= 64:
        return 64, 64, 64, 4, 4, True
    return 256, 128, 64, 8, 3, True


def split_k(tiles: int, k4: int, block_k: int, programs: int) -> int:
    """K splits so that `tiles` output tiles make about `programs` programs, each walking at least
    MIN_K_BLOCKS_PER_SPLIT blocks of packed rows; 1 when the tiles alone are enough."""
    k_blocks = cdiv(k4, block_k)
    if tiles >= programs or k_blocks < 2 * MIN_K_BLOCKS_PER_SPLIT:
        return 1
    return max(1, min(cdiv(programs, tiles), k_blocks // MIN_K_BLOCKS_PER_SPLIT))


# -- launchers ---------------------------------------------------------------------------------------------------


def int2_matmul_tiled(
    a: torch.Tensor,
    b: torch.Tensor,
    block_m: int,
    block_n: int,
    block_k: int,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    weights_left: bool = False,
) -> torch.Tensor:
    """``a`` int8 (M, K), ``b`` uint8 (K/4, N), any strides; the given tiling and at most `splits` K splits;
    `weights_left`: the kernel's WEIGHTS_LEFT."""
    m, k = a.shape
    n = b.shape[1]
    k4 = k // CODES_PER_BYTE
    k_blocks = cdiv(k4, block_k)
    splits = max(1, min(splits, k_blocks))
    k_span = max(1, cdiv(k_blocks, splits)) * block_k  # packed rows per split, a multiple of BLOCK_K
    splits = max(1, cdiv(k4, k_span))  # no split left without rows
    if splits > 1:
        c = torch.zeros((m, n), dtype=torch.int32, device=a.device)
    else:
        c = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return c
    grid = (cdiv(m, block_m) * cdiv(n, block_n), splits)
    _launch(int2_matmul_kernel)[grid](
        a, b, c,
        m, n, k4, k_span,
        a.stride(0), a.stride(1), k4 * a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=GROUP_M,
        SPLIT_K=splits, EVEN_K=k4 % block_k == 0, WEIGHTS_LEFT=weights_left,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return c


def int2_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` int8 (M, K) times the ternary weights packed in ``b`` uint8 (K/4, N): int32 (M, N), tiled by `tile`."""
    m, k = a.shape
    n = b.shape[1]
    block_m, block_n, block_k, num_warps, num_stages, weights_left = tile(m)
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    programs = SPLIT_K_PROGRAMS_PER_SM * sm_count(a.device)
    splits = split_k(tiles, k // CODES_PER_BYTE, block_k, programs)
    return int2_matmul_tiled(a, b, block_m, block_n, block_k, splits, num_warps, num_stages, weights_left)


int2_matmul_op = launcher_op("int2_matmul", int2_matmul)


# -- the kernel contract -------------------------------------------------------------------------------------------


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    a, b = inputs
    launcher = int2_matmul_op if torch.compiler.is_compiling() else int2_matmul
    return (launcher(a, b),), None


def supports(inputs: tuple, attrs: dict) -> list[str]:
    a, b = inputs
    reasons = []
    if a.dim() == 2 and a.shape[1] > MAX_K:
        reasons.append(f"K = {a.shape[1]} is over the Triton int2_matmul's limit of {MAX_K} (int32 accumulation)")
    return reasons


KERNEL = KernelSpec(
    op="int2_matmul",
    forward=forward,
    backward=None,
    supports=supports,
    devices=("cuda",),
    dtypes=(torch.int8,),
)
