"""The Triton rms_norm's own paths, which the generic conformance test does not reach: rows too long for registers
(chunked), several rows per program, strided inputs, a weight in another dtype, no weight, and a missing upstream
gradient. Truth is the reference backend's forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
import triton
from liger_backends.reference.rms_norm import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import rms_norm

    return rms_norm


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make(shape, dtype, device, weight_dtype=None, with_weight=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    weight = None
    if with_weight:
        weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(device=device, dtype=weight_dtype or dtype)
    dy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return x, weight, dy


def truth(x, weight, dy, **attrs):
    """y, dx, dw of the reference semantics in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    (y,), _ = reference_forward((x64, w64), {"in_place": True, **attrs}, True)
    y.backward(dy.double())
    return y, x64.grad, None if weight is None else w64.grad


def run_triton(x, weight, dy, **attrs):
    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    y = liger_core.call("rms_norm", x, weight, impl="triton", **attrs)
    y.backward(dy)
    return y, x.grad, None if weight is None else weight.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(x, weight, dy, **attrs):
    got = run_triton(x, weight, dy, **attrs)
    want = truth(x, weight, dy, **attrs)
    # "llama" rounds offset + weight to the weight's dtype, so a coarser weight sets the tolerance.
    coarsest = x.dtype if weight is None else max(x.dtype, weight.dtype, key=TOLERANCE.get)
    assert got[0].dtype == x.dtype
    assert_close("y", got[0], want[0], coarsest)
    assert got[1].dtype == x.dtype
    assert_close("dx", got[1], want[1], coarsest)
    if weight is None:
        assert got[2] is None
    else:
        assert got[2].dtype == weight.dtype
        # dw is a sum over rows in fp32, rounded once to the weight's dtype.
        assert_close("dw", got[2], want[2], coarsest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("casting_mode", "offset"), [("llama", 0.0), ("gemma", 1.0), ("none", 0.5)])
def test_rows_too_long_for_registers_take_the_chunked_path(kernel_module, device, dtype, casting_mode, offset):
    hidden = kernel_module.MAX_FUSED_FORWARD_COLS + 1234  # not a multiple of either chunk
    assert triton.next_power_of_2(hidden) > kernel_module.MAX_FUSED_FORWARD_COLS
    assert triton.next_power_of_2(hidden) > kernel_module.MAX_FUSED_BACKWARD_COLS
    assert hidden % kernel_module.forward_chunk(hidden) and hidden % kernel_module.ROW_DOT_CHUNK
    assert hidden % kernel_module.BACKWARD_CHUNK
    x, weight, dy = make((3, hidden), dtype, device)
    check(x, weight, dy, eps=1e-6, offset=offset, casting_mode=casting_mode)


def test_largest_hidden_size(kernel_module, device):
    x, weight, dy = make((2, 262144), torch.bfloat16, device)
    check(x, weight, dy, eps=1e-6, offset=0.0, casting_mode="llama")


def test_widest_rows_kept_in_registers(kernel_module, device):
    hidden = 16000  # the widest block of both fused kernels, its end masked off
    block = triton.next_power_of_2(hidden)
    assert block == kernel_module.MAX_FUSED_FORWARD_COLS == kernel_module.MAX_FUSED_BACKWARD_COLS
    x, weight, dy = make((4, hidden), torch.float16, device)
    check(x, weight, dy, eps=1e-5, offset=0.0, casting_mode="llama")


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
    x, weight, dy = make((n_rows, hidden), dtype, device)
    check(x, weight, dy, eps=1e-6, offset=0.0, casting_mode="llama")


def test_strided_inputs_and_gradients_are_read_correctly_and_left_alone(device):
    generator = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 6, 50, generator=generator).to(device)
    sliced = wide[:, :, 3:40]  # rows of 37 with a row stride of 50: served without a copy
    transposed = torch.randn(37, 6, 4, generator=generator).to(device).permute(2, 1, 0)  # needs a copy
    weight = (1 + 0.1 * torch.randn(37, generator=generator)).to(device)
    for x in (sliced, transposed):
        x_before, w_before = x.clone(), weight.clone()
        dy = torch.randn(4, 6, 37, generator=generator).to(device)
        dy_before = dy.clone()
        check(x, weight, dy, eps=1e-6, offset=0.0, casting_mode="llama", in_place=True)
        assert torch.equal(x, x_before) and torch.equal(weight, w_before) and torch.equal(dy, dy_before)
    # y.sum() hands back a broadcast gradient: every stride zero.
    x = sliced.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    liger_core.call("rms_norm", x, w, impl="triton").sum().backward()
    want = truth(sliced, weight, torch.ones(4, 6, 37, device=device), eps=1e-6, offset=0.0, casting_mode="llama")
    assert_close("dx", x.grad, want[1], torch.float32)
    assert_close("dw", w.grad, want[2], torch.float32)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
)
@pytest.mark.parametrize(("casting_mode", "offset"), [("llama", 1.0), ("gemma", 1.0), ("none", 0.0)])
def test_weight_in_another_dtype(device, dtype, weight_dtype, casting_mode, offset):
    x, weight, dy = make((3, 5, 37), dtype, device, weight_dtype=weight_dtype)
    check(x, weight, dy, eps=1e-6, offset=offset, casting_mode=casting_mode)


@pytest.mark.parametrize("casting_mode", ["llama", "gemma", "none"])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 20000)])
def test_no_weight(device, casting_mode, shape):
    x, _, dy = make(shape, torch.bfloat16, device, with_weight=False)
    check(x, None, dy, eps=1e-6, offset=1.0, casting_mode=casting_mode)  # the offset applies to the weight only


def test_missing_upstream_gradient_gives_no_gradients(kernel_module, device):
    x, weight, _ = make((4, 64), torch.float32, device)
    attrs = {"eps": 1e-6, "offset": 0.0, "casting_mode": "llama", "in_place": True}
    for w in (weight, None):
        (y,), saved = kernel_module.forward((x, w), attrs, True)
        assert y.shape == x.shape
        assert kernel_module.backward(saved, (None,)) == (None, None)


def test_weight_gradient_is_deterministic_and_empty_input_works(device):
    x, weight, dy = make((700, 96), torch.bfloat16, device)
    first, second = run_triton(x, weight, dy), run_triton(x, weight, dy)
    assert torch.equal(first[2], second[2])
    assert torch.equal(first[1], second[1])
    y, dx, dw = run_triton(x[:0], weight, dy[:0], eps=1e-6)
    assert y.shape == (0, 96) and dx.shape == (0, 96)
    assert torch.equal(dw, torch.zeros_like(weight))


def test_supports_names_what_it_cannot_serve(kernel_module):
    x = torch.empty(2, 8, dtype=torch.float64, device="meta")
    reasons = kernel_module.supports((x, None), {"casting_mode": "llama"})
    assert any("float64" in r for r in reasons)
    too_wide = torch.empty(2, kernel_module.MAX_COLS + 1, device="meta")
    assert any("limit" in r for r in kernel_module.supports((too_wide, None), {"casting_mode": "llama"}))
    assert kernel_module.supports((torch.empty(2, 8, device="meta"), None), {"casting_mode": "gemma"}) == []


@pytest.mark.parametrize("hidden", [37, 16384 + 1234])  # the fused and the chunked backward
def test_frozen_weight_gets_no_gradient_and_dx_is_unchanged(kernel_module, device, hidden):
    # LoRA fine-tuning freezes the norms' weights: dx must be exactly what it is with a trainable weight, and the
    # kernel computes no dW for it (autograd would discard one anyway).
    x, weight, dy = make((5, hidden), torch.float32, device, seed=3)
    _, dx_trainable, dw = run_triton(x, weight, dy, offset=0.5)
    assert dw is not None
    frozen = weight.detach()  # requires_grad False
    x_leaf = x.detach().requires_grad_()
    liger_core.call("rms_norm", x_leaf, frozen, impl="triton", offset=0.5).backward(dy)
    assert frozen.grad is None
    torch.testing.assert_close(x_leaf.grad, dx_trainable, rtol=0, atol=0)
    want = truth(x, weight, dy, eps=1e-6, offset=0.5, casting_mode="llama")
    assert_close("dx", x_leaf.grad, want[1], torch.float32)


def test_strided_trainable_weight_gets_its_gradient(device):
    # The kernel takes a contiguous copy of a strided weight; whether a dW is wanted is asked of the caller's weight.
    x, weight, dy = make((5, 37), torch.float32, device, seed=5)
    strided = torch.stack([weight, torch.zeros_like(weight)], dim=1).reshape(-1)[::2].detach().requires_grad_()
    assert strided.stride(0) == 2
    got = run_triton(x, strided, dy)
    want = truth(x, weight, dy, eps=1e-6, offset=0.0, casting_mode="llama")
    assert_close("dw", got[2], want[2], torch.float32)
