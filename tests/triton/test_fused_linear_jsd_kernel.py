"""The Triton fused_linear_jsd's own paths, which the generic conformance test does not reach: the chunk loop over
several token chunks (the last one partial), rows in several column blocks and column blocks in slices, every beta,
temperatures, labels with all rows ignored, different student and teacher hidden sizes and dtypes, a float64
accumulator, gradients wanted for only one of input and weight, inputs left alone, the weight-gradient accumulation
on its own, the custom op's schema and fake. Truth is the reference backend's forward run in float64."""

import os

import pytest
import torch
from liger_backends.reference.fused_linear_jsd import backward as reference_backward
from liger_backends.reference.fused_linear_jsd import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ROWS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 23, 19, 29, 53


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import fused_linear_jsd

    return fused_linear_jsd


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def small_chunks(kernel_module, monkeypatch):
    """Chunks of 10 rows (3 chunks for 23 rows, the last of 3), column blocks of 16 in two slices of 8 (V = 53: 4
    blocks, the last partial, its second slice past the row's end)."""
    monkeypatch.setattr(kernel_module, "CHUNK_BYTES", 10 * VOCAB * 4)
    monkeypatch.setattr(kernel_module, "BLOCK_COLS", 16)
    monkeypatch.setattr(kernel_module, "NUM_WARPS", 2)
    assert kernel_module.chunk_rows(ROWS, VOCAB, 2, 2) == 10


def make(dtype, device, teacher_dtype=None, rows=ROWS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    teacher_dtype = teacher_dtype or dtype

    def randn(shape, scale, dt):
        return (scale * torch.randn(shape, generator=generator)).to(device=device, dtype=dt)

    return (
        randn((rows, STUDENT_HIDDEN), 1.0, dtype),
        randn((VOCAB, STUDENT_HIDDEN), 2.0 / STUDENT_HIDDEN**0.5, dtype),
        randn((rows, TEACHER_HIDDEN), 1.0, teacher_dtype),
        randn((VOCAB, TEACHER_HIDDEN), 2.0 / TEACHER_HIDDEN**0.5, teacher_dtype),
    )


def labels_for(device, ignore_index=-100, dtype=torch.int64, rows=ROWS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.4] = ignore_index
    return labels.to(device=device, dtype=dtype)


ATTRS = {"jsd_beta": 0.5, "ignore_index": -100, "temperature": 1.0, "accum_dtype": None}


def truth(tensors, labels, dy, **attrs):
    """loss, grad_x, grad_w of the reference semantics in float64."""
    wide = tuple(t.detach().double() for t in tensors)
    wide[0].requires_grad_()
    wide[1].requires_grad_()
    (loss,), saved = reference_forward((*wide, labels), {**ATTRS, **attrs}, True)
    grad_x, grad_w = reference_backward(saved, (dy.double(),))
    return loss, grad_x, grad_w


def run_triton(tensors, labels, dy, want=(True, True), **attrs):
    x, w = (t.detach().requires_grad_(flag) for t, flag in zip(tensors[:2], want))
    loss = liger_core.call("fused_linear_jsd", x, w, *tensors[2:], labels, impl="triton", **attrs)
    loss.backward(dy)
    return loss, x.grad, w.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(tensors, labels, want=(True, True), seed=5, **attrs):
    x, w = tensors[:2]
    dy = torch.randn((), generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    got = run_triton(tensors, labels, dy, want, **attrs)
    expected = truth(tensors, labels, dy, **attrs)
    assert got[0].dtype == x.dtype
    assert_close("loss", got[0], expected[0], x.dtype)
    for name, flag, grad, ref, t in zip(("grad x", "grad w"), want, got[1:], expected[1:], (x, w)):
        if flag:
            assert grad.dtype == t.dtype
            assert_close(name, grad, ref, x.dtype)
        else:
            assert grad is None
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (1.0, 0.7), (0.5, 2.0), (0.2, 1.0)])
def test_every_beta_and_temperature_over_several_chunks(small_chunks, device, dtype, beta, temperature):
    check(make(dtype, device), labels_for(device), jsd_beta=beta, temperature=temperature)


def test_without_labels_a_custom_ignore_index_and_int32_labels(small_chunks, device):
    tensors = make(torch.float32, device)
    check(tensors, None, jsd_beta=0.4)
    labels = labels_for(device, ignore_index=7, dtype=torch.int32)
    check(tensors, labels, jsd_beta=0.4, ignore_index=7)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(small_chunks, device, beta):
    labels = torch.full((ROWS,), -100, device=device)
    loss, grad_x, grad_w = check(make(torch.float32, device), labels, jsd_beta=beta)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_x).item() == 0 and torch.count_nonzero(grad_w).item() == 0


def test_bf16_student_with_an_fp32_teacher_and_a_float64_accumulator(small_chunks, device):
    check(make(torch.bfloat16, device, teacher_dtype=torch.float32), labels_for(device), temperature=1.5)
    check(make(torch.float32, device), labels_for(device), jsd_beta=0.3, accum_dtype=torch.float64)


@pytest.mark.parametrize("want", [(True, False), (False, True)])
def test_gradient_for_only_the_input_or_only_the_weight(small_chunks, device, want):
    check(make(torch.float32, device), labels_for(device), want=want)


def test_one_chunk_with_the_default_budget_and_wide_rows(kernel_module, device):
    # V wider than the row kernel's column block: several column blocks per pass, one chunk.
    tensors = make(torch.float32, device, rows=4)
    wide_vocab = kernel_module.BLOCK_COLS + 300
    generator = torch.Generator().manual_seed(3)
    w_s = (0.5 * torch.randn(wide_vocab, STUDENT_HIDDEN, generator=generator)).to(device)
    w_t = (0.5 * torch.randn(wide_vocab, TEACHER_HIDDEN, generator=generator)).to(device)
    assert kernel_module.chunk_rows(4, wide_vocab, 4, 4) == 4
    check((tensors[0], w_s, tensors[2], w_t), None, jsd_beta=0.5)


@pytest.mark.parametrize("vocab", [32, 5])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_vocabularies_without_a_partial_block_or_with_only_one(small_chunks, device, vocab, beta):
    # 32: two full column blocks of 16 and no masked block; 5: one block of 8, masked, its second slice holding a
    # single column.
    tensors = make(torch.float32, device)
    generator = torch.Generator().manual_seed(4)
    w_s = (0.5 * torch.randn(vocab, STUDENT_HIDDEN, generator=generator)).to(device)
    w_t = (0.5 * torch.randn(vocab, TEACHER_HIDDEN, generator=generator)).to(device)
    check((tensors[0], w_s, tensors[2], w_t), labels_for(device), jsd_beta=beta)


def test_inputs_are_left_alone_and_no_gradient_mode_gives_the_loss(small_chunks, device):
    tensors = make(torch.bfloat16, device)
    labels = labels_for(device)
    before = [t.clone() for t in (*tensors, labels)]
    loss, _, _ = check(tensors, labels, jsd_beta=0.6)
    for t, b in zip((*tensors, labels), before):
        assert torch.equal(t, b)
    with torch.no_grad():
        x, w = (t.detach().requires_grad_() for t in tensors[:2])
        no_grad_loss = liger_core.call("fused_linear_jsd", x, w, *tensors[2:], labels, impl="triton", jsd_beta=0.6)
    assert torch.equal(no_grad_loss, loss.detach())


def test_missing_upstream_gradient_gives_no_gradients(kernel_module, device):
    tensors = [t.requires_grad_() for t in make(torch.float32, device)[:2]] + list(make(torch.float32, device)[2:])
    (loss,), saved = kernel_module.forward((*tensors, None), ATTRS, True)
    assert loss.dim() == 0
    assert kernel_module.backward(saved, (None,)) == (None, None)


def test_empty_batch(device):
    x, w, xt, wt = (t[:0] if i in (0, 2) else t for i, t in enumerate(make(torch.float32, device)))
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = liger_core.call("fused_linear_jsd", x, w, xt, wt, None, impl="triton")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape and torch.count_nonzero(w.grad).item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_gradient_accumulates_in_float32(kernel_module, device, dtype):
    generator = torch.Generator().manual_seed(4)
    dlogits = torch.randn(64, 33, generator=generator).to(device, dtype)
    x = torch.randn(64, 17, generator=generator).to(device, dtype)
    acc = torch.randn(33, 17, generator=generator).to(device)
    want = acc.double() + dlogits.double().t() @ x.double()
    for _ in range(2):  # the second call takes whichever path the first one settled on
        got = acc.clone()
        kernel_module.accumulate_weight_gradient(got, dlogits, x)
        assert got.dtype == torch.float32
        assert_close("grad w", got, want, torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)


@pytest.mark.parametrize("accum_dtype, expected", [(None, torch.bfloat16), (torch.float32, torch.float32)])
def test_weight_gradient_dtype_follows_the_weight_unless_accum_dtype_is_wider(
    kernel_module, device, accum_dtype, expected
):
    """As fused_linear_cross_entropy: the (V, H) weight gradient is accumulated in the weight's dtype by default (no
    float32 copy of it), in accum_dtype when that is wider; the values match the float64 truth either way."""
    tensors = make(torch.bfloat16, device)
    labels = labels_for(device)
    student = tuple(t.detach().requires_grad_() for t in tensors[:2])
    _, saved = kernel_module.forward((*student, *tensors[2:], labels), {**ATTRS, "accum_dtype": accum_dtype}, True)
    grad_x, grad_w, _, _ = saved
    assert grad_w.dtype == expected and grad_x.dtype == torch.bfloat16
    check(tensors, labels, accum_dtype=accum_dtype)


def test_custom_op_schema_and_fake(kernel_module, device):
    x, w, xt, wt = make(torch.float32, device, rows=5)
    args = (x, w, xt, wt, labels_for(device, rows=5), 0.5, -100, 1.0, torch.float32, True, True)
    torch.library.opcheck(
        kernel_module.fused_linear_jsd_forward_op, args, test_utils=("test_schema", "test_faketensor")
    )


def test_supports_names_what_it_cannot_serve(kernel_module):
    meta = torch.empty(4, 8, device="meta")
    inputs = (meta, meta.double(), meta, meta, torch.empty(4, dtype=torch.int16, device="meta"))
    reasons = kernel_module.supports(inputs, ATTRS)
    assert any("student_weight" in r and "float64" in r for r in reasons)
    assert any("shift_labels" in r for r in reasons)
    assert kernel_module.supports((meta.bfloat16(), meta.bfloat16(), meta, meta, None), ATTRS) == []
