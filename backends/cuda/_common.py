"""What the cuda backend's kernel modules share: the dtypes, the extension handle, row views, `supports` helpers.

Launch pattern (as the triton backend's): eagerly a kernel module calls the extension's function directly (a
custom op's dispatch would cost more host time than the kernels take at small shapes); under torch.compile it calls
the ``liger_cuda::*`` custom op, whose fake implementation gives Dynamo the outputs' metadata. Eager training
(gradients needed, not compiling) goes one step further where a kernel declares ``eager_autograd``: its forward calls
the extension's C++ autograd function, and liger_core's Python bridge is left out (`records_own_graph`).
"""

from __future__ import annotations

import torch

from liger_core.spec import KernelSpec

from . import _extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_CAPABILITY = _extension.MIN_CAPABILITY
# Largest row (hidden size, vocabulary, head size) the int32 arithmetic of the launchers is tested for, with room.
MAX_COLS = 1 << 24


def cuda_kernel(op: str, forward, backward, supports, eager_autograd: bool = False) -> KernelSpec:
    """A kernel of this backend: CUDA tensors of DTYPES, on GPUs of MIN_CAPABILITY or newer. `eager_autograd`: its
    forward calls the extension's C++ autograd function when gradients are needed outside torch.compile (see
    `records_own_graph`)."""
    return KernelSpec(
        op=op,
        forward=forward,
        backward=backward,
        supports=supports,
        devices=("cuda",),
        dtypes=DTYPES,
        min_capability=MIN_CAPABILITY,
        eager_autograd=eager_autograd,
    )


def ext():
    """The loaded extension (built on first use)."""
    return _extension.module()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def records_own_graph(needs_grad: bool) -> bool:
    """Whether a forward with ``eager_autograd`` calls the extension's C++ autograd function (csrc/bindings.cpp):
    eagerly, when gradients are needed and autograd is recording. The backward then runs on autograd's device thread
    without Python, which cut the host time of a small rms_norm forward+backward from 340 to 131 us on an H200's host
    (benchmarks/results/2026-11-29-h200-s9-host-autograd.json). Inside liger_core's bridge grad mode is off, so a
    forward the bridge runs (under torch.compile: Dynamo traces Python autograd functions, not C++ ones) returns its
    saved state for `backward` as every other kernel does."""
    return needs_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


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
