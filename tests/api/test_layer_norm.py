"""LigerLayerNorm and liger_layer_norm against layer normalisation written out here in plain PyTorch."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import liger_core
from liger_core.testing import check_conformance
from liger_kernel.transformers import LigerLayerNorm, liger_layer_norm
from liger_kernel.transformers.functional import liger_layer_norm as functional_layer_norm

SHAPES = [(3, 7, 37), (13, 101), (37,)]
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def layer_norm(x, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * w + b`` over the last dim, biased variance, in fp32, cast back at the end."""
    wide = x.float()
    mean = wide.mean(-1, keepdim=True)
    var = (wide - mean).pow(2).mean(-1, keepdim=True)
    out = (wide - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def random(shape, dtype, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + shift).to(dtype)


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_forward_backward(ours, formula, x, params_ours, params_ref, dtype):
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), formula(x_ref)
    assert y_ours.dtype == x.dtype and y_ours.shape == x.shape
    assert_close(y_ours, y_ref, dtype, "y")
    dy = random(x.shape, x.dtype, seed=99)
    dy_copy = dy.clone()
    grads_ours = torch.autograd.grad(y_ours, [x_ours, *params_ours], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params_ref], dy)
    for name, g_ours, g_ref in zip(["dx", "dweight", "dbias"], grads_ours, grads_ref):
        assert g_ours.dtype == g_ref.dtype and g_ours.shape == g_ref.shape
        assert_close(g_ours, g_ref, dtype, name)
    assert torch.equal(dy, dy_copy)


# -- the module --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-6, 1e-1])
def test_module_matches_formula(shape, dtype, eps):
    module = LigerLayerNorm(shape[-1], eps=eps, bias=True).to(dtype)
    with torch.no_grad():
        module.weight.copy_(random(shape[-1:], dtype, seed=1, scale=0.3, shift=1.0))
    weight_ref = module.weight.detach().clone().requires_grad_()
    bias_ref = module.bias.detach().clone().requires_grad_()
    # an offset mean, and small values when eps is large so that eps matters
    x = random(shape, dtype, seed=2, scale=0.3 if eps > 1e-3 else 3.0, shift=0.7)
    check_forward_backward(
        module,
        lambda x: layer_norm(x, weight_ref, bias_ref, eps),
        x,
        [module.weight, module.bias],
        [weight_ref, bias_ref],
        dtype,
    )


def test_matches_torch_layer_norm_in_fp32():
    module = LigerLayerNorm(101, eps=1e-5, bias=True)
    x = random((13, 101), torch.float32, seed=3, scale=2.0)
    torch.testing.assert_close(module(x), F.layer_norm(x, (101,), module.weight, module.bias, 1e-5))


def test_parameters_and_init():
    module = LigerLayerNorm(8)
    assert isinstance(module.weight, torch.nn.Parameter) and isinstance(module.bias, torch.nn.Parameter)
    assert torch.equal(module.weight, torch.ones(8)) and torch.equal(module.bias, torch.zeros(8))
    assert torch.equal(LigerLayerNorm(8, init_fn="zeros").weight, torch.zeros(8))
    torch.manual_seed(0)
    biased = LigerLayerNorm(64, bias=True)
    assert biased.bias.std() > 0.5  # randn, as 0.8.5
    assert list(module.state_dict()) == ["weight", "bias"]
    assert module.eps == module.variance_epsilon == 1e-6 and module.hidden_size == 8
    assert LigerLayerNorm(8).to(torch.bfloat16).bias.dtype == torch.bfloat16
    assert "8, eps=1e-06" in repr(module) and "impl='reference'" in repr(LigerLayerNorm(4, impl="reference"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp32_parameters_with_low_precision_input(dtype):
    # Mixed precision: fp32 weight and bias, bf16 activations; the output keeps the input's dtype.
    module = LigerLayerNorm(37, bias=True)
    weight_ref = module.weight.detach().clone().requires_grad_()
    bias_ref = module.bias.detach().clone().requires_grad_()
    check_forward_backward(
        module,
        lambda x: layer_norm(x, weight_ref, bias_ref, 1e-6),
        random((5, 37), dtype, seed=4),
        [module.weight, module.bias],
        [weight_ref, bias_ref],
        dtype,
    )


def test_constructor_signature_matches_liger_kernel_0_8():
    params = [(p.name, p.default) for p in inspect.signature(LigerLayerNorm).parameters.values()]
    assert params == [
        ("hidden_size", inspect.Parameter.empty),
        ("eps", 1e-6),
        ("bias", False),
        ("init_fn", "ones"),
        ("impl", None),
        ("backend", None),
    ]
    assert list(inspect.signature(liger_layer_norm).parameters) == ["X", "W", "B", "eps"]
    assert functional_layer_norm is liger_layer_norm


# -- the functional ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_functional(dtype, with_bias):
    weight = random((37,), dtype, seed=5, scale=0.3, shift=1.0).requires_grad_()
    bias = random((37,), dtype, seed=6, scale=0.3).requires_grad_() if with_bias else None
    weight_ref = weight.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_() if with_bias else None
    check_forward_backward(
        lambda x: liger_layer_norm(x, weight, bias, 1e-5),
        lambda x: layer_norm(x, weight_ref, bias_ref, 1e-5),
        random((3, 7, 37), dtype, seed=7, scale=2.0, shift=-1.0),
        [p for p in (weight, bias) if p is not None],
        [p for p in (weight_ref, bias_ref) if p is not None],
        dtype,
    )


# -- backends ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_argument_forces_the_backend(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch, "run_kernel", lambda spec, backend, *a: chosen.append(backend) or original(spec, backend, *a)
    )
    module = LigerLayerNorm(37, bias=True, **kwargs)
    x = random((3, 37), torch.float32, seed=8).requires_grad_()
    y = module(x)
    torch.testing.assert_close(y, layer_norm(x, module.weight, module.bias, 1e-6))
    y.sum().backward()
    assert x.grad is not None and module.weight.grad is not None and module.bias.grad is not None
    assert chosen == ["reference"]


def test_bad_impl():
    with pytest.raises(ValueError, match="registered backends"):
        LigerLayerNorm(8, impl="no-such-backend")
    with pytest.raises(liger_core.BackendUnavailableError, match=r"layer_norm\(x=\(3, 8\)"):
        LigerLayerNorm(8, impl="cuda")(torch.randn(3, 8))


@pytest.mark.parametrize("case", liger_core.registry.get_registry().operator("layer_norm").cases)
def test_operator_spec_conforms_on_the_reference_backend(case):
    for dtype in (torch.float32, torch.bfloat16):
        result = check_conformance("layer_norm", "reference", dtype, attrs=case)
        assert result.passed, result.report()


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="init_fn"):
        LigerLayerNorm(8, init_fn="randn")
    with pytest.raises(ValueError, match="eps"):
        LigerLayerNorm(8, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        LigerLayerNorm(8, eps="small")
    with pytest.raises(ValueError, match="hidden_size"):
        LigerLayerNorm(0)


def test_bad_call_arguments():
    with pytest.raises(ValueError, match=r"'weight' must have shape \(9,\)"):
        LigerLayerNorm(8)(torch.randn(4, 9))
    with pytest.raises(TypeError, match="'x'.*floating-point"):
        LigerLayerNorm(8)(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'bias' must have shape \(8,\)"):
        liger_layer_norm(torch.randn(4, 8), torch.ones(8), torch.zeros(7), 1e-6)
    with pytest.raises(TypeError, match="'weight'.*tensor"):
        liger_layer_norm(torch.randn(4, 8), None, None, 1e-6)
    with pytest.raises(ValueError, match="'eps'"):
        liger_layer_norm(torch.randn(4, 8), torch.ones(8), None, -1.0)
    with pytest.raises(ValueError, match="'x'"):
        liger_layer_norm(torch.randn(4, 0), torch.ones(0), None, 1e-6)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["module", "functional"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    module = LigerLayerNorm(37, bias=True)
    if which == "module":
        fn = module
    else:
        fn = lambda x: liger_layer_norm(x, module.weight, module.bias, 1e-6)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    x = random((3, 7, 37), torch.float32, seed=9, scale=2.0)
    dy = random(x.shape, torch.float32, seed=10)
    results = []
    for f in (fn, compiled):
        x_leaf = x.clone().requires_grad_()
        y = f(x_leaf)
        results.append((y, *torch.autograd.grad(y, [x_leaf, module.weight, module.bias], dy)))
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager)
