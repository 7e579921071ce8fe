"""What the four preference-loss modules share: option checks, the call, and the ``(loss, aux)`` convention."""

from __future__ import annotations

import torch
from torch import nn

import liger_core
from liger_core.operators.preference import check_options as check_ranges

from ..transformers._common import check_attr, resolve_impl
from ..transformers._distributed import gather_dtensors


def check_options(op: str, owner: str, **options) -> dict:
    """Type, choice and range checks of an operator's options, so that a bad one fails before any data."""
    checked = {name: check_attr(op, owner, name, value) for name, value in options.items()}
    check_ranges(op, checked, owner)
    return checked


def run(op: str, inputs: tuple, impl, attrs: dict):
    """Call the operator and split its outputs into ``(loss, aux)``: every aux entry is detached. DTensor operands
    (e.g. an FSDP2-sharded lm_head weight) are gathered first (`gather_dtensors`)."""
    loss, *aux = liger_core.call(op, *gather_dtensors(*inputs), impl=impl, **attrs)
    return loss, tuple(aux)


class PreferenceLoss(nn.Module):
    """Base of the modules: keeps the checked options as attributes (as liger-kernel 0.8 does)."""

    OP = ""

    def __init__(self, compiled: bool, chunk_size: int, impl, backend, **options):
        super().__init__()
        name = type(self).__name__
        self._option_names = tuple(options)
        for option, value in check_options(self.OP, name, **options).items():
            setattr(self, option, value)
        # Accepted for compatibility: how the work is tiled is the backend's business (API.md).
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.impl = resolve_impl(name, impl, backend)

    def _attrs(self) -> dict:
        return {option: getattr(self, option) for option in self._option_names}

    def _run(self, inputs: tuple) -> tuple[torch.Tensor, tuple]:
        return run(self.OP, inputs, self.impl, self._attrs())

    def extra_repr(self) -> str:
        parts = [f"{option}={getattr(self, option)!r}" for option in self._option_names]
        if self.impl is not None:
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
