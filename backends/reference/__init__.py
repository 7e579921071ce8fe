"""The reference backend: plain PyTorch, every operator, any device. It is the ground truth of the conformance
tests and what runs where no faster backend serves. Autograd differentiates its forwards (``backward=None``)."""

from liger_core import __version__
from liger_core.spec import BackendSpec

BACKEND = BackendSpec(
    name="reference",
    priority=100,
    kernels={
        "rms_norm": "liger_backends.reference.rms_norm:KERNEL",
        "cross_entropy": "liger_backends.reference.cross_entropy:KERNEL",
        "fused_linear_cross_entropy": "liger_backends.reference.fused_linear_cross_entropy:KERNEL",
        "kl_div": "liger_backends.reference.kl_div:KERNEL",
        "jsd": "liger_backends.reference.jsd:KERNEL",
        "fused_linear_jsd": "liger_backends.reference.fused_linear_jsd:KERNEL",
        "fused_linear_dpo": "liger_backends.reference.preference:DPO_KERNEL",
        "fused_linear_orpo": "liger_backends.reference.preference:ORPO_KERNEL",
        "fused_linear_cpo": "liger_backends.reference.preference:CPO_KERNEL",
        "fused_linear_simpo": "liger_backends.reference.preference:SIMPO_KERNEL",
        "layer_norm": "liger_backends.reference.layer_norm:KERNEL",
        "rope": "liger_backends.reference.rope:KERNEL",
        "swiglu": "liger_backends.reference.swiglu:KERNEL",
        "geglu": "liger_backends.reference.geglu:KERNEL",
        "embedding": "liger_backends.reference.embedding:KERNEL",
        "int2_matmul": "liger_backends.reference.int2_matmul:KERNEL",
    },
    version=__version__,
    autotune=False,
)
