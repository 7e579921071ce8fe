"""The cuda backend: CUDA C++ kernels built as a PyTorch extension on first use.

It implements no operator yet (the CUDA kernels arrive with their own issue); it is registered now so that
`liger-kernel info` says truthfully why it cannot serve on this machine.
"""

from __future__ import annotations

import os
import shutil

from liger_core import __version__
from liger_core.spec import BackendSpec


def available() -> list[str]:
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is built without CUDA")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if shutil.which("nvcc") is None and not (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
        reasons.append("nvcc (the CUDA compiler) is not on PATH nor under CUDA_HOME")
    return reasons


BACKEND = BackendSpec(
    name="cuda",
    priority=20,
    kernels={},
    available=available,
    version=__version__,
    devices=("cuda",),
)
