"""swiglu: ``y = silu(a) * b`` elementwise (the gate of Llama-style MLPs), computed in fp32, output in a's dtype.

``a`` (the gate projection) and ``b`` (the up projection) have one shape and one dtype; both get gradients.
"""

from __future__ import annotations

from ._gated import gated_spec

SPEC = gated_spec("swiglu")
