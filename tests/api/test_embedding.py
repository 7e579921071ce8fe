"""LigerEmbedding (liger_kernel.transformers.experimental) against ``weight[indices]`` with masking, written here."""

import inspect

import pytest
import torch

import liger_core
from liger_core.testing import check_conformance
from liger_kernel.transformers.experimental import LigerEmbedding
from liger_kernel.transformers.experimental.embedding import LigerEmbedding as module_class

DTYPES = [torch.float32, torch.bfloat16]


# -- the formula -------------------------------------------------------------------------------------------------


def embedding(indices, weight, padding_idx=None):
    """``weight[indices]``; rows whose index is the padding row, or outside [0, N), are zeros and get no gradient.
    The gather runs in fp32 so that repeated indices accumulate their gradient in fp32."""
    num = weight.shape[0]
    pad = None if padding_idx is None else padding_idx % num
    keep = (indices >= 0) & (indices < num)
    if pad is not None:
        keep &= indices != pad
    rows = weight.float()[indices.clamp(0, num - 1).long()]
    return (rows * keep.unsqueeze(-1)).to(weight.dtype)


def weight_gradient(indices, dy, num, padding_idx=None):
    """The dense gradient written out: ``dW[i] = Σ dy[t] over t with indices[t] == i``, minus dropped rows."""
    grad = torch.zeros(num, dy.shape[-1], dtype=torch.float32)
    pad = None if padding_idx is None else padding_idx % num
    for index, row in zip(indices.reshape(-1).tolist(), dy.reshape(-1, dy.shape[-1]).float()):
        if 0 <= index < num and index != pad:
            grad[index] += row
    return grad.to(dy.dtype)


# -- helpers -----------------------------------------------------------------------------------------------------


def random_indices(shape, num, seed, dtype=torch.int64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num, shape, generator=generator).to(dtype)


def random(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def check_forward_backward(module, indices, dtype):
    weight = module.weight
    y = module(indices)
    assert y.dtype == dtype and y.shape == (*indices.shape, module.embedding_dim)
    expected = embedding(indices, weight.detach(), module.padding_idx)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)  # a lookup is exact
    dy = random(y.shape, dtype, seed=99)
    (grad,) = torch.autograd.grad(y, [weight], dy)
    assert grad.layout == torch.strided and grad.shape == weight.shape and grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    want = weight_gradient(indices, dy, module.num_embeddings, module.padding_idx)
    torch.testing.assert_close(grad.float(), want.float(), atol=tol, rtol=tol)
    return y, grad


def module(num, dim, dtype, padding_idx=None, **kwargs):
    torch.manual_seed(0)
    return LigerEmbedding(num, dim, padding_idx=padding_idx, **kwargs).to(dtype)


# -- forward and backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("index_shape", [(7,), (3, 17), (2, 3, 5), ()])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_lookup_matches_indexing(dtype, index_shape, index_dtype):
    emb = module(23, 37, dtype)
    indices = random_indices(index_shape, 23, seed=1, dtype=index_dtype)  # 51 draws from 23: repeats
    check_forward_backward(emb, indices, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx, row", [(0, 0), (4, 4), (-1, 22), (-5, 18)])
def test_padding_idx_rows_are_zero_and_get_no_gradient(dtype, padding_idx, row):
    emb = module(23, 37, dtype, padding_idx=padding_idx)
    assert emb.padding_idx == row  # normalised, as nn.Embedding
    assert torch.count_nonzero(emb.weight[row]) == 0 and torch.count_nonzero(emb.weight) > 0
    with torch.no_grad():
        emb.weight[row] = 3.0  # even with data in the padding row, it comes out as zeros
    indices = random_indices((4, 9), 23, seed=2)
    indices[0, :3] = row
    y, grad = check_forward_backward(emb, indices, dtype)
    assert torch.count_nonzero(y[0, :3]) == 0
    assert torch.count_nonzero(grad[row]) == 0


@pytest.mark.parametrize("padding_idx", [-1, 22])
def test_negative_and_positive_padding_idx_agree_through_the_operator(padding_idx):
    weight = random((23, 8), torch.float32, seed=3)
    indices = torch.tensor([[22, 1, 22], [0, 5, 21]])
    y = liger_core.call("embedding", indices, weight, padding_idx=padding_idx)
    assert torch.count_nonzero(y[0, 0]) == 0 and torch.count_nonzero(y[0, 2]) == 0
    torch.testing.assert_close(y[1], weight[[0, 5, 21]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_index_gives_a_zero_row_and_no_gradient(dtype):
    emb = module(11, 6, dtype, padding_idx=2)
    indices = torch.tensor([[0, 11, 3], [-1, 1000, 10], [2, -12, 5]])
    y, grad = check_forward_backward(emb, indices, dtype)
    for t, s in [(0, 1), (1, 0), (1, 1), (2, 1), (2, 0)]:
        assert torch.count_nonzero(y[t, s]) == 0
    torch.testing.assert_close(y[0, 0], emb.weight[0].detach())
    assert torch.count_nonzero(grad[[1, 4, 6, 7, 8, 9]]) == 0  # rows nobody asked for, nor an out-of-range one


def test_out_of_range_index_is_a_value_error_under_checks(monkeypatch):
    emb = LigerEmbedding(11, 6)
    emb(torch.tensor([0, 10]))  # in range: fine
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    emb(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"'indices' holds values outside \[0, 11\): \[11\]"):
        emb(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"'indices'.*\[-1\]"):
        emb(torch.tensor([[-1, 3]], dtype=torch.int32))


def test_gradient_accumulates_into_the_parameter():
    emb = LigerEmbedding(5, 4)
    emb(torch.tensor([1, 1, 1, 3])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.layout == torch.strided
    torch.testing.assert_close(emb.weight.grad.sum(-1), torch.tensor([0.0, 12.0, 0.0, 4.0, 0.0]))


def test_init_and_state():
    torch.manual_seed(0)
    emb = LigerEmbedding(64, 32)
    assert isinstance(emb.weight, torch.nn.Parameter) and emb.weight.shape == (64, 32)
    assert 0.8 < emb.weight.std() < 1.2  # randn
    assert emb.padding_idx is None and list(emb.state_dict()) == ["weight"]
    assert "64, 32" in repr(emb) and "padding_idx=63" in repr(LigerEmbedding(64, 32, padding_idx=-1))
    assert module_class is LigerEmbedding
    assert [(p.name, p.default) for p in inspect.signature(LigerEmbedding).parameters.values()] == [
        ("num_embeddings", inspect.Parameter.empty),
        ("embedding_dim", inspect.Parameter.empty),
        ("padding_idx", None),
        ("impl", None),
        ("backend", None),
    ]


def test_matches_nn_embedding_without_padding():
    emb = LigerEmbedding(50, 16)
    reference = torch.nn.Embedding(50, 16, _weight=emb.weight.detach().clone())
    indices = random_indices((4, 6), 50, seed=4)
    torch.testing.assert_close(emb(indices), reference(indices))


# -- backends ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_argument_forces_the_backend(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch, "run_kernel", lambda spec, backend, *a: chosen.append(backend) or original(spec, backend, *a)
    )
    emb = LigerEmbedding(9, 4, **kwargs)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad is not None and chosen == ["reference"]


def test_bad_impl():
    with pytest.raises(ValueError, match="registered backends"):
        LigerEmbedding(9, 4, impl="no-such-backend")
    with pytest.raises(liger_core.BackendUnavailableError, match=r"embedding\(indices=\(2,\)"):
        LigerEmbedding(9, 4, impl="cuda")(torch.tensor([1, 2]))


@pytest.mark.parametrize("case", liger_core.registry.get_registry().operator("embedding").cases)
def test_operator_spec_conforms_on_the_reference_backend(case):
    for dtype in (torch.float32, torch.bfloat16):
        result = check_conformance("embedding", "reference", dtype, attrs=case)
        assert result.passed, result.report()


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="'num_embeddings'"):
            LigerEmbedding(bad, 4)
        with pytest.raises(ValueError, match="'embedding_dim'"):
            LigerEmbedding(4, bad)
    for bad in (4, -5, 100):
        with pytest.raises(ValueError, match=r"'padding_idx' must be in \[-4, 4\)"):
            LigerEmbedding(4, 2, padding_idx=bad)
    with pytest.raises(TypeError, match="'padding_idx'"):
        LigerEmbedding(4, 2, padding_idx=1.0)


def test_bad_call_arguments():
    emb = LigerEmbedding(9, 4)
    with pytest.raises(TypeError, match="'indices'.*int64 or int32"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="'indices'.*int64 or int32"):
        emb(torch.tensor([1, 2], dtype=torch.int16))
    with pytest.raises(TypeError, match="'indices'.*tensor"):
        emb([1, 2])
    weight = torch.randn(9, 4)
    with pytest.raises(ValueError, match="'weight' must be 2-D"):
        liger_core.call("embedding", torch.tensor([1]), weight[0])
    with pytest.raises(TypeError, match="'weight'.*floating-point"):
        liger_core.call("embedding", torch.tensor([1]), torch.ones(9, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'padding_idx' must be in \[-9, 9\)"):
        liger_core.call("embedding", torch.tensor([1]), weight, padding_idx=9)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, -1])
def test_compile_fullgraph_matches_eager(padding_idx):
    torch._dynamo.reset()
    emb = LigerEmbedding(23, 37, padding_idx=padding_idx)
    compiled = torch.compile(emb, fullgraph=True)
    indices = random_indices((3, 17), 23, seed=5)
    indices[0, 0], indices[1, 1] = 22, 40  # the padding row and an out-of-range index
    dy = random((3, 17, 37), torch.float32, seed=6)
    results = []
    for f in (emb, compiled):
        y = f(indices)
        results.append((y, *torch.autograd.grad(y, [emb.weight], dy)))
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager)
