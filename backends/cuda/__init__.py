"""The cuda backend: hand-written CUDA C++ kernels (csrc/) built as a PyTorch extension on first use.

Operators: rms_norm, layer_norm, rope, swiglu, geglu, cross_entropy, embedding, forward and backward, in fp32, bf16
and fp16 with fp32 accumulation. Each kernel module (`rms_norm.py`, ...) calls the extension directly when eager and
through a ``torch.library`` custom op with a fake implementation under torch.compile, so Dynamo traces through it
without a graph break and CUDA graphs capture it (no host synchronisation anywhere).

Importing this package builds nothing. ``available()`` checks, most basic first: torch built with CUDA, a visible GPU,
nvcc, ninja, compute capability >= 7.0; then it builds the extension, or loads the cached build (see `_extension`),
so a failed build makes the backend unavailable, with the compiler's error, before any call is routed to it.
"""

from __future__ import annotations

from liger_core import __version__
from liger_core.spec import BackendSpec


def available() -> list[str]:
    from . import _extension

    return _extension.problems()


BACKEND = BackendSpec(
    name="cuda",
    priority=20,
    kernels={
        "rms_norm": "liger_backends.cuda.rms_norm:KERNEL",
        "layer_norm": "liger_backends.cuda.layer_norm:KERNEL",
        "rope": "liger_backends.cuda.rope:KERNEL",
        "swiglu": "liger_backends.cuda.swiglu:KERNEL",
        "geglu": "liger_backends.cuda.geglu:KERNEL",
        "cross_entropy": "liger_backends.cuda.cross_entropy:KERNEL",
        "embedding": "liger_backends.cuda.embedding:KERNEL",
    },
    available=available,
    version=__version__,
    devices=("cuda",),
)
