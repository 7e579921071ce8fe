"""LigerRMSNorm, its Gemma variants and liger_rms_norm against RMSNorm written out here in plain PyTorch."""

import inspect

import pytest
import torch

from liger_kernel.transformers import (
    LigerRMSNorm,
    LigerRMSNormForGemma,
    LigerRMSNormForGemma2,
    LigerRMSNormForGemma3,
)
from liger_kernel.transformers.functional import liger_rms_norm

SHAPES = [(3, 7, 37), (13, 101)]
DTYPES = [torch.float32, torch.bfloat16]
# bf16 has 8 bits of mantissa: a rounding step is 2^-8 of the value.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# -- the formulas ------------------------------------------------------------------------------------------------


def llama_rms_norm(x, weight, eps):
    """Hugging Face's LlamaRMSNorm: variance in fp32, the normalised x cast back before the weight multiply."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return hidden.to(input_dtype) if weight is None else weight * hidden.to(input_dtype)


def gemma_rms_norm(x, weight, eps):
    """Hugging Face's GemmaRMSNorm: everything in fp32, ``(1 + w)``, cast back at the end."""
    hidden = x.float()
    out = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).to(x.dtype)


def plain_rms_norm(x, weight, eps, offset):
    """casting_mode "none": the input dtype throughout."""
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * (offset + weight)


# -- helpers -----------------------------------------------------------------------------------------------------


def random(shape, dtype, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + shift).to(dtype)


def assert_close(actual, expected, dtype, name):
    """Tolerance relative to the size of the expected values, so that small gradients are compared fairly."""
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_forward_backward(ours, formula, x, params, dtype):
    """Run `ours(x)` and `formula(x)` on separate leaves, compare the outputs and the gradient of every input."""
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y_ours = ours(x_ours)
    y_ref = formula(x_ref)
    assert y_ours.dtype == x.dtype and y_ours.shape == x.shape
    assert_close(y_ours, y_ref, dtype, "y")
    dy = random(x.shape, x.dtype, seed=99)
    dy_copy = dy.clone()
    grads_ours = torch.autograd.grad(y_ours, [x_ours, *params["ours"]], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params["ref"]], dy)
    for index, (g_ours, g_ref) in enumerate(zip(grads_ours, grads_ref)):
        assert g_ours.dtype == g_ref.dtype
        assert_close(g_ours, g_ref, dtype, "dx" if index == 0 else f"d(param {index})")
    # The caller still holds dy: the in-place rule forbids writing into it.
    assert torch.equal(dy, dy_copy)


# -- the modules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-6, 1e-1])
def test_llama_rms_norm_matches_hugging_face_formula(shape, dtype, eps):
    module = LigerRMSNorm(shape[-1], eps=eps).to(dtype)
    with torch.no_grad():
        module.weight.copy_(random(shape[-1:], dtype, seed=1, scale=0.3, shift=1.0))
    weight_ref = module.weight.detach().clone().requires_grad_()
    # small inputs make eps matter
    x = random(shape, dtype, seed=2, scale=0.5 if eps > 1e-3 else 2.0, shift=0.1)
    check_forward_backward(
        module,
        lambda x: llama_rms_norm(x, weight_ref, eps),
        x,
        {"ours": [module.weight], "ref": [weight_ref]},
        dtype,
    )


@pytest.mark.parametrize("cls", [LigerRMSNormForGemma, LigerRMSNormForGemma2, LigerRMSNormForGemma3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_variants_match_gemma_formula(cls, dtype):
    shape = (3, 7, 37)
    module = cls(shape[-1]).to(dtype)
    assert torch.count_nonzero(module.weight) == 0  # zeros init: (1 + w) starts as identity
    with torch.no_grad():
        module.weight.copy_(random(shape[-1:], dtype, seed=3, scale=0.3))
    weight_ref = module.weight.detach().clone().requires_grad_()
    x = random(shape, dtype, seed=4, scale=3.0)
    check_forward_backward(
        module,
        lambda x: gemma_rms_norm(x, weight_ref, 1e-6),
        x,
        {"ours": [module.weight], "ref": [weight_ref]},
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_casting_with_fp32_weight_returns_input_dtype(dtype):
    # A weight kept in fp32 (mixed precision) while x is bf16: the output keeps x's dtype, per API.md.
    module = LigerRMSNorm(101)
    with torch.no_grad():
        module.weight.copy_(random((101,), torch.float32, seed=5, scale=0.2, shift=1.0))
    weight_ref = module.weight.detach().clone().requires_grad_()
    x = random((13, 101), dtype, seed=6)
    check_forward_backward(
        module,
        lambda x: llama_rms_norm(x, weight_ref, 1e-6).to(x.dtype),
        x,
        {"ours": [module.weight], "ref": [weight_ref]},
        dtype,
    )
    assert module.weight.grad is None  # autograd.grad, not .backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_casting_mode_none_and_offset(dtype, offset):
    module = LigerRMSNorm(37, eps=1e-5, offset=offset, casting_mode="none").to(dtype)
    with torch.no_grad():
        module.weight.copy_(random((37,), dtype, seed=7, scale=0.3, shift=0.5))
    weight_ref = module.weight.detach().clone().requires_grad_()
    check_forward_backward(
        module,
        lambda x: plain_rms_norm(x, weight_ref, 1e-5, offset),
        random((3, 7, 37), dtype, seed=8),
        {"ours": [module.weight], "ref": [weight_ref]},
        dtype,
    )


@pytest.mark.parametrize("casting_mode", ["llama", "gemma", "none"])
def test_gemma_casting_with_offset_on_llama_module(casting_mode):
    # Every casting mode with offset 1.0 and a random weight, in fp32 (where the modes agree up to rounding).
    module = LigerRMSNorm(37, offset=1.0, casting_mode=casting_mode)
    with torch.no_grad():
        module.weight.copy_(random((37,), torch.float32, seed=9, scale=0.3))
    weight_ref = module.weight.detach().clone().requires_grad_()
    check_forward_backward(
        module,
        lambda x: gemma_rms_norm(x, weight_ref, 1e-6),
        random((13, 37), torch.float32, seed=10),
        {"ours": [module.weight], "ref": [weight_ref]},
        torch.float32,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_weight(dtype):
    module = LigerRMSNorm(101, elementwise_affine=False)
    assert module.weight is None and list(module.parameters()) == []
    check_forward_backward(
        module,
        lambda x: llama_rms_norm(x, None, 1e-6),
        random((13, 101), dtype, seed=11),
        {"ours": [], "ref": []},
        dtype,
    )


def test_init_fn_and_in_place_options():
    assert torch.equal(LigerRMSNorm(5).weight, torch.ones(5))
    assert torch.equal(LigerRMSNorm(5, init_fn="zeros").weight, torch.zeros(5))
    assert isinstance(LigerRMSNorm(5).weight, torch.nn.Parameter)
    x = random((4, 37), torch.float32, seed=12)
    out_of_place = LigerRMSNorm(37, in_place=False, row_mode=True)(x)
    torch.testing.assert_close(out_of_place, llama_rms_norm(x, torch.ones(37), 1e-6))


def test_constructor_signatures_match_liger_kernel_0_8():
    def defaults(cls):
        return [(p.name, p.default) for p in inspect.signature(cls).parameters.values()]

    common = [("in_place", True), ("row_mode", None), ("elementwise_affine", True), ("impl", None), ("backend", None)]
    empty = inspect.Parameter.empty
    assert defaults(LigerRMSNorm) == [
        ("hidden_size", empty),
        ("eps", 1e-6),
        ("offset", 0.0),
        ("casting_mode", "llama"),
        ("init_fn", "ones"),
        *common,
    ]
    gemma = [("eps", 1e-6), ("offset", 1.0), ("casting_mode", "gemma"), ("init_fn", "zeros")]
    assert defaults(LigerRMSNormForGemma) == [("hidden_size", empty), *gemma, *common]
    no_in_place = [("in_place", False), *common[1:]]
    assert defaults(LigerRMSNormForGemma2) == [("hidden_size", empty), *gemma, *no_in_place]
    assert defaults(LigerRMSNormForGemma3) == [("dim", empty), *gemma, *no_in_place]
    assert LigerRMSNormForGemma2(8).in_place is False and LigerRMSNormForGemma(8).in_place is True
    assert [p.name for p in inspect.signature(liger_rms_norm).parameters.values()] == [
        "X",
        "W",
        "eps",
        "offset",
        "casting_mode",
        "in_place",
    ]


def test_attributes_and_repr():
    module = LigerRMSNormForGemma3(16, eps=1e-5)
    assert module.variance_epsilon == 1e-5 and module.eps == 1e-5
    assert (module.offset, module.casting_mode, module.in_place) == (1.0, "gemma", False)
    text = repr(module)
    assert "(16,)" in text and "eps=1e-05" in text and "offset=1.0" in text and "gemma" in text
    assert "impl='reference'" in repr(LigerRMSNorm(4, impl="reference"))


def test_module_moves_with_to_and_keeps_state_dict():
    module = LigerRMSNorm(8).to(torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16
    assert list(module.state_dict()) == ["weight"]
    assert LigerRMSNorm(8, elementwise_affine=False).state_dict() == {}


# -- the functional ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "casting_mode, offset, formula",
    [
        ("llama", 0.0, lambda x, w: llama_rms_norm(x, w, 1e-6)),
        ("gemma", 1.0, lambda x, w: gemma_rms_norm(x, w, 1e-6)),
        ("none", 0.25, lambda x, w: plain_rms_norm(x, w, 1e-6, 0.25)),
    ],
)
def test_functional(dtype, casting_mode, offset, formula):
    weight = random((37,), dtype, seed=13, scale=0.3, shift=0.5).requires_grad_()
    weight_ref = weight.detach().clone().requires_grad_()
    check_forward_backward(
        lambda x: liger_rms_norm(x, weight, 1e-6, offset=offset, casting_mode=casting_mode, in_place=False),
        lambda x: formula(x, weight_ref),
        random((3, 7, 37), dtype, seed=14),
        {"ours": [weight], "ref": [weight_ref]},
        dtype,
    )


def test_functional_without_weight_and_positional_arguments():
    x = random((13, 101), torch.float32, seed=15)
    torch.testing.assert_close(liger_rms_norm(x, None, 1e-6), llama_rms_norm(x, None, 1e-6))
    w = random((101,), torch.float32, seed=16)
    torch.testing.assert_close(liger_rms_norm(x, w, 1e-6, 1.0, "gemma", True), gemma_rms_norm(x, w, 1e-6))


# -- backends ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_argument_forces_the_backend(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch, "run_kernel", lambda spec, backend, *a: chosen.append(backend) or original(spec, backend, *a)
    )
    module = LigerRMSNorm(37, **kwargs)
    x = random((3, 37), torch.float32, seed=17, shift=0.2).requires_grad_()
    y = module(x)
    torch.testing.assert_close(y, llama_rms_norm(x, torch.ones(37), 1e-6))
    y.sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    assert chosen == ["reference"]


def test_unknown_impl_is_a_value_error_listing_backends():
    with pytest.raises(ValueError, match=r"(?s)impl.*no-such-backend.*registered backends.*reference"):
        LigerRMSNorm(8, impl="no-such-backend")
    with pytest.raises(ValueError, match="registered backends"):
        LigerRMSNormForGemma(8, backend="no-such-backend")
    with pytest.raises(ValueError, match="backend"):
        LigerRMSNorm(8, impl="reference", backend="triton")


def test_impl_that_cannot_serve_raises_backend_unavailable():
    # required, so never a silent fallback: the cuda backend cannot serve CPU tensors
    from liger_core import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"(?s)rms_norm\(x=\(3, 8\).*cuda"):
        LigerRMSNorm(8, impl="cuda")(torch.randn(3, 8))


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="init_fn"):
        LigerRMSNorm(8, init_fn="randn")
    with pytest.raises(ValueError, match="casting_mode"):
        LigerRMSNorm(8, casting_mode="fp32")
    with pytest.raises(ValueError, match="eps"):
        LigerRMSNorm(8, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        LigerRMSNorm(8, eps="small")
    with pytest.raises(ValueError, match="hidden_size"):
        LigerRMSNorm(0)


def test_bad_call_arguments():
    module = LigerRMSNorm(8)
    with pytest.raises(ValueError, match=r"'weight' must have shape \(9,\)"):
        module(torch.randn(4, 9))
    with pytest.raises(TypeError, match="'x'.*floating-point"):
        module(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="'x'.*tensor"):
        module([1.0] * 8)
    with pytest.raises(ValueError, match="weight"):
        liger_rms_norm(torch.randn(4, 8), torch.randn(8, 1), 1e-6)
    with pytest.raises(ValueError, match="casting_mode"):
        liger_rms_norm(torch.randn(4, 8), torch.randn(8), 1e-6, casting_mode="bf16")


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    module = LigerRMSNormForGemma(37)
    with torch.no_grad():
        module.weight.copy_(random((37,), torch.float32, seed=18, scale=0.3))
    if which == "module":
        fn = module
    else:
        fn = lambda x: liger_rms_norm(x, module.weight, 1e-6, offset=1.0, casting_mode="gemma")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    x = random((3, 7, 37), torch.float32, seed=19)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = random(x.shape, torch.float32, seed=20)
    y_eager = fn(x_eager)
    (dx_eager, dw_eager) = torch.autograd.grad(y_eager, [x_eager, module.weight], dy)
    y_compiled = compiled(x_compiled)
    (dx_compiled, dw_compiled) = torch.autograd.grad(y_compiled, [x_compiled, module.weight], dy)
    torch.testing.assert_close(y_compiled, y_eager)
    torch.testing.assert_close(dx_compiled, dx_eager)
    torch.testing.assert_close(dw_compiled, dw_eager)
