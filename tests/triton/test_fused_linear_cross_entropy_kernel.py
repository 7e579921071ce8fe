"""The Triton fused_linear_cross_entropy's own paths, which the generic conformance test does not reach: the loop
over several token chunks (the chunk budget patched small) with a ragged last chunk, every option, the recomputing
backward of reduction "none", gradients for only some inputs, the weight gradient accumulated in the weight's dtype
or in accum_dtype, every row ignored, out-of-range targets, and the caller's tensors left alone. Truth is the
reference backend run in float64."""

import os

import pytest
import torch

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
    "accum_dtype": None,
    "use_token_scaling": False,
}
EVERYTHING = {
    "label_smoothing": 0.1,
    "lse_square_scale": 1e-3,
    "softcap": 3.0,
    "return_z_loss": True,
    "return_token_accuracy": True,
    "return_predicted_tokens": True,
}
ROWS, HIDDEN, VOCAB = 37, 19, 53


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import fused_linear_cross_entropy

    return fused_linear_cross_entropy


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def small_chunks(kernel_module, device, monkeypatch):
    """Chunks of 8 rows (fp32) or 16 rows (bf16): 37 rows take five or three chunks, the last one ragged (on a GPU
    too: its floor on chunk rows is lifted)."""
    monkeypatch.setitem(kernel_module.CHUNK_BYTES, device, 8 * VOCAB * 4)
    monkeypatch.setattr(kernel_module, "MIN_CHUNK_ROWS", {})


def make(dtype, device, with_bias=False, with_ce_weight=False, ignore_index=-100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 2 / HIDDEN**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    target[torch.rand(ROWS, generator=generator) < 0.2] = ignore_index
    bias = (0.5 * torch.randn(VOCAB, generator=generator)).to(device=device, dtype=dtype) if with_bias else None
    ce_weight = (
        torch.rand(VOCAB, generator=generator).add(0.5).to(device=device, dtype=dtype) if with_ce_weight else None
    )
    return x, weight, target.to(device), bias, ce_weight


def run(impl, x, weight, target, bias, ce_weight, upstream, wrt=(True, True, True), **attrs):
    """Outputs and the gradients of (x, weight, bias) (None where not asked)."""
    leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip((x, weight, bias), wrt, strict=True)]
    outputs = liger_core.call(
        "fused_linear_cross_entropy", leaves[0], leaves[1], target, leaves[2], ce_weight, impl=impl,
        **{**DEFAULTS, **attrs},
    )  # fmt: skip
    outputs[0].backward(upstream)
    return outputs, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def truth(x, weight, target, bias, ce_weight, upstream, wrt=(True, True, True), **attrs):
    wide = [None if t is None else t.double() for t in (x, weight, target, bias, ce_weight)]
    wide[2] = target
    return run("reference", *wide, upstream.double(), wrt, **attrs)


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at other places"
    scale = max(want.nan_to_num().abs().max().item() if want.numel() else 0.0, 1.0)
    error = (got - want).nan_to_num().abs().max().item() if want.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(x, weight, target, bias, ce_weight, upstream=None, wrt=(True, True, True), **attrs):
    full = {**DEFAULTS, **attrs}
    dtype = x.dtype
    if upstream is None:
        shape = (ROWS,) if full["reduction"] == "none" else ()
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(x.device, dtype)
    got, got_grads = run("triton", x, weight, target, bias, ce_weight, upstream, wrt, **attrs)
    want, want_grads = truth(x, weight, target, bias, ce_weight, upstream, wrt, **attrs)
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)  # the fused loss is float32
    assert_close("loss", got[0], want[0], dtype)
    if got[1] is not None or want[1] is not None:
        assert_close("z_loss", got[1], want[1], dtype)
    if full["return_token_accuracy"] or full["return_predicted_tokens"]:
        # Argmax depends on the logits as rounded to the dtype (ties): compared with the reference at that dtype.
        same_dtype, _ = run("reference", x, weight, target, bias, ce_weight, upstream, wrt, **attrs)
        if full["return_token_accuracy"]:
            assert_close("token_accuracy", got[2], same_dtype[2], torch.float32)
        if full["return_predicted_tokens"]:
            assert torch.equal(got[3], same_dtype[3])
    for name, g, w, t in zip(("grad input", "grad weight", "grad bias"), got_grads, want_grads, (x, weight, bias)):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.dtype == t.dtype, name
            assert_close(name, g, w, dtype)
    return got, got_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_over_several_chunks(small_chunks, device, dtype, reduction):
    x, weight, target, bias, ce_weight = make(dtype, device, with_bias=True, with_ce_weight=True)
    check(x, weight, target, bias, ce_weight, reduction=reduction, use_token_scaling=True, **EVERYTHING)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"use_token_scaling": True},
        {"label_smoothing": 0.2, "reduction": "sum"},
        {"lse_square_scale": 1e-2, "return_z_loss": True, "reduction": "none"},
        {"softcap": 2.0, "ignore_index": 5, "return_token_accuracy": True},
        {"accum_dtype": torch.float32, "reduction": "none"},
    ],
)
def test_single_options_over_several_chunks(small_chunks, device, attrs):
    x, weight, target, bias, ce_weight = make(
        torch.float32, device, with_bias=True, ignore_index=attrs.get("ignore_index", -100)
    )
    check(x, weight, target, bias, ce_weight, **attrs)


@pytest.mark.parametrize("wrt", [(True, False, False), (False, True, True), (False, False, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_for_some_inputs_only(small_chunks, device, wrt, reduction):
    x, weight, target, bias, _ = make(torch.float32, device, with_bias=True)
    check(x, weight, target, bias, None, wrt=wrt, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_weight_gradient_accumulation_dtype(small_chunks, device, accum_dtype):
    x, weight, target, bias, _ = make(torch.bfloat16, device, with_bias=True)
    _, (_, grad_weight, grad_bias) = check(x, weight, target, bias, None, accum_dtype=accum_dtype)
    assert grad_weight.dtype == torch.bfloat16 and grad_bias.dtype == torch.bfloat16


def test_chunk_rows(kernel_module, monkeypatch):
    monkeypatch.setitem(kernel_module.CHUNK_BYTES, "cuda", 128 << 20)
    assert kernel_module.chunk_rows(8192, 128256, 2, "cuda") == 512
    assert kernel_module.chunk_rows(8192, 256000, 2, "cuda") == 256
    assert kernel_module.chunk_rows(100, 1000, 2, "cuda") == 100
    assert kernel_module.chunk_rows(8192, 10**9, 4, "cuda") == 1
    monkeypatch.setitem(kernel_module.CHUNK_BYTES, "cuda", 1 << 30)
    assert kernel_module.chunk_rows(8192, 128256, 2, "cuda") == 4096


def test_chunk_rows_floor(kernel_module):
    """The GPU floor of the fused-linear CE: 1024 rows at Gemma's vocabulary instead of the budget's 512, capped by
    MAX_FLOOR_BYTES for a huge vocabulary, never more rows than there are, and no floor unless asked for or on the
    CPU."""
    floor = kernel_module.MIN_CHUNK_ROWS
    assert kernel_module.chunk_rows(8192, 256000, 2, "cuda") == 512
    assert kernel_module.chunk_rows(8192, 256000, 2, "cuda", min_rows=floor) == 1024
    assert kernel_module.chunk_rows(8192, 128256, 2, "cuda", min_rows=floor) == 1024
    huge = kernel_module.MAX_FLOOR_BYTES // 2 // 300  # 1024 rows of it would take more than MAX_FLOOR_BYTES
    assert kernel_module.chunk_rows(8192, huge, 2, "cuda", min_rows=floor) == 256  # 300 rows, to a multiple of 128
    assert kernel_module.chunk_rows(700, 256000, 2, "cuda", min_rows=floor) == 700
    assert kernel_module.chunk_rows(8192, 256000, 2, "cpu", min_rows=floor) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_not_nan(small_chunks, device, reduction):
    x, weight, target, bias, ce_weight = make(torch.float32, device, with_bias=True, with_ce_weight=True)
    target = torch.full_like(target, -100)
    (loss, *_), grads = check(x, weight, target, bias, ce_weight, reduction=reduction, **EVERYTHING)
    assert (loss == 0).all()
    assert all((g == 0).all() for g in grads)


def test_out_of_range_targets_poison_the_loss_without_reading_out_of_bounds(small_chunks, device):
    x, weight, target, bias, ce_weight = make(torch.float32, device, with_ce_weight=True)
    target[3], target[30] = VOCAB + 10**9, -3
    for reduction in ("mean", "none"):
        (loss, *_), grads = check(x, weight, target, bias, ce_weight, reduction=reduction, lse_square_scale=1e-2)
        assert loss.isnan().any()
        assert all(g.isfinite().all() for g in grads if g is not None)


def test_empty_batch(device):
    x, weight, target, bias, _ = make(torch.float32, device, with_bias=True)
    (loss, *_), grads = run("triton", x[:0], weight, target[:0], bias, None, torch.tensor(1.0, device=device))
    assert loss == 0
    assert grads[0].shape == (0, HIDDEN) and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_callers_tensors_are_left_alone_and_upstream_scales(small_chunks, device):
    x, weight, target, bias, ce_weight = make(torch.bfloat16, device, with_bias=True, with_ce_weight=True)
    before = [t.clone() for t in (x, weight, target, bias, ce_weight)]
    for upstream in (1.0, -2.5):
        check(x, weight, target, bias, ce_weight, upstream=torch.tensor(upstream, dtype=torch.bfloat16), **EVERYTHING)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, weight, target, bias, ce_weight), strict=True))


def test_no_gradient_wanted(kernel_module, device):
    x, weight, target, bias, _ = make(torch.float32, device, with_bias=True)
    attrs = {**DEFAULTS, **EVERYTHING}
    outputs, saved = kernel_module.forward((x, weight, target, bias, None), attrs, False)
    assert saved is None
    want, _ = truth(x, weight, target, bias, None, torch.tensor(1.0), **EVERYTHING)
    assert_close("loss", outputs[0], want[0], torch.float32)
    assert torch.equal(outputs[3], want[3])


def test_supports_names_what_it_cannot_serve(kernel_module):
    target = torch.empty(2, dtype=torch.int64, device="meta")
    x64, w64 = (
        torch.empty(2, 8, dtype=torch.float64, device="meta"),
        torch.empty(5, 8, dtype=torch.float64, device="meta"),
    )
    assert any("float64" in r for r in kernel_module.supports((x64, w64, target, None, None), DEFAULTS))
    x, w = (
        torch.empty(2, 8, dtype=torch.bfloat16, device="meta"),
        torch.empty(5, 8, dtype=torch.bfloat16, device="meta"),
    )
    assert kernel_module.supports((x, w, target, None, torch.empty(5, device="meta")), DEFAULTS) == []


def test_reference_conformance_harness_accepts_the_operator():
    from liger_core.testing import check_conformance

    assert check_conformance("fused_linear_cross_entropy", "reference", torch.float32).passed


@pytest.mark.parametrize(
    "operand_dtype, accum_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_weight_gradient_first_chunk_overwrites_an_uninitialised_buffer(
    kernel_module, device, operand_dtype, accum_dtype
):
    """The chunk loops allocate grad_W with torch.empty and let the first chunk write it: whatever the buffer held
    (NaN here) must not leak into the sum, in every operand / accumulator dtype pairing; later chunks add."""
    generator = torch.Generator().manual_seed(9)
    chunks = [
        (
            torch.randn(24, 37, generator=generator).to(device, operand_dtype),
            torch.randn(24, 13, generator=generator).to(device, operand_dtype),
        )
        for _ in range(3)
    ]
    got = torch.full((37, 13), float("nan"), dtype=accum_dtype, device=device)
    for index, (dlogits, x) in enumerate(chunks):
        kernel_module.accumulate_weight_gradient(got, dlogits, x, first=index == 0)
    want = sum(dlogits.double().t() @ x.double() for dlogits, x in chunks)
    assert got.dtype == accum_dtype
    tolerance = 1e-5 if accum_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tolerance, atol=tolerance * 10)
