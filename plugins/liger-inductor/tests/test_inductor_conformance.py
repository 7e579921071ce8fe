"""Every operator of the registry, through the inductor backend, against the reference: one line each.

Tiny shapes on the CPU (Inductor's C++ code generator). Most of the time is compilation: one graph per operator and
direction, a few seconds each on a small machine.
"""

import pytest
import torch

from liger_core.registry import CATALOGUE
from liger_core.testing import assert_conforms


@pytest.mark.parametrize("op", sorted(CATALOGUE))
def test_conforms(op):
    assert_conforms(op, "inductor", torch.int8 if op == "int2_matmul" else torch.float32)


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("rms_norm", {"casting_mode": "gemma", "offset": 1.0}),
        ("fused_linear_cross_entropy", {"reduction": "none", "lse_square_scale": 1e-3, "return_z_loss": True}),
        ("fused_linear_orpo", {"with_nll_target": True, "with_bias": True}),
        # the weight gradient accumulated in bf16 (the default) and in float32 (accum_dtype), with a bias
        ("fused_linear_cross_entropy", {"with_bias": True, "label_smoothing": 0.1}),
        ("fused_linear_cross_entropy", {"with_bias": True, "accum_dtype": torch.float32}),
        ("fused_linear_jsd", {"with_labels": True, "temperature": 2.0}),
        ("fused_linear_dpo", {}),
    ],
)
def test_conforms_in_bfloat16_with_options(op, attrs):
    assert_conforms(op, "inductor", torch.bfloat16, attrs=attrs)
