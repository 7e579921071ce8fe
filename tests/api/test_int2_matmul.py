"""The ternary-weight GEMM (matmul, pack_weights, unpack_weights) against the layout and product written out here."""

import pytest
import torch

import liger_core
from liger_core.testing import check_conformance
from liger_kernel.ops.experimental import mm_int8int2 as ops_module
from liger_kernel.transformers import experimental
from liger_kernel.transformers.experimental import matmul, pack_weights, unpack_weights

# -- the formulas ------------------------------------------------------------------------------------------------


def decode_by_hand(packed):
    """The documented layout, byte by byte: code i of packed row j (bits 2i, 2i+1) is ``w[i·rows + j] + 1``."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1).to(torch.int64)
    w = torch.empty((4 * rows, flat.shape[1]), dtype=torch.int64)
    for i in range(4):
        for j in range(rows):
            low = (flat[j] // (1 << (2 * i))) % 2
            high = (flat[j] // (1 << (2 * i + 1))) % 2
            w[i * rows + j] = low + 2 * high - 1
    return w.reshape(4 * rows, *packed.shape[1:])


def product(a, w):
    """The exact integer product, in int64, as int32 (no test value comes near 2^31)."""
    return (a.to(torch.int64) @ w.to(torch.int64)).to(torch.int32)


# -- helpers -----------------------------------------------------------------------------------------------------


def random_a(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)


def random_w(shape, seed, dtype=torch.int8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=generator).to(dtype)


# -- matmul ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, k, n", [(1, 4, 1), (1, 4, 9), (2, 8, 3), (3, 12, 7), (4, 36, 33), (1, 100, 5)])
def test_matmul_matches_the_integer_product(m, k, n):
    a, w = random_a((m, k), seed=m * 1000 + k), random_w((k, n), seed=n)
    b = pack_weights(w)
    assert b.shape == (k // 4, n) and b.dtype == torch.uint8
    assert torch.equal(decode_by_hand(b), w.to(torch.int64))  # pack_weights writes the documented layout
    c = matmul(a, b)
    assert c.dtype == torch.int32 and c.shape == (m, n)
    assert torch.equal(c, product(a, w))
    assert not c.requires_grad


def test_matmul_on_hand_packed_bytes():
    """Bytes built from the layout by hand, not by pack_weights: 146 = codes (2, 0, 1, 2), 25 = codes (1, 2, 1, 0)."""
    b = torch.tensor([[146], [25]], dtype=torch.uint8)
    w = torch.tensor([[1], [0], [-1], [1], [0], [0], [1], [-1]])  # row i·2 + j is code i of byte j
    assert torch.equal(unpack_weights(b), w.to(torch.int32))
    assert torch.equal(pack_weights(w), b)
    a = random_a((3, 8), seed=5)
    assert torch.equal(matmul(a, b), product(a, w))


def test_matmul_extreme_values():
    """|sums| as large as int8 allows: -128 and 127 against all-ones and all-minus-ones weights."""
    k = 64
    a = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2)], dtype=torch.int8)
    w = torch.stack([torch.ones(k), -torch.ones(k), torch.zeros(k)], dim=1).to(torch.int64)
    assert torch.equal(matmul(a, pack_weights(w)), product(a, w))


def test_matmul_non_contiguous_inputs():
    a = random_a((12, 3), seed=1).t()  # (3, 12), a transposed view
    w = random_w((12, 10), seed=2)
    b = pack_weights(w)[:, ::2]  # every other column: strided
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(matmul(a, b), product(a, w[:, ::2]))


def test_matmul_does_not_modify_its_arguments():
    a, b = random_a((3, 16), seed=3), pack_weights(random_w((16, 5), seed=4))
    a_copy, b_copy = a.clone(), b.clone()
    matmul(a, b)
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)


def test_padding_rows_are_zero_weights():
    """K = 10 packs into 3 rows; the 2 padded rows hold zero weights, so whatever a holds there does not count."""
    a, w = random_a((4, 12), seed=6), random_w((10, 6), seed=7)
    b = pack_weights(w)
    assert b.shape == (3, 6)
    assert torch.equal(matmul(a, b), product(a[:, :10], w))


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_reference_kernel_slices_and_float32_path(monkeypatch, rows):
    """The slicing over K (shrunk here to 3 packed rows per slice) and the float32 path other devices take."""
    from liger_backends.reference import int2_matmul as kernel

    monkeypatch.setattr(kernel, "CHUNK_ROWS", 3)
    a, w = random_a((3, 4 * rows), seed=rows), random_w((4 * rows, 5), seed=rows + 1)
    b = pack_weights(w)
    for dtype in (torch.int32, torch.float32):
        assert torch.equal(kernel.ternary_matmul(a, b, dtype), product(a, w))


def test_float32_path_is_exact_past_two_to_the_24():
    """127·K > 2^24 with K = 160000: one float32 matmul would round; the slices of at most 4096 rows do not."""
    from liger_backends.reference import int2_matmul as kernel

    k = 160_000
    a = torch.full((1, k), 127, dtype=torch.int8)
    w = torch.ones((k, 2), dtype=torch.int8)
    w[::2, 1] = -1
    w[::3, 1] = 0
    expected = product(a, w)
    assert expected[0, 0] == 127 * k and expected[0, 0] > 2**24
    assert torch.equal(kernel.ternary_matmul(a, pack_weights(w), torch.float32), expected)


def test_matmul_empty_inner_dimension():
    a, b = torch.zeros((2, 0), dtype=torch.int8), torch.zeros((0, 3), dtype=torch.uint8)
    assert torch.equal(matmul(a, b), torch.zeros((2, 3), dtype=torch.int32))


# -- pack_weights / unpack_weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(4,), (13,), (4, 1), (8, 5), (11, 3)])
def test_round_trip(dtype, shape):
    w = random_w(shape, seed=sum(shape), dtype=dtype)
    w_copy = w.clone()
    packed = pack_weights(w)
    rows = -(-shape[0] // 4)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, *shape[1:])
    assert torch.equal(w, w_copy)  # 0.8.5 adds 1 to its argument in place; we must not
    unpacked = unpack_weights(packed)
    assert unpacked.dtype == torch.int32 and unpacked.shape == (4 * rows, *shape[1:])
    assert torch.equal(unpacked[: shape[0]], w.to(torch.int32))
    assert torch.equal(unpacked[shape[0] :], torch.zeros_like(unpacked[shape[0] :]))
    assert torch.equal(decode_by_hand(packed), unpacked.to(torch.int64))
    packed_copy = packed.clone()
    unpack_weights(packed)
    assert torch.equal(packed, packed_copy)


def test_unsigned_weights_pack():
    w = torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0], [1, 1]], dtype=torch.uint8)
    assert torch.equal(unpack_weights(pack_weights(w))[:5], w.to(torch.int32))


def test_both_import_paths_are_the_same_functions():
    assert ops_module.matmul is matmul
    assert ops_module.pack_weights is pack_weights
    assert ops_module.unpack_weights is unpack_weights
    assert {"matmul", "pack_weights", "unpack_weights"} <= set(experimental.__all__)


# -- bad input ---------------------------------------------------------------------------------------------------


def _good():
    return random_a((3, 8), seed=8), pack_weights(random_w((8, 5), seed=9))


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda a, b: (a.float(), b), TypeError, r"'a' must be an int8"),
        (lambda a, b: (a.to(torch.int32), b), TypeError, r"'a' must be an int8"),
        (lambda a, b: (a, b.to(torch.int8)), TypeError, r"'b' must be a uint8"),
        (lambda a, b: (a.tolist(), b), TypeError, r"'a' must be a tensor"),
        (lambda a, b: (a, None), TypeError, r"'b' must be a tensor"),
        (lambda a, b: (a[0], b), ValueError, r"'a' must be 2-D"),
        (lambda a, b: (a.unsqueeze(0), b), ValueError, r"'a' must be 2-D"),
        (lambda a, b: (a, b[:, 0]), ValueError, r"'b' must be 2-D"),
        (lambda a, b: (a[:, :6], b), ValueError, r"multiple of 4, got 6"),
        (lambda a, b: (a[:, :7], b), ValueError, r"multiple of 4, got 7"),
        (lambda a, b: (a[:, :4], b), ValueError, r"'b' must have shape \(K/4, N\) = \(1, N\)"),
        (lambda a, b: (torch.cat([a, a], 1), b), ValueError, r"'b' must have shape \(K/4, N\) = \(4, N\)"),
        (lambda a, b: (a.to("meta"), b), ValueError, r"'b' is on cpu but 'a' is on meta"),
    ],
)
def test_matmul_bad_input(make, error, pattern):
    with pytest.raises(error, match=pattern):
        matmul(*make(*_good()))


def test_matmul_invalid_code_is_checked_on_request(monkeypatch):
    a, b = _good()
    b[1, 2] = 0b00110000  # code 2 of this byte is 3: no weight
    matmul(a, b)  # without checks: no host sync, the code decodes as 2
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match=r"'b' holds the 2-bit code 3"):
        matmul(a, b)
    with pytest.raises(ValueError, match=r"'packed' holds the 2-bit code 3"):
        unpack_weights(b)


@pytest.mark.parametrize(
    "w, kwargs, error, pattern",
    [
        (torch.zeros(8, dtype=torch.int8), {"bits": 4}, ValueError, r"bits=2.*got bits=4"),
        (torch.zeros(8, dtype=torch.int8), {"bits": 1}, ValueError, r"bits=2.*got bits=1"),
        (torch.zeros(8), {}, TypeError, r"'w' must be an integer tensor.*float32"),
        (torch.zeros(8, dtype=torch.bool), {}, TypeError, r"'w' must be an integer tensor.*bool"),
        ([0, 1, -1, 0], {}, TypeError, r"'w' must be a tensor"),
        (torch.zeros((2, 4, 4), dtype=torch.int8), {}, ValueError, r"'w' must be 1-D or 2-D"),
        (torch.zeros((), dtype=torch.int8), {}, ValueError, r"'w' must be 1-D or 2-D"),
        (torch.tensor([0, 1, 2, -1]), {}, ValueError, r"'w' must hold only -1, 0 and 1, found \[2\]"),
        (torch.tensor([[0, -2], [-3, 1]], dtype=torch.int16), {}, ValueError, r"found \[-3, -2\]"),
        (torch.tensor([0, 255, 1], dtype=torch.uint8), {}, ValueError, r"found \[255\]"),
    ],
)
def test_pack_weights_bad_input(w, kwargs, error, pattern):
    copy = w.clone() if isinstance(w, torch.Tensor) else None
    with pytest.raises(error, match=pattern):
        pack_weights(w, **kwargs)
    if copy is not None:
        assert torch.equal(w, copy)


@pytest.mark.parametrize(
    "packed, kwargs, error, pattern",
    [
        (torch.zeros(2, dtype=torch.uint8), {"bits": 8}, ValueError, r"bits=2.*got bits=8"),
        (torch.zeros(2, dtype=torch.int8), {}, TypeError, r"'packed' must be a uint8"),
        (torch.zeros((1, 2, 3), dtype=torch.uint8), {}, ValueError, r"'packed' must be 1-D or 2-D"),
        ([85, 85], {}, TypeError, r"'packed' must be a tensor"),
    ],
)
def test_unpack_weights_bad_input(packed, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        unpack_weights(packed, **kwargs)


# -- backends, the spec, torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_requires_the_reference_backend(kwargs, monkeypatch):
    from liger_core import dispatch

    chosen = []
    original = dispatch.run_kernel
    monkeypatch.setattr(
        dispatch, "run_kernel", lambda spec, backend, *rest: chosen.append(backend) or original(spec, backend, *rest)
    )
    a, b = _good()
    assert torch.equal(matmul(a, b, **kwargs), product(a, unpack_weights(b)))
    assert chosen == ["reference"]


def test_unknown_impl_is_rejected():
    a, b = _good()
    with pytest.raises(ValueError, match=r"(?s)impl.*no-such-backend.*registered backends.*reference"):
        matmul(a, b, impl="no-such-backend")
    with pytest.raises(ValueError, match=r"impl.*backend.*disagree"):
        matmul(a, b, impl="reference", backend="triton")


def test_cpu_selects_the_reference_backend():
    a, b = _good()
    assert liger_core.dispatch.select_backend("int2_matmul", a, b) == "reference"


def test_spec_and_conformance():
    spec = liger_core.registry.get_registry().operator("int2_matmul")
    assert spec.dtypes == (torch.int8,)
    assert spec.error_floor == {torch.int8: 0.0}
    assert not any(i.differentiable for i in spec.inputs) and not any(o.differentiable for o in spec.outputs)
    (a, b), attrs = spec.make_inputs("cpu", torch.int8, "tiny", seed=3)
    assert attrs == {} and a.shape == (5, 12) and b.shape == (3, 7) and (a.dtype, b.dtype) == (torch.int8, torch.uint8)
    assert int(a.min()) < -64 and int(a.max()) > 64  # the whole int8 range, not a narrow one
    assert torch.equal(spec.make_inputs("cpu", torch.int8, "tiny", seed=3)[0][1], b)  # seeded
    (a, b), _ = spec.make_inputs("cpu", torch.int8, "small", seed=0)
    assert a.shape == (1024, 1024) and b.shape == (256, 1024)
    with pytest.raises(ValueError, match="int8"):
        spec.make_inputs("cpu", torch.float32, "tiny")
    result = check_conformance("int2_matmul", "reference", torch.int8)
    assert result.passed, result.report()
    assert [c.name for c in result.comparisons] == ["output c"] and result.comparisons[0].exact


def test_compile_fullgraph_matches_eager():
    a, w = random_a((3, 20), seed=11), random_w((20, 9), seed=12)
    b = pack_weights(w)
    compiled = torch.compile(matmul, fullgraph=True)
    assert torch.equal(compiled(a, b), product(a, w))
    a2 = random_a((3, 20), seed=13)  # new data, same shapes: no recompilation needed, still right
    assert torch.equal(compiled(a2, b), product(a2, w))


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["small", "llama8b"])
def test_matmul_on_cuda_is_exact(size):
    spec = liger_core.registry.get_registry().operator("int2_matmul")
    (a, b), _ = spec.make_inputs("cuda", torch.int8, size, seed=0)
    c = matmul(a, b)
    assert c.device.type == "cuda"
    assert torch.equal(c.cpu(), matmul(a.cpu(), b.cpu()))
