"""kl_div in Triton: ``nn.KLDivLoss`` on log-probabilities ``y_pred`` against ``y_true`` (see
liger_core.operators.kl_div for the math), over the inputs flattened to one dimension.

Forward: a grid of a few programs per SM walks BLOCK-element blocks (program i takes blocks i, i + programs, ...).
For "none" each block's elementwise loss is stored; otherwise each program keeps an fp32 register accumulator and
writes one partial, which torch sums (deterministic for a given grid) and divides as the reduction asks.

Backward. The gradient with respect to y_pred does not depend on y_pred: ``−y_true`` (``−exp(y_true)`` when
log_target) times the reduction's scale and the upstream gradient. So it is written by the backward launch from
y_true alone rather than by the forward and scaled later: one read and one write per element instead of a write in
the forward plus a read and a write in the backward, and no (input-sized) buffer held from forward to backward. The
upstream gradient is either elementwise ("none") or a 0-D tensor read on the device; a broadcast one (all strides 0,
as ``loss.sum()`` hands back) is read as a scalar too.

Under torch.compile the launchers run as custom ops opaque to Inductor; eagerly they are plain calls (see rms_norm.py's
launchers for why). They never write their inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec

from .rms_norm import DTYPES, _launch, cast_to, cdiv, launcher_op, sm_count

TARGET_DTYPES = DTYPES + (torch.float64,)  # y_true is only read (and rounded to fp32, as the reference does)
REDUCTIONS = ("batchmean", "mean", "sum", "none")
# Elements per block and the grid. Untuned: to be swept on an H200.
BLOCK = 4096
NUM_WARPS = 8
PROGRAMS_PER_SM = 8


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def kl_div_forward_kernel(
    Y_PRED, Y_TRUE, LOSS, PARTIALS,
    n_elements, eps,
    LOG_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(pid.to(tl.int64) * BLOCK, n_elements, step):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        pred = tl.load(Y_PRED + offsets, mask=mask, other=0.0).to(tl.float32)
        true = tl.load(Y_TRUE + offsets, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            loss = tl.exp(true) * (true - pred)
        else:
            loss = true * (tl.log(tl.maximum(true, eps)) - pred)
        if ELEMENTWISE:
            tl.store(LOSS + offsets, cast_to(loss, LOSS.dtype.element_ty), mask=mask)
        else:
            acc += tl.where(mask, loss, 0.0)
    if not ELEMENTWISE:
        tl.store(PARTIALS + pid, tl.sum(acc, axis=0))


@triton.jit
def kl_div_backward_kernel(
    Y_TRUE, DY, DX,
    n_elements, scale,
    LOG_TARGET: tl.constexpr, DY_IS_SCALAR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dx = −y_true · scale · dy (−exp(y_true) · ... when log_target)."""
    pid = tl.program_id(0)
    dy = 1.0
    if DY_IS_SCALAR:
        dy = tl.load(DY).to(tl.float32)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(pid.to(tl.int64) * BLOCK, n_elements, step):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        true = tl.load(Y_TRUE + offsets, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            true = tl.exp(true)
        if not DY_IS_SCALAR:
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offsets, cast_to(-true * (scale * dy), DX.dtype.element_ty), mask=mask)


def grid_size(n_elements: int, device: torch.device) -> int:
    return max(1, min(cdiv(n_elements, BLOCK), PROGRAMS_PER_SM * sm_count(device)))


# -- launchers -----------------------------------------------------------------------------------------------------


def kl_div_forward(
    y_pred: torch.Tensor, y_true: torch.Tensor, eps: float, log_target: bool, elementwise: bool
) -> torch.Tensor:
    """y_pred, y_true: contiguous, 1-D. Returns the elementwise loss in y_pred's dtype ("none"), else the fp32 sum
    as a 0-D tensor."""
    n = y_pred.numel()
    loss = torch.empty((n,) if elementwise else (0,), dtype=y_pred.dtype, device=y_pred.device)
    if n == 0:
        return loss if elementwise else torch.zeros((), dtype=torch.float32, device=y_pred.device)
    programs = grid_size(n, y_pred.device)
    partials = torch.empty((0,) if elementwise else (programs,), dtype=torch.float32, device=y_pred.device)
    _launch(kl_div_forward_kernel)[(programs,)](
        y_pred, y_true, loss, partials,
        n, eps,
        LOG_TARGET=log_target, ELEMENTWISE=elementwise, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return loss if elementwise else partials.sum()


def kl_div_backward(
    y_true: torch.Tensor, dy: torch.Tensor, divisor: int, log_target: bool, dy_is_scalar: bool, dtype: torch.dtype
) -> torch.Tensor:
    """y_true: contiguous, 1-D; dy: 0-D or a single element when `dy_is_scalar`, else contiguous like y_true; the
    reduction divided the sum by `divisor` (1 for "sum" and "none"). An int, not the scale: under torch.compile it
    may be a symbolic size, which a float computed from it in the traced code would specialise."""
    scale = 1.0 / max(divisor, 1)
    n = y_true.numel()
    dx = torch.empty((n,), dtype=dtype, device=y_true.device)
    if n == 0:
        return dx
    _launch(kl_div_backward_kernel)[(grid_size(n, y_true.device),)](
        y_true, dy, dx,
        n, scale,
        LOG_TARGET=log_target, DY_IS_SCALAR=dy_is_scalar, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return dx


kl_div_forward_op = launcher_op("kl_div_forward", kl_div_forward)
kl_div_backward_op = launcher_op("kl_div_backward", kl_div_backward)


# -- the kernel contract -------------------------------------------------------------------------------------------


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    y_pred, y_true = inputs
    shape = y_pred.shape
    pred = y_pred.reshape(-1).contiguous()
    true = y_true.detach().reshape(-1).contiguous()  # no gradient to the target
    reduction = attrs["reduction"]
    elementwise = reduction == "none"
    launcher = kl_div_forward_op if torch.compiler.is_compiling() else kl_div_forward
    result = launcher(pred, true, attrs["eps"], attrs["log_target"], elementwise)
    if elementwise:
        loss, divisor = result.view(shape), 1
    elif reduction == "sum":
        loss, divisor = result, 1
    else:
        divisor = pred.numel() if reduction == "mean" else (shape[0] if len(shape) else 1)
        loss = result / divisor
    saved = (true, shape, y_pred.dtype, divisor, attrs["log_target"]) if needs_grad else None
    return (loss.to(y_pred.dtype),), saved


def backward(saved: tuple, grad_outputs: tuple):
    true, shape, dtype, divisor, log_target = saved
    (dy,) = grad_outputs
    if dy is None:
        return (None,)
    # A 0-D gradient (a reduction) or a broadcast one is one value; otherwise one per element.
    dy_is_scalar = dy.dim() == 0 or all(stride == 0 for stride in dy.stride())
    dy = dy if dy_is_scalar else dy.reshape(-1).contiguous()
    launcher = kl_div_backward_op if torch.compiler.is_compiling() else kl_div_backward
    return (launcher(true, dy, divisor, log_target, dy_is_scalar, dtype).view(shape),)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    y_pred, y_true = inputs
    reasons = []
    if y_pred.dtype not in DTYPES:
        reasons.append(f"y_pred is {y_pred.dtype}; the Triton kl_div takes {[str(d) for d in DTYPES]}")
    if y_true.dtype not in TARGET_DTYPES:
        reasons.append(f"y_true is {y_true.dtype}; the Triton kl_div takes {[str(d) for d in TARGET_DTYPES]}")
    if attrs.get("reduction") not in REDUCTIONS:
        reasons.append(f"reduction {attrs.get('reduction')!r} is not one of {list(REDUCTIONS)}")
    return reasons


KERNEL = KernelSpec(
    op="kl_div",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
