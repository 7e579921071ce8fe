"""LigerFusedLinearJSD and liger_fused_linear_jsd against the JSD of the student's and teacher's
``log_softmax(x @ W.T / temperature)``, written out here from the full logits, and proof that the reference never
materialises a (BT, V) tensor."""

import inspect

import pytest
import torch
from liger_backends.reference import fused_linear_cross_entropy as reference_flce
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from liger_core.testing import check_conformance
from liger_kernel.transformers import LigerFusedLinearJSD
from liger_kernel.transformers.functional import liger_fused_linear_jsd

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BETAS = [0.0, 0.5, 1.0]
ROWS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 37, 19, 23, 53


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 5 rows (a student and a teacher block each), so every test crosses chunk boundaries."""
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 5 * VOCAB * 4 * 2)


def make_inputs(dtype, seed, rows=ROWS, vocab=VOCAB, ignore_index=-100, ignored_share=0.3):
    generator = torch.Generator().manual_seed(seed)

    def linear(hidden):
        x = torch.randn(rows, hidden, generator=generator).to(dtype)
        return x, (torch.randn(vocab, hidden, generator=generator) * 3.0 / hidden**0.5).to(dtype)

    student_input, student_weight = linear(STUDENT_HIDDEN)
    teacher_input, teacher_weight = linear(TEACHER_HIDDEN)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignored_share] = ignore_index
    return student_input, student_weight, teacher_input, teacher_weight, labels


def expected_loss(student_input, student_weight, teacher_input, teacher_weight, shift_labels=None, **options):
    beta = options.get("jsd_beta", 0.5)
    temperature = options.get("temperature", 1.0)
    ignore_index = options.get("ignore_index", -100)
    q = torch.softmax(student_input.float() @ student_weight.float().T / temperature, -1)
    p = torch.softmax(teacher_input.float() @ teacher_weight.float().T / temperature, -1)
    if beta == 0.0:
        rows = (p * (p.log() - q.log())).sum(-1)
    elif beta == 1.0:
        rows = (q * (q.log() - p.log())).sum(-1)
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


def check_loss_and_gradients(ours, inputs, dtype, with_labels=True, **options):
    student_input, student_weight, teacher_input, teacher_weight, labels = inputs
    labels = labels if with_labels else None
    x, w = student_input.clone().requires_grad_(), student_weight.clone().requires_grad_()
    x_ref, w_ref = student_input.float().requires_grad_(), student_weight.float().requires_grad_()
    loss = ours(x, w, teacher_input, teacher_weight, labels)
    expected = expected_loss(x_ref, w_ref, teacher_input, teacher_weight, labels, **options)
    assert loss.dtype == student_input.dtype and loss.shape == ()
    assert_close(loss, expected, dtype, "loss")
    got = torch.autograd.grad(loss * 0.7, (x, w))  # an upstream gradient other than 1
    want = torch.autograd.grad(expected * 0.7, (x_ref, w_ref))
    for name, g, r, leaf in zip(("d student_input", "d student_weight"), got, want, (x, w)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_module_matches_the_formula(dtype, beta, temperature):
    module = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
    check_loss_and_gradients(module.forward, make_inputs(dtype, seed=1), dtype, jsd_beta=beta, temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_functional_without_labels_and_with_an_ignore_index(dtype, beta):
    inputs = make_inputs(dtype, seed=2, ignore_index=4)
    check_loss_and_gradients(
        lambda *args: liger_fused_linear_jsd(*args[:4], None, jsd_beta=beta, temperature=0.7),
        inputs,
        dtype,
        with_labels=False,
        jsd_beta=beta,
        temperature=0.7,
    )
    check_loss_and_gradients(
        lambda *args: liger_fused_linear_jsd(*args, jsd_beta=beta, ignore_index=4),
        inputs,
        dtype,
        jsd_beta=beta,
        ignore_index=4,
    )


@pytest.mark.parametrize("accum_dtype", [None, torch.float32, torch.float64])
def test_accum_dtype(accum_dtype):
    module = LigerFusedLinearJSD(accum_dtype=accum_dtype)
    check_loss_and_gradients(module.forward, make_inputs(torch.bfloat16, seed=3), torch.bfloat16)


def test_matches_liger_jsd_on_the_log_softmax():
    from liger_kernel.transformers import LigerJSD

    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(torch.float32, seed=4)
    log_q = torch.log_softmax(student_input @ student_weight.T / 2.0, -1)
    log_p = torch.log_softmax(teacher_input @ teacher_weight.T / 2.0, -1)
    torch.testing.assert_close(
        LigerFusedLinearJSD(jsd_beta=0.2, temperature=2.0)(*make_inputs(torch.float32, seed=4)),
        LigerJSD(beta=0.2)(log_q, log_p, labels),
    )


def test_all_rows_ignored_gives_zero_and_zero_gradients():
    student_input, student_weight, teacher_input, teacher_weight, _ = make_inputs(torch.float32, seed=5)
    x, w = student_input.requires_grad_(), student_weight.requires_grad_()
    loss = LigerFusedLinearJSD()(x, w, teacher_input, teacher_weight, torch.full((ROWS,), -100))
    assert torch.equal(loss, torch.zeros(()))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_no_gradient_to_the_teacher_and_a_frozen_student_weight():
    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(torch.float32, seed=6)
    x = student_input.clone().requires_grad_()
    teacher_input.requires_grad_()
    teacher_weight.requires_grad_()
    LigerFusedLinearJSD()(x, student_weight, teacher_input, teacher_weight, labels).backward()
    assert x.grad is not None and student_weight.grad is None
    assert teacher_input.grad is None and teacher_weight.grad is None
    # only the teacher requires grad: nothing to differentiate
    assert not liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight).requires_grad
    with torch.no_grad():
        plain = liger_fused_linear_jsd(x, student_weight, teacher_input, teacher_weight, labels)
    torch.testing.assert_close(plain, liger_fused_linear_jsd(x, student_weight, teacher_input, teacher_weight, labels))


def test_teacher_in_another_dtype():
    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(torch.float32, seed=7)
    got = liger_fused_linear_jsd(student_input, student_weight, teacher_input.double(), teacher_weight.double(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_loss(student_input, student_weight, teacher_input, teacher_weight, labels))


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any ATen operator returns while active (forward and backward):
    every CPU tensor comes out of an ATen operator, so this sees all of them. See test_fused_linear_cross_entropy."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_logits_sized_tensor_is_ever_created(monkeypatch):
    rows, vocab = 96, 512
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 8 * vocab * 4 * 2)  # 8-row chunks
    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(
        torch.float32, seed=8, rows=rows, vocab=vocab
    )
    x, w = student_input.clone().requires_grad_(), student_weight.clone().requires_grad_()
    with LargestTensor() as seen:
        loss = LigerFusedLinearJSD(jsd_beta=0.4)(x, w, teacher_input, teacher_weight, labels)
        loss.backward()
    # the largest tensors allowed: one chunk of logits, or the weights themselves (V × 23 for the teacher)
    assert seen.largest <= max(8 * vocab, vocab * TEACHER_HIDDEN) < rows * vocab
    expected = expected_loss(student_input, student_weight, teacher_input, teacher_weight, labels, jsd_beta=0.4)
    torch.testing.assert_close(loss, expected)


def test_signatures_match_liger_kernel_0_8():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    empty = inspect.Parameter.empty
    assert defaults(LigerFusedLinearJSD) == [
        ("jsd_beta", 0.5),
        ("ignore_index", -100),
        ("temperature", 1.0),
        ("accum_dtype", None),
        ("impl", None),
        ("backend", None),
    ]
    assert defaults(LigerFusedLinearJSD.forward) == [
        ("self", empty),
        ("student_input", empty),
        ("student_weight", empty),
        ("teacher_input", empty),
        ("teacher_weight", empty),
        ("shift_labels", None),
    ]
    assert defaults(liger_fused_linear_jsd) == [
        ("student_input", empty),
        ("student_weight", empty),
        ("teacher_input", empty),
        ("teacher_weight", empty),
        ("shift_labels", None),
        ("jsd_beta", 0.5),
        ("ignore_index", -100),
        ("temperature", 1.0),
        ("accum_dtype", None),
    ]
    module = LigerFusedLinearJSD(jsd_beta=0.1, temperature=2, accum_dtype=torch.float32, impl="reference")
    assert (module.jsd_beta, module.temperature, module.accum_dtype) == (0.1, 2.0, torch.float32)
    assert "temperature=2.0" in repr(module) and "impl='reference'" in repr(module)


def test_impl_argument(monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append(backend)
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    check_loss_and_gradients(
        LigerFusedLinearJSD(impl="reference").forward, make_inputs(torch.float32, seed=9), torch.float32
    )
    assert chosen == ["reference"]
    with pytest.raises(ValueError, match="registered backends"):
        LigerFusedLinearJSD(backend="nonesuch")


def test_bad_arguments():
    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(torch.float32, seed=10)
    module = LigerFusedLinearJSD()
    with pytest.raises(ValueError, match="jsd_beta"):
        LigerFusedLinearJSD(jsd_beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSD(temperature=0.0)
    with pytest.raises(TypeError, match="accum_dtype"):
        LigerFusedLinearJSD(accum_dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, temperature=-1.0)
    with pytest.raises(ValueError, match=r"'student_weight' must have shape \(V, 19\)"):
        module(student_input, teacher_weight, teacher_input, teacher_weight)
    with pytest.raises(ValueError, match="'teacher_weight' must have 53 rows"):
        module(student_input, student_weight, teacher_input, teacher_weight[:10])
    with pytest.raises(ValueError, match="'teacher_input' must have 37 rows"):
        module(student_input, student_weight, teacher_input[:5], teacher_weight)
    with pytest.raises(TypeError, match="'teacher_weight' must have the dtype of 'teacher_input'"):
        module(student_input, student_weight, teacher_input, teacher_weight.double())
    with pytest.raises(ValueError, match="'student_input' must be 2-D"):
        module(student_input.view(1, ROWS, -1), student_weight, teacher_input, teacher_weight)
    with pytest.raises(ValueError, match=r"'shift_labels' must have shape \(37,\)"):
        module(student_input, student_weight, teacher_input, teacher_weight, labels[:3])
    with pytest.raises(TypeError, match="'student_input'.*floating-point"):
        module(student_input.long(), student_weight, teacher_input, teacher_weight)


def test_conformance_harness_accepts_every_case():
    from liger_core.registry import get_registry

    for case in get_registry().operator("fused_linear_jsd").cases:
        result = check_conformance("fused_linear_jsd", "reference", torch.float32, attrs=case)
        assert result.passed, result.report()


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    student_input, student_weight, teacher_input, teacher_weight, labels = make_inputs(torch.float32, seed=11)
    if which == "module":
        module = LigerFusedLinearJSD(jsd_beta=0.3, temperature=1.5)
        fn = lambda x, w: module(x, w, teacher_input, teacher_weight, labels)  # noqa: E731
    else:
        fn = lambda x, w: liger_fused_linear_jsd(x, w, teacher_input, teacher_weight, labels, jsd_beta=1.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (student_input, student_weight)]
    compiled_leaves = [t.clone().requires_grad_() for t in (student_input, student_weight)]
    eager, got = fn(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
