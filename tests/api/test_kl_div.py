"""LigerKLDIVLoss and liger_kl_div against torch.nn.functional.kl_div, and the eps clamp of API.md written out."""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liger_core.testing import check_conformance
from liger_kernel.transformers import LigerKLDIVLoss
from liger_kernel.transformers.functional import liger_kl_div

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
REDUCTIONS = ["batchmean", "mean", "sum", "none"]


def make_inputs(shape, dtype, seed, log_target=False):
    generator = torch.Generator().manual_seed(seed)
    y_pred = torch.log_softmax(torch.randn(shape, generator=generator) * 2, -1).to(dtype)
    logits = torch.randn(shape, generator=generator) * 2
    y_true = (torch.log_softmax(logits, -1) if log_target else torch.softmax(logits, -1)).to(dtype)
    return y_pred, y_true


def expected_loss(y_pred, y_true, reduction, log_target, eps=1e-10):
    """API.md's formula: F.kl_div, except that log(y_true) is taken of max(y_true, eps)."""
    if log_target:
        return F.kl_div(y_pred.float(), y_true.float(), reduction=reduction, log_target=True)
    y_true = y_true.float()
    loss = y_true * (torch.log(y_true.clamp(min=eps)) - y_pred.float())
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "batchmean":
        return loss.sum() / y_pred.shape[0]
    return loss


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_loss_and_gradient(ours, y_pred, y_true, dtype, expected_fn):
    pred = y_pred.clone().requires_grad_()
    pred_ref = y_pred.clone().float().requires_grad_()
    loss = ours(pred, y_true)
    expected = expected_fn(pred_ref, y_true)
    assert loss.dtype == y_pred.dtype and loss.shape == expected.shape
    assert_close(loss, expected, dtype, "loss")
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    (got,) = torch.autograd.grad(loss, pred, grad_out.to(loss.dtype))
    (want,) = torch.autograd.grad(expected, pred_ref, grad_out)
    assert got.dtype == y_pred.dtype
    assert_close(got, want, dtype, "d y_pred")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_module_matches_torch_kl_div(dtype, reduction, log_target):
    y_pred, y_true = make_inputs((3, 7, 37), dtype, seed=1, log_target=log_target)
    module = LigerKLDIVLoss(reduction=reduction, log_target=log_target)
    check_loss_and_gradient(
        module,
        y_pred,
        y_true,
        dtype,
        lambda p, t: F.kl_div(p, t.float(), reduction=reduction, log_target=log_target),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functional_matches_torch_kl_div(dtype, reduction):
    y_pred, y_true = make_inputs((13, 101), dtype, seed=2)
    check_loss_and_gradient(
        lambda p, t: liger_kl_div(p, t, reduction=reduction),
        y_pred,
        y_true,
        dtype,
        lambda p, t: F.kl_div(p, t.float(), reduction=reduction),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_eps_clamps_the_log_of_the_target(reduction):
    y_pred, y_true = make_inputs((5, 11), torch.float32, seed=3)
    y_true[:, :3] = torch.tensor([0.0, 1e-12, 1e-20])  # zero, and below eps: log(eps) is used
    for eps in (1e-10, 1e-6):
        check_loss_and_gradient(
            LigerKLDIVLoss(eps=eps, reduction=reduction),
            y_pred,
            y_true,
            torch.float32,
            lambda p, t: expected_loss(p, t, reduction, False, eps),  # noqa: B023
        )
    # with eps at its default the clamped terms are negligible: it still equals F.kl_div
    torch.testing.assert_close(
        LigerKLDIVLoss(reduction=reduction)(y_pred, y_true), F.kl_div(y_pred, y_true, reduction=reduction)
    )


def test_default_reduction_is_mean_and_a_scalar_batchmean_sums():
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=4)
    torch.testing.assert_close(LigerKLDIVLoss()(y_pred, y_true), F.kl_div(y_pred, y_true))
    scalar_pred, scalar_true = y_pred[0, 0], y_true[0, 0]
    torch.testing.assert_close(
        LigerKLDIVLoss(reduction="batchmean")(scalar_pred, scalar_true),
        F.kl_div(scalar_pred, scalar_true, reduction="batchmean"),
    )


def test_no_gradient_to_the_target():
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=5)
    pred, true = y_pred.clone().requires_grad_(), y_true.clone().requires_grad_()
    LigerKLDIVLoss(reduction="sum")(pred, true).backward()
    assert pred.grad is not None and true.grad is None
    only_target = y_true.clone().requires_grad_()
    assert not liger_kl_div(y_pred, only_target).requires_grad


def test_is_a_kl_div_loss_with_its_legacy_arguments():
    module = LigerKLDIVLoss()
    assert isinstance(module, nn.KLDivLoss)
    assert (module.reduction, module.log_target, module.eps) == ("mean", False, 1e-10)
    module = LigerKLDIVLoss(1e-8, None, None, "sum", True)  # eps, size_average, reduce, reduction, log_target
    assert (module.eps, module.reduction, module.log_target) == (1e-8, "sum", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = LigerKLDIVLoss(size_average=False)  # nn.KLDivLoss maps it to reduction="sum"
    assert legacy.reduction == "sum"
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=6)
    torch.testing.assert_close(legacy(y_pred, y_true), F.kl_div(y_pred, y_true, reduction="sum"))


def test_signatures_match_liger_kernel_0_8():
    parameters = list(inspect.signature(LigerKLDIVLoss.__init__).parameters.values())
    assert [(p.name, p.default) for p in parameters[:2]] == [("self", inspect.Parameter.empty), ("eps", 1e-10)]
    assert [p.kind for p in parameters[2:]] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    assert list(inspect.signature(LigerKLDIVLoss.forward).parameters) == ["self", "y_pred", "y_true"]
    empty = inspect.Parameter.empty
    assert [(p.name, p.default) for p in inspect.signature(liger_kl_div).parameters.values()] == [
        ("input", empty),
        ("target", empty),
        ("size_average", True),
        ("reduce", True),
        ("reduction", "mean"),
        ("log_target", False),
        ("eps", 1e-10),
    ]


def test_size_average_and_reduce_are_ignored_by_the_functional():
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=7)
    expected = liger_kl_div(y_pred, y_true, reduction="sum")
    torch.testing.assert_close(liger_kl_div(y_pred, y_true, False, False, "sum"), expected)


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "native"}])
def test_impl_argument(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append(backend)
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=8)
    module = LigerKLDIVLoss(reduction="batchmean", **kwargs)
    assert module.impl is not None and "impl=" in repr(module)
    torch.testing.assert_close(module(y_pred, y_true), F.kl_div(y_pred, y_true, reduction="batchmean"))
    assert chosen == ["reference"]
    with pytest.raises(ValueError, match="registered backends"):
        LigerKLDIVLoss(impl="nonesuch")


def test_bad_arguments():
    y_pred, y_true = make_inputs((4, 9), torch.float32, seed=9)
    with pytest.raises(ValueError, match="reduction"):
        LigerKLDIVLoss(reduction="avg")
    with pytest.raises(ValueError, match="eps"):
        LigerKLDIVLoss(eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        LigerKLDIVLoss(eps="small")
    with pytest.raises(ValueError, match="'y_true' must have the shape of 'y_pred'"):
        LigerKLDIVLoss()(y_pred, y_true[:2])
    with pytest.raises(TypeError, match="'y_pred'.*floating-point"):
        LigerKLDIVLoss()(y_pred.long(), y_true)
    with pytest.raises(TypeError, match="'y_true'.*floating-point"):
        liger_kl_div(y_pred, y_true.long())
    with pytest.raises(ValueError, match="reduction"):
        liger_kl_div(y_pred, y_true, reduction="avg")


def test_conformance_harness_accepts_every_case():
    from liger_core.registry import get_registry

    for case in get_registry().operator("kl_div").cases:
        result = check_conformance("kl_div", "reference", torch.float32, attrs=case)
        assert result.passed, result.report()


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    y_pred, y_true = make_inputs((5, 37), torch.float32, seed=10, log_target=True)
    if which == "module":
        fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        fn = lambda p, t: liger_kl_div(p, t, reduction="batchmean", log_target=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_pred, compiled_pred = y_pred.clone().requires_grad_(), y_pred.clone().requires_grad_()
    eager, got = fn(eager_pred, y_true), compiled(compiled_pred, y_true)
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    torch.testing.assert_close(compiled_pred.grad, eager_pred.grad)
