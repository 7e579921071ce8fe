"""What the cuda backend's kernel modules share: the dtypes, the extension handle, row views, `supports` helpers.

Launch pattern (as the triton backend's): eagerly a kernel module calls the extension's function directly (a
custom op's dispatch would cost more host time than the kernels take at small shapes); under torch.compile it calls
the ``liger_cuda::*`` custom op, whose fake implementation gives Dynamo the outputs' metadata.
"""

from __future__ import annotations

import torch

from liger_core.spec import KernelSpec

from . import _extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_CAPABILITY = _extension.MIN_CAPABILITY
# Largest row (hidden size, vocabulary, head size) the int32 arithmetic of the launchers is tested for, with room.
MAX_COLS = 1 << 24


def cuda_kernel(op: str, forward, backward, supports) -> KernelSpec:
    """A kernel of this backend: CUDA tensors of DTYPES, on GPUs of MIN_CAPABILITY or newer."""
    return KernelSpec(
        op=op,
        forward=forward,
        backward=backward,
        supports=supports,
        devices=("cuda",),
        dtypes=DTYPES,
        min_capability=MIN_CAPABILITY,
    )


def ext():
    """The loaded extension (built on first use)."""
    return _extension.module()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride; a copy only when no such view exists."""
    view = t.reshape(-1, n_cols)
    if view.stride(-1) != 1 and n_cols > 1:
        view = view.contiguous()
    return view


def dtype_reasons(op: str, **tensors: torch.Tensor | None) -> list[str]:
    names = [str(d) for d in DTYPES]
    return [
        f"{name} is {t.dtype}; the CUDA {op} takes {names}"
        for name, t in tensors.items()
        if t is not None and t.dtype not in DTYPES
    ]
