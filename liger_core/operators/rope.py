"""rope: Hugging Face's ``apply_rotary_pos_emb`` with ``rotate_half`` (non-interleaved halves).

``q (B, Hq, T, D)`` and ``k (B, Hkv, T, D)`` (Hq ≠ Hkv allowed; with ``unsqueeze_dim=2`` the layout is
``(B, T, H, D)``), ``cos``/``sin`` of shape ``(1 or B, T, R)`` where ``R = rotary_dim`` (``D`` when None). The first
``R`` features of every head are rotated, ``x·cos + rotate_half(x)·sin``; the remaining ``D − R`` pass through, as in
Hugging Face's partial-rotary models (GLM, Phi, ...), whose cos/sin are ``R`` wide. ``cos`` and ``sin`` get no
gradient. Strided views (the ``(B, T, H, D)`` memory that ``transpose(1, 2)`` leaves) are accepted as they are.
"""

from __future__ import annotations

import torch

from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import randn, require_dim, require_float, require_same_device, tensor_key

# (B, Hq, Hkv, T, D, R): tiny uses GQA, odd T and an odd number of heads.
SHAPES = {"tiny": (2, 6, 2, 7, 16), "small": (2, 16, 16, 512, 128), "llama8b": (1, 32, 8, 8192, 128)}


def rotated_width(q: torch.Tensor, attrs: dict) -> int:
    """The number of leading features of each head that are rotated: ``rotary_dim``, or the head size."""
    return q.shape[-1] if attrs["rotary_dim"] is None else attrs["rotary_dim"]


def check(inputs: tuple, attrs: dict) -> None:
    q, k, cos, sin = inputs
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        require_float("rope", name, t)
    require_dim("rope", "q", q, 4)
    require_dim("rope", "k", k, 4)
    if k.dtype != q.dtype:
        raise TypeError(f"rope: 'k' must have q's dtype {q.dtype}, got {k.dtype}")
    seq_dim = 2 if attrs["unsqueeze_dim"] == 1 else 1
    layout = "(B, H, T, D)" if seq_dim == 2 else "(B, T, H, D)"
    batch, seq, head_dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    if k.shape[0] != batch or k.shape[seq_dim] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"rope: 'k' {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence length and head size "
            f"(layout {layout} for unsqueeze_dim={attrs['unsqueeze_dim']})"
        )
    rotary_dim = attrs["rotary_dim"]
    if rotary_dim is None:
        if head_dim % 2:
            raise ValueError(f"rope: the head size of 'q' must be even to rotate halves, got {head_dim}")
    elif rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rope: 'rotary_dim' must be even, positive and at most the head size {head_dim}, got {rotary_dim}"
        )
    width = rotated_width(q, attrs)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq or t.shape[2] != width:
            hint = "" if rotary_dim is not None or t.dim() != 3 else f" (or pass rotary_dim={t.shape[2]})"
            raise ValueError(
                f"rope: {name!r} must have shape (1 or {batch}, {seq}, {width}) = (1 or batch, sequence length, "
                f"{'rotary_dim' if rotary_dim is not None else 'head size'}), got {tuple(t.shape)}{hint}"
            )
        require_same_device("rope", "q", q, name, t)
    if cos.shape != sin.shape:
        raise ValueError(f"rope: 'sin' must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    require_same_device("rope", "q", q, "k", k)


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from the largest stride to the smallest: tells a contiguous tensor from a transposed view."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def key(inputs: tuple, attrs: dict) -> tuple:
    q, k, cos, sin = inputs
    return (
        tensor_key(q),
        tensor_key(k),
        q.shape[1],
        k.shape[1],
        q.shape[-1],  # exact: kernels choose block sizes from it
        _layout(q),
        _layout(k),
        cos.dtype,
        cos.shape[0] == 1,
        attrs["rotary_dim"],
        attrs["unsqueeze_dim"],
    )


def make_inputs(
    device: torch.device,
    dtype: torch.dtype,
    size: str,
    seed: int,
    transposed: bool = False,
    shared_cos: bool = False,
    **attrs,
):
    """``transposed=True`` builds q and k as views with dimensions 1 and 2 swapped in memory: for the default
    ``unsqueeze_dim=1``, the ``(B, T, H, D)`` memory that Hugging Face's ``transpose(1, 2)`` hands over.
    ``shared_cos=True`` gives cos/sin a batch dimension of 1 (one position table for every sequence)."""
    generator = torch.Generator().manual_seed(seed)
    batch, q_heads, kv_heads, seq, head_dim = SHAPES[size]
    width = attrs.get("rotary_dim") or head_dim
    heads_first = attrs.get("unsqueeze_dim", 1) == 1

    def heads(count: int) -> torch.Tensor:
        shape = (batch, count, seq, head_dim) if heads_first else (batch, seq, count, head_dim)
        if not transposed:
            return randn(shape, dtype, device, generator)
        return randn((shape[0], shape[2], shape[1], shape[3]), dtype, device, generator).transpose(1, 2)

    q, k = heads(q_heads), heads(kv_heads)
    # Real rotary tables: angle = position · base^(-2i/R), duplicated over the two halves; each sequence starts
    # at its own offset, as with left padding or packed sequences.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, width, 2, dtype=torch.float64) / width))
    starts = torch.randint(0, 64, (1 if shared_cos else batch, 1), generator=generator)
    angles = (torch.arange(seq, dtype=torch.float64) + starts)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)
    return (q, k, cos, sin), attrs


SPEC = OpSpec(
    name="rope",
    inputs=(
        InputSpec(name="q", differentiable=True),
        InputSpec(name="k", differentiable=True),
        InputSpec(name="cos"),
        InputSpec(name="sin"),
    ),
    attrs=(
        AttrSpec(name="rotary_dim", type="int", default=None, optional=True),
        AttrSpec(name="unsqueeze_dim", type="int", default=1, choices=(1, 2)),
    ),
    outputs=(OutputSpec(name="q_out"), OutputSpec(name="k_out")),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"rotary_dim": 8, "shared_cos": True},
        {"transposed": True},
        {"unsqueeze_dim": 2, "rotary_dim": 12},
    ),
    make_inputs_fn=make_inputs,
)
