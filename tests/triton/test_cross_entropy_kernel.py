"""The Triton cross_entropy's own paths, which the generic conformance test does not reach: rows swept in several
chunks with a ragged last one, argmax ties across chunks, every row ignored, out-of-range targets, the per-row
backward of reduction "none", the in-place scaling of the saved gradient, the caller's logits left alone, and the
hand-over launcher that writes the gradient into the logits (with its version bump). Truth is the reference
backend's forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.cross_entropy import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value (1 at least).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DEFAULTS = {
    "ignore_index": -100,
    "lse_square_scale": 0.0,
    "label_smoothing": 0.0,
    "reduction": "mean",
    "softcap": None,
    "return_z_loss": False,
    "return_token_accuracy": False,
    "return_predicted_tokens": False,
}
EVERYTHING = {
    "label_smoothing": 0.1,
    "lse_square_scale": 1e-3,
    "softcap": 4.0,
    "return_z_loss": True,
    "return_token_accuracy": True,
    "return_predicted_tokens": True,
}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import cross_entropy

    return cross_entropy


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(params=["few rows", "many rows"])
def small_blocks(kernel_module, monkeypatch, request):
    """Rows of 53 are swept in four 16-wide chunks, the last one ragged, by the launch for rows too few to fill the
    SMs and by the one for many rows (row_launch)."""
    monkeypatch.setattr(kernel_module, "BLOCK_V", 16)
    monkeypatch.setattr(kernel_module, "FEW_ROWS_BLOCK_V", 16)
    monkeypatch.setattr(kernel_module, "WARP_SLOTS_PER_SM", 1 << 30 if request.param == "few rows" else 0)


def test_row_launch_widens_the_programs_only_when_the_rows_cannot_fill_the_sms(kernel_module):
    cpu = torch.device("cpu")
    slots = kernel_module.WARP_SLOTS_PER_SM * kernel_module.sm_count(cpu)
    threshold = slots // kernel_module.ROW_WARPS  # the fewest rows whose ROW_WARPS-warp programs fill every slot
    few = kernel_module.row_launch(threshold - 1, 128256, cpu)
    many = kernel_module.row_launch(threshold, 128256, cpu)
    assert few == {
        "BLOCK": kernel_module.FEW_ROWS_BLOCK_V,
        "STAGES": kernel_module.FEW_ROWS_STAGES,
        "num_warps": kernel_module.FEW_ROWS_WARPS,
    }
    assert many == {
        "BLOCK": kernel_module.BLOCK_V,
        "STAGES": kernel_module.ROW_STAGES,
        "num_warps": kernel_module.ROW_WARPS,
    }
    assert few["num_warps"] > many["num_warps"]
    # a narrow vocabulary is one block, whichever launch
    narrow = (kernel_module.row_launch(3, 100, cpu), kernel_module.row_launch(threshold, 100, cpu))
    assert narrow[0]["BLOCK"] == narrow[1]["BLOCK"] == 128


def make(rows, vocab, dtype, device, with_weight=False, ignore_index=-100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(rows, vocab, generator=generator)).to(device=device, dtype=dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < 0.2] = ignore_index
    weight = torch.rand(vocab, generator=generator).add(0.5).to(device=device, dtype=dtype) if with_weight else None
    return logits, target.to(device), weight


def truth(logits, target, weight, upstream, **attrs):
    """Outputs and d loss / d logits of the reference semantics in float64."""
    attrs = {**DEFAULTS, **attrs}
    x = logits.detach().double().requires_grad_()
    outputs, _ = reference_forward((x, target, None if weight is None else weight.double()), attrs, True)
    (grad,) = torch.autograd.grad(outputs[0], x, upstream.double())
    return outputs, grad


def run_triton(logits, target, weight, upstream, **attrs):
    x = logits.detach().requires_grad_()
    outputs = liger_core.call("cross_entropy", x, target, weight, impl="triton", **{**DEFAULTS, **attrs})
    outputs[0].backward(upstream)
    return outputs, x.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at other places"
    scale = max(want.nan_to_num().abs().max().item() if want.numel() else 0.0, 1.0)
    error = (got - want).nan_to_num().abs().max().item() if want.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(logits, target, weight, upstream=None, **attrs):
    full = {**DEFAULTS, **attrs}
    if upstream is None:
        shape = (logits.shape[0],) if full["reduction"] == "none" else ()
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(logits.device, logits.dtype)
    (loss, z_loss, accuracy, predicted), grad = run_triton(logits, target, weight, upstream, **attrs)
    want, want_grad = truth(logits, target, weight, upstream, **attrs)
    dtype = logits.dtype
    assert loss.dtype == dtype
    assert_close("loss", loss, want[0], dtype)
    assert_close("grad", grad, want_grad, dtype)
    if full["return_z_loss"]:
        assert z_loss.dtype == dtype
        assert_close("z_loss", z_loss, want[1], dtype)
    else:
        assert z_loss is None
    if full["return_token_accuracy"]:
        assert accuracy.dtype == torch.float32
        # Accuracy counts whole rows: it may differ only where two logits tie within the dtype's rounding.
        assert_close("token_accuracy", accuracy, want[2], torch.float32)
    else:
        assert accuracy is None
    if full["return_predicted_tokens"]:
        assert predicted.dtype == torch.int64
        assert torch.equal(predicted, want[3])
    else:
        assert predicted is None
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_every_option_over_several_chunks_with_a_ragged_tail(small_blocks, device, dtype, reduction, with_weight):
    logits, target, weight = make(37, 53, dtype, device, with_weight=with_weight)
    check(logits, target, weight, reduction=reduction, **EVERYTHING)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"label_smoothing": 0.3},
        {"lse_square_scale": 1e-2, "return_z_loss": True},
        {"softcap": 2.0, "reduction": "sum"},
        {"label_smoothing": 1.0, "reduction": "none"},
        {"ignore_index": 7, "return_token_accuracy": True, "reduction": "none"},
    ],
)
def test_single_options_over_several_chunks(small_blocks, device, attrs):
    logits, target, weight = make(
        29, 70, torch.float32, device, with_weight=True, ignore_index=attrs.get("ignore_index", -100)
    )
    check(logits, target, weight, **attrs)


def test_argmax_takes_the_first_index_on_ties_within_and_across_chunks(small_blocks, device):
    logits, target, _ = make(4, 53, torch.float32, device)
    logits[0, [3, 9]] = 50.0  # one chunk
    logits[1, [5, 20, 52]] = 50.0  # three chunks, the last one ragged
    logits[2, [17, 33]] = 50.0  # second and third chunks
    logits[3, 52] = 50.0  # the last column
    target = torch.tensor([3, 20, 17, 52], device=device)
    attrs = {"return_predicted_tokens": True, "return_token_accuracy": True, "reduction": "none"}
    (_, _, accuracy, predicted), _ = run_triton(logits, target, None, torch.ones(4, device=device), **attrs)
    assert predicted.tolist() == [3, 5, 17, 52] == logits.argmax(-1).tolist()
    assert accuracy.tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_not_nan(device, reduction):
    logits, target, weight = make(6, 40, torch.float32, device, with_weight=True)
    target = torch.full_like(target, -100)
    loss, grad = check(logits, target, weight, reduction=reduction, **EVERYTHING)
    assert not loss.isnan().any() and (loss == 0).all()
    assert (grad == 0).all()
    outputs = liger_core.call("cross_entropy", logits, target, weight, impl="triton", **{**DEFAULTS, **EVERYTHING})
    assert outputs[2] == 0 and outputs[1] == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_of_range_targets_poison_the_loss_without_reading_out_of_bounds(device, reduction):
    logits, target, weight = make(5, 40, torch.float32, device, with_weight=True)
    target[1], target[3] = 40 + 10**9, -7  # far past the row, and negative but not ignore_index
    attrs = {"reduction": reduction, "label_smoothing": 0.1, "lse_square_scale": 1e-2}
    loss, grad = check(logits, target, weight, **attrs)
    assert loss.isnan().any()
    if reduction == "none":
        assert loss.isnan().tolist() == [False, True, False, True, False]
    assert grad.isfinite().all()


def test_reduction_none_backward_scales_each_row(device):
    logits, target, weight = make(9, 33, torch.bfloat16, device, with_weight=True)
    upstream = torch.tensor([0.0, 1.0, -2.0, 1.0, 3.5, 1.0, 1.0, -1.0, 0.25], device=device, dtype=torch.bfloat16)
    check(logits, target, weight, upstream=upstream, reduction="none", lse_square_scale=1e-2, softcap=3.0)
    # An expanded upstream (stride 0), as loss.sum().backward() hands over.
    x = logits.detach().requires_grad_()
    liger_core.call("cross_entropy", x, target, weight, impl="triton", reduction="none")[0].sum().backward()
    _, want = truth(logits, target, weight, torch.ones(9, device=device), reduction="none")
    assert_close("grad", x.grad, want, torch.bfloat16)


def test_callers_logits_are_left_alone_and_the_gradient_has_its_own_buffer(device):
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(8, 64, generator=generator).to(device)
    target = torch.randint(0, 50, (8,), generator=generator).to(device)
    for logits in (wide[:, 5:55], wide.t().contiguous().t()[:, :50]):  # row stride 64; then a column-major copy
        before = logits.clone()
        x = logits.detach().requires_grad_()
        loss = liger_core.call("cross_entropy", x, target, None, impl="triton", **{**DEFAULTS, **EVERYTHING})[0]
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(logits, before)
        assert grad.data_ptr() != x.data_ptr()
        _, want = truth(logits, target, None, torch.tensor(1.0), **EVERYTHING)
        assert_close("grad", grad, want, torch.float32)


def test_saved_gradient_is_scaled_in_place_and_a_second_backward_raises(device):
    logits, target, _ = make(7, 30, torch.float32, device)
    x = logits.detach().requires_grad_()
    loss = liger_core.call("cross_entropy", x, target, None, impl="triton")[0]
    (2.5 * loss).backward(retain_graph=True)
    _, want = truth(logits, target, None, torch.tensor(2.5))
    assert_close("grad", x.grad, want, torch.float32)
    # The saved gradient was consumed by the in-place scaling (its version bumped): no silent reuse.
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_no_gradient_wanted_skips_the_gradient(kernel_module, device):
    logits, target, weight = make(7, 30, torch.float32, device, with_weight=True)
    attrs = {**DEFAULTS, **EVERYTHING}
    outputs, saved = kernel_module.forward((logits, target, weight), attrs, False)
    assert saved is None
    want, _ = truth(logits, target, weight, torch.tensor(1.0), **EVERYTHING)
    assert_close("loss", outputs[0], want[0], torch.float32)
    assert kernel_module.backward((torch.zeros(7, 30),), (None,)) == (None,)


def test_int32_targets(device):
    logits, target, weight = make(11, 45, torch.float16, device, with_weight=True)
    check(logits, target.to(torch.int32), weight, label_smoothing=0.2, return_predicted_tokens=True)


def test_gradient_written_into_handed_over_logits_bumps_their_version(kernel_module, device):
    logits, target, weight = make(6, 40, torch.float32, device, with_weight=True)
    args = (-100, 0.1, 1e-3, 3.0, "mean")
    want, want_grad = truth(
        logits, target, weight, torch.tensor(1.0), label_smoothing=0.1, lse_square_scale=1e-3, softcap=3.0
    )

    # Someone else saved the buffer for a backward: the version bump makes that backward raise.
    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1.0
    observer = (buffer**2).sum()  # pow saves `buffer`
    version = buffer._version
    loss, *_ = kernel_module.cross_entropy_forward_into_logits(buffer.detach(), target, weight, *args)
    assert buffer._version > version
    assert_close("loss", loss, want[0], torch.float32)
    assert_close("grad", buffer.detach(), want_grad, torch.float32)
    with pytest.raises(RuntimeError, match="inplace"):
        observer.backward()

    # A buffer the caller allocated itself keeps its version.
    own = logits.clone()
    version = own._version
    kernel_module.cross_entropy_forward_into_logits(own, target, weight, *args, allocated_here=True)
    assert own._version == version
    assert_close("grad", own, want_grad, torch.float32)


def test_supports_names_what_it_cannot_serve(kernel_module):
    target = torch.empty(2, dtype=torch.int64, device="meta")
    x64 = torch.empty(2, 8, dtype=torch.float64, device="meta")
    assert any("float64" in r for r in kernel_module.supports((x64, target, None), DEFAULTS))
    no_classes = torch.empty(2, 0, device="meta")
    assert any("V = 0" in r for r in kernel_module.supports((no_classes, target, None), DEFAULTS))
    bf16 = torch.empty(2, 8, dtype=torch.bfloat16, device="meta")
    assert kernel_module.supports((bf16, target, torch.empty(8, device="meta")), DEFAULTS) == []


def test_reference_conformance_harness_accepts_the_operator():
    from liger_core.testing import check_conformance

    assert check_conformance("cross_entropy", "reference", torch.float32).passed


def test_scaling_strides_over_a_buffer_larger_than_its_grid(device):
    # The backward's in-place scaling runs a capped grid that strides: a buffer of two passes and a ragged tail, with
    # a scalar factor, a factor of exactly 1 (the buffer left as it is) and one factor per row (some of them 1).
    from liger_backends.triton import _scaling
    from liger_backends.triton.rms_norm import sm_count

    one_pass = _scaling.PROGRAMS_PER_SM * sm_count(torch.device(device)) * _scaling.BLOCK
    rows = 7
    cols = 2 * one_pass // rows + 13
    generator = torch.Generator().manual_seed(8)
    buffer = torch.randn(rows, cols, generator=generator).to(device, torch.bfloat16)
    per_row = torch.randn(rows, generator=generator)
    per_row[2] = 1.0
    for factor in (torch.tensor(-1.75), torch.tensor(1.0), per_row):
        scaled = buffer.clone()
        assert _scaling.scale_in_place(scaled, factor.to(device)) is scaled
        want = (buffer.float() * factor.reshape(-1, 1).to(device)).to(torch.bfloat16)
        assert torch.equal(scaled, want)
