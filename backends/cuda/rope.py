"""rope in CUDA (csrc/rope.cu): Hugging Face's ``apply_rotary_pos_emb`` with ``rotate_half``, forward and backward,
q and k (any head counts: GQA) in one launch each, fp32 math.

q and k are read as (B, T, H, D) views through their strides, so the (B, T, H, D) memory that Hugging Face's
``transpose(1, 2)`` hands over is never copied; only a head dimension without unit stride is. The rotated q and k
are written into fresh buffers (``torch.empty_like``: a dense input's layout, transposed or not); the gradients take
the layouts of the forward's outputs. cos and sin get no gradient; features past ``rotary_dim`` pass through.
"""

from __future__ import annotations

import torch

from liger_core.operators.rope import rotated_width

from ._common import compiling, cuda_kernel, dtype_reasons, ext, records_own_graph

MAX_HEAD_DIM = 1 << 16


@torch.library.custom_op("liger_cuda::rope_forward", mutates_args=())
def rope_forward_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return ext().rope_forward(q, k, cos, sin, unsqueeze_dim, rotary_dim)


@rope_forward_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, rotary_dim):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("liger_cuda::rope_backward", mutates_args=())
def rope_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_stride: list[int],
    k_stride: list[int],
    unsqueeze_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ext().rope_backward(dq_out, dk_out, cos, sin, q_stride, k_stride, unsqueeze_dim, rotary_dim)


@rope_backward_op.register_fake
def _(dq_out, dk_out, cos, sin, q_stride, k_stride, unsqueeze_dim, rotary_dim):
    dq = torch.empty_strided(dq_out.shape, q_stride, dtype=dq_out.dtype, device=dq_out.device)
    dk = torch.empty_strided(dk_out.shape, k_stride, dtype=dk_out.dtype, device=dk_out.device)
    return dq, dk


def _unit_feature_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(inputs: tuple, attrs: dict, needs_grad: bool):
    q, k, cos, sin = inputs
    rotary_dim = rotated_width(q, attrs)
    unsqueeze_dim = attrs["unsqueeze_dim"]
    # No gradient to the rotary tables (API.md), even when the caller's require one.
    cos, sin = cos.detach(), sin.detach()
    q_in, k_in = _unit_feature_stride(q), _unit_feature_stride(k)
    if records_own_graph(needs_grad):
        outputs = ext().rope_autograd(q_in, k_in, cos, sin, unsqueeze_dim, rotary_dim, q.requires_grad, k.requires_grad)
        return tuple(outputs), None
    if compiling():
        q_out, k_out = rope_forward_op(q_in, k_in, cos, sin, unsqueeze_dim, rotary_dim)
    else:
        q_out, k_out = ext().rope_forward(q_in, k_in, cos, sin, unsqueeze_dim, rotary_dim)
    saved = None
    if needs_grad:
        # The gradients take the outputs' strides; an input that needs no gradient gets none computed.
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
    q_stride = q_stride if dq_out is not None else list(dq_in.stride())
    k_stride = k_stride if dk_out is not None else list(dk_in.stride())
    if compiling():
        dq, dk = rope_backward_op(dq_in, dk_in, cos, sin, q_stride, k_stride, unsqueeze_dim, rotary_dim)
    else:
        dq, dk = ext().rope_backward(dq_in, dk_in, cos, sin, q_stride, k_stride, unsqueeze_dim, rotary_dim)
    return (dq if dq_out is not None else None), (dk if dk_out is not None else None)


def supports(inputs: tuple, attrs: dict) -> list[str]:
    q, k, cos, sin = inputs
    reasons = dtype_reasons("rope", q=q, k=k, cos=cos, sin=sin)
    if q.dim() == 4 and q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head size {q.shape[-1]} is over the CUDA rope's limit of {MAX_HEAD_DIM}")
    if attrs.get("unsqueeze_dim") not in (1, 2):
        reasons.append(f"unsqueeze_dim {attrs.get('unsqueeze_dim')!r} is not 1 or 2")
    return reasons


KERNEL = cuda_kernel("rope", forward, backward, supports, eager_autograd=True)
