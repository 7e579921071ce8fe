"""The Triton rope's own paths, beyond the generic conformance cases: Hugging Face's transposed views (read in place,
outputs and gradients in the inputs' layouts), GQA with head counts that leave head blocks partly masked, partial
rotary widths, cos/sin shared over the batch, unsqueeze_dim=2, cos/sin whose halves differ (the backward must be the
exact transpose), a missing upstream gradient, non-dense inputs and broadcast gradients. Truth is the reference
backend's forward run in float64 and differentiated by autograd."""

import os

import pytest
import torch
from liger_backends.reference.rope import forward as reference_forward

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

# Largest error allowed, relative to the largest magnitude of the true value: a few roundings in the dtype.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import rope

    return rope


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def heads(batch, count, seq, dim, dtype, device, generator, unsqueeze_dim=1, transposed=False):
    """q or k in the layout unsqueeze_dim names; transposed=True: dimensions 1 and 2 swapped in memory."""
    shape = [batch, count, seq, dim] if unsqueeze_dim == 1 else [batch, seq, count, dim]
    if transposed:
        shape[1], shape[2] = shape[2], shape[1]
    t = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return t.transpose(1, 2) if transposed else t


def tables(batch, seq, width, dtype, device, generator, equal_halves=True):
    """cos/sin (batch, seq, width): real rotary angles, or unrelated random values in each half."""
    if equal_halves:
        angles = torch.rand(batch, seq, width // 2, generator=generator, dtype=torch.float64) * 6.3
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    cos = torch.randn(batch, seq, width, generator=generator, dtype=torch.float64)
    sin = torch.randn(batch, seq, width, generator=generator, dtype=torch.float64)
    return cos.to(device, dtype), sin.to(device, dtype)


def truth(q, k, cos, sin, dq, dk, **attrs):
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    attrs = {"rotary_dim": None, "unsqueeze_dim": 1, **attrs}
    (q_out, k_out), _ = reference_forward((q64, k64, cos.double(), sin.double()), attrs, True)
    torch.autograd.backward((q_out, k_out), (dq.double(), dk.double()))
    return q_out, k_out, q64.grad, k64.grad


def run_triton(q, k, cos, sin, dq, dk, **attrs):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_out, k_out = liger_core.call("rope", q, k, cos, sin, impl="triton", **attrs)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out, k_out, q.grad, k.grad


def assert_close(name, got, want, dtype):
    assert got is not None, f"{name}: no value"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: error {error:.3g} over {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def check(q, k, cos, sin, seed=1, **attrs):
    generator = torch.Generator().manual_seed(seed)
    dq = torch.randn(q.shape, generator=generator).to(q.device, q.dtype)
    dk = torch.randn(k.shape, generator=generator).to(k.device, k.dtype)
    before = [t.clone() for t in (q, k, cos, sin)]
    got = run_triton(q, k, cos, sin, dq, dk, **attrs)
    want = truth(q, k, cos, sin, dq, dk, **attrs)
    for name, g, w in zip(("q_out", "k_out", "dq", "dk"), got, want):
        assert_close(name, g, w, q.dtype)
    assert all(torch.equal(t, b) for t, b in zip((q, k, cos, sin), before)), "an input was written"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_transposed_views_are_read_in_place_and_keep_their_layout(device, dtype, unsqueeze_dim):
    generator = torch.Generator().manual_seed(0)
    q = heads(2, 4, 5, 16, dtype, device, generator, unsqueeze_dim, transposed=True)
    k = heads(2, 2, 5, 16, dtype, device, generator, unsqueeze_dim, transposed=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(2, 5, 16, dtype, device, generator)
    q_out, k_out, dq, dk = check(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    # A dense input's layout is kept: the transposed-view output and gradients are (B, T, H, D) memory, as q is.
    for t in (q_out, dq):
        assert t.stride() == q.stride()
    for t in (k_out, dk):
        assert t.stride() == k.stride()


@pytest.mark.parametrize(("q_heads", "k_heads"), [(12, 3), (7, 1), (3, 5)])
def test_gqa_head_counts_with_partly_masked_head_blocks(kernel_module, device, q_heads, k_heads):
    generator = torch.Generator().manual_seed(2)
    q = heads(2, q_heads, 3, 8, torch.float32, device, generator)
    k = heads(2, k_heads, 3, 8, torch.float32, device, generator)
    cos, sin = tables(2, 3, 8, torch.float32, device, generator)
    _, block_h, _, _ = kernel_module.rope_tile(6, q_heads, k_heads, 8, 8)
    # (12, 3) and (3, 5): some head block is partly masked; (7, 1): one head per block, q's seven blocks before k's.
    assert q_heads % block_h or k_heads % block_h or block_h == 1
    check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(16, 6), (20, 20), (24, 16), (10, 2)])
def test_partial_rotary_passes_the_rest_through(device, dtype, head_dim, rotary_dim):
    generator = torch.Generator().manual_seed(3)
    q = heads(2, 3, 4, head_dim, dtype, device, generator, transposed=True)
    k = heads(2, 1, 4, head_dim, dtype, device, generator, transposed=True)
    cos, sin = tables(2, 4, rotary_dim, dtype, device, generator)
    q_out, k_out, dq, _ = check(q, k, cos, sin, rotary_dim=rotary_dim)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])  # bit for bit


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_cos_and_sin_shared_over_the_batch(device, unsqueeze_dim):
    generator = torch.Generator().manual_seed(4)
    q = heads(3, 4, 6, 16, torch.bfloat16, device, generator, unsqueeze_dim)
    k = heads(3, 2, 6, 16, torch.bfloat16, device, generator, unsqueeze_dim)
    cos, sin = tables(1, 6, 16, torch.bfloat16, device, generator)
    check(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def test_unequal_halves_of_cos_and_sin_are_differentiated_exactly(device):
    """Real rotary tables repeat their halves, so "sin negated" would do; the kernel's backward is the exact
    transpose, which this checks with unrelated halves."""
    generator = torch.Generator().manual_seed(5)
    q = heads(2, 3, 5, 12, torch.float32, device, generator)
    k = heads(2, 3, 5, 12, torch.float32, device, generator)
    cos, sin = tables(2, 5, 8, torch.float32, device, generator, equal_halves=False)
    check(q, k, cos, sin, rotary_dim=8)


def test_tables_in_another_dtype_and_strided(device):
    generator = torch.Generator().manual_seed(6)
    q = heads(2, 4, 5, 16, torch.bfloat16, device, generator, transposed=True)
    k = heads(2, 2, 5, 16, torch.bfloat16, device, generator, transposed=True)
    cos, sin = tables(2, 5, 32, torch.float32, device, generator)
    check(q, k, cos[..., :16], sin[..., :16])  # fp32 tables, not contiguous


@pytest.mark.parametrize("rows", [1, 7, 2048, 8192])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(128, 128), (128, 8), (128, 12), (128, 32), (96, 64), (80, 32)])
@pytest.mark.parametrize(("q_heads", "k_heads"), [(32, 8), (40, 40), (12, 3)])
def test_tile_is_made_of_powers_of_two(kernel_module, rows, head_dim, rotary_dim, q_heads, k_heads):
    """Triton compiles only power-of-two blocks and warp counts. A partial rotation makes the head's elements no
    power of two (8 rotated + 128 passed through): the tile's quotients must still round to one (they gave 3 tokens
    and 6 warps at 8192 rows, which the interpreter runs but a GPU refuses to compile)."""
    block_t, block_h, _, num_warps = kernel_module.rope_tile(rows, q_heads, k_heads, head_dim, rotary_dim)
    for value in (block_t, block_h, num_warps):
        assert value >= 1 and value & (value - 1) == 0, (block_t, block_h, num_warps)
    assert num_warps in (4, 8)


def test_partial_rotary_with_many_tokens_per_program(kernel_module, device):
    """8 of 128 dimensions rotated (136 elements a head in the tile) over 301 tokens: several tokens per program, the
    last block partial, the tile's quotients rounded to powers of two."""
    generator = torch.Generator().manual_seed(12)
    block_t = kernel_module.rope_tile(2 * 301, 2, 1, 128, 8)[0]
    assert 1 < block_t < 2 * 301 and (2 * 301) % block_t
    q = heads(2, 2, 301, 128, torch.float32, device, generator)
    k = heads(2, 1, 301, 128, torch.float32, device, generator)
    q_out, _, _, _ = check(q, k, *tables(2, 301, 8, torch.float32, device, generator), rotary_dim=8)
    assert torch.equal(q_out[..., 8:], q[..., 8:])


def test_many_tokens_per_program_and_a_long_head(kernel_module, device):
    generator = torch.Generator().manual_seed(7)
    block_t = kernel_module.rope_tile(2 * 301, 2, 1, 8, 8)[0]
    assert 1 < block_t < 2 * 301 and (2 * 301) % block_t  # several tokens per program, the last block partial
    q, k = heads(2, 2, 301, 8, torch.float32, device, generator), heads(2, 1, 301, 8, torch.float32, device, generator)
    check(q, k, *tables(2, 301, 8, torch.float32, device, generator))
    q, k = (
        heads(1, 2, 3, 256, torch.bfloat16, device, generator),
        heads(1, 1, 3, 256, torch.bfloat16, device, generator),
    )
    check(q, k, *tables(1, 3, 256, torch.bfloat16, device, generator))


def test_one_output_unused_and_one_input_frozen(device):
    generator = torch.Generator().manual_seed(8)
    q = heads(2, 4, 3, 8, torch.float32, device, generator)
    k = heads(2, 2, 3, 8, torch.float32, device, generator)
    cos, sin = tables(2, 3, 8, torch.float32, device, generator)
    dq = torch.randn(q.shape, generator=generator).to(device)
    want = truth(q, k, cos, sin, dq, torch.zeros_like(k))
    # Only q_out reaches the loss: k gets no gradient through it.
    q_leaf, k_leaf = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, _ = liger_core.call("rope", q_leaf, k_leaf, cos, sin, impl="triton")
    q_out.backward(dq)
    assert_close("dq", q_leaf.grad, want[2], torch.float32)
    assert k_leaf.grad is None
    # k frozen, q trained.
    q_leaf = q.clone().requires_grad_()
    q_out, k_out = liger_core.call("rope", q_leaf, k, cos, sin, impl="triton")
    torch.autograd.backward((q_out, k_out), (dq, torch.ones_like(k)))
    assert_close("dq", q_leaf.grad, want[2], torch.float32)


def test_non_dense_inputs_and_broadcast_gradients(device):
    generator = torch.Generator().manual_seed(9)
    # q and k as slices of one fused projection (B, T, (Hq + Hkv) · D), then viewed as (B, H, T, D).
    fused = torch.randn(2, 5, (4 + 2) * 8, generator=generator).to(device)
    q = fused[..., :32].view(2, 5, 4, 8).transpose(1, 2)
    k = fused[..., 32:].view(2, 5, 2, 8).transpose(1, 2)
    cos, sin = tables(2, 5, 8, torch.float32, device, generator)
    check(q, k, cos, sin)
    # (q_out + k_out).sum() hands back gradients whose strides are all zero.
    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = liger_core.call("rope", q_leaf, k_leaf, cos, sin, impl="triton")
    (q_out.sum() + k_out.sum()).backward()
    want = truth(q, k, cos, sin, torch.ones(q.shape, device=device), torch.ones(k.shape, device=device))
    assert_close("dq", q_leaf.grad, want[2], torch.float32)
    assert_close("dk", k_leaf.grad, want[3], torch.float32)


def test_missing_upstream_gradients_give_none(kernel_module, device):
    generator = torch.Generator().manual_seed(10)
    q = heads(1, 2, 3, 8, torch.float32, device, generator)
    k = heads(1, 2, 3, 8, torch.float32, device, generator)
    cos, sin = tables(1, 3, 8, torch.float32, device, generator)
    q.requires_grad_()
    k.requires_grad_()
    _, saved = kernel_module.forward((q, k, cos, sin), {"rotary_dim": None, "unsqueeze_dim": 1}, True)
    assert kernel_module.backward(saved, (None, None)) == (None, None)
    dq, dk = kernel_module.backward(saved, (None, torch.ones_like(k)))
    assert dq is None and dk.shape == k.shape
    dq, dk = kernel_module.backward(saved, (torch.ones_like(q), None))
    assert dq.shape == q.shape and dk is None
    # An input that did not require a gradient gets none, even with an upstream gradient.
    _, saved = kernel_module.forward((q, k.detach(), cos, sin), {"rotary_dim": None, "unsqueeze_dim": 1}, True)
    dq, dk = kernel_module.backward(saved, (torch.ones_like(q), torch.ones_like(k)))
    assert dq.shape == q.shape and dk is None


def test_supports_names_what_it_cannot_serve(kernel_module):
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    attrs = {"rotary_dim": None, "unsqueeze_dim": 1}
    q, cos = meta(1, 2, 3, 8), meta(1, 3, 8)
    assert kernel_module.supports((q, q, cos, cos), attrs) == []
    q64 = meta(1, 2, 3, 8, dtype=torch.float64)
    assert any("float64" in r for r in kernel_module.supports((q64, q64, cos, cos), attrs))
    wide = meta(1, 1, 1, 2 * kernel_module.MAX_HEAD_DIM)
    assert any("limit" in r for r in kernel_module.supports((wide, wide, cos, cos), attrs))
