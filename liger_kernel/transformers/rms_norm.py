"""RMSNorm modules, liger-kernel 0.8 compatible: ``y = x * rsqrt(mean(x², -1) + eps) * (offset + weight)``."""

from __future__ import annotations

import torch
from torch import nn

import liger_core

from ._common import check_attr, resolve_impl

_INIT_FNS = ("ones", "zeros")


class LigerRMSNorm(nn.Module):
    """RMSNorm over the last dimension, through the ``rms_norm`` operator.

    casting_mode "llama": rstd in fp32, the normalised x cast back to the input dtype before the weight multiply
    (Hugging Face's LlamaRMSNorm); "gemma": everything in fp32, cast back at the end; "none": the input dtype
    throughout. ``in_place`` lets a backend reuse the upstream gradient buffer for dX where that is safe;
    ``row_mode`` is accepted for compatibility. ``impl=`` (or its legacy alias ``backend=``) requires a backend.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting_mode: str = "llama",
        init_fn: str = "ones",
        in_place: bool = True,
        row_mode=None,
        elementwise_affine: bool = True,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"{name}: 'hidden_size' must be a positive int, got {hidden_size!r}")
        if init_fn not in _INIT_FNS:
            raise ValueError(f"{name}: 'init_fn' must be one of {list(_INIT_FNS)}, got {init_fn!r}")
        self.variance_epsilon = check_attr("rms_norm", name, "eps", eps)
        if self.variance_epsilon < 0:
            raise ValueError(f"{name}: 'eps' must be >= 0, got {eps}")
        self.offset = check_attr("rms_norm", name, "offset", offset)
        self.casting_mode = check_attr("rms_norm", name, "casting_mode", casting_mode)
        self.in_place = check_attr("rms_norm", name, "in_place", in_place)
        self.row_mode = row_mode
        self.hidden_size = hidden_size
        self.elementwise_affine = bool(elementwise_affine)
        self.impl = resolve_impl(name, impl, backend)
        if self.elementwise_affine:
            init = torch.ones if init_fn == "ones" else torch.zeros
            self.weight = nn.Parameter(init(hidden_size))
        else:
            self.register_parameter("weight", None)

    @property
    def eps(self) -> float:  # Hugging Face's Gemma3RMSNorm calls it eps, LlamaRMSNorm variance_epsilon
        return self.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return liger_core.call(
            "rms_norm",
            hidden_states,
            self.weight,
            impl=self.impl,
            eps=self.variance_epsilon,
            offset=self.offset,
            casting_mode=self.casting_mode,
            in_place=self.in_place,
        )

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else (self.hidden_size,)
        return (
            f"{shape}, eps={self.variance_epsilon}, offset={self.offset}, casting_mode={self.casting_mode!r}, "
            f"in_place={self.in_place}, row_mode={self.row_mode}, elementwise_affine={self.elementwise_affine}"
            + (f", impl={self.impl!r}" if self.impl is not None else "")
        )


class LigerRMSNormForGemma(LigerRMSNorm):
    """Gemma's RMSNorm: ``x * rsqrt(...) * (1 + w)`` in fp32, the weight initialised to zeros."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 1.0,
        casting_mode: str = "gemma",
        init_fn: str = "zeros",
        in_place: bool = True,
        row_mode=None,
        elementwise_affine: bool = True,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(
            hidden_size, eps, offset, casting_mode, init_fn, in_place, row_mode, elementwise_affine, impl, backend
        )


class LigerRMSNormForGemma2(LigerRMSNorm):
    """Gemma 2's RMSNorm: as Gemma's, never reusing the upstream gradient buffer (``in_place=False``)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 1.0,
        casting_mode: str = "gemma",
        init_fn: str = "zeros",
        in_place: bool = False,
        row_mode=None,
        elementwise_affine: bool = True,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(
            hidden_size, eps, offset, casting_mode, init_fn, in_place, row_mode, elementwise_affine, impl, backend
        )


class LigerRMSNormForGemma3(LigerRMSNorm):
    """Gemma 3's RMSNorm, whose first argument is ``dim`` (it also normalises q and k per head)."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        offset: float = 1.0,
        casting_mode: str = "gemma",
        init_fn: str = "zeros",
        in_place: bool = False,
        row_mode=None,
        elementwise_affine: bool = True,
        impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__(dim, eps, offset, casting_mode, init_fn, in_place, row_mode, elementwise_affine, impl, backend)
