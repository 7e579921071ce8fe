"""LigerSwiGLUMLP, LigerGEGLUMLP, liger_swiglu and liger_geglu against the gated activations written out here."""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import liger_core
from liger_core.testing import check_conformance
from liger_kernel.transformers import LigerGEGLUMLP, LigerSwiGLUMLP, liger_geglu, liger_swiglu
from liger_kernel.transformers.functional import liger_geglu as functional_geglu
from liger_kernel.transformers.functional import liger_swiglu as functional_swiglu

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# -- the formulas ------------------------------------------------------------------------------------------------


def swiglu(a, b):
    """``silu(a) * b = a·sigmoid(a)·b``, in fp32, cast back."""
    a32 = a.float()
    return (a32 / (1.0 + torch.exp(-a32)) * b.float()).to(a.dtype)


def geglu(a, b):
    """``gelu_tanh(a) * b = ½a(1 + tanh(√(2/π)(a + 0.044715a³)))·b``, in fp32, cast back."""
    a32 = a.float()
    gelu = 0.5 * a32 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a32 + 0.044715 * a32.pow(3))))
    return (gelu * b.float()).to(a.dtype)


FUNCTIONALS = {"swiglu": (liger_swiglu, swiglu), "geglu": (liger_geglu, geglu)}


# -- helpers -----------------------------------------------------------------------------------------------------


def random(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_forward_backward(ours, formula, inputs, dtype, wrt_ours=(), wrt_ref=()):
    leaves_ours = [t.detach().requires_grad_() for t in inputs]
    leaves_ref = [t.detach().clone().requires_grad_() for t in inputs]
    y_ours, y_ref = ours(*leaves_ours), formula(*leaves_ref)
    assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
    assert_close(y_ours, y_ref, dtype, "y")
    dy = random(y_ref.shape, y_ref.dtype, seed=99)
    grads_ours = torch.autograd.grad(y_ours, [*leaves_ours, *wrt_ours], dy)
    grads_ref = torch.autograd.grad(y_ref, [*leaves_ref, *wrt_ref], dy)
    for index, (got, want) in enumerate(zip(grads_ours, grads_ref)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, dtype, f"gradient {index}")


def llama_config(hidden_act="silu", **extra):
    return SimpleNamespace(hidden_size=24, intermediate_size=37, hidden_act=hidden_act, **extra)


def mlp_formula(module, act):
    gate, up, down = (
        p.detach().clone().requires_grad_()
        for p in (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight)
    )

    def formula(x):
        return act(x @ gate.T, x @ up.T) @ down.T

    return formula, [gate, up, down]


# -- functionals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37), (13, 101), (1,)])
def test_functional_matches_formula(op, dtype, shape):
    ours, formula = FUNCTIONALS[op]
    a, b = random(shape, dtype, seed=1, scale=3.0), random(shape, dtype, seed=2)
    check_forward_backward(ours, formula, (a, b), dtype)


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_on_chunked_views(op, dtype):
    # Phi-3 splits one fused gate_up projection: a and b are non-contiguous halves of one tensor.
    ours, formula = FUNCTIONALS[op]
    a, b = random((4, 7, 2 * 29), dtype, seed=3, scale=2.0).chunk(2, dim=-1)
    assert not a.is_contiguous()
    check_forward_backward(ours, formula, (a, b), dtype)


def test_geglu_matches_torch_gelu_tanh_and_swiglu_matches_silu():
    a, b = random((13, 37), torch.float32, seed=4, scale=3.0), random((13, 37), torch.float32, seed=5)
    torch.testing.assert_close(liger_geglu(a, b), torch.nn.functional.gelu(a, approximate="tanh") * b)
    torch.testing.assert_close(liger_swiglu(a, b), torch.nn.functional.silu(a) * b)
    assert functional_geglu is liger_geglu and functional_swiglu is liger_swiglu


# -- the MLP modules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_act", ["silu", "swish"])
def test_swiglu_mlp(dtype, hidden_act):
    module = LigerSwiGLUMLP(llama_config(hidden_act)).to(dtype)
    assert [name for name, _ in module.named_children()] == ["gate_proj", "up_proj", "down_proj"]
    assert all(child.bias is None for child in module.children())
    assert module.gate_proj.weight.shape == (37, 24) and module.down_proj.weight.shape == (24, 37)
    formula, params = mlp_formula(module, swiglu)
    ours_params = [module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight]
    check_forward_backward(module, formula, (random((3, 5, 24), dtype, seed=6),), dtype, ours_params, params)


def test_swiglu_mlp_intermediate_size_override():
    module = LigerSwiGLUMLP(llama_config(), intermediate_size=11)
    assert module.intermediate_size == 11 and module.up_proj.weight.shape == (11, 24)
    assert module(torch.randn(2, 24)).shape == (2, 24)


def test_swiglu_mlp_matches_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=32, intermediate_size=72, hidden_act="silu")
    ours, theirs = LigerSwiGLUMLP(config), LlamaMLP(config)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_mlp(dtype):
    module = LigerGEGLUMLP(llama_config("gelu_pytorch_tanh")).to(dtype)
    assert [name for name, _ in module.named_children()] == ["gate_proj", "up_proj", "down_proj"]
    assert all(child.bias is None for child in module.children())
    formula, params = mlp_formula(module, geglu)
    ours_params = [module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight]
    check_forward_backward(module, formula, (random((3, 5, 24), dtype, seed=7),), dtype, ours_params, params)


def test_geglu_mlp_matches_transformers_gemma_mlps():
    from transformers import Gemma2Config, GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP

    x = torch.randn(2, 5, 32)
    for config, mlp in (
        (GemmaConfig(hidden_size=32, intermediate_size=72), GemmaMLP),
        (Gemma2Config(hidden_size=32, intermediate_size=72), Gemma2MLP),
    ):
        ours, theirs = LigerGEGLUMLP(config), mlp(config)
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))


def test_geglu_mlp_activation_names():
    for name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"):
        LigerGEGLUMLP(llama_config(name))
    # Gemma 2/3 keep it in hidden_activation, which wins over hidden_act
    LigerGEGLUMLP(llama_config("silu", hidden_activation="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="'config.hidden_activation'.*'relu'"):
        LigerGEGLUMLP(llama_config("gelu", hidden_activation="relu"))
    with pytest.raises(ValueError, match="'config.hidden_act'.*'silu'"):
        LigerGEGLUMLP(llama_config("silu"))


def test_signatures_match_liger_kernel_0_8():
    def names(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    empty = inspect.Parameter.empty
    assert names(LigerSwiGLUMLP) == [("config", empty), ("intermediate_size", None), ("impl", None), ("backend", None)]
    assert names(LigerGEGLUMLP) == [("config", empty), ("impl", None), ("backend", None)]
    assert names(liger_swiglu) == names(liger_geglu) == [("a", empty), ("b", empty)]


# -- backends ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, op", [(LigerSwiGLUMLP, "swiglu"), (LigerGEGLUMLP, "geglu")])
@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_argument_forces_the_backend(cls, op, kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch,
        "run_kernel",
        lambda spec, backend, *a: chosen.append((spec.name, backend)) or original(spec, backend, *a),
    )
    module = cls(llama_config("silu" if op == "swiglu" else "gelu_pytorch_tanh"), **kwargs)
    module(torch.randn(3, 24, requires_grad=True)).sum().backward()
    assert module.gate_proj.weight.grad is not None
    assert chosen == [(op, "reference")]


def test_bad_impl():
    with pytest.raises(ValueError, match="registered backends"):
        LigerSwiGLUMLP(llama_config(), impl="no-such-backend")
    with pytest.raises(liger_core.BackendUnavailableError, match=r"geglu\(a=\(3, 37\)"):
        LigerGEGLUMLP(llama_config("gelu"), impl="cuda")(torch.randn(3, 24))


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_operator_spec_conforms_on_the_reference_backend(op):
    for case in liger_core.registry.get_registry().operator(op).cases:
        for dtype in (torch.float32, torch.bfloat16):
            result = check_conformance(op, "reference", dtype, attrs=case)
            assert result.passed, result.report()


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_config():
    with pytest.raises(ValueError, match="'config.hidden_act'.*'gelu'"):
        LigerSwiGLUMLP(llama_config("gelu"))
    with pytest.raises(ValueError, match="'config.hidden_act'.*None"):
        LigerSwiGLUMLP(SimpleNamespace(hidden_size=8, intermediate_size=16))
    with pytest.raises(ValueError, match="'config.hidden_size'"):
        LigerSwiGLUMLP(SimpleNamespace(intermediate_size=16, hidden_act="silu"))
    with pytest.raises(ValueError, match="'config.intermediate_size'"):
        LigerGEGLUMLP(SimpleNamespace(hidden_size=8, intermediate_size=0, hidden_act="gelu"))
    with pytest.raises(ValueError, match="'intermediate_size'"):
        LigerSwiGLUMLP(llama_config(), intermediate_size=-3)


@pytest.mark.parametrize("fn", [liger_swiglu, liger_geglu])
def test_bad_call_arguments(fn):
    with pytest.raises(ValueError, match="'b' must have a's shape"):
        fn(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(TypeError, match="'b' must have a's dtype"):
        fn(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="'a'.*floating-point"):
        fn(torch.ones(3, 8, dtype=torch.int64), torch.randn(3, 8))
    with pytest.raises(ValueError, match="'a' must be"):
        fn(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(TypeError, match="'b'.*tensor"):
        fn(torch.randn(3), None)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["swiglu_mlp", "geglu_mlp", "swiglu", "geglu"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    if which.endswith("mlp"):
        cls = LigerSwiGLUMLP if which == "swiglu_mlp" else LigerGEGLUMLP
        module = cls(llama_config("silu" if which == "swiglu_mlp" else "gelu"))
        fn, params = module, list(module.parameters())
        inputs = [random((3, 5, 24), torch.float32, seed=8)]
    else:
        fn, params = FUNCTIONALS[which][0], []
        inputs = [random((3, 5, 37), torch.float32, seed=9, scale=3.0), random((3, 5, 37), torch.float32, seed=10)]
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = f(*leaves)
        results.append((y, *torch.autograd.grad(y, leaves + params, torch.ones_like(y))))
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager)
