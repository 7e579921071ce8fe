"""kl_div in Triton: ``nn.KLDivLoss`` on log-probabilities ``y_pred`` against ``y_true`` (see
liger_core.operators.kl_div for the math), over the inputs flattened to one dimension.

Forward: a grid of a few programs per SM walks BLOCK-element blocks (program i takes blocks i, i + programs, ...).
For "none" each block's elementwise loss is stored; otherwise each program keeps an fp32 register accumulator and
writes one partial, which torch sums (deterministic for a given grid) and divides as the reduction asks.

Backward. The gradient with respect to y_pred does not depend on y_pred: ``−y_true`` (``−exp(y_true)`` when
log_target) times the reduction's scale and the upstream gradient.

- "batchmean", "mean", "sum" (a scalar loss): the forward launch writes ``−y_true · scale`` while y_true is in
  registers, and the backward multiplies it by the upstream scalar in place (``_scaling``; nothing is read or written
  for ``loss.backward()``, whose upstream is exactly 1). Traffic per element: 2 reads and 1 write in all, against 2
  reads in the forward plus 1 read and 1 write in a backward that wrote it; the price is the gradient buffer existing
  from the forward on (it is an output either way, so the peak is the same). As for cross_entropy and jsd, a second
  backward through a retained graph raises autograd's in-place error rather than scaling the buffer twice.
- "none": the upstream is one value per element, unknown in the forward; the backward launch writes
  ``−y_true · dy`` from y_true and dy.

Under torch.compile the launchers run as custom ops opaque to Inductor; eagerly they are plain calls (see rms_norm.py's
launchers for why). They never write their inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_core.spec import KernelSpec, as_dtype

from ._scaling import scale_by_gradient
from .rms_norm import DTYPES, _launch, cast_to, cdiv, launcher_op, sm_count

TARGET_DTYPES = DTYPES + (torch.float64,)  # y_true is only read (and rounded to fp32, as the reference does)
REDUCTIONS = ("batchmean", "mean", "sum", "none")
# Elements per block, the grid, and STAGES: blocks whose loads are in flight at once (Triton's loop pipelining).
# From benchmarks/tune.py on an H200, batchmean forward+backward at (4096, 128256) fp32: 1.61 ms (2 reads and 1 write
# of 2.1 GB each, 3.9 TB/s); without pipelining the best setting took 1.65 ms.
BLOCK = 8192
NUM_WARPS = 8
PROGRAMS_PER_SM = 8
STAGES = 3


# -- kernels -------------------------------------------------------------------------------------------------------


@triton.jit
def kl_div_forward_kernel(
    Y_PRED, Y_TRUE, LOSS, PARTIALS, DX,
    n_elements, eps, grad_scale,
    LOG_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """The loss (elementwise, or one fp32 partial sum per program) and, when WRITE_GRAD, dx = −y_true · grad_scale
    (−exp(y_true) · ... when log_target)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in tl.range(pid.to(tl.int64) * BLOCK, n_elements, step, num_stages=STAGES):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        pred = tl.load(Y_PRED + offsets, mask=mask, other=0.0).to(tl.float32)
        true = tl.load(Y_TRUE + offsets, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            weight = tl.exp(true)  # the target's probability
            loss = weight * (true - pred)
        else:
            weight = true
            loss = true * (tl.log(tl.maximum(true, eps)) - pred)
        if WRITE_GRAD:
            tl.store(DX + offsets, cast_to(-weight * grad_scale, DX.dtype.element_ty), mask=mask)
        if ELEMENTWISE:
            tl.store(LOSS + offsets, cast_to(loss, LOSS.dtype.element_ty), mask=mask)
        else:
            acc += tl.where(mask, loss, 0.0)
    if not ELEMENTWISE:
        tl.store(PARTIALS + pid, tl.sum(acc, axis=0))


@triton.jit
def kl_div_backward_kernel(
    Y_TRUE, DY, DX,
    n_elements,
    LOG_TARGET: tl.constexpr, DY_IS_SCALAR: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """dx = −y_true · dy (−exp(y_true) · dy when log_target)."""
    pid = tl.program_id(0)
    scalar_dy = 1.0
    if DY_IS_SCALAR:
        scalar_dy = tl.load(DY).to(tl.float32)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in tl.range(pid.to(tl.int64) * BLOCK, n_elements, step, num_stages=STAGES):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        true = tl.load(Y_TRUE + offsets, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            true = tl.exp(true)
        # A new name, not `scalar_dy` reassigned: a loop-carried value must keep its type (a scalar is not a block).
        dy = scalar_dy
        if not DY_IS_SCALAR:
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offsets, cast_to(-true * dy, DX.dtype.element_ty), mask=mask)


def grid_size(n_elements: int, device: torch.device) -> int:
    return max(1, min(cdiv(n_elements, BLOCK), PROGRAMS_PER_SM * sm_count(device)))


# -- launchers -----------------------------------------------------------------------------------------------------


def kl_div_forward(
    y_pred: torch.Tensor, y_true: torch.Tensor, eps: float, log_target: bool, elementwise: bool, grad_divisor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_pred, y_true: contiguous, 1-D. Returns (the elementwise loss in y_pred's dtype ("none"), else the fp32 sum
    as a 0-D tensor; the gradient for a unit upstream, in y_pred's dtype, when `grad_divisor` > 0, else an empty
    tensor). The reduction divides the sum by `grad_divisor`: an int, not the scale, because under torch.compile it
    may be a symbolic size, which a float computed from it in the traced code would specialise."""
    n = y_pred.numel()
    write_grad = grad_divisor > 0
    device = y_pred.device
    loss = torch.empty((n,) if elementwise else (0,), dtype=y_pred.dtype, device=device)
    dx = torch.empty((n,) if write_grad else (0,), dtype=y_pred.dtype, device=device)
    if n == 0:
        return (loss if elementwise else torch.zeros((), dtype=torch.float32, device=device)), dx
    programs = grid_size(n, device)
    partials = torch.empty((0,) if elementwise else (programs,), dtype=torch.float32, device=device)
    _launch(kl_div_forward_kernel)[(programs,)](
        y_pred, y_true, loss, partials, dx,
        n, eps, 1.0 / max(grad_divisor, 1),
        LOG_TARGET=log_target, ELEMENTWISE=elementwise, WRITE_GRAD=write_grad, BLOCK=BLOCK, STAGES=STAGES,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return (loss if elementwise else partials.sum()), dx


def kl_div_backward(
    y_true: torch.Tensor, dy: torch.Tensor, log_target: bool, dy_is_scalar: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Reduction "none": y_true contiguous, 1-D; dy one value when `dy_is_scalar` (a broadcast upstream, as
    ``loss.sum()`` hands back), else contiguous like y_true. Returns dx = −y_true · dy in `dtype`."""
    n = y_true.numel()
    dx = torch.empty((n,), dtype=dtype, device=y_true.device)
    if n == 0:
        return dx
    _launch(kl_div_backward_kernel)[(grid_size(n, y_true.device),)](
        y_true, dy, dx,
        n,
        LOG_TARGET=log_target, DY_IS_SCALAR=dy_is_scalar, BLOCK=BLOCK, STAGES=STAGES,
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
    if reduction in ("none", "sum"):
        divisor = 1
    else:
        divisor = pred.numel() if reduction == "mean" else (shape[0] if len(shape) else 1)
    gradient_now = needs_grad and not elementwise
    launcher = kl_div_forward_op if torch.compiler.is_compiling() else kl_div_forward
    result, dx = launcher(pred, true, attrs["eps"], attrs["log_target"], elementwise, divisor if gradient_now else 0)
    loss = result.view(shape) if elementwise else result / divisor
    saved = None
    if gradient_now:
        saved = ("scale", dx.view(shape), y_pred.dtype)
    elif needs_grad:
        saved = ("write", true, shape, y_pred.dtype, attrs["log_target"])
    return (as_dtype(loss, y_pred.dtype),), saved


def backward(saved: tuple, grad_outputs: tuple):
    (dy,) = grad_outputs
    if dy is None:
        return (None,)
    if saved[0] == "scale":  # a scalar loss: the forward wrote the gradient for a unit upstream
        _, dx, dtype = saved
        return (scale_by_gradient(dx, dy, dtype),)
    _, true, shape, dtype, log_target = saved
    dy_is_scalar = all(stride == 0 for stride in dy.stride())  # a broadcast upstream is one value
    dy = dy if dy_is_scalar else dy.reshape(-1).contiguous()
    launcher = kl_div_backward_op if torch.compiler.is_compiling() else kl_div_backward
    return (launcher(true, dy, log_target, dy_is_scalar, dtype).view(shape),)


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
