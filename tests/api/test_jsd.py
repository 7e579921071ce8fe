"""LigerJSD and liger_jsd against the generalised Jensen-Shannon divergence written out here from softmax
probabilities (beta 0 and 1 as the forward and reverse KL of API.md), with shift_labels and ignore_index."""

import inspect

import pytest
import torch

from liger_core.testing import check_conformance
from liger_kernel.transformers import LigerJSD
from liger_kernel.transformers.functional import liger_jsd

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BETAS = [0.0, 0.3, 0.5, 1.0]


def make_inputs(rows, vocab, dtype, seed, ignore_index=-100, ignored_share=0.3):
    """Student and teacher log-probabilities from random logits, and labels with some rows ignored."""
    generator = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 2, -1).to(dtype)
    log_p = torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 2, -1).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignored_share] = ignore_index
    return log_q, log_p, labels


def expected_loss(log_q, log_p, shift_labels=None, beta=0.5, ignore_index=-100):
    q, p = log_q.float().exp(), log_p.float().exp()
    if beta == 0.0:
        rows = (p * (p.log() - q.log())).sum(-1)  # KL(P‖Q)
    elif beta == 1.0:
        rows = (q * (q.log() - p.log())).sum(-1)  # KL(Q‖P)
    else:
        m = beta * p + (1 - beta) * q
        rows = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    counted = torch.ones_like(rows, dtype=torch.bool) if shift_labels is None else shift_labels != ignore_index
    return (rows * counted).sum() / counted.sum().clamp(min=1)


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_loss_and_gradient(ours, log_q, log_p, dtype, **options):
    q = log_q.clone().requires_grad_()
    q_ref = log_q.clone().float().requires_grad_()
    loss = ours(q, log_p)
    expected = expected_loss(q_ref, log_p, **options)
    assert loss.dtype == log_q.dtype and loss.shape == ()
    assert_close(loss, expected, dtype, "loss")
    (got,) = torch.autograd.grad(loss * 1.7, q)  # an upstream gradient other than 1
    (want,) = torch.autograd.grad(expected * 1.7, q_ref)
    assert got.dtype == log_q.dtype
    assert_close(got, want, dtype, "d log_q")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_module_matches_the_formula(dtype, beta, with_labels):
    log_q, log_p, labels = make_inputs(37, 53, dtype, seed=1)
    labels = labels if with_labels else None
    module = LigerJSD(beta=beta)
    check_loss_and_gradient(lambda q, p: module(q, p, labels), log_q, log_p, dtype, shift_labels=labels, beta=beta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
def test_functional_with_a_custom_ignore_index(dtype, beta):
    log_q, log_p, labels = make_inputs(13, 101, dtype, seed=2, ignore_index=5)
    check_loss_and_gradient(
        lambda q, p: liger_jsd(q, p, labels, beta=beta, ignore_index=5),
        log_q,
        log_p,
        dtype,
        shift_labels=labels,
        beta=beta,
        ignore_index=5,
    )


def test_beta_0_and_1_are_the_two_kl_divergences_not_zero():
    log_q, log_p, _ = make_inputs(9, 31, torch.float32, seed=3)
    forward_kl = torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True) / 9
    reverse_kl = torch.nn.functional.kl_div(log_p, log_q, reduction="sum", log_target=True) / 9
    torch.testing.assert_close(LigerJSD(beta=0.0)(log_q, log_p), forward_kl)
    torch.testing.assert_close(LigerJSD(beta=1.0)(log_q, log_p), reverse_kl)
    assert LigerJSD(beta=0.0)(log_q, log_p) > 0.1 and LigerJSD(beta=1.0)(log_q, log_p) > 0.1
    # identical distributions: 0 for every beta
    for beta in BETAS:
        torch.testing.assert_close(LigerJSD(beta=beta)(log_q, log_q), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_all_rows_ignored_gives_zero_and_a_zero_gradient(beta):
    log_q, log_p, _ = make_inputs(11, 17, torch.float32, seed=4)
    labels = torch.full((11,), -100)
    q = log_q.clone().requires_grad_()
    loss = LigerJSD(beta=beta)(q, log_p, labels)
    assert torch.equal(loss, torch.zeros(()))
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_gradient_flows_to_the_student_only():
    log_q, log_p, labels = make_inputs(11, 17, torch.float32, seed=5)
    q, p = log_q.clone().requires_grad_(), log_p.clone().requires_grad_()
    LigerJSD()(q, p, labels).backward()
    assert q.grad is not None and p.grad is None
    assert not liger_jsd(log_q, log_p.clone().requires_grad_()).requires_grad


def test_teacher_in_another_dtype():
    log_q, log_p, labels = make_inputs(11, 17, torch.float32, seed=6)
    check_loss_and_gradient(
        lambda q, p: liger_jsd(q, p.bfloat16(), labels), log_q, log_p.bfloat16(), torch.float32, shift_labels=labels
    )


def test_signatures_match_liger_kernel_0_8():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert defaults(LigerJSD) == [("beta", 0.5), ("ignore_index", -100), ("impl", None), ("backend", None)]
    empty = inspect.Parameter.empty
    assert defaults(LigerJSD.forward) == [("self", empty), ("log_q", empty), ("log_p", empty), ("shift_labels", None)]
    assert defaults(liger_jsd) == [
        ("input", empty),
        ("target", empty),
        ("shift_labels", None),
        ("beta", 0.5),
        ("ignore_index", -100),
    ]
    module = LigerJSD(beta=0.25, ignore_index=0, impl="reference")
    assert (module.beta, module.ignore_index) == (0.25, 0)
    assert "beta=0.25" in repr(module) and "impl='reference'" in repr(module)


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "pytorch"}])
def test_impl_argument(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append(backend)
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    log_q, log_p, labels = make_inputs(11, 17, torch.float32, seed=7)
    check_loss_and_gradient(
        lambda q, p: LigerJSD(**kwargs)(q, p, labels), log_q, log_p, torch.float32, shift_labels=labels
    )
    assert chosen == ["reference"]
    with pytest.raises(ValueError, match="registered backends"):
        LigerJSD(impl="nonesuch")


def test_bad_arguments():
    log_q, log_p, labels = make_inputs(11, 17, torch.float32, seed=8)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            LigerJSD(beta=beta)
        with pytest.raises(ValueError, match="beta"):
            liger_jsd(log_q, log_p, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        LigerJSD(beta="half")
    with pytest.raises(TypeError, match="ignore_index"):
        LigerJSD(ignore_index=1.0)
    with pytest.raises(ValueError, match="'log_p' must have the shape of 'log_q'"):
        LigerJSD()(log_q, log_p[:, :5])
    with pytest.raises(ValueError, match="'log_q' must be 2-D"):
        LigerJSD()(log_q.view(1, 11, 17), log_p.view(1, 11, 17))
    with pytest.raises(ValueError, match=r"'shift_labels' must have shape \(11,\)"):
        LigerJSD()(log_q, log_p, labels[:4])
    with pytest.raises(TypeError, match="'shift_labels'.*int64"):
        LigerJSD()(log_q, log_p, labels.float())
    with pytest.raises(TypeError, match="'log_q'.*floating-point"):
        liger_jsd(log_q.long(), log_p)


def test_conformance_harness_accepts_every_case():
    from liger_core.registry import get_registry

    for case in get_registry().operator("jsd").cases:
        result = check_conformance("jsd", "reference", torch.float32, attrs=case)
        assert result.passed, result.report()


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    log_q, log_p, labels = make_inputs(13, 37, torch.float32, seed=9)
    if which == "module":
        module = LigerJSD(beta=0.3)
        fn = lambda q, p: module(q, p, labels)  # noqa: E731
    else:
        fn = lambda q, p: liger_jsd(q, p, labels, beta=1.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_q, compiled_q = log_q.clone().requires_grad_(), log_q.clone().requires_grad_()
    eager, got = fn(eager_q, log_p), compiled(compiled_q, log_p)
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    torch.testing.assert_close(compiled_q.grad, eager_q.grad)
