"""The operators whose math is one differentiable expression: the reference backend's forward, compiled whole.

The reference kernels (`liger_backends.reference`) are plain PyTorch with no host synchronisation and no Python
branch on the data, only on attributes, dtypes and shapes: exactly what Dynamo traces into one graph. Each is compiled
by `CompiledFunction` (one graph per attribute set and static shape, token dimensions dynamic), and ``backward=None``:
autograd differentiates the compiled forward, i.e. runs the backward graph that AOTAutograd derived and Inductor
compiled with it, fusing the elementwise work of each direction into a few kernels.
"""

from __future__ import annotations

import torch
from liger_backends.reference import (
    cross_entropy,
    embedding,
    geglu,
    int2_matmul,
    jsd,
    kl_div,
    layer_norm,
    rms_norm,
    rope,
    swiglu,
)

from liger_core.spec import KernelSpec

from .compiler import ALL, LEADING, CompiledFunction, inductor_kernel


def compiled_kernel(op: str, reference_forward, token_dims: dict[int, str], **spec) -> KernelSpec:
    """A KernelSpec running `reference_forward`'s math through Inductor; `token_dims` as in `CompiledFunction`."""

    def math(inputs: tuple, attrs: dict):
        outputs, _ = reference_forward(inputs, attrs, False)  # these forwards save nothing: autograd does
        return tuple(outputs)

    compiled = CompiledFunction(op, math, token_dims)

    def forward(inputs: tuple, attrs: dict, needs_grad: bool):
        return compiled(inputs, attrs), None

    forward.compiled = compiled  # for tests and tools: its signatures and compilation count
    return inductor_kernel(op, forward, **spec)


# Inputs in the OpSpecs' order; LEADING: every dimension but the last (hidden, vocabulary) varies with the batch.
RMS_NORM = compiled_kernel("rms_norm", rms_norm.forward, {0: LEADING})
LAYER_NORM = compiled_kernel("layer_norm", layer_norm.forward, {0: LEADING})
ROPE = compiled_kernel("rope", rope.forward, {0: LEADING, 1: LEADING, 2: LEADING, 3: LEADING})
SWIGLU = compiled_kernel("swiglu", swiglu.forward, {0: LEADING, 1: LEADING})
GEGLU = compiled_kernel("geglu", geglu.forward, {0: LEADING, 1: LEADING})
CROSS_ENTROPY = compiled_kernel("cross_entropy", cross_entropy.forward, {0: LEADING, 1: ALL})
KL_DIV = compiled_kernel("kl_div", kl_div.forward, {0: LEADING, 1: LEADING})
JSD = compiled_kernel("jsd", jsd.forward, {0: LEADING, 1: LEADING, 2: ALL})
EMBEDDING = compiled_kernel("embedding", embedding.forward, {0: ALL})
INT2_MATMUL = compiled_kernel("int2_matmul", int2_matmul.forward, {0: LEADING}, dtypes=(torch.int8,))
