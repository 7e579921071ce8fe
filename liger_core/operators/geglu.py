"""geglu: ``y = gelu(a, approximate="tanh") * b`` elementwise (Gemma's MLP gate), computed in fp32, output in a's
dtype. ``a`` (the gate projection) and ``b`` (the up projection) have one shape and one dtype; both get gradients.
"""

from __future__ import annotations

from ._gated import gated_spec

SPEC = gated_spec("geglu")
