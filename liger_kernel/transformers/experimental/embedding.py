"""LigerEmbedding, liger-kernel 0.8 compatible: an ``nn.Embedding`` lookup through the ``embedding`` operator."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from .._common import check_attr, resolve_impl


class LigerEmbedding(nn.Module):
    """``forward(indices) -> weight[indices]`` for indices (int64 or int32) of any shape.

    A negative ``padding_idx`` counts from the end and is stored as a row number, as ``nn.Embedding`` does; rows
    whose index is ``padding_idx`` come out as zeros and send no gradient. The weight is initialised ``randn`` with
    the padding row zeroed; its gradient is dense. An index outside ``[0, num_embeddings)`` gives a zero row (a
    ValueError under ``LIGER_KERNEL_CHECKS=1``), never an out-of-bounds read. ``impl=`` (or its legacy alias
    ``backend=``) requires a backend.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: {arg!r} must be a positive int, got {value!r}")
        padding_idx = check_attr("embedding", name, "padding_idx", padding_idx)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"{name}: 'padding_idx' must be in [{-num_embeddings}, {num_embeddings}), got {padding_idx}"
                )
            padding_idx = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.impl = resolve_impl(name, impl, backend)
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        if padding_idx is not None:
            with torch.no_grad():
                self.weight[padding_idx].zero_()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return liger_core.call("embedding", indices, self.weight, impl=self.impl, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}"
            + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
            + (f", impl={self.impl!r}" if self.impl is not None else "")
        )
