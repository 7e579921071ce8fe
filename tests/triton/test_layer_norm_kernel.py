"""The Triton layer_norm's own paths, which the generic conformance test does not reach: rows too long for registers
(chunked, up to 262144), the widest rows kept in registers, several rows per program, a mean far from zero, strided
inputs and gradients, weight and bias in other dtypes, no bias, deterministic dW/dB, empty input and a missing
upstream gradient. Truth is the reference backend's forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
import triton
from liger_backends.reference.layer_norm import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import layer_norm

    return layer_norm


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make(shape, dtype, device, weight_dtype=None, bias_dtype="same", mean=0.5, seed=0):
    """x, weight, bias (None when bias_dtype is None), dy."""
    generator = torch.Generator().manual_seed(seed)
    x = (mean + 2.0 * torch.randn(shape, generator=generator)).to(device=device, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(device=device, dtype=weight_dtype or dtype)
    bias = None
    if bias_dtype is not None:
        bias_dtype = (weight_dtype or dtype) if bias_dtype == "same" else bias_dtype
        bias = (0.1 * torch.randn(shape[-1], generator=generator)).to(device=device, dtype=bias_dtype)
    dy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return x, weight, bias, dy


def truth(x, weight, bias, dy, eps):
    """y, dx, dw, db of the reference semantics in float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    (y,), _ = reference_forward(tuple(leaves), {"eps": eps}, True)
    y.backward(dy.double())
    return y, *(None if t is None else t.grad for t in leaves)


def run_triton(x, weight, bias, dy, eps=1e-6):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
    y = liger_core.call("layer_norm", *leaves, impl="triton", eps=eps)
    y.backward(dy)
    return y, *(None if t is None else t.grad for t in leaves)


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(x, weight, bias, dy, eps=1e-6):
    inputs = (x, weight, bias, dy)
    before = [None if t is None else t.clone() for t in inputs]
    got = run_triton(x, weight, bias, dy, eps)
    want = truth(x, weight, bias, dy, eps)
    params = [t for t in (weight, bias) if t is not None]
    coarsest = max([x.dtype] + [t.dtype for t in params], key=TOLERANCE.get)
    for name, g, w, source in zip(("y", "dx", "dw", "db"), got, want, (x, x, weight, bias)):
        if source is None:
            assert g is None, f"{name}: a gradient for an absent bias"
            continue
        assert g.dtype == source.dtype, f"{name}: dtype {g.dtype}, expected {source.dtype}"
        assert_close(name, g, w, coarsest)
    assert all(t is None or torch.equal(t, t0) for t, t0 in zip(inputs, before)), "an input was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_rows_too_long_for_registers_take_the_chunked_path(kernel_module, device, dtype, with_bias):
    hidden = kernel_module.MAX_FUSED_FORWARD_COLS + 1234  # not a multiple of either chunk
    assert triton.next_power_of_2(hidden) > kernel_module.MAX_FUSED_FORWARD_COLS
    assert triton.next_power_of_2(hidden) > kernel_module.MAX_FUSED_BACKWARD_COLS
    assert hidden % kernel_module.forward_chunk(hidden) and hidden % kernel_module.ROW_DOT_CHUNK
    assert hidden % kernel_module.BACKWARD_CHUNK
    x, weight, bias, dy = make((3, hidden), dtype, device, bias_dtype="same" if with_bias else None)
    check(x, weight, bias, dy)


def test_largest_hidden_size(device):
    x, weight, bias, dy = make((2, 262144), torch.bfloat16, device)
    check(x, weight, bias, dy)


def test_widest_rows_kept_in_registers(kernel_module, device):
    hidden = 16000  # the widest block of both fused kernels, its end masked off
    block = triton.next_power_of_2(hidden)
    assert block == kernel_module.MAX_FUSED_FORWARD_COLS == kernel_module.MAX_FUSED_BACKWARD_COLS
    x, weight, bias, dy = make((4, hidden), torch.float16, device)
    check(x, weight, bias, dy)


@pytest.mark.parametrize("hidden", [37, 1000, 20000])
def test_a_mean_far_from_zero_does_not_cancel(device, hidden):
    # Both variance computations (two passes in registers, shifted sums over chunks) against x = 100 + 2·randn.
    x, weight, bias, dy = make((3, hidden), torch.float32, device, mean=100.0)
    check(x, weight, bias, dy)


@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_rows_share_programs(kernel_module, device, hidden, dtype):
    block_cols = triton.next_power_of_2(hidden)
    assert kernel_module.forward_tile(block_cols, 1 << 20)[0] > 1
    rows_per_tile, _, programs_per_sm = kernel_module.backward_tile(block_cols, 1 << 20)
    assert rows_per_tile > 1
    programs = kernel_module.sm_count(torch.device(device)) * programs_per_sm
    # Enough rows that each backward program walks several tiles, the last one partly filled.
    n_rows = 3 * rows_per_tile * programs + 5
    rows_per_program, _ = kernel_module.partition_rows(n_rows, rows_per_tile, programs)
    assert rows_per_program > rows_per_tile
    x, weight, bias, dy = make((n_rows, hidden), dtype, device)
    check(x, weight, bias, dy)


def test_strided_inputs_and_gradients(device):
    generator = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 6, 50, generator=generator).to(device)
    sliced = wide[:, :, 3:40]  # rows of 37 with a row stride of 50: served without a copy
    transposed = torch.randn(37, 6, 4, generator=generator).to(device).permute(2, 1, 0)  # needs a copy
    weight = (1 + 0.1 * torch.randn(74, generator=generator)).to(device)[::2]  # a strided weight
    bias = 0.1 * torch.randn(37, generator=generator).to(device)
    for x in (sliced, transposed):
        check(x, weight, bias, torch.randn(4, 6, 37, generator=generator).to(device))
    check(sliced, weight, bias, torch.randn(4, 6, 64, generator=generator).to(device)[..., 5:42])
    # y.sum() hands back a broadcast gradient: every stride zero.
    leaves = [t.detach().requires_grad_() for t in (sliced, weight, bias)]
    liger_core.call("layer_norm", *leaves, impl="triton").sum().backward()
    want = truth(sliced, weight, bias, torch.ones(4, 6, 37, device=device), 1e-6)
    for name, leaf, w in zip(("dx", "dw", "db"), leaves, want[1:]):
        assert_close(name, leaf.grad, w, torch.float32)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype", "bias_dtype"),
    [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16, None),
    ],
)
@pytest.mark.parametrize("hidden", [37, 17000])
def test_weight_and_bias_in_other_dtypes(device, dtype, weight_dtype, bias_dtype, hidden):
    x, weight, bias, dy = make((3, hidden), dtype, device, weight_dtype=weight_dtype, bias_dtype=bias_dtype)
    check(x, weight, bias, dy)


def test_parameter_gradients_are_deterministic_and_empty_input_works(device):
    x, weight, bias, dy = make((700, 96), torch.bfloat16, device)
    first, second = run_triton(x, weight, bias, dy), run_triton(x, weight, bias, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    y, dx, dw, db = run_triton(x[:0], weight, bias, dy[:0])
    assert y.shape == (0, 96) and dx.shape == (0, 96)
    assert torch.equal(dw, torch.zeros_like(weight)) and torch.equal(db, torch.zeros_like(bias))


def test_missing_upstream_gradient_gives_no_gradients(kernel_module, device):
    x, weight, bias, _ = make((4, 64), torch.float32, device)
    for b in (bias, None):
        (y,), saved = kernel_module.forward((x, weight, b), {"eps": 1e-6}, True)
        assert y.shape == x.shape
        assert kernel_module.backward(saved, (None,)) == (None, None, None)


def test_supports_names_what_it_cannot_serve(kernel_module):
    x = torch.empty(2, 8, device="meta")
    w64 = torch.empty(8, dtype=torch.float64, device="meta")
    reasons = kernel_module.supports((x, w64, w64), {"eps": 1e-6})
    assert len(reasons) == 2 and all("float64" in r for r in reasons)
    too_wide = torch.empty(2, kernel_module.MAX_COLS + 1, device="meta")
    wide_w = torch.empty(kernel_module.MAX_COLS + 1, device="meta")
    assert any("limit" in r for r in kernel_module.supports((too_wide, wide_w, None), {"eps": 1e-6}))
    assert kernel_module.supports((x, torch.empty(8, device="meta"), None), {"eps": 1e-6}) == []


@pytest.mark.parametrize("hidden", [37, 16384 + 1234])  # the fused and the chunked backward
@pytest.mark.parametrize("trainable", [(), ("bias",), ("weight",)])
def test_frozen_parameters_get_no_gradient_and_dx_is_unchanged(kernel_module, device, hidden, trainable):
    # LoRA fine-tuning freezes the norms' parameters: dx must be exactly what it is with trainable ones, the frozen
    # ones get no gradient, and a trainable one still gets its own.
    x, weight, bias, dy = make((5, hidden), torch.float32, device, seed=4)
    _, dx_all, dw_all, db_all = run_triton(x, weight, bias, dy)
    leaves = {"weight": weight.detach(), "bias": bias.detach()}
    for name in trainable:
        leaves[name].requires_grad_()
    x_leaf = x.detach().requires_grad_()
    liger_core.call("layer_norm", x_leaf, leaves["weight"], leaves["bias"], impl="triton").backward(dy)
    torch.testing.assert_close(x_leaf.grad, dx_all, rtol=0, atol=0)
    for name, full in (("weight", dw_all), ("bias", db_all)):
        if name in trainable:
            torch.testing.assert_close(leaves[name].grad, full, rtol=0, atol=0)
        else:
            assert leaves[name].grad is None
