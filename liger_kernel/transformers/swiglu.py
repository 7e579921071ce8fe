"""SwiGLU MLP, liger-kernel 0.8 compatible: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import resolve_impl

_ACTIVATIONS = ("silu", "swish")


def config_size(owner: str, config, name: str) -> int:
    """A positive int attribute of a model config, or a ValueError naming it."""
    value = getattr(config, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: 'config.{name}' must be a positive int, got {value!r}")
    return value


class LigerSwiGLUMLP(nn.Module):
    """Llama's MLP with the gate fused: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, three bias-free Linears.

    ``config`` needs ``hidden_size``, ``intermediate_size`` and ``hidden_act`` in {"silu", "swish"} (anything else
    is a ValueError). ``intermediate_size`` overrides the config's (MoE experts). ``impl=`` (or its legacy alias
    ``backend=``) requires a backend for the ``swiglu`` operator; the projections are ordinary ``nn.Linear``s.
    """

    def __init__(
        self, config, intermediate_size: int | None = None, impl: str | None = None, backend: str | None = None
    ):
        super().__init__()
        name = type(self).__name__
        self.config = config
        self.hidden_size = config_size(name, config, "hidden_size")
        if intermediate_size is None:
            self.intermediate_size = config_size(name, config, "intermediate_size")
        elif not isinstance(intermediate_size, int) or isinstance(intermediate_size, bool) or intermediate_size <= 0:
            raise ValueError(f"{name}: 'intermediate_size' must be a positive int or None, got {intermediate_size!r}")
        else:
            self.intermediate_size = intermediate_size
        hidden_act = getattr(config, "hidden_act", None)
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{name}: 'config.hidden_act' must be one of {list(_ACTIVATIONS)}, got {hidden_act!r}")
        self.impl = resolve_impl(name, impl, backend)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projections' outputs are ours alone: handed over, so the gradients may reuse their storage.
        gate = self.gate_proj(x)
        return self.down_proj(liger_core.call("swiglu", gate, self.up_proj(x), impl=self.impl, in_place=True))


class LigerPhi3SwiGLUMLP(nn.Module):
    """Phi-3's MLP with the gate fused: ``down_proj(up * silu(gate))`` where ``gate, up`` are the two halves of one
    bias-free ``gate_up_proj`` Linear (``hidden -> 2 * intermediate``), as Hugging Face's ``Phi3MLP`` (same
    parameter names, so its state dict loads unchanged).

    ``config`` needs ``hidden_size``, ``intermediate_size`` and ``hidden_act`` in {"silu", "swish"} (anything else
    is a ValueError). ``impl=`` (or ``backend=``) requires a backend for the ``swiglu`` operator.
    """

    def __init__(self, config, impl: str | None = None, backend: str | None = None):
        super().__init__()
        name = type(self).__name__
        self.config = config
        self.hidden_size = config_size(name, config, "hidden_size")
        self.intermediate_size = config_size(name, config, "intermediate_size")
        hidden_act = getattr(config, "hidden_act", None)
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{name}: 'config.hidden_act' must be one of {list(_ACTIVATIONS)}, got {hidden_act!r}")
        self.impl = resolve_impl(name, impl, backend)
        self.gate_up_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(liger_core.call("swiglu", gate, up, impl=self.impl, in_place=True))
