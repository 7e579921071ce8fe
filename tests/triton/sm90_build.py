"""Compile every Triton kernel of the Triton backend for sm_90 (Hopper) on a machine without a GPU.

Run as a script, without TRITON_INTERPRET (tests/triton/test_sm90_build.py does). Every operator runs its Triton
forward and backward on fake tensors (shapes and dtypes, no data) at the "small" and "llama8b" sizes, for every
case its spec lists and every dtype its kernel takes, plus rms_norm and layer_norm at a 262144-wide row (their
split-row kernels). The kernel launches are recorded instead of run, each distinct one is compiled for sm_90 with
Triton's own ptxas, and one JSON line per compiled kernel is printed: name, launch options, shared memory and, when
Triton ships cuobjdump, the bytes of stack a thread spills registers to.

What the interpreter cannot show, this does: that the kernels build for the GPU at the launch constants real shapes
pick (tensor-core tile minimums, shared memory, inline PTX that assembles).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

import torch
import triton
from liger_backends.triton import rms_norm as base
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from liger_core.registry import get_registry

SMS = 132  # an H100 / H200: the grids that scale with the SM count get the GPU's shape
DTYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64", torch.int8: "i8",
    torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}  # fmt: skip
OPTIONS = ("num_warps", "num_stages", "maxnreg")


def record_launches() -> list:
    """Make every launch append (kernel, args, keyword args) to the returned list instead of running."""
    launches = []

    def getitem(self, grid):
        return lambda *args, **meta: launches.append((self.kernel, args, meta))

    base._TritonLauncher.__getitem__ = getitem  # the launcher that skips fake tensors: record those too
    JITFunction.run = lambda self, *args, grid, warmup, **meta: launches.append((self, args, meta))
    base._sm_count = lambda device_type, index: SMS
    # Fake tensors read as "being traced by torch.compile", where some launchers use torch ops instead of a kernel.
    for module in backend_modules():
        if hasattr(module, "traced"):
            module.traced = lambda tensor: False
    return launches


def backend_modules() -> list:
    package = importlib.import_module("liger_backends.triton")
    return [
        importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)
    ]


def kernels_defined() -> set[str]:
    """The names of the Triton kernels (``*_kernel``) the backend's modules define."""
    names = set()
    for module in backend_modules():
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.__module__ == module.__name__:
                names.add(name)
    return names


def use_gpu_chunks() -> None:
    """The fused-linear losses chunk by a budget per device type: give the CPU (the fake tensors' device) the GPU's."""
    for name in ("fused_linear_cross_entropy", "fused_linear_jsd", "_target_logprobs"):
        module = importlib.import_module(f"liger_backends.triton.{name}")
        for constant in ("CHUNK_BYTES", "MIN_CHUNK_ROWS"):
            table = getattr(module, constant, None)
            if isinstance(table, dict) and "cuda" in table:
                table["cpu"] = table["cuda"]


def run_operator(mode: FakeTensorMode, op: str, dtype: torch.dtype, size: str, case: dict) -> None:
    registry = get_registry()
    spec, kernel = registry.operator(op), registry.kernel(op, "triton")
    try:
        with mode:
            inputs, attrs = spec.make_inputs("cpu", dtype, size, seed=0, **case)
    except Exception:  # inputs made from their data (packed int2 weights are checked): real ones, then faked
        inputs, attrs = spec.make_inputs("cpu", dtype, size, seed=0, **case)
        inputs = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
    inputs, attrs = spec.bind(inputs, attrs)
    if kernel.supports(inputs, attrs):
        return  # a case this kernel declines is served by another backend
    needs_grad = bool(spec.differentiable_inputs) and dtype.is_floating_point
    with mode:
        if needs_grad:  # as in training: kernels decide which gradients to compute from requires_grad
            inputs = tuple(
                t.detach().requires_grad_() if i in spec.differentiable_inputs and t is not None else t
                for i, t in enumerate(inputs)
            )  # fmt: skip
        # As in dispatch's autograd bridge: a kernel with its own backward runs both without building a graph.
        with torch.no_grad() if kernel.backward is not None else contextlib.nullcontext():
            outputs, saved = kernel.forward(inputs, attrs, needs_grad)
        grads = tuple(
            torch.ones_like(out) if differentiable(out) and out_spec.differentiable else None
            for out, out_spec in zip(outputs, spec.outputs)
        )  # fmt: skip
        if needs_grad and kernel.backward is not None:
            with torch.no_grad():
                kernel.backward(saved, grads)
        elif needs_grad:  # autograd differentiates this kernel's forward (its own autograd Functions)
            pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])


def differentiable(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def specialisation(kernel: JITFunction, args: tuple, meta: dict):
    """(signature, constants, arguments divisible by 16, options) as Triton's runtime would specialise this launch:
    pointers 16-byte aligned, integers equal to 1 made constants, integers divisible by 16 marked so."""
    meta = dict(meta)
    options = {key: meta.pop(key) for key in OPTIONS if key in meta}
    bound = inspect.signature(kernel.fn).bind(*args, **meta)
    bound.apply_defaults()
    signature, constants, aligned = {}, {}, []
    for param in kernel.params:
        value = bound.arguments[param.name]
        if (
            param.is_constexpr
            or value is None
            or (isinstance(value, int) and not isinstance(value, bool) and value == 1)
        ):
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + DTYPE_NAMES[value.dtype]
            aligned.append(param.name)
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(param.name)
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} = {value!r} has no Triton type here")
    signature.update({name: "constexpr" for name in constants})
    return signature, constants, aligned, options


def spilled_bytes(cubin: bytes) -> int | None:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    found = re.search(r"STACK:(\d+)", usage)
    return int(found.group(1)) if found else None


def main() -> None:
    launches = record_launches()
    use_gpu_chunks()
    registry = get_registry()
    registry.load_everything()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ops = [op for op in registry.operator_names() if "triton" in registry.implementations(op)]
    for op in ops:
        spec, kernel = registry.operator(op), registry.kernel(op, "triton")
        for dtype in kernel.dtypes:
            for size in ("small", "llama8b"):
                for case in spec.cases or ({},):
                    run_operator(mode, op, dtype, size, dict(case))
    torch.use_deterministic_algorithms(True)  # the embedding's sorted, atomics-free backward
    for dtype in registry.kernel("embedding", "triton").dtypes:
        run_operator(mode, "embedding", dtype, "llama8b", {})
    torch.use_deterministic_algorithms(False)
    for op in ("rms_norm", "layer_norm"):  # rows too wide for one block: the split-row kernels
        shapes = importlib.import_module(f"liger_core.operators.{op}").SHAPES
        shapes["llama8b"] = (64, 262144)
        for dtype in registry.kernel(op, "triton").dtypes:
            run_operator(mode, op, dtype, "llama8b", {})

    distinct = {}
    for kernel, args, meta in launches:
        signature, constants, aligned, options = specialisation(kernel, args, meta)
        key = (
            kernel.fn.__name__,
            json.dumps(signature, sort_keys=True),
            repr(sorted(constants.items())),
            repr(options),
        )
        distinct.setdefault(key, (kernel, signature, constants, aligned, options))
    for (name, *_), (kernel, signature, constants, aligned, options) in distinct.items():
        attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        row = {"kernel": name, "options": options, "constants": {k: repr(v) for k, v in constants.items()}}
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            row.update(shared=compiled.metadata.shared, spilled=spilled_bytes(compiled.asm["cubin"]))
            row["inline_ptx"] = "0x7F7F7F7F" in compiled.asm["ptx"]
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
        print(json.dumps(row), flush=True)
    print(json.dumps({"defined": sorted(kernels_defined())}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
