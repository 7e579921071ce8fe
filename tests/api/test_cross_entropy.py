"""LigerCrossEntropyLoss and liger_cross_entropy against torch.nn.functional.cross_entropy and the extras of API.md
(softcap, z-loss, token accuracy, predicted tokens, all rows ignored) written out here in plain PyTorch."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from liger_core import BackendUnavailableError
from liger_kernel.transformers import CrossEntropyOutput, LigerCrossEntropyLoss
from liger_kernel.transformers.functional import liger_cross_entropy

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
REDUCTIONS = ["mean", "sum", "none"]


# -- the formula -------------------------------------------------------------------------------------------------


def expected_loss(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    softcap=None,
    lse_square_scale=0.0,
):
    """F.cross_entropy in fp32 after the softcap, plus the z-loss; 0 instead of NaN when every row is ignored."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    counted = target != ignore_index
    w = None if weight is None else weight.float()
    if reduction == "mean" and not counted.any():
        loss = (z * 0).sum()  # F.cross_entropy gives NaN here; API.md says 0 (with a zero gradient)
    else:
        loss = F.cross_entropy(
            z, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
        )
    lse = torch.logsumexp(z, dim=-1)
    z_rows = torch.where(counted, lse_square_scale * lse.pow(2), torch.zeros_like(lse))
    if reduction == "mean":
        z_loss = z_rows.sum() / counted.sum().clamp(min=1)
    elif reduction == "sum":
        z_loss = z_rows.sum()
    else:
        z_loss = z_rows
    if lse_square_scale > 0:
        loss = loss + z_loss
    return loss, z_loss


def expected_token_stats(logits, target, ignore_index, reduction):
    counted = target != ignore_index
    predicted = logits.float().argmax(-1)
    correct = ((predicted == target) & counted).float()
    accuracy = correct if reduction == "none" else correct.sum() / counted.sum().clamp(min=1)
    return accuracy, torch.where(counted, predicted, torch.full_like(predicted, -1))


# -- helpers -----------------------------------------------------------------------------------------------------


def make_inputs(rows, vocab, dtype, seed, ignore_index=-100, ignored_share=0.2):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 3.0).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < ignored_share] = ignore_index
    weight = torch.rand(vocab, generator=generator) + 0.5
    return logits, target, weight


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_loss_and_gradient(ours, logits, target, dtype, **options):
    """`ours(logits, target)` returns the loss: compare it and its gradient with the formula's."""
    z_ours = logits.clone().requires_grad_()
    z_ref = logits.clone().float().requires_grad_()
    loss = ours(z_ours, target)
    expected, _ = expected_loss(z_ref, target, **options)
    assert loss.dtype == logits.dtype and loss.shape == expected.shape
    assert_close(loss, expected, dtype, "loss")
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)) + 0.5  # not just ones
    (dz_ours,) = torch.autograd.grad(loss, z_ours, grad_out.to(loss.dtype))
    (dz_ref,) = torch.autograd.grad(expected, z_ref, grad_out)
    assert dz_ours.dtype == logits.dtype
    assert_close(dz_ours, dz_ref, dtype, "d input")


# -- against F.cross_entropy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_module_matches_torch_cross_entropy(dtype, reduction, with_weight, label_smoothing, ignore_index):
    logits, target, weight = make_inputs(13, 101, dtype, seed=1, ignore_index=ignore_index)
    weight = weight if with_weight else None
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    module = LigerCrossEntropyLoss(weight=weight, **options)
    check_loss_and_gradient(module, logits, target, dtype, weight=weight, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functional_matches_torch_cross_entropy(dtype, reduction):
    logits, target, weight = make_inputs(37, 53, dtype, seed=2)
    check_loss_and_gradient(
        lambda z, t: liger_cross_entropy(z, t, weight, reduction=reduction, label_smoothing=0.05),
        logits,
        target,
        dtype,
        weight=weight,
        reduction=reduction,
        label_smoothing=0.05,
    )


def test_a_three_dimensional_batch_flattened_like_hugging_face():
    logits, target, _ = make_inputs(3 * 7, 37, torch.float32, seed=3)
    batch = logits.view(3, 7, 37)
    loss = LigerCrossEntropyLoss()(batch.view(-1, 37), target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


# -- softcap and z-loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_and_z_loss(dtype, reduction):
    logits, target, weight = make_inputs(13, 101, dtype, seed=4)
    options = dict(softcap=5.0, lse_square_scale=0.05, reduction=reduction, label_smoothing=0.1)
    module = LigerCrossEntropyLoss(weight=weight, return_z_loss=True, **options)
    z_ours = logits.clone().requires_grad_()
    out = module(z_ours, target)
    assert isinstance(out, CrossEntropyOutput)
    assert out.token_accuracy is None and out.predicted_tokens is None
    z_ref = logits.float().requires_grad_()
    loss_ref, z_loss_ref = expected_loss(z_ref, target, weight=weight, **options)
    assert_close(out.loss, loss_ref, dtype, "loss")
    assert_close(out.z_loss, z_loss_ref, dtype, "z_loss")
    assert not out.z_loss.requires_grad  # detached, for logging
    grad_out = torch.rand(out.loss.shape, generator=torch.Generator().manual_seed(6)) + 0.5
    (dz_ours,) = torch.autograd.grad(out.loss, z_ours, grad_out.to(dtype))
    (dz_ref,) = torch.autograd.grad(loss_ref, z_ref, grad_out)
    assert_close(dz_ours, dz_ref, dtype, "d input")


def test_z_loss_is_not_class_weighted_and_changes_the_gradient():
    logits, target, weight = make_inputs(13, 101, torch.float32, seed=7)
    plain = LigerCrossEntropyLoss(weight=weight)
    with_z = LigerCrossEntropyLoss(weight=weight, lse_square_scale=0.1)
    check_loss_and_gradient(with_z, logits, target, torch.float32, weight=weight, lse_square_scale=0.1)
    assert not torch.allclose(plain(logits, target), with_z(logits, target))


def test_softcap_alone_functional():
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=8)
    check_loss_and_gradient(
        lambda z, t: liger_cross_entropy(z, t, softcap=2.0), logits, target, torch.float32, softcap=2.0
    )


# -- token accuracy and predicted tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_accuracy_and_predicted_tokens(dtype, reduction):
    logits, target, _ = make_inputs(37, 53, dtype, seed=9, ignore_index=3)
    # make about half of the rows correct, so accuracy is neither 0 nor 1
    generator = torch.Generator().manual_seed(10)
    argmax = logits.float().argmax(-1)
    hit = (torch.rand(37, generator=generator) < 0.5) & (target != 3)
    target = torch.where(hit, argmax, target)
    module = LigerCrossEntropyLoss(
        ignore_index=3, reduction=reduction, return_token_accuracy=True, return_predicted_tokens=True
    )
    out = module(logits.clone().requires_grad_(), target)
    accuracy, predicted = expected_token_stats(logits, target, 3, reduction)
    assert out.z_loss is None
    torch.testing.assert_close(out.token_accuracy.float(), accuracy)
    assert torch.equal(out.predicted_tokens, predicted)
    assert 0 < accuracy.float().mean() < 1
    assert not out.token_accuracy.requires_grad and not out.predicted_tokens.requires_grad
    expected, _ = expected_loss(logits, target, ignore_index=3, reduction=reduction)
    assert_close(out.loss, expected, dtype, "loss")
    # one flag at a time fills one field
    only = liger_cross_entropy(logits, target, ignore_index=3, reduction=reduction, return_predicted_tokens=True)
    assert only.token_accuracy is None and torch.equal(only.predicted_tokens, predicted)


# -- every row ignored -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_all_rows_ignored_gives_zero_not_nan(reduction, with_weight):
    logits, _, weight = make_inputs(13, 101, torch.float32, seed=11)
    target = torch.full((13,), -100)
    z = logits.clone().requires_grad_()
    out = LigerCrossEntropyLoss(
        weight=weight if with_weight else None,
        reduction=reduction,
        lse_square_scale=0.01,
        label_smoothing=0.1,
        return_z_loss=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
    )(z, target)
    assert torch.equal(out.loss, torch.zeros_like(out.loss))
    assert torch.equal(out.z_loss, torch.zeros_like(out.z_loss))
    assert torch.equal(out.token_accuracy, torch.zeros_like(out.token_accuracy))
    assert torch.equal(out.predicted_tokens, torch.full((13,), -1))
    out.loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# -- the return convention and the public surface ----------------------------------------------------------------


def test_returns_a_tensor_unless_a_flag_is_set():
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=12)
    assert isinstance(LigerCrossEntropyLoss()(logits, target), torch.Tensor)
    assert isinstance(LigerCrossEntropyLoss(lse_square_scale=1e-3)(logits, target), torch.Tensor)
    assert isinstance(liger_cross_entropy(logits, target), torch.Tensor)
    for flag in ("return_z_loss", "return_token_accuracy", "return_predicted_tokens"):
        assert isinstance(LigerCrossEntropyLoss(**{flag: True})(logits, target), CrossEntropyOutput)
        assert isinstance(liger_cross_entropy(logits, target, **{flag: True}), CrossEntropyOutput)


def test_cross_entropy_output_is_a_dataclass():
    assert dataclasses.is_dataclass(CrossEntropyOutput)
    fields = [(f.name, f.default) for f in dataclasses.fields(CrossEntropyOutput)]
    assert fields == [("loss", None), ("z_loss", None), ("token_accuracy", None), ("predicted_tokens", None)]
    assert CrossEntropyOutput(loss=torch.tensor(1.0)).z_loss is None


def test_signatures_match_liger_kernel_0_8():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert defaults(LigerCrossEntropyLoss) == [
        ("weight", None),
        ("ignore_index", -100),
        ("lse_square_scale", 0.0),
        ("label_smoothing", 0.0),
        ("reduction", "mean"),
        ("softcap", None),
        ("return_z_loss", False),
        ("return_token_accuracy", False),
        ("return_predicted_tokens", False),
        ("impl", None),
        ("backend", None),
    ]
    assert [name for name, _ in defaults(LigerCrossEntropyLoss.forward)] == ["self", "_input", "target"]
    empty = inspect.Parameter.empty
    assert defaults(liger_cross_entropy) == [
        ("input", empty),
        ("target", empty),
        ("weight", None),
        ("size_average", None),
        ("ignore_index", -100),
        ("reduce", None),
        ("reduction", "mean"),
        ("label_smoothing", 0.0),
        ("lse_square_scale", 0.0),
        ("softcap", None),
        ("return_z_loss", False),
        ("return_token_accuracy", False),
        ("return_predicted_tokens", False),
    ]


def test_size_average_and_reduce_are_ignored():
    logits, target, weight = make_inputs(13, 101, torch.float32, seed=13)
    expected = liger_cross_entropy(logits, target, weight, reduction="sum")
    for size_average, reduce in [(True, True), (False, False), (None, False)]:
        got = liger_cross_entropy(logits, target, weight, size_average, -100, reduce, "sum")
        torch.testing.assert_close(got, expected)


def test_weight_is_a_buffer_that_moves_with_to():
    _, _, weight = make_inputs(4, 101, torch.float32, seed=14)
    module = LigerCrossEntropyLoss(weight=weight)
    assert "weight" in dict(module.named_buffers())
    assert "weight" in module.state_dict()
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    logits, target, _ = make_inputs(13, 101, torch.float64, seed=15)
    torch.testing.assert_close(module(logits, target), F.cross_entropy(logits, target, weight=weight.double()))
    assert LigerCrossEntropyLoss().weight is None


def test_attributes_and_repr():
    module = LigerCrossEntropyLoss(ignore_index=0, softcap=30, reduction="sum", return_z_loss=True, impl="reference")
    assert (module.ignore_index, module.softcap, module.reduction, module.return_z_loss) == (0, 30.0, "sum", True)
    text = repr(module)
    assert "ignore_index=0" in text and "softcap=30.0" in text and "return_z_loss=True" in text
    assert "impl='reference'" in text


# -- backends ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "pytorch"}])
def test_impl_argument(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append(backend)
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=16)
    check_loss_and_gradient(LigerCrossEntropyLoss(**kwargs), logits, target, torch.float32)
    assert chosen == ["reference"]


def test_unknown_impl_is_a_value_error_listing_backends():
    with pytest.raises(ValueError, match=r"(?s)impl.*nonesuch.*registered backends.*reference"):
        LigerCrossEntropyLoss(impl="nonesuch")
    with pytest.raises(ValueError, match="registered backends"):
        LigerCrossEntropyLoss(backend="nonesuch")


def test_impl_that_cannot_serve_raises_backend_unavailable():
    # the cuda backend has no cross_entropy kernel (and no GPU here): a requirement, never a silent fallback
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=17)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        LigerCrossEntropyLoss(impl="cuda")(logits, target)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="reduction"):
        LigerCrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerCrossEntropyLoss(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="softcap"):
        LigerCrossEntropyLoss(softcap=0.0)
    with pytest.raises(ValueError, match="lse_square_scale"):
        LigerCrossEntropyLoss(lse_square_scale=-1e-4)
    with pytest.raises(TypeError, match="ignore_index"):
        LigerCrossEntropyLoss(ignore_index=-100.0)
    with pytest.raises(ValueError, match="weight"):
        LigerCrossEntropyLoss(weight=torch.ones(3, 3))
    with pytest.raises(TypeError, match="weight"):
        LigerCrossEntropyLoss(weight=[1.0, 2.0])


def test_bad_functional_options():
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=18)
    with pytest.raises(ValueError, match="reduction"):
        liger_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        liger_cross_entropy(logits, target, label_smoothing=2.0)
    with pytest.raises(ValueError, match="softcap"):
        liger_cross_entropy(logits, target, softcap=-1.0)


def test_bad_call_arguments():
    logits, target, weight = make_inputs(13, 101, torch.float32, seed=19)
    with pytest.raises(ValueError, match=r"'weight' must have shape \(101,\)"):
        LigerCrossEntropyLoss(weight=weight[:50])(logits, target)
    with pytest.raises(TypeError, match="'target'.*int64"):
        LigerCrossEntropyLoss()(logits, target.float())
    with pytest.raises(ValueError, match="'target' must have shape"):
        LigerCrossEntropyLoss()(logits, target[:5])
    with pytest.raises(ValueError, match="'input' must be 2-D"):
        LigerCrossEntropyLoss()(logits.view(13, 101, 1), target)
    with pytest.raises(TypeError, match="'input'.*floating-point"):
        liger_cross_entropy(logits.long(), target)


def test_out_of_range_target(monkeypatch):
    logits, target, _ = make_inputs(13, 101, torch.float32, seed=20, ignored_share=0.0)
    target[2] = 101
    assert torch.isnan(LigerCrossEntropyLoss()(logits, target))  # no host sync by default: NaN, never a bad read
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match="target"):
        LigerCrossEntropyLoss()(logits, target)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    logits, target, weight = make_inputs(37, 53, torch.float32, seed=21)
    options = dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=10.0, return_z_loss=True)
    options["return_token_accuracy"] = options["return_predicted_tokens"] = True
    if which == "module":
        fn = LigerCrossEntropyLoss(weight=weight, **options)
    else:
        fn = lambda z, t: liger_cross_entropy(z, t, weight, **options)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    z_eager, z_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, got = fn(z_eager, target), compiled(z_compiled, target)
    assert isinstance(got, CrossEntropyOutput)
    for field in ("loss", "z_loss", "token_accuracy", "predicted_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(eager, field))
    eager.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(z_compiled.grad, z_eager.grad)
