"""The Triton kl_div's own paths, which the generic conformance test does not reach: several blocks per program and a
partial last block, every reduction with both target forms, a 0-D and an empty input, strided inputs left alone, a
float64 target, elementwise, 0-D and broadcast upstream gradients, a missing one. Truth is the reference backend's
forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.kl_div import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
REDUCTIONS = ("batchmean", "mean", "sum", "none")


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import kl_div

    return kl_div


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def small_blocks(kernel_module, monkeypatch):
    """64-element blocks on 3 programs: each program walks several blocks, the last one partly filled."""
    monkeypatch.setattr(kernel_module, "BLOCK", 64)
    monkeypatch.setattr(kernel_module, "grid_size", lambda n, device: 3)


def make(shape, dtype, device, log_target=False, true_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y_pred = torch.log_softmax(2 * torch.randn(shape, generator=generator), -1)
    logits = 2 * torch.randn(shape, generator=generator)
    y_true = torch.log_softmax(logits, -1) if log_target else torch.softmax(logits, -1)
    return y_pred.to(device=device, dtype=dtype), y_true.to(device=device, dtype=true_dtype or dtype)


def truth(y_pred, y_true, dy, **attrs):
    pred = y_pred.detach().double().requires_grad_()
    (loss,), _ = reference_forward((pred, y_true.detach().double()), attrs, True)
    loss.backward(dy.double())
    return loss, pred.grad


def run_triton(y_pred, y_true, dy, **attrs):
    y_pred = y_pred.detach().requires_grad_()
    loss = liger_core.call("kl_div", y_pred, y_true, impl="triton", **attrs)
    loss.backward(dy)
    return loss, y_pred.grad


def assert_close(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
    error = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(y_pred, y_true, dy, **attrs):
    attrs = {"reduction": "mean", "log_target": False, "eps": 1e-10, **attrs}
    got_loss, got_grad = run_triton(y_pred, y_true, dy, **attrs)
    want_loss, want_grad = truth(y_pred, y_true, dy, **attrs)
    assert got_loss.dtype == y_pred.dtype and got_grad.dtype == y_pred.dtype
    assert_close("loss", got_loss, want_loss, y_pred.dtype)
    assert_close("grad y_pred", got_grad, want_grad, y_pred.dtype)


def upstream(attrs, shape, dtype, device, seed=5):
    generator = torch.Generator().manual_seed(seed)
    dy_shape = shape if attrs.get("reduction") == "none" else ()
    return torch.randn(dy_shape, generator=generator).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_over_several_blocks_per_program(small_blocks, device, dtype, log_target, reduction):
    shape = (5, 7, 37)  # 1295 elements: 21 blocks of 64, the last one partial, on 3 programs
    y_pred, y_true = make(shape, dtype, device, log_target=log_target)
    attrs = {"reduction": reduction, "log_target": log_target}
    check(y_pred, y_true, upstream(attrs, shape, dtype, device), **attrs)


@pytest.mark.parametrize("eps", [1e-10, 1e-3])
def test_eps_clamps_zero_and_tiny_targets(device, eps):
    y_pred, y_true = make((4, 50), torch.float32, device)
    y_true[:, ::3] = 0.0
    y_true[:, 1::7] = 1e-6
    attrs = {"reduction": "sum", "eps": eps}
    check(y_pred, y_true, upstream(attrs, y_pred.shape, torch.float32, device), **attrs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_dimensional_and_empty_inputs(device, reduction):
    y_pred, y_true = make((), torch.float32, device)
    y_true = torch.tensor(0.3, device=device)
    check(y_pred - 1.0, y_true, upstream({"reduction": reduction}, (), torch.float32, device), reduction=reduction)
    empty = torch.empty(0, 5, device=device)
    loss = liger_core.call("kl_div", empty.requires_grad_(), empty.detach(), impl="triton", reduction=reduction)
    (want,), _ = reference_forward(
        (empty.detach(), empty.detach()), {"reduction": reduction, "log_target": False, "eps": 1e-10}, False
    )
    assert loss.shape == want.shape
    assert torch.equal(loss.isnan(), want.isnan()) and (loss.isnan().all() or torch.equal(loss, want))


def test_strided_inputs_and_float64_target_are_read_correctly_and_left_alone(device):
    generator = torch.Generator().manual_seed(3)
    y_pred = torch.log_softmax(torch.randn(37, 6, generator=generator), 0).to(device).t()  # needs a copy
    y_true = torch.softmax(torch.randn(6, 50, generator=generator), -1).to(device, torch.float64)[:, 5:42]
    before = (y_pred.clone(), y_true.clone())
    for reduction in ("batchmean", "none"):
        attrs = {"reduction": reduction}
        check(y_pred, y_true, upstream(attrs, y_pred.shape, torch.float32, device), **attrs)
    assert torch.equal(y_pred, before[0]) and torch.equal(y_true, before[1])


def test_broadcast_upstream_gradient_is_read_as_one_value(device):
    y_pred, y_true = make((3, 41), torch.float32, device, log_target=True)
    x = y_pred.detach().requires_grad_()
    liger_core.call("kl_div", x, y_true, impl="triton", reduction="none", log_target=True).sum().backward()
    _, want = truth(y_pred, y_true, torch.ones(3, 41, device=device), reduction="none", log_target=True, eps=1e-10)
    assert_close("grad y_pred", x.grad, want.to(device), torch.float32)


def test_missing_upstream_gradient_and_no_gradient_needed(kernel_module, device):
    y_pred, y_true = make((3, 41), torch.float32, device)
    attrs = {"reduction": "sum", "log_target": False, "eps": 1e-10}
    (loss,), saved = kernel_module.forward((y_pred, y_true), attrs, True)
    assert kernel_module.backward(saved, (None,)) == (None,)
    (loss_no_grad,), nothing = kernel_module.forward((y_pred, y_true), attrs, False)
    assert nothing is None and torch.equal(loss, loss_no_grad)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_scalar_loss_gradient_comes_from_the_forward_and_is_scaled_once(kernel_module, device, reduction):
    """A scalar loss's gradient is written by the forward launch (for a unit upstream): the backward of
    ``loss.backward()`` hands that buffer back untouched, another upstream scales it, and a second backward through
    a retained graph raises instead of scaling it twice."""
    y_pred, y_true = make((6, 45), torch.float32, device, log_target=True)
    attrs = {"reduction": reduction, "log_target": True, "eps": 1e-10}
    (_,), saved = kernel_module.forward((y_pred, y_true), attrs, True)
    _, want = truth(y_pred, y_true, torch.tensor(1.0), **attrs)
    one = torch.ones((), device=device)
    (grad,) = kernel_module.backward(saved, (one,))
    assert_close("unit-upstream gradient written by the forward", grad, want.to(device), torch.float32)

    x = y_pred.detach().requires_grad_()
    loss = liger_core.call("kl_div", x, y_true, impl="triton", **attrs)
    loss.backward(torch.tensor(2.5, device=device), retain_graph=True)
    assert_close("scaled gradient", x.grad, 2.5 * want.to(device), torch.float32)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.tensor(2.5, device=device))


def test_supports_names_what_it_cannot_serve(kernel_module):
    meta = torch.empty(2, 8, device="meta")
    reasons = kernel_module.supports((meta.double(), meta), {"reduction": "mean"})
    assert any("y_pred" in r and "float64" in r for r in reasons)
    assert kernel_module.supports((meta, meta.double()), {"reduction": "sum"}) == []
    assert any("reduction" in r for r in kernel_module.supports((meta, meta), {"reduction": "max"}))
