"""The Triton jsd's own paths, which the generic conformance test does not reach: rows split into several column
blocks with a partial last one, several tiles per program, every beta (0 and 1 are the two KLs), labels with a custom
ignore_index and all rows ignored, the gradient computed in the forward (default) or in the backward, a float64
teacher, strided inputs left alone, int32 labels, a missing upstream gradient. Truth is the reference backend's
forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.jsd import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import jsd

    return jsd


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def small_tiles(kernel_module, monkeypatch):
    """(4, 16) tiles on 3 programs: a row of V = 53 is 4 column blocks, the last partial; each program walks many."""
    monkeypatch.setattr(kernel_module, "TILE", 64)
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_COLS", 16)
    monkeypatch.setattr(kernel_module, "grid_size", lambda *args: 3)


@pytest.fixture(params=[False, True], ids=["grad-in-backward", "grad-in-forward"])
def gradient_side(kernel_module, monkeypatch, request):
    monkeypatch.setattr(kernel_module, "GRADIENT_IN_FORWARD", request.param)
    return request.param


def make(rows, vocab, dtype, device, teacher_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(2 * torch.randn(rows, vocab, generator=generator), -1)
    log_p = torch.log_softmax(2 * torch.randn(rows, vocab, generator=generator), -1)
    return log_q.to(device=device, dtype=dtype), log_p.to(device=device, dtype=teacher_dtype or dtype)


def labels_for(rows, vocab, device, ignore_index=-100, dtype=torch.int64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.4] = ignore_index
    return labels.to(device=device, dtype=dtype)


def truth(log_q, log_p, labels, dy, **attrs):
    q = log_q.detach().double().requires_grad_()
    (loss,), _ = reference_forward((q, log_p.detach().double(), labels), attrs, True)
    loss.backward(dy.double())
    return loss, q.grad


def run_triton(log_q, log_p, labels, dy, **attrs):
    q = log_q.detach().requires_grad_()
    loss = liger_core.call("jsd", q, log_p, labels, impl="triton", **attrs)
    loss.backward(dy)
    return loss, q.grad


def assert_close(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(log_q, log_p, labels, beta=0.5, ignore_index=-100, seed=5):
    attrs = {"beta": beta, "ignore_index": ignore_index}
    dy = torch.randn((), generator=torch.Generator().manual_seed(seed)).to(log_q.device, log_q.dtype)
    got_loss, got_grad = run_triton(log_q, log_p, labels, dy, **attrs)
    want_loss, want_grad = truth(log_q, log_p, labels, dy, **attrs)
    assert got_loss.dtype == log_q.dtype and got_grad.dtype == log_q.dtype
    assert_close("loss", got_loss, want_loss, log_q.dtype)
    assert_close("grad log_q", got_grad, want_grad, log_q.dtype)
    return got_loss, got_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.1])
def test_every_beta_over_column_blocks_and_several_tiles_per_program(small_tiles, gradient_side, device, dtype, beta):
    log_q, log_p = make(37, 53, dtype, device)
    check(log_q, log_p, labels_for(37, 53, device), beta=beta)


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_without_labels_and_with_a_custom_ignore_index_in_int32(small_tiles, gradient_side, device, beta):
    log_q, log_p = make(9, 53, torch.float32, device)
    check(log_q, log_p, None, beta=beta)
    check(log_q, log_p, labels_for(9, 53, device, ignore_index=3, dtype=torch.int32), beta=beta, ignore_index=3)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_every_row_ignored_gives_zero_loss_and_zero_gradient(gradient_side, device, beta):
    log_q, log_p = make(6, 29, torch.float32, device)
    labels = torch.full((6,), -100, device=device)
    loss, grad = check(log_q, log_p, labels, beta=beta)
    assert loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_probabilities_that_underflow_give_finite_terms(gradient_side, device, beta):
    """Entries far below the rest of their row: subnormal (e^-95, e^-103.5: the smallest subnormal, which halves to
    0) or zero (e^-120) in float32, in one distribution or in both at once (where the mixture m is floored), and
    teacher entries of probability exactly 0 (-inf)."""
    log_q, log_p = make(6, 53, torch.float32, "cpu")
    log_q[:, :6] = torch.tensor([-95.0, -120.0, -95.0, -30.0, -120.0, -103.5])
    log_p[:, :6] = torch.tensor([-95.0, -95.0, float("-inf"), -120.0, -120.0, -120.0])
    loss, grad = check(log_q.to(device), log_p.to(device), None, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_wide_rows_in_one_program(kernel_module, device):
    # The default tiles: a row wider than MAX_BLOCK_COLS is several blocks.
    vocab = kernel_module.MAX_BLOCK_COLS + 1000
    log_q, log_p = make(3, vocab, torch.bfloat16, device)
    check(log_q, log_p, None, beta=0.5)


def test_strided_and_float64_teacher_are_read_correctly_and_left_alone(small_tiles, device):
    generator = torch.Generator().manual_seed(2)
    log_q = torch.log_softmax(torch.randn(53, 11, generator=generator), 0).to(device).t()  # needs a copy
    wide = torch.randn(11, 60, generator=generator, dtype=torch.float64)
    wide[:, 2:55] = torch.log_softmax(wide[:, 2:55], -1)
    log_p = wide.to(device)[:, 2:55]  # rows with a stride of 60: read without a copy
    labels = labels_for(22, 53, device)[::2]  # a strided label vector
    before = (log_q.clone(), log_p.clone(), labels.clone())
    check(log_q, log_p, labels, beta=0.3)
    assert torch.equal(log_q, before[0]) and torch.equal(log_p, before[1]) and torch.equal(labels, before[2])


def test_missing_upstream_gradient_and_no_gradient_needed(kernel_module, device):
    log_q, log_p = make(4, 19, torch.float32, device)
    attrs = {"beta": 0.5, "ignore_index": -100}
    (loss,), saved = kernel_module.forward((log_q, log_p, None), attrs, True)
    assert kernel_module.backward(saved, (None,)) == (None,)
    (loss_no_grad,), nothing = kernel_module.forward((log_q, log_p, None), attrs, False)
    assert nothing is None and torch.equal(loss, loss_no_grad)


def test_supports_names_what_it_cannot_serve(kernel_module):
    meta = torch.empty(2, 8, device="meta")
    labels = torch.empty(2, dtype=torch.int16, device="meta")
    reasons = kernel_module.supports((meta.double(), meta, labels), {"beta": 0.5})
    assert any("log_q" in r and "float64" in r for r in reasons)
    assert any("shift_labels" in r for r in reasons)
    assert kernel_module.supports((meta.half(), meta.double(), None), {"beta": 0.5}) == []


def test_gradient_scaled_in_place_refuses_a_second_backward_instead_of_scaling_twice(kernel_module, device):
    log_q, log_p = make(6, 37, torch.float32, device)
    log_q.requires_grad_(True)
    loss = liger_core.call("jsd", log_q, log_p, None, impl="triton") * 3.0
    (first,) = torch.autograd.grad(loss, log_q, retain_graph=True)
    expected_q = log_q.detach().double().requires_grad_(True)
    expected = reference_forward((expected_q, log_p.double(), None), {"beta": 0.5, "ignore_index": -100}, False)
    (truth,) = torch.autograd.grad(expected[0][0] * 3.0, expected_q)
    torch.testing.assert_close(first.double(), truth, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, log_q)
