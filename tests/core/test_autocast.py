"""Operators compute in their inputs' dtypes under autocast too: dispatch turns autocast off while a kernel runs, so
a region of ``torch.autocast`` (mixed-precision training) neither changes what a kernel computes nor breaks it.
(Before, the reference DPO failed inside autocast: its chunk products came out in bf16 beside fp32 operands.)"""

import pytest
import torch

import liger_core


def _run(op, make_inputs, attrs, autocast: bool):
    inputs = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = liger_core.call(op, *inputs, impl="reference", **attrs)
        loss = out[0] if isinstance(out, tuple) else out
        loss = loss.float().sum()
    loss.backward()
    grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return loss.detach(), grads


def _rms_norm_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 33, generator=g).requires_grad_(), (1 + torch.randn(33, generator=g)).requires_grad_()


def _flce_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 24, generator=g).requires_grad_()
    w = (torch.randn(57, 24, generator=g) / 5).requires_grad_()
    return x, w, torch.randint(0, 57, (13,), generator=g), None, None


def _dpo_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 16, generator=g).requires_grad_()
    w = (torch.randn(41, 16, generator=g) / 4).requires_grad_()
    target = torch.randint(0, 41, (4, 7), generator=g)
    return x, w, target, None, None, None, None


CASES = {
    "rms_norm": (_rms_norm_inputs, {}),
    "fused_linear_cross_entropy": (_flce_inputs, {}),
    "fused_linear_dpo": (_dpo_inputs, {"use_ref_model": False}),
}


@pytest.mark.parametrize("op", list(CASES))
def test_autocast_region_changes_nothing_inside_an_operator(op):
    make_inputs, attrs = CASES[op]
    plain_loss, plain_grads = _run(op, make_inputs, attrs, autocast=False)
    loss, grads = _run(op, make_inputs, attrs, autocast=True)
    assert torch.equal(loss, plain_loss)
    assert len(grads) == len(plain_grads) > 0
    for grad, plain in zip(grads, plain_grads):
        assert grad.dtype == plain.dtype == torch.float32
        assert torch.equal(grad, plain)


def test_autocast_stays_on_around_the_operator():
    x, w = _rms_norm_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        liger_core.call("rms_norm", x, w, impl="reference")
        assert torch.is_autocast_enabled("cpu")
        assert (x @ w[:, None]).dtype == torch.bfloat16  # the caller's own ops are still autocast
