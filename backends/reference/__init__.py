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
    },
    version=__version__,
    autotune=False,
)
