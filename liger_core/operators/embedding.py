"""embedding: ``y = weight[indices]`` for indices of any shape, as ``nn.Embedding``.

``padding_idx`` (None, or in ``[-N, N)``; a negative one counts from the end, see `padding_row`): rows whose index
is the padding row come out as zeros and send no gradient to the weight. An index outside ``[0, N)`` gives a zero
row and no gradient, never an out-of-bounds read; under ``LIGER_KERNEL_CHECKS=1`` it is a ValueError instead.
The weight gradient is dense, accumulated over repeated indices.
"""

from __future__ import annotations

import torch

from .. import env
from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_index, require_same_device, tensor_key

# (indices shape, num_embeddings, embedding_dim)
SHAPES = {"tiny": ((3, 17), 53, 37), "small": ((1024,), 32000, 1024), "llama8b": ((8192,), 128256, 4096)}


def padding_row(padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` as a row number in ``[0, N)``: a negative one counts from the end, as in ``nn.Embedding``.
    Every kernel goes through this, so they all agree on what a negative value means."""
    if padding_idx is None:
        return None
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def check(inputs: tuple, attrs: dict) -> None:
    indices, weight = inputs
    require_index("embedding", "indices", indices)
    require_float("embedding", "weight", weight)
    require_dim("embedding", "weight", weight, 2)
    require_same_device("embedding", "weight", weight, "indices", indices)
    num_embeddings = weight.shape[0]
    padding_idx = attrs["padding_idx"]
    if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"embedding: 'padding_idx' must be in [{-num_embeddings}, {num_embeddings}) for a weight of "
            f"{num_embeddings} rows, got {padding_idx}"
        )
    if env.checks_enabled() and indices.numel():  # reads the data: synchronises, so only on request
        out_of_range = (indices < 0) | (indices >= num_embeddings)
        if bool(out_of_range.any()):
            bad = indices[out_of_range][:5].tolist()
            raise ValueError(f"embedding: 'indices' holds values outside [0, {num_embeddings}): {bad}")


def key(inputs: tuple, attrs: dict) -> tuple:
    indices, weight = inputs
    return (
        tensor_key(weight),
        weight.shape[1],  # exact: kernels choose block sizes from it
        bucket(indices.numel()),
        indices.dtype,
        attrs["padding_idx"] is not None,
    )


def make_inputs(
    device: torch.device,
    dtype: torch.dtype,
    size: str,
    seed: int,
    int32_indices: bool = False,
    out_of_range: bool = False,
    **attrs,
):
    """Random indices with repeats (the weight gradient must accumulate); with a ``padding_idx``, a fifth of them
    hit the padding row; ``out_of_range=True`` puts a few indices below 0 and at or beyond N."""
    generator = torch.Generator().manual_seed(seed)
    index_shape, num_embeddings, dim = SHAPES[size]
    weight = randn((num_embeddings, dim), dtype, device, generator)
    indices = torch.randint(0, num_embeddings, index_shape, generator=generator)
    pad = padding_row(attrs.get("padding_idx"), num_embeddings)
    if pad is not None:
        indices[torch.rand(index_shape, generator=generator) < 0.2] = pad
    if out_of_range:
        flat = indices.view(-1)
        bad = torch.tensor([-1, num_embeddings, num_embeddings + 1000, -num_embeddings - 1])
        flat[torch.randperm(flat.numel(), generator=generator)[: bad.numel()]] = bad[: flat.numel()]
    indices = indices.to(device=device, dtype=torch.int32 if int32_indices else torch.int64)
    return (indices, weight), attrs


SPEC = OpSpec(
    name="embedding",
    inputs=(InputSpec(name="indices"), InputSpec(name="weight", differentiable=True)),
    attrs=(AttrSpec(name="padding_idx", type="int", default=None, optional=True),),
    outputs=(OutputSpec(name="y"),),
    check=check,
    key_fn=key,
    cases=(
        {},
        {"padding_idx": 5},
        {"padding_idx": -2, "int32_indices": True},
        {"out_of_range": True, "padding_idx": 0},
    ),
    make_inputs_fn=make_inputs,
)
