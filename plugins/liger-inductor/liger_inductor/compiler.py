"""Compiling plain PyTorch math with Inductor once per static signature, without recompiling from step to step.

`CompiledFunction(math, token_dims)` wraps ``math(args, static)``: ``args`` a tuple of tensors (or None, or plain
values), ``static`` a dict of Python constants (the operator's attributes and the like). Each call is routed to a
`torch.compile`'d copy of the math chosen by the call's *signature*:

- every item of ``static``;
- for each tensor: dtype, device, number of dimensions, requires_grad, contiguity, and its sizes except the token
  dimensions; plus whether grad mode is on.

Token dimensions (rows, batch, sequence: what changes from one step to the next) are marked dynamic before the first
compilation (`torch._dynamo.maybe_mark_dynamic`), so one graph serves every token count: a step whose batch is a few
tokens longer reuses it. Every other size (hidden, vocabulary, head size) is static in its graph, so Inductor
specialises its reductions on it. Dynamo specialises sizes 0 and 1 even when marked, so a first call with a single row
costs one more compilation later, once.

Why one copy per signature: Dynamo keeps compiled graphs on the *code object* of the compiled function, shared by
every `torch.compile` wrapper of it, and gives up (runs eagerly, with a warning) after
``torch._dynamo.config.recompile_limit`` (8) graphs per code object. Sixteen operators with their attribute sets,
dtypes and hidden sizes would reach that at once. So each signature compiles its own copy of a tiny entry function,
with a code object of its own whose name says which signature it is (it shows in Dynamo's logs); its one graph
(a second for the 0/1 case) stays far below the limit, and Dynamo's "automatic dynamic" bookkeeping, which is keyed by
the code's name, cannot leak from one signature to another. The copies are kept in a bounded LRU per function.

The tensors handed to the compiled copy are fresh views of the caller's (`Tensor.view`), so marking their token
dimensions dynamic leaves no mark on the caller's tensors.

Under an outer `torch.compile` (the caller compiles a model that calls us), the math runs plainly: the outer
compilation traces it into its own graph, which Inductor compiles anyway.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import threading
import types
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch._dynamo

from liger_core.spec import KernelSpec

CPU_VARIABLE = "LIGER_INDUCTOR_CPU"
MAX_SIGNATURES = 64  # compiled copies kept per function; the least recently used beyond that are dropped

# Which dimensions of an argument are token dimensions: all but the last (hidden/vocabulary) one, or all of them.
LEADING = "leading"
ALL = "all"


def _entry(math, args, static):
    return math(args, static)


class CompiledFunction:
    """``math(args, static)`` compiled by Inductor once per signature (see the module docstring)."""

    def __init__(self, name: str, math: Callable, token_dims: dict[int, str], max_signatures: int = MAX_SIGNATURES):
        self.name = name
        self.math = math
        self.token_dims = token_dims
        self.max_signatures = max_signatures
        self._compiled: OrderedDict[tuple, Callable] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # copies created so far (each compiles on its first call)

    def __call__(self, args: tuple, static: dict):
        if torch.compiler.is_compiling():
            return self.math(args, static)
        key = self.signature(args, static)
        with self._lock:  # the lookup, the reordering and _create's eviction must not interleave across threads
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self._create(key)
        return compiled(self.math, self._marked(args), static)

    def signature(self, args: tuple, static: dict) -> tuple:
        described = tuple(_describe(value, self.token_dims.get(i)) for i, value in enumerate(args))
        return described, tuple(static.items()), torch.is_grad_enabled()

    def signatures(self) -> list[tuple]:
        with self._lock:
            return list(self._compiled)

    def _create(self, key: tuple) -> Callable:
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                self.compilations += 1
                name = f"liger_inductor_{self.name}_{self.compilations}"
                code = _entry.__code__.replace(co_name=name, co_qualname=name)
                copy = types.FunctionType(code, _entry.__globals__, name)
                compiled = self._compiled[key] = torch.compile(copy, fullgraph=True)
                while len(self._compiled) > self.max_signatures:
                    self._compiled.popitem(last=False)
        return compiled

    def _marked(self, args: tuple) -> tuple:
        if not self.token_dims:
            return args
        marked = list(args)
        for index, which in self.token_dims.items():
            value = args[index]
            if isinstance(value, torch.Tensor) and value.dim():
                dims = _token_dims(value, which)
                if dims:
                    alias = value.view(value.shape)  # a new tensor object: the caller's stays unmarked
                    torch._dynamo.maybe_mark_dynamic(alias, list(dims))
                    marked[index] = alias
        return tuple(marked)


def _token_dims(value: torch.Tensor, which: str | None) -> range:
    if which is None:
        return range(0)
    return range(value.dim() - 1) if which == LEADING else range(value.dim())


def _describe(value, which: str | None):
    if isinstance(value, torch.Tensor):
        dynamic = _token_dims(value, which)
        sizes = tuple(None if d in dynamic else size for d, size in enumerate(value.shape))
        return ("tensor", value.dtype, value.device, sizes, value.requires_grad, value.is_contiguous())
    return ("value", value)


# -- toolchains ----------------------------------------------------------------------------------------------------


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def has_cpp_compiler() -> bool:
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return any(shutil.which(c) for c in candidates if c)


def toolchain_reasons(inputs: tuple, attrs: dict) -> list[str]:
    """The `supports` shared by every kernel: what Inductor needs for the call's device. Metadata only."""
    tensor = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if tensor is None:
        return []
    if tensor.device.type == "cuda":
        return [] if has_triton() else ["Inductor needs Triton for CUDA tensors, and it is not installed"]
    if tensor.device.type == "cpu":
        reasons = []
        if os.environ.get(CPU_VARIABLE) != "1":
            reasons.append(
                f"it serves CPU tensors only with {CPU_VARIABLE}=1 (compiling for the CPU is slow; meant for tests)"
            )
        if not has_cpp_compiler():
            reasons.append("Inductor needs a C++ compiler for CPU tensors (g++ or clang++, or $CXX), none was found")
        return reasons
    return [f"Inductor does not generate code for {tensor.device.type} tensors here"]


# -- chunking ------------------------------------------------------------------------------------------------------

# Token rows per chunk of the fused-linear operators: one chunk's float32 logits take at most about this many bytes.
# Tests lower it to exercise several chunks at tiny shapes.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(rows: int, vocab: int, heads: int = 1) -> int:
    """How many token rows one chunk holds (at least 1), for `heads` sets of float32 (rows, vocab) logits."""
    return max(1, min(max(rows, 1), CHUNK_BYTES // max(vocab * 4 * heads, 1)))


def weight_accumulation_dtype(weight_dtype: torch.dtype, accum_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the fused-linear operators accumulate the weight gradient in: the weight's own by default, so that
    each chunk's ``(V, chunk) @ (chunk, H)`` product runs on the tensor cores at the inputs' rate (one rounding per
    chunk, as the triton backend does); ``accum_dtype`` when it is wider. Accumulating a bf16 model in float32 made
    those products float32 GEMMs: 210 ms for a fused-linear CE that takes 44 ms on triton (H200, 8192 x 4096 x
    128256)."""
    return weight_dtype if accum_dtype is None else torch.promote_types(weight_dtype, accum_dtype)


def inductor_kernel(op: str, forward, backward=None, **spec) -> KernelSpec:
    """A kernel of this backend: CUDA tensors on GPUs Triton supports (sm_70 and newer), served where the toolchain
    Inductor needs is there (`toolchain_reasons`); CPU tensors only when forced (see CPU_VARIABLE)."""
    return KernelSpec(
        op=op,
        forward=forward,
        backward=backward,
        supports=toolchain_reasons,
        devices=("cuda",),
        min_capability=(7, 0),
        **spec,
    )
