"""Every (operator, backend, dtype, case) of the registry against the reference backend (liger_core.testing).

On the CPU the backends that serve CPU tensors run at "tiny" shapes (triton through its interpreter); with
``-m gpu`` every backend that serves CUDA tensors runs at "small" shapes, and the default case in bf16 at "llama8b".
The reference backend is the truth, so it is never tested against itself.
"""

import pytest
import torch

from liger_core.registry import get_registry
from liger_core.testing import assert_conforms, declines


def _declines(op, backend, dtype, case, device) -> list[str]:
    return declines(op, backend, dtype, device=device, attrs=case)


def _cases(device: str, sizes: tuple[str, ...]):
    registry = get_registry()
    for op in registry.operator_names():
        spec = registry.operator(op)
        for backend in registry.implementations(op):
            if backend == spec.reference_backend:
                continue  # the reference against itself proves nothing (and costs a third of the GPU run)
            plugin = registry.backends[backend]
            if device not in plugin.spec.devices + plugin.spec.forced_only_devices:
                continue  # e.g. the cuda backend on the CPU: nothing to run here
            # The realistic size runs once per kernel: the default case in the operator's training dtype (bf16
            # where it is offered). Every dtype and case runs at the first size.
            big_dtype = torch.bfloat16 if torch.bfloat16 in spec.dtypes else spec.dtypes[0]
            for dtype in spec.dtypes:
                for index, case in enumerate(spec.cases):
                    if not plugin.first_party and device == "cpu" and _declines(op, backend, dtype, case, device):
                        continue  # the test plugins serve a deliberately narrow subset

                    for size in sizes if index == 0 and dtype == big_dtype else sizes[:1]:
                        yield pytest.param(
                            op, backend, dtype, case, size, id=f"{op}-{backend}-{dtype}-{size}-case{index}"
                        )


def _run(op, backend, dtype, case, size, device):
    # A first-party kernel that declines a case of its own operator is a gap: it fails, it is not skipped.
    reasons = _declines(op, backend, dtype, case, device)
    assert not reasons, f"{backend} does not serve this case of {op}: " + "; ".join(reasons)
    assert_conforms(op, backend, dtype, device=device, size=size, seed=7, attrs=case)


@pytest.mark.parametrize("op, backend, dtype, case, size", list(_cases("cpu", ("tiny",))))
def test_conformance_cpu(op, backend, dtype, case, size):
    _run(op, backend, dtype, case, size, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("op, backend, dtype, case, size", list(_cases("cuda", ("small", "llama8b"))))
def test_conformance_gpu(op, backend, dtype, case, size):
    _run(op, backend, dtype, case, size, "cuda")
