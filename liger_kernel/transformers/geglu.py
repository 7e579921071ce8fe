"""GEGLU MLP, liger-kernel 0.8 compatible: ``down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))`` (Gemma)."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import resolve_impl
from .swiglu import config_size

# Every one of these is (or, for Gemma's legacy "gelu", is meant as) GELU's tanh approximation.
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")


class LigerGEGLUMLP(nn.Module):
    """Gemma's MLP with the gate fused: ``down_proj(gelu(gate_proj(x), approximate="tanh") * up_proj(x))``, three
    bias-free Linears.

    ``config`` needs ``hidden_size``, ``intermediate_size`` and an activation, read from ``hidden_activation``
    (Gemma 2 and 3) or else ``hidden_act`` (Gemma). Accepted: "gelu_pytorch_tanh", "gelu_new" and "gelu_fast" (all
    the tanh formula) and "gelu", which Gemma's first checkpoints name while meaning the tanh approximation
    (Hugging Face's GemmaConfig maps it so too): the operator always uses the tanh approximation, so an exact-erf
    GELU model differs by up to about 1e-3 per activation. Anything else (e.g. "silu") is a ValueError.
    ``impl=`` (or its legacy alias ``backend=``) requires a backend for the ``geglu`` operator.
    """

    def __init__(self, config, impl: str | None = None, backend: str | None = None):
        super().__init__()
        name = type(self).__name__
        self.config = config
        self.hidden_size = config_size(name, config, "hidden_size")
        self.intermediate_size = config_size(name, config, "intermediate_size")
        activation = getattr(config, "hidden_activation", None)
        source = "hidden_activation"
        if activation is None:
            activation, source = getattr(config, "hidden_act", None), "hidden_act"
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: 'config.{source}' must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        self.impl = resolve_impl(name, impl, backend)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projections' outputs are ours alone: handed over, so the gradients may reuse their storage.
        gate = self.gate_proj(x)
        return self.down_proj(liger_core.call("geglu", gate, self.up_proj(x), impl=self.impl, in_place=True))
