"""The Triton swiglu and geglu kernels' own paths, which the generic conformance test does not reach: both layouts
(flat, and rows for views whose row stride is not the width), tails that are not a multiple of the block, several
rows per program, several column blocks per row, strided or broadcast upstream gradients, saturated activations,
empty inputs and a missing upstream gradient. Truth is the reference backend's forward run in float64 and
differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.geglu import forward as reference_geglu
from liger_backends.reference.swiglu import forward as reference_swiglu

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

OPS = ("swiglu", "geglu")
REFERENCE = {"swiglu": reference_swiglu, "geglu": reference_geglu}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest error allowed, relative to the largest magnitude of the true value: a rounding or two in the dtype.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def gated():
    from liger_backends.triton import _gated

    return _gated


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def random(shape, dtype, device, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(device=device, dtype=dtype)


def halves(shape, dtype, device, seed=0):
    """a and b as the two halves of one (..., 2I) projection: rows of I with a row stride of 2I."""
    fused = random((*shape[:-1], 2 * shape[-1]), dtype, device, seed, scale=2.0)
    return fused.chunk(2, dim=-1)


def truth(op, a, b, dy):
    """y, da, db of the reference semantics in float64."""
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    (y,), _ = REFERENCE[op]((a64, b64), {}, True)
    y.backward(dy.double())
    return y, a64.grad, b64.grad


def run_triton(op, a, b, dy):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = liger_core.call(op, a, b, impl="triton")
    y.backward(dy)
    return y, a.grad, b.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(op, a, b, dy):
    before = [t.clone() for t in (a, b, dy)]
    got = run_triton(op, a, b, dy)
    want = truth(op, a, b, dy)
    for name, g, w in zip(("y", "da", "db"), got, want):
        assert_close(f"{op} {name}", g, w, a.dtype)
    assert all(torch.equal(t, t0) for t, t0 in zip((a, b, dy), before)), "an input was written"


def layout_of(gated, *operands):
    n_cols = operands[0].shape[-1]
    rows = [t.reshape(-1, n_cols) for t in operands]
    shape, _, col_blocks, options = gated._layout(rows[0].shape[0], n_cols, *rows)
    return shape, col_blocks, options


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_inputs_run_flat_with_one_tail(gated, device, op, dtype):
    a = random((3, 5, 300), dtype, device, 1, scale=2.0)  # 4500 elements: one full block and a tail
    b = random((3, 5, 300), dtype, device, 2)
    dy = random((3, 5, 300), dtype, device, 3)
    shape, col_blocks, options = layout_of(gated, a, b, dy)
    assert shape == (1, 4500) and options["BLOCK_ROWS"] == 1
    assert col_blocks == 2 and 4500 % options["BLOCK_COLS"]
    check(op, a, b, dy)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_halves_of_a_fused_projection_are_read_in_place(gated, device, op, dtype):
    # Rows of 5000 with a row stride of 10000: several column blocks per row, the last one partly filled.
    a, b = halves((3, 5000), dtype, device)
    assert a.stride(0) == b.stride(0) == 10000
    dy = random((3, 5000), dtype, device, 3)
    shape, col_blocks, options = layout_of(gated, a, b, dy)
    assert shape == (3, 5000) and col_blocks > 1 and 5000 % options["BLOCK_COLS"]
    check(op, a, b, dy)


@pytest.mark.parametrize("op", OPS)
def test_a_and_b_with_different_row_strides(gated, device, op):
    a, _ = halves((6, 1100), torch.float32, device)  # row stride 2200
    b = random((6, 3300), torch.float32, device, 2)[:, 1000:2100]  # row stride 3300
    dy = random((6, 1100), torch.float32, device, 3)
    assert layout_of(gated, a, b, dy)[0] == (6, 1100)
    check(op, a, b, dy)
    check(op, b, a, dy)
    check(op, a, dy, b)  # contiguous b, strided dy


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_strided_rows_share_programs(gated, device, op, dtype):
    a, b = halves((4, 70, 37), dtype, device)
    dy = random((4, 70, 37), dtype, device, 3)
    shape, _, options = layout_of(gated, a, b, dy)
    assert shape == (280, 37) and 1 < options["BLOCK_ROWS"] < 280  # several programs, the last one partly filled
    check(op, a, b, dy)


@pytest.mark.parametrize("op", OPS)
def test_strided_and_broadcast_upstream_gradients(gated, device, op):
    a = random((4, 6, 40), torch.float32, device, 1, scale=2.0)
    b = random((4, 6, 40), torch.float32, device, 2)
    # dy with a row stride of its own: contiguous a and b, but the backward takes the rows layout.
    dy = random((4, 6, 64), torch.float32, device, 3)[..., :40]
    assert layout_of(gated, a, b, dy)[0] == (24, 40)
    check(op, a, b, dy)
    # A transposed dy has no (rows, I) view with unit column stride: it is copied, not misread.
    check(op, a, b, random((40, 6, 4), torch.float32, device, 4).permute(2, 1, 0))
    # y.sum() hands back a gradient whose strides are all zero.
    a_leaf, b_leaf = a.detach().requires_grad_(), b.detach().requires_grad_()
    liger_core.call(op, a_leaf, b_leaf, impl="triton").sum().backward()
    _, da, db = truth(op, a, b, torch.ones(4, 6, 40, device=device))
    assert_close("da", a_leaf.grad, da, torch.float32)
    assert_close("db", b_leaf.grad, db, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_activations_stay_finite(device, op, dtype):
    # Far out on both sides sigmoid's exp overflows to inf: the result must be 0 or the identity, never NaN.
    a = torch.tensor([[-200.0, -90.0, -30.0, -8.0, 0.0, 8.0, 30.0, 90.0, 200.0]], device=device).to(dtype)
    b = random(a.shape, dtype, device, 2)
    dy = random(a.shape, dtype, device, 3)
    got = run_triton(op, a, b, dy)
    assert all(torch.isfinite(t).all() for t in got)
    check(op, a, b, dy)


@pytest.mark.parametrize("op", OPS)
def test_empty_inputs_and_missing_upstream_gradient(device, op):
    from liger_backends.triton import geglu, swiglu

    kernel = {"swiglu": swiglu, "geglu": geglu}[op].KERNEL
    a = random((0, 37), torch.bfloat16, device, 1)
    y, da, db = run_triton(op, a, a.clone(), a.clone())
    assert y.shape == da.shape == db.shape == (0, 37)
    a, b = random((2, 3, 8), torch.float32, device, 1), random((2, 3, 8), torch.float32, device, 2)
    (y,), saved = kernel.forward((a, b), {}, True)
    assert y.shape == (2, 3, 8)
    assert kernel.backward(saved, (None,)) == (None, None)
    (_,), saved = kernel.forward((a, b), {}, False)
    assert saved is None


@pytest.mark.parametrize("op", OPS)
def test_supports_names_what_it_cannot_serve(op):
    from liger_backends.triton import geglu, swiglu

    kernel = {"swiglu": swiglu, "geglu": geglu}[op].KERNEL
    x64 = torch.empty(2, 8, dtype=torch.float64, device="meta")
    reasons = kernel.supports((x64, x64), {})
    assert len(reasons) == 2 and all("float64" in r for r in reasons)
    x = torch.empty(2, 8, dtype=torch.bfloat16, device="meta")
    assert kernel.supports((x, x), {}) == []


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fused", [False, True], ids=["two-projections", "halves-of-one"])
def test_handed_over_inputs_receive_their_gradients_in_place(op, fused, device):
    # What the MLP modules do: a and b are their own projections' outputs, handed over with in_place=True.
    x = random((2, 5, 11), torch.float32, device, seed=3).requires_grad_(True)
    width = 37
    weight = random((2 * width, 11), torch.float32, device, seed=4).requires_grad_(True)

    def grads(in_place):
        projected = x @ weight.T
        a, b = projected.chunk(2, dim=-1) if fused else (projected[..., :width] * 1, projected[..., width:] * 1)
        storage = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
        y = liger_core.call(op, a, b, impl="triton", in_place=in_place)
        upstream = random(y.shape, torch.float32, device, seed=5)
        return torch.autograd.grad(y, (a, b, x, weight), upstream), storage

    (da, db, dx, dw), storage = grads(True)
    (da_fresh, db_fresh, dx_fresh, dw_fresh), _ = grads(False)
    for got, want in ((da, da_fresh), (db, db_fresh), (dx, dx_fresh), (dw, dw_fresh)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the gradients live in the inputs' storage: no new (rows, I) buffers
    assert {da.untyped_storage().data_ptr(), db.untyped_storage().data_ptr()} == storage


@pytest.mark.parametrize("op", OPS)
def test_a_handed_over_input_someone_else_saved_raises_instead_of_a_wrong_gradient(op, device):
    a = random((4, 37), torch.float32, device, seed=1).requires_grad_(True) * 1
    b = random((4, 37), torch.float32, device, seed=2).requires_grad_(True) * 1
    square = (a * a).sum()  # saves a; created first, so its backward runs after ours has overwritten a
    y = liger_core.call(op, a, b, impl="triton", in_place=True)
    loss = y.sum() + square
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", OPS)
def test_in_place_is_not_taken_when_a_and_b_are_the_same_tensor(op, device):
    a = random((3, 37), torch.float32, device, seed=1).requires_grad_(True) * 1
    y = liger_core.call(op, a, a, impl="triton", in_place=True)
    (got,) = torch.autograd.grad(y.sum(), a)
    wide = a.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(REFERENCE[op]((wide, wide), {}, False)[0][0].sum(), wide)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
