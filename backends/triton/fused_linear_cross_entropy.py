"""fused_linear_cross_entropy in Triton: cross_entropy of ``input @ weight.T + bias`` without the (BT, V) logits.

The tokens are walked in chunks of rows. Per chunk:

1. logits = F.linear(x_chunk, W, b): cuBLAS through torch, in the input dtype, into the one chunk buffer this module
   allocates for the loop;
2. the Triton cross-entropy row kernel (cross_entropy.py) computes the chunk's loss terms and writes d loss / d logits
   over that same buffer (ours, so no copy and no version bump are needed);
3. grad_x[chunk] = dlogits @ W, grad_W += dlogits.T @ x_chunk, grad_b += dlogits.sum(0).

So the logits exist one chunk at a time and each GEMM runs once: three GEMMs in all, the floor of this loss.

- "mean" and "sum": everything happens in the forward, with the reduction's coefficients ("mean" denominators from a
  one-program reduction over the targets, on the device) already applied; the backward multiplies the saved
  gradients by the incoming scalar, in place, and leaves them untouched when it is exactly 1 (no host sync).
- "none": the upstream gradient differs per row and is unknown in the forward, which computes only the loss; the
  backward recomputes each chunk's logits and runs the same loop with the per-row upstream as coefficients.

Precision and memory. The GEMMs run in the input dtype with fp32 accumulation inside cuBLAS; the softmax math is
fp32; dlogits are rounded once to the input dtype (they feed the GEMMs in that dtype, as F.linear's backward would).
grad_W: by default it is accumulated over chunks in the weight's dtype (each chunk's product is added by one addmm,
one rounding per chunk): the weight gradient is the one (V, H) buffer, 1 GB at Llama-3 shapes in bf16, with no fp32
copy beside it. ``accum_dtype=torch.float32`` (or any wider dtype) accumulates it in that dtype instead, at the cost
of a (V, H) fp32 buffer; on the GPU with torch >= 2.10 each chunk's GEMM still reads bf16/fp16 operands and adds its
fp32 result into that buffer (``addmm(out_dtype=torch.float32)``), elsewhere the operands are upcast first. It is
cast to the weight's dtype in the backward. grad_b is always accumulated in fp32 (V values). grad_x is written per
chunk in the input dtype.

Chunk size: CHUNK_BYTES bounds one chunk's logits in the input dtype, except that a chunk keeps at least
MIN_CHUNK_ROWS rows on the GPU (see ``chunk_rows``): the chunk buffer is the only memory beside the gradients
themselves.

``use_token_scaling`` multiplies each row's CE term (not its z-loss) by its predicted probability of the target,
detached, computed by the row kernel from the same log-sum-exp.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.torch_version import TorchVersion

from liger_core.spec import KernelSpec

from .cross_entropy import contiguous_rows, finish, launch_rows, launch_stats, row_buffers, scale_in_place
from .rms_norm import DTYPES, cdiv, launcher_op

# Most bytes one chunk's logits (in the input dtype) may take, per device type. On the GPU, rows per chunk trade
# memory for time: every chunk's grad_W GEMM reads and writes the whole (V, H) gradient, so fewer, deeper chunks
# move less. benchmarks/tune.py on an H200, 8192 tokens, V 128256, bf16, forward+backward (peak extra memory):
#   hidden 4096: 64 MiB 54.6 ms (1.19 GB), 128 MiB 44.9 (1.32), 256 MiB 42.0 (1.57), 512 MiB 41.6 (2.07), 1 GiB 39.9
#   hidden 2048: 64 MiB 29.6 ms (0.66 GB), 128 MiB 24.2 (0.78), 256 MiB 22.4 (1.03), 512 MiB 21.2 (1.54), 1 GiB 20.7
# 256 MiB (1024 rows at V = 128256) takes most of the gain for a quarter of a GiB. On the CPU (tests) chunks are
# small, so several are walked.
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 10}
DEFAULT_CHUNK_BYTES = 256 << 20
# The fused-linear cross entropy's chunks keep at least MIN_CHUNK_ROWS rows on the GPU, as long as that takes at most
# MAX_FLOOR_BYTES: a chunk's grad_W GEMM does K/2 FLOP per byte of the (V, H) gradient it reads and writes (K = the
# chunk's rows), and the H200 needs about 200 to stay compute-bound. The byte budget alone gives 1024 rows at
# V = 128256 but 512 at Gemma's 256000: there (x (8192, 3584), bf16) the floor takes the fused-linear CE from 87.9 to
# 77.8 ms for 250 MiB more (2.31 GB in all); 2048 rows would give 76.8 ms at 2.81 GB
# (2026-11-29-h200-s7-tune-flce-gemma.json).
MIN_CHUNK_ROWS = {"cuda": 1024}
MAX_FLOOR_BYTES = 1 << 30


def chunk_rows(
    rows: int,
    vocab: int,
    itemsize: int,
    device_type: str,
    chunk_bytes: dict | None = None,
    min_rows: dict | None = None,
) -> int:
    """Token rows per chunk (at least 1); a multiple of 128 when there is room for several, for the GEMMs.
    `chunk_bytes` (per device type) defaults to this module's CHUNK_BYTES; `min_rows` (per device type, none by
    default) raises the rows to that floor where it takes at most MAX_FLOOR_BYTES."""
    budget = (CHUNK_BYTES if chunk_bytes is None else chunk_bytes).get(device_type, DEFAULT_CHUNK_BYTES)
    row_bytes = max(vocab * itemsize, 1)
    n = max(1, budget // row_bytes)
    if min_rows is not None:
        n = max(n, min(min_rows.get(device_type, 1), MAX_FLOOR_BYTES // row_bytes))
    if n >= 256:
        n = n // 128 * 128
    return max(1, min(n, rows))


# Row stride of the chunk buffers, in elements, is a multiple of this: Triton specialises an integer argument
# divisible by 16, and only then can the row kernels prove a row's start 16-byte aligned and load it in vectors. A
# vocabulary such as 50257 or 128257 would otherwise read every logit with its own 2-byte load.
ROW_STRIDE_MULTIPLE = 16


def chunk_buffer(n_rows: int, step: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one (rows, V) logits buffer a chunk loop writes every chunk into, its rows padded to a multiple of
    ROW_STRIDE_MULTIPLE elements (the padding is never read; cuBLAS writes and reads the rows through their stride).
    Allocating per chunk would hold two chunks at once: the previous chunk's logits stay referenced until the next
    chunk's assignment completes."""
    padded = cdiv(vocab, ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE
    return torch.empty((min(step, n_rows), padded), dtype=dtype, device=device)[:, :vocab]


def chunk_logits(x_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor):
    """``F.linear(x_chunk, weight, bias)`` (the same mm / addmm) into the first rows of `buffer`."""
    out = buffer[: x_chunk.shape[0]]
    if bias is None:
        return torch.mm(x_chunk, weight.t(), out=out)
    return torch.addmm(bias, x_chunk, weight.t(), out=out)


def weight_accumulation_dtype(weight_dtype: torch.dtype, accum_dtype: torch.dtype | None) -> torch.dtype:
    return weight_dtype if accum_dtype is None else torch.promote_types(weight_dtype, accum_dtype)


# Whether this torch's CUDA addmm adds a bf16/fp16 product into an fp32 tensor (out_dtype with an fp32 `self`: torch
# >= 2.10). Set to False for the process if it turns out not to; no probe, so nothing synchronises or breaks a capture.
_ADDMM_OUT_DTYPE = {"works": TorchVersion(torch.__version__) >= (2, 10)}


def weight_gradient_buffer(shape, dtype: torch.dtype, device: torch.device, n_rows: int) -> torch.Tensor:
    """The weight gradient a chunk loop fills through `accumulate_weight_gradient`: uninitialised, since the first
    chunk writes it whole, or zeros when there are no rows (no chunk writes it)."""
    make = torch.zeros if n_rows == 0 else torch.empty
    return make(shape, dtype=dtype, device=device)


def accumulate_weight_gradient(
    grad_weight: torch.Tensor, dlogits: torch.Tensor, x_chunk: torch.Tensor, first: bool = False
) -> None:
    """``grad_weight += dlogits.T @ x_chunk`` with grad_weight (V, H) in its own (accumulation) dtype. `first`: the
    chunk loop's first chunk, grad_weight still uninitialised (``torch.empty``), so the product is written, not added:
    no (V, H) memset before the loop."""
    acc = grad_weight.dtype
    if dlogits.dtype == acc and x_chunk.dtype == acc:
        if first:
            torch.mm(dlogits.t(), x_chunk, out=grad_weight)
        else:
            grad_weight.addmm_(dlogits.t(), x_chunk)
        return
    if first:
        grad_weight.zero_()
    if not (dlogits.is_cuda and acc == torch.float32 and dlogits.dtype == x_chunk.dtype):
        grad_weight.addmm_(dlogits.t().to(acc), x_chunk.to(acc))
        return
    # Under fake tensors (the launcher run to learn its outputs' shapes) torch 2.11's addmm decomposition mistakes
    # out_dtype for beta and raises, so the fake run takes the plain path below: same shapes, no data.
    if _ADDMM_OUT_DTYPE["works"] and not isinstance(grad_weight, FakeTensor):
        try:
            torch.addmm(grad_weight, dlogits.t(), x_chunk, out_dtype=torch.float32, out=grad_weight)
            return
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # rejected by its argument checks, before any work
            _ADDMM_OUT_DTYPE["works"] = False
    # The GEMM at the inputs' rate, its (V, H) result rounded once to their dtype before the fp32 sum.
    grad_weight.add_(dlogits.t() @ x_chunk)


def _chunk_loop(
    x, weight, target, bias, ce_weight, stats, attrs, rows, upstream, want, accum_dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Walk the chunks: loss rows into `rows` (when given), gradients (with `upstream` per-row coefficients when
    given) for the inputs in `want` = (x, weight, bias). Returns (grad_x, grad_weight, grad_bias), None where not
    wanted, in x's dtype, the weight accumulation dtype and fp32."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    device = x.device
    compute_grad = any(want)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=device) if want[0] else None
    grad_weight = None
    if want[1]:
        acc = weight_accumulation_dtype(weight.dtype, accum_dtype)
        grad_weight = weight_gradient_buffer(weight.shape, acc, device, n_rows)
    grad_bias = torch.zeros((vocab,), dtype=torch.float32, device=device) if want[2] else None
    step = chunk_rows(n_rows, vocab, x.element_size(), device.type, min_rows=MIN_CHUNK_ROWS)
    buffer = chunk_buffer(n_rows, step, vocab, x.dtype, device)
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        x_chunk = x[start:end]
        logits = chunk_logits(x_chunk, weight, bias, buffer)
        chunk_rows_out = None if rows is None else tuple(None if r is None else r[start:end] for r in rows)
        launch_rows(
            logits, logits if compute_grad else None, target[start:end], ce_weight, stats, chunk_rows_out,
            None if upstream is None else upstream[start:end],
            attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"],
            token_scaling=attrs["use_token_scaling"],
        )  # fmt: skip
        if not compute_grad:
            continue
        dlogits = logits  # overwritten in place by the row kernel
        if grad_x is not None:
            torch.mm(dlogits, weight, out=grad_x[start:end])
        if grad_weight is not None:
            accumulate_weight_gradient(grad_weight, dlogits, x_chunk, first=start == 0)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=torch.float32)
    return grad_x, grad_weight, grad_bias


def _attrs(ignore_index, label_smoothing, lse_square_scale, softcap, use_token_scaling) -> dict:
    return {
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "lse_square_scale": lse_square_scale,
        "softcap": softcap,
        "use_token_scaling": use_token_scaling,
    }


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=like.dtype, device=like.device) if t is None else t


def fused_linear_cross_entropy_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: str,
    return_z_loss: bool,
    return_token_accuracy: bool,
    return_predicted_tokens: bool,
    use_token_scaling: bool,
    accum_dtype: torch.dtype | None,
    want_x: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """x (BT, H), weight (V, H) with unit column strides. Returns (loss, z_loss, token_accuracy, predicted_tokens,
    grad_x, grad_weight, grad_bias, stats), an empty tensor for each not asked; the gradients (for a unit upstream
    gradient) only for "mean"/"sum"; stats (cross_entropy.launch_stats) for the backward of "none"."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    attrs = _attrs(ignore_index, label_smoothing, lse_square_scale, softcap, use_token_scaling)
    stats = launch_stats(target, ce_weight, vocab, ignore_index, reduction, label_smoothing)
    rows = row_buffers(n_rows, x.device, return_token_accuracy or return_predicted_tokens)
    want = (want_x, want_weight, want_bias) if reduction != "none" else (False, False, False)
    grads = _chunk_loop(x, weight, target, bias, ce_weight, stats, attrs, rows, None, want, accum_dtype)
    loss_dtype = torch.promote_types(x.dtype, torch.float32)  # the loss is fp32, as Hugging Face's
    loss, z_loss, accuracy = finish(
        rows, target, stats, loss_dtype, ignore_index, reduction, lse_square_scale, return_z_loss, return_token_accuracy
    )
    pred = rows[2] if return_predicted_tokens else None
    empty_index = torch.empty((0,), dtype=torch.int64, device=x.device)
    pred = empty_index if pred is None else pred
    return (loss, z_loss, accuracy, pred, *(_or_empty(g, x) for g in grads), stats)


def fused_linear_cross_entropy_backward_rows(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    use_token_scaling: bool,
    accum_dtype: torch.dtype | None,
    want_x: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction "none": recompute each chunk and accumulate the gradients with grad_loss (BT,) as per-row
    coefficients. Returns (grad_x, grad_weight, grad_bias) in the inputs' dtypes, empty where not wanted."""
    attrs = _attrs(ignore_index, label_smoothing, lse_square_scale, softcap, use_token_scaling)
    grad_x, grad_weight, grad_bias = _chunk_loop(
        x, weight, target, bias, ce_weight, stats, attrs, None, grad_loss, (want_x, want_weight, want_bias),
        accum_dtype,
    )  # fmt: skip
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return _or_empty(grad_x, x), _or_empty(grad_weight, x), _or_empty(grad_bias, x)


fused_linear_cross_entropy_forward_op = launcher_op(
    "fused_linear_cross_entropy_forward", fused_linear_cross_entropy_forward
)
fused_linear_cross_entropy_backward_rows_op = launcher_op(
    "fused_linear_cross_entropy_backward_rows", fused_linear_cross_entropy_backward_rows
)


# -- the kernel contract -------------------------------------------------------------------------------------------


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    x, weight, target, bias, ce_weight = inputs
    x, weight = contiguous_rows(x), contiguous_rows(weight)
    target = target.contiguous()
    bias = None if bias is None else bias.contiguous()
    ce_weight = None if ce_weight is None else ce_weight.detach().contiguous()  # no gradient to the class weights
    want = (
        needs_grad and x.requires_grad,
        needs_grad and weight.requires_grad,
        needs_grad and bias is not None and bias.requires_grad,
    )
    compiling = torch.compiler.is_compiling()
    launcher = fused_linear_cross_entropy_forward_op if compiling else fused_linear_cross_entropy_forward
    reduction = attrs["reduction"]
    loss, z_loss, accuracy, pred, grad_x, grad_weight, grad_bias, stats = launcher(
        x, weight, target, bias, ce_weight,
        attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"], reduction,
        attrs["return_z_loss"], attrs["return_token_accuracy"], attrs["return_predicted_tokens"],
        attrs["use_token_scaling"], attrs["accum_dtype"], *want,
    )  # fmt: skip
    outputs = (
        loss,
        z_loss if attrs["return_z_loss"] else None,
        accuracy if attrs["return_token_accuracy"] else None,
        pred if attrs["return_predicted_tokens"] else None,
    )
    if not needs_grad:
        return outputs, None
    dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction != "none":
        grads = tuple(g if w else None for g, w in zip((grad_x, grad_weight, grad_bias), want))
        return outputs, ("scale", *grads, dtypes)
    return outputs, ("recompute", x, weight, target, bias, ce_weight, stats, want, attrs)


def backward(saved: tuple, grad_outputs: tuple):
    grad_loss = grad_outputs[0]
    if grad_loss is None:
        return None, None, None
    if saved[0] == "scale":
        _, grad_x, grad_weight, grad_bias, dtypes = saved
        return tuple(
            None if grad is None else scale_in_place(grad, grad_loss).to(dtype)
            for grad, dtype in zip((grad_x, grad_weight, grad_bias), dtypes)
        )
    _, x, weight, target, bias, ce_weight, stats, want, attrs = saved
    launcher = (
        fused_linear_cross_entropy_backward_rows_op
        if torch.compiler.is_compiling()
        else fused_linear_cross_entropy_backward_rows
    )
    grads = launcher(
        grad_loss.contiguous(), x, weight, target, bias, ce_weight, stats,
        attrs["ignore_index"], attrs["label_smoothing"], attrs["lse_square_scale"], attrs["softcap"],
        attrs["use_token_scaling"], attrs["accum_dtype"], *want,
    )  # fmt: skip
    return tuple(g if w else None for g, w in zip(grads, want))


def supports(inputs: tuple, attrs: dict) -> list[str]:
    x, weight, target, bias, ce_weight = inputs
    reasons = []
    for name, t in (("input", x), ("weight", weight), ("bias", bias), ("ce_weight", ce_weight)):
        if t is not None and t.dtype not in DTYPES:
            reasons.append(
                f"{name} is {t.dtype}; the Triton fused_linear_cross_entropy takes {[str(d) for d in DTYPES]}"
            )
    return reasons


KERNEL = KernelSpec(
    op="fused_linear_cross_entropy",
    forward=forward,
    backward=backward,
    supports=supports,
    devices=("cuda",),
    dtypes=DTYPES,
)
