"""LayerNorm module, liger-kernel 0.8 compatible: ``F.layer_norm`` over the last dimension with weight and bias."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import check_attr, resolve_impl

_INIT_FNS = ("ones", "zeros")


class LigerLayerNorm(nn.Module):
    """LayerNorm over the last dimension, through the ``layer_norm`` operator (computed in fp32, returned in the
    input's dtype).

    ``weight`` is initialised by ``init_fn`` ("ones" or "zeros"). ``bias`` is always an ``nn.Parameter``: zeros,
    or ``randn`` when ``bias=True``, as liger-kernel 0.8.5 does. ``impl=`` (or its legacy alias ``backend=``)
    requires a backend.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        bias: bool = False,
        init_fn: str = "ones",
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"{name}: 'hidden_size' must be a positive int, got {hidden_size!r}")
        if init_fn not in _INIT_FNS:
            raise ValueError(f"{name}: 'init_fn' must be one of {list(_INIT_FNS)}, got {init_fn!r}")
        self.eps = check_attr("layer_norm", name, "eps", eps)
        if self.eps < 0:
            raise ValueError(f"{name}: 'eps' must be >= 0, got {eps}")
        self.hidden_size = hidden_size
        self.impl = resolve_impl(name, impl, backend)
        self.weight = nn.Parameter(torch.ones(hidden_size) if init_fn == "ones" else torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.randn(hidden_size) if bias else torch.zeros(hidden_size))

    @property
    def variance_epsilon(self) -> float:  # the name LigerRMSNorm and Hugging Face's norms use
        return self.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return liger_core.call("layer_norm", hidden_states, self.weight, self.bias, impl=self.impl, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (f", impl={self.impl!r}" if self.impl is not None else "")
