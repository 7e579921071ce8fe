"""Backend `inductor`: every operator of the registry as plain PyTorch math compiled by torch.compile (Inductor).

This module is imported when the registry is built, so it stays light: torch._dynamo, the kernels and the math are
imported on first use.

Priority 50: behind triton (10) and cuda (20), ahead of reference (100); lower wins. It therefore never wins by
priority alone where triton or cuda serve, but on CUDA the autotuner (on by default) times it beside them on the
first call of each shape bucket and keeps it where it is faster. On the CPU it serves only when forced *and*
``LIGER_INDUCTOR_CPU=1`` is set (see `liger_inductor.compiler.toolchain_reasons`).
"""

from __future__ import annotations

from liger_core.spec import BackendSpec

__version__ = "0.1.0"


def available() -> list[str]:
    """Reasons torch.compile cannot be used here at all; device-specific gaps are the kernels' `supports`."""
    from .compiler import has_cpp_compiler, has_triton

    try:
        import torch._dynamo
    except Exception as error:  # a broken install must cost a reason, not the registry
        return [f"torch._dynamo failed to import: {type(error).__name__}: {error}"]
    if not torch._dynamo.is_dynamo_supported():
        return ["torch.compile is not supported with this Python version or platform"]
    if not has_triton() and not has_cpp_compiler():
        return ["Inductor has no code generator here: Triton is not installed (for CUDA) and no C++ compiler was found"]
    return []


_MODULES = {
    "rms_norm": "simple:RMS_NORM",
    "layer_norm": "simple:LAYER_NORM",
    "rope": "simple:ROPE",
    "swiglu": "simple:SWIGLU",
    "geglu": "simple:GEGLU",
    "cross_entropy": "simple:CROSS_ENTROPY",
    "kl_div": "simple:KL_DIV",
    "jsd": "simple:JSD",
    "embedding": "simple:EMBEDDING",
    "int2_matmul": "simple:INT2_MATMUL",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy:KERNEL",
    "fused_linear_jsd": "fused_linear_jsd:KERNEL",
    "fused_linear_dpo": "preference:DPO_KERNEL",
    "fused_linear_orpo": "preference:ORPO_KERNEL",
    "fused_linear_cpo": "preference:CPO_KERNEL",
    "fused_linear_simpo": "preference:SIMPO_KERNEL",
}

BACKEND = BackendSpec(
    name="inductor",
    priority=50,
    kernels={op: f"liger_inductor.{where}" for op, where in _MODULES.items()},
    available=available,
    version=__version__,
    devices=("cuda",),
    # The CPU (Inductor's C++ code generator) only when forced, and only with LIGER_INDUCTOR_CPU=1: it is there so
    # that CI can test these kernels, not to be picked on anyone's CPU.
    forced_only_devices=("cpu",),
)
