"""The triton backend: Triton kernels, the primary backend on NVIDIA GPUs.

On a machine without a GPU it serves CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before triton is imported, and only when forced (that is how CI runs these kernels).
"""

from __future__ import annotations

import importlib.util

from liger_core import __version__, env
from liger_core.spec import BackendSpec


def available() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton; Linux only)"]
    if env.triton_interpret():
        return []
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA GPU is visible (set TRITON_INTERPRET=1 to run its kernels on the CPU, for testing)"]
    return []


BACKEND = BackendSpec(
    name="triton",
    priority=10,
    kernels={
        "rms_norm": "liger_backends.triton.rms_norm:KERNEL",
        "layer_norm": "liger_backends.triton.layer_norm:KERNEL",
        "swiglu": "liger_backends.triton.swiglu:KERNEL",
        "geglu": "liger_backends.triton.geglu:KERNEL",
        "rope": "liger_backends.triton.rope:KERNEL",
        "embedding": "liger_backends.triton.embedding:KERNEL",
        "kl_div": "liger_backends.triton.kl_div:KERNEL",
        "jsd": "liger_backends.triton.jsd:KERNEL",
        "fused_linear_jsd": "liger_backends.triton.fused_linear_jsd:KERNEL",
        "cross_entropy": "liger_backends.triton.cross_entropy:KERNEL",
        "fused_linear_cross_entropy": "liger_backends.triton.fused_linear_cross_entropy:KERNEL",
        "int2_matmul": "liger_backends.triton.int2_matmul:KERNEL",
        "fused_linear_dpo": "liger_backends.triton.preference:DPO_KERNEL",
        "fused_linear_orpo": "liger_backends.triton.preference:ORPO_KERNEL",
        "fused_linear_cpo": "liger_backends.triton.preference:CPO_KERNEL",
        "fused_linear_simpo": "liger_backends.triton.preference:SIMPO_KERNEL",
    },
    available=available,
    version=__version__,
    devices=("cuda",),
    forced_only_devices=("cpu",) if env.triton_interpret() else (),
)
