"""Kernels of the test plugin, in plain PyTorch, with hand-written backwards."""

import time

import torch

from liger_core.spec import KernelSpec, as_dtype


def rms_norm_forward(inputs, attrs, needs_grad):
    x, weight = inputs  # offset is 0: supports() declines the rest
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + attrs["eps"])
    y = x.float() * rstd * (weight.float() if weight is not None else 1.0)
    return (as_dtype(y, x.dtype),), (x, weight, rstd)


def rms_norm_backward(saved, grad_outputs):
    x, weight, rstd = saved
    (dy,) = grad_outputs
    if dy is None:
        return None, None
    normalised = x.float() * rstd
    g = dy.float() * (weight.float() if weight is not None else 1.0)
    dx = rstd * (g - normalised * (g * normalised).mean(-1, keepdim=True))
    dw = None
    if weight is not None:
        dw = (dy.float() * normalised).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


def declines_gemma(inputs, attrs):
    reasons = []
    if attrs["casting_mode"] != "llama":
        reasons.append("testplug only implements casting_mode='llama'")
    if attrs["offset"] != 0.0:
        reasons.append("testplug only implements offset=0")
    return reasons


RMS_NORM = KernelSpec(
    op="rms_norm",
    forward=rms_norm_forward,
    backward=rms_norm_backward,
    supports=declines_gemma,
    dtypes=(torch.float32,),
    devices=("cpu",),
)


def slow_rms_norm_forward(inputs, attrs, needs_grad):
    time.sleep(0.005)  # so that the autotuner has an unmistakable loser
    return rms_norm_forward(inputs, attrs, needs_grad)


SLOW_RMS_NORM = KernelSpec(
    op="rms_norm",
    forward=slow_rms_norm_forward,
    backward=rms_norm_backward,
    supports=declines_gemma,
    dtypes=(torch.float32,),
    devices=("cpu",),
)


def scale_forward(inputs, attrs, needs_grad):
    (x,) = inputs
    return (x * attrs["factor"],), (attrs["factor"],)


def scale_backward(saved, grad_outputs):
    (factor,) = saved
    (dy,) = grad_outputs
    return (None if dy is None else dy * factor,)


SCALE = KernelSpec(op="scale", forward=scale_forward, backward=scale_backward)
