"""liger_rotary_pos_emb and liger_rope against Hugging Face's rotate_half RoPE written out here."""

import inspect

import pytest
import torch

import liger_core
from liger_core.testing import check_conformance
from liger_kernel.transformers import liger_rotary_pos_emb
from liger_kernel.transformers.functional import liger_rope
from liger_kernel.transformers.rope import liger_rotary_pos_emb as rope_module_function

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# -- the formula -------------------------------------------------------------------------------------------------


def rotate_half(x):
    """Hugging Face's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face's apply_rotary_pos_emb with partial rotary (GLM): cos/sin are as wide as the rotated part.
    In fp32, cast back to the input dtype."""
    cos = cos.float().unsqueeze(unsqueeze_dim)
    sin = sin.float().unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def apply(x):
        x_rot, x_pass = x.float()[..., :rotary_dim], x.float()[..., rotary_dim:]
        out = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat([out, x_pass], dim=-1).to(x.dtype)

    return apply(q), apply(k)


# -- helpers -----------------------------------------------------------------------------------------------------


def random(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def rotary_tables(batch, seq, width, dtype, seed=0):
    """cos/sin (batch, T, width) of real rotary angles, with a random start position per sequence."""
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, width, 2, dtype=torch.float64) / width))
    starts = torch.randint(0, 100, (batch, 1), generator=generator)
    angles = (torch.arange(seq, dtype=torch.float64) + starts)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_forward_backward(ours, q, k, cos, sin, dtype, unsqueeze_dim=1):
    """Compare ours(q, k, cos, sin) with hf_rope on separate leaves: outputs and the gradients of q and k.
    q and k may be strided views; the leaves are views of the same kind."""
    q_ours, k_ours = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_before, k_before = q.detach().clone(), k.detach().clone()
    q_out, k_out = ours(q_ours, k_ours, cos, sin)
    q_exp, k_exp = hf_rope(q_ref, k_ref, cos, sin, unsqueeze_dim)
    for name, got, want in (("q_out", q_out, q_exp), ("k_out", k_out, k_exp)):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name)
    dq, dk = random(q.shape, dtype, seed=91), random(k.shape, dtype, seed=92)
    grads_ours = torch.autograd.grad([q_out, k_out], [q_ours, k_ours], [dq, dk])
    grads_ref = torch.autograd.grad([q_exp, k_exp], [q_ref, k_ref], [dq, dk])
    for name, got, want in zip(["dq", "dk"], grads_ours, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name)
    # never modifies the caller's tensors
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


# -- forward and backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq, head_dim",
    [(2, 4, 4, 5, 8), (3, 6, 2, 7, 16), (1, 5, 1, 13, 34)],  # MHA, GQA, MQA with odd T and D/2
)
@pytest.mark.parametrize("cos_batch", ["B", "1"])
def test_matches_hugging_face_formula(dtype, batch, q_heads, kv_heads, seq, head_dim, cos_batch):
    q = random((batch, q_heads, seq, head_dim), dtype, seed=1)
    k = random((batch, kv_heads, seq, head_dim), dtype, seed=2)
    cos, sin = rotary_tables(batch if cos_batch == "B" else 1, seq, head_dim, dtype)
    check_forward_backward(liger_rotary_pos_emb, q, k, cos, sin, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [2, 8, 12, 16])
def test_partial_rotary_dim(dtype, rotary_dim):
    q = random((2, 6, 7, 16), dtype, seed=3)
    k = random((2, 2, 7, 16), dtype, seed=4)
    cos, sin = rotary_tables(2, 7, rotary_dim, dtype)
    check_forward_backward(
        lambda q, k, c, s: liger_rotary_pos_emb(q, k, c, s, rotary_dim=rotary_dim), q, k, cos, sin, dtype
    )
    if rotary_dim < 16:  # the features past rotary_dim pass through unchanged, and so do their gradients
        q_out, _ = liger_rotary_pos_emb(q, k, cos, sin, rotary_dim=rotary_dim)
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [None, 10])
def test_transposed_views_from_hugging_face_attention(dtype, rotary_dim):
    # HF builds q as proj(x).view(B, T, H, D).transpose(1, 2): (B, H, T, D) logically, (B, T, H, D) in memory.
    batch, seq, head_dim = 2, 9, 14
    q = random((batch, seq, 6, head_dim), dtype, seed=5).transpose(1, 2)
    k = random((batch, seq, 3, head_dim), dtype, seed=6).transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = rotary_tables(batch, seq, rotary_dim or head_dim, dtype)
    check_forward_backward(
        lambda q, k, c, s: liger_rotary_pos_emb(q, k, c, s, rotary_dim=rotary_dim), q, k, cos, sin, dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_unsqueeze_dim_2_takes_b_t_h_d(dtype):
    q = random((2, 7, 6, 16), dtype, seed=7)
    k = random((2, 7, 2, 16), dtype, seed=8)
    cos, sin = rotary_tables(2, 7, 16, dtype)
    check_forward_backward(
        lambda q, k, c, s: liger_rope(q, k, c, s, unsqueeze_dim=2), q, k, cos, sin, dtype, unsqueeze_dim=2
    )


def test_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = random((2, 6, 7, 16), torch.float32, seed=9), random((2, 2, 7, 16), torch.float32, seed=10)
    cos, sin = rotary_tables(2, 7, 16, torch.float32)
    for got, want in zip(liger_rotary_pos_emb(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def test_no_gradient_to_cos_and_sin_and_position_ids_ignored():
    q = random((2, 4, 5, 8), torch.float32, seed=11).requires_grad_()
    k = random((2, 4, 5, 8), torch.float32, seed=12).requires_grad_()
    cos, sin = rotary_tables(2, 5, 8, torch.float32)
    cos.requires_grad_()
    sin.requires_grad_()
    position_ids = torch.arange(5).expand(2, 5)
    q_out, k_out = liger_rotary_pos_emb(q, k, cos, sin, position_ids)
    q_plain, _ = liger_rope(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_plain)
    grads = torch.autograd.grad((q_out.sum() + k_out.sum()), [q, k, cos, sin], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    assert grads[2] is None and grads[3] is None


def test_inference_mode_and_fp16():
    q, k = random((1, 2, 3, 8), torch.float16, seed=13), random((1, 2, 3, 8), torch.float16, seed=14)
    cos, sin = rotary_tables(1, 3, 8, torch.float16)
    with torch.inference_mode():
        q_out, k_out = liger_rotary_pos_emb(q, k, cos, sin)
    q_exp, k_exp = hf_rope(q, k, cos, sin)
    assert q_out.dtype == torch.float16
    torch.testing.assert_close(q_out, q_exp, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(k_out, k_exp, atol=2e-3, rtol=2e-3)


def test_fp32_tables_with_bf16_heads():
    # cos/sin kept in fp32 while q and k are bf16: the outputs keep q's dtype.
    q, k = random((2, 3, 5, 8), torch.bfloat16, seed=19), random((2, 1, 5, 8), torch.bfloat16, seed=20)
    cos, sin = rotary_tables(2, 5, 8, torch.float32)
    check_forward_backward(liger_rotary_pos_emb, q, k, cos, sin, torch.bfloat16)


def test_signatures_match_liger_kernel_0_8():
    expected = [
        ("q", inspect.Parameter.empty),
        ("k", inspect.Parameter.empty),
        ("cos", inspect.Parameter.empty),
        ("sin", inspect.Parameter.empty),
        ("position_ids", None),
        ("unsqueeze_dim", 1),
        ("rotary_dim", None),
    ]
    for fn in (liger_rotary_pos_emb, liger_rope):
        assert [(p.name, p.default) for p in inspect.signature(fn).parameters.values()] == expected
    assert rope_module_function is liger_rotary_pos_emb


# -- backends ----------------------------------------------------------------------------------------------------


def test_forcing_the_reference_backend(monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch, "run_kernel", lambda spec, backend, *a: chosen.append(backend) or original(spec, backend, *a)
    )
    q, k = random((1, 2, 3, 8), torch.float32, seed=15), random((1, 2, 3, 8), torch.float32, seed=16)
    cos, sin = rotary_tables(1, 3, 8, torch.float32)
    with liger_core.use_backend("reference", op="rope"):
        liger_rotary_pos_emb(q, k, cos, sin)
    monkeypatch.setenv("LIGER_KERNEL_IMPL_ROPE", "torch")
    liger_rope(q, k, cos, sin)
    assert chosen == ["reference", "reference"]
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_ROPE", "cuda")
    with pytest.raises(liger_core.BackendUnavailableError, match=r"rope\(q=\(1, 2, 3, 8\)"):
        liger_rope(q, k, cos, sin)


@pytest.mark.parametrize("case", liger_core.registry.get_registry().operator("rope").cases)
def test_operator_spec_conforms_on_the_reference_backend(case):
    for dtype in (torch.float32, torch.bfloat16):
        result = check_conformance("rope", "reference", dtype, attrs=case)
        assert result.passed, result.report()


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="'q' must be 4-D"):
        liger_rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="'k'.*sequence length"):
        liger_rope(q, torch.randn(2, 2, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="'k'.*head size"):
        liger_rope(q, torch.randn(2, 2, 5, 10), cos, sin)
    with pytest.raises(ValueError, match="'k'.*batch"):
        liger_rope(q, torch.randn(3, 2, 5, 8), cos, sin)
    with pytest.raises(TypeError, match="'k' must have q's dtype"):
        liger_rope(q, k.to(torch.bfloat16), cos, sin)
    with pytest.raises(TypeError, match="'q'.*floating-point"):
        liger_rope(q.to(torch.int64), k, cos, sin)
    with pytest.raises(ValueError, match=r"'cos' must have shape \(1 or 2, 5, 8\)"):
        liger_rope(q, k, torch.randn(3, 5, 8), sin)
    with pytest.raises(ValueError, match=r"'cos'.*rotary_dim=6"):
        liger_rope(q, k, torch.randn(2, 5, 6), torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"'cos' must have shape"):
        liger_rope(q, k, torch.randn(5, 8), sin)  # 2-D tables would broadcast wrongly
    with pytest.raises(ValueError, match=r"'sin' must have shape"):
        liger_rope(q, k, cos, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="'sin' must have cos's shape"):
        liger_rope(q, k, cos, torch.randn(1, 5, 8))
    for bad in (0, 3, 10, -2):
        with pytest.raises(ValueError, match="'rotary_dim'"):
            liger_rope(q, k, cos, sin, rotary_dim=bad)
    with pytest.raises(ValueError, match="'cos'.*rotary_dim"):
        liger_rope(q, k, cos, sin, rotary_dim=4)  # tables as wide as D while only 4 features rotate
    with pytest.raises(ValueError, match="head size.*even"):
        liger_rope(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7), torch.randn(1, 2, 7), torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="'unsqueeze_dim'"):
        liger_rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(TypeError, match="'rotary_dim' must be int"):
        liger_rope(q, k, cos, sin, rotary_dim=4.0)
    with pytest.raises(TypeError, match="'cos' must be a tensor"):
        liger_rope(q, k, None, sin)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_compile_fullgraph_matches_eager(rotary_dim):
    torch._dynamo.reset()

    def fn(q, k, cos, sin):
        return liger_rotary_pos_emb(q, k, cos, sin, rotary_dim=rotary_dim)

    compiled = torch.compile(fn, fullgraph=True)
    q = random((2, 7, 6, 12), torch.float32, seed=17).transpose(1, 2)
    k = random((2, 7, 2, 12), torch.float32, seed=18).transpose(1, 2)
    cos, sin = rotary_tables(1, 7, rotary_dim or 12, torch.float32)
    results = []
    for f in (fn, compiled):
        q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = f(q_leaf, k_leaf, cos, sin)
        grads = torch.autograd.grad([q_out, k_out], [q_leaf, k_leaf], [torch.ones_like(q_out), k_out.detach()])
        results.append((q_out, k_out, *grads))
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager)
