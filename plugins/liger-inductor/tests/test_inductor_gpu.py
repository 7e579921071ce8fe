"""On a GPU (``python -m pytest -m gpu plugins/liger-inductor/tests``): every operator in bfloat16 at "small" shapes,
through Inductor's Triton code generator, and the autotuner taking inductor into account."""

import pytest
import torch

import liger_core
from liger_core import autotune
from liger_core.registry import CATALOGUE
from liger_core.testing import assert_conforms

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("op", sorted(CATALOGUE))
def test_conforms_on_cuda(op):
    assert_conforms(op, "inductor", torch.int8 if op == "int2_matmul" else torch.bfloat16, device="cuda", size="small")


def test_autotuner_times_inductor_beside_the_others():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    liger_core.call("rms_norm", x, w)
    records = [r for r in autotune.cached_decisions() if r["op"] == "rms_norm"]
    assert records and "inductor" in records[-1]["candidates"], records
