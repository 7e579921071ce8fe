"""Rotary position embedding, liger-kernel 0.8 compatible: Hugging Face's ``apply_rotary_pos_emb``."""

from __future__ import annotations

import torch

import liger_core


def liger_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids=None,
    unsqueeze_dim: int = 1,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` with Hugging Face's non-interleaved halves.

    q ``(B, Hq, T, D)`` and k ``(B, Hkv, T, D)`` (Hq ≠ Hkv allowed; ``(B, T, H, D)`` with ``unsqueeze_dim=2``),
    in the same dtype; cos and sin ``(1 or B, T, R)`` with ``R = rotary_dim``, or ``D`` when ``rotary_dim`` is None.
    Only the first ``R`` features of each head are rotated (R even, at most D), the rest pass through, as in Hugging
    Face's partial-rotary models. cos and sin get no gradient. Strided views such as the ``(B, T, H, D)`` memory that
    ``transpose(1, 2)`` leaves are taken as they are. ``position_ids`` is accepted and unused (cos and sin already
    hold the positions), as in Hugging Face and liger-kernel 0.8.
    """
    return liger_core.call("rope", q, k, cos, sin, rotary_dim=rotary_dim, unsqueeze_dim=unsqueeze_dim)
