"""The Triton embedding's own paths, beyond the generic conformance cases: both backward paths (fp32 atomics straight
into the gradient for an fp32 weight, owner rows for bf16/fp16, and the sorted deterministic path taken under
``torch.use_deterministic_algorithms(True)``), long runs of one repeated index, rows wider than one column block,
padding and out-of-range indices (zero rows, no gradient), int32 indices, strided weights and broadcast gradients.
Truth is the reference backend's forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.embedding import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# The gradient sums up to a few hundred rows in fp32 and rounds once to the weight's dtype.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import embedding

    return embedding


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def deterministic():
    """Runs the test body under torch.use_deterministic_algorithms(True), restoring the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def make(index_shape, num_embeddings, dim, dtype, device, seed=0, high=None, index_dtype=torch.int64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_embeddings, dim, generator=generator).to(device=device, dtype=dtype)
    indices = torch.randint(0, high or num_embeddings, index_shape, generator=generator)
    dy = torch.randn(*index_shape, dim, generator=generator).to(device=device, dtype=dtype)
    return indices.to(device=device, dtype=index_dtype), weight, dy


def truth(indices, weight, dy, padding_idx=None):
    w64 = weight.detach().double().requires_grad_()
    (y,), _ = reference_forward((indices, w64), {"padding_idx": padding_idx}, True)
    y.backward(dy.double())
    return y, w64.grad


def run_triton(indices, weight, dy, padding_idx=None):
    weight = weight.detach().requires_grad_()
    y = liger_core.call("embedding", indices, weight, impl="triton", padding_idx=padding_idx)
    y.backward(dy)
    return y, weight.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(indices, weight, dy, padding_idx=None):
    before = (indices.clone(), weight.clone(), dy.clone())
    y, dw = run_triton(indices, weight, dy, padding_idx)
    want_y, want_dw = truth(indices, weight, dy, padding_idx)
    assert torch.equal(y.double(), want_y), "the forward is a copy: it must be exact"
    assert_close("dw", dw, want_dw, weight.dtype)
    assert all(torch.equal(t, b) for t, b in zip((indices, weight, dy), before)), "an input was written"
    return y, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["atomic", "deterministic"])
def test_repeated_indices_accumulate(request, device, dtype, path):
    if path == "deterministic":
        request.getfixturevalue("deterministic")
    # 300 tokens over 7 rows: runs of about 40, several BLOCK_RUN steps of the sorted path each.
    indices, weight, dy = make((3, 100), 7, 24, dtype, device, high=7)
    _, dw = check(indices, weight, dy)
    assert (dw != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_path_equals_the_atomic_path_and_repeats_bit_for_bit(request, device, dtype):
    indices, weight, dy = make((5, 41), 30, 40, dtype, device, seed=1, high=30)
    indices[0, :20] = 3  # one run longer than a BLOCK_RUN step
    _, atomic = run_triton(indices, weight, dy, padding_idx=5)
    request.getfixturevalue("deterministic")
    _, first = run_triton(indices, weight, dy, padding_idx=5)
    _, second = run_triton(indices, weight, dy, padding_idx=5)
    assert torch.equal(first, second)
    assert_close("deterministic dw", first, atomic.double(), dtype)
    if dtype == torch.float32:
        # Sums of the same fp32 values in other orders: equal to within a few roundings.
        torch.testing.assert_close(first, atomic, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["atomic", "deterministic"])
@pytest.mark.parametrize("padding_idx", [0, 4, -1])
def test_padding_and_out_of_range_indices_give_zero_rows_and_no_gradient(request, device, path, padding_idx):
    if path == "deterministic":
        request.getfixturevalue("deterministic")
    indices, weight, dy = make((4, 13), 9, 20, torch.bfloat16, device, seed=2)
    indices[0, :6] = torch.tensor([-1, 9, 10_000, -10_000, 2**40, -(2**40)])
    indices[1, :4] = padding_idx % 9
    y, dw = check(indices, weight, dy, padding_idx=padding_idx)
    dropped = (indices < 0) | (indices >= 9) | (indices == padding_idx % 9)
    assert (y[dropped] == 0).all() and (y[~dropped] != 0).any()
    assert (dw[padding_idx % 9] == 0).all()


@pytest.mark.parametrize("path", ["atomic", "deterministic"])
def test_int32_indices(request, device, path):
    if path == "deterministic":
        request.getfixturevalue("deterministic")
    indices, weight, dy = make((2, 3, 11), 17, 12, torch.float16, device, seed=3, index_dtype=torch.int32)
    indices[0, 0, :2] = torch.tensor([-5, 17], dtype=torch.int32)
    check(indices, weight, dy, padding_idx=-3)


@pytest.mark.parametrize("path", ["atomic", "deterministic"])
def test_rows_wider_than_one_column_block(kernel_module, request, device, path):
    if path == "deterministic":
        request.getfixturevalue("deterministic")
    dim = kernel_module.MAX_BLOCK_COLS + 101
    indices, weight, dy = make((5,), 4, dim, torch.bfloat16, device, seed=4)
    check(indices, weight, dy, padding_idx=1)


def test_many_tokens_per_program(kernel_module, device):
    block_tokens = kernel_module.embedding_tile(1000, 10)[0]
    assert 1 < block_tokens < 1000 and 1000 % block_tokens
    indices, weight, dy = make((1000,), 50, 10, torch.float32, device, seed=5)
    check(indices, weight, dy)


def test_strided_weight_and_broadcast_gradient(device):
    generator = torch.Generator().manual_seed(6)
    table = torch.randn(11, 40, generator=generator).to(device)
    weight = table[:, 5:29]  # rows of 24 with a row stride of 40: read without a copy
    indices = torch.randint(0, 11, (3, 7), generator=generator).to(device)
    dy = torch.randn(3, 7, 24, generator=generator).to(device)
    check(indices, weight, dy)
    leaf = weight.detach().requires_grad_()
    liger_core.call("embedding", indices, leaf, impl="triton").sum().backward()  # a gradient with zero strides
    want = truth(indices, weight, torch.ones(3, 7, 24, device=device))[1]
    assert_close("dw", leaf.grad, want, torch.float32)


def test_scalar_and_empty_indices(kernel_module, device):
    _, weight, _ = make((1,), 6, 8, torch.float32, device)
    leaf = weight.detach().requires_grad_()
    y = liger_core.call("embedding", torch.tensor(4, device=device), leaf, impl="triton")
    assert torch.equal(y, weight[4])
    y.backward(torch.ones(8, device=device))
    assert torch.equal(leaf.grad[4], torch.ones(8, device=device)) and leaf.grad.sum() == 8
    empty = torch.empty(2, 0, dtype=torch.int64, device=device)
    y = liger_core.call("embedding", empty, leaf, impl="triton")
    assert y.shape == (2, 0, 8)
    (dw,) = kernel_module.backward(kernel_module.forward((empty, leaf), {"padding_idx": None}, True)[1], (y,))
    assert torch.equal(dw, torch.zeros_like(weight))
    assert kernel_module.backward(kernel_module.forward((empty, leaf), {"padding_idx": None}, True)[1], (None,)) == (
        None,
    )


@pytest.mark.parametrize(
    ("dtype", "deterministic_algorithms", "expected"),
    [
        (torch.float32, False, ["embedding_backward_atomic_kernel"]),
        (
            torch.bfloat16,
            False,
            ["embedding_claim_rows_kernel", "embedding_gather_sums_kernel", "embedding_write_owned_rows_kernel"],
        ),
        (torch.float32, True, ["embedding_backward_sorted_kernel"]),
        (torch.float16, True, ["embedding_backward_sorted_kernel"]),
    ],
)
def test_the_backward_path_follows_the_weight_dtype_and_the_determinism_flag(
    kernel_module, request, monkeypatch, device, dtype, deterministic_algorithms, expected
):
    if deterministic_algorithms:
        request.getfixturevalue("deterministic")
    launched = []

    def spy(kernel):
        launched.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return kernel

    monkeypatch.setattr(kernel_module, "_launch", spy)
    indices, weight, dy = make((9,), 5, 8, dtype, device, seed=7)
    check(indices, weight, dy)
    assert launched == ["embedding_forward_kernel", *expected]


def test_supports_names_what_it_cannot_serve(kernel_module):
    indices = torch.empty(4, dtype=torch.int64, device="meta")
    assert kernel_module.supports((indices, torch.empty(5, 3, device="meta")), {"padding_idx": None}) == []
    weight64 = torch.empty(5, 3, dtype=torch.float64, device="meta")
    assert any("float64" in r for r in kernel_module.supports((indices, weight64), {"padding_idx": None}))
