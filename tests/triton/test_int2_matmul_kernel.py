"""The Triton int2_matmul, exact against a formula written here: every weight unpacked from its byte with integer
operations, the product taken in int64. Odd shapes (every edge mask), the extreme int8 values against all-(+1) and
all-(-1) weights, every code of every byte, several tiles along each dimension with and without split-K and with K/4
both a multiple of BLOCK_K and not, strided inputs, empty shapes, and each branch of the launch heuristics."""

import itertools
import os

import pytest
import torch

import liger_core
from liger_core.operators.int2_matmul import pack_weights

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)


@pytest.fixture(scope="module")
def kernel_module():
    from liger_backends.triton import int2_matmul

    return int2_matmul


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def weights_of(b: torch.Tensor) -> torch.Tensor:
    """int64 (K, N): row r = i·(K/4) + j of w is code i of packed row j, minus one."""
    rows = b.shape[0]
    w = torch.empty((4 * rows, b.shape[1]), dtype=torch.int64)
    packed = b.cpu().to(torch.int64)
    for r in range(4 * rows):
        code, j = divmod(r, rows)
        w[r] = packed[j].div(4**code, rounding_mode="floor").remainder(4) - 1
    return w


def truth(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.cpu().to(torch.int64) @ weights_of(b)


def make(m, k, n, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8)
    w = torch.randint(-1, 2, (k, n), generator=generator, dtype=torch.int8)
    return a.to(device), pack_weights(w).to(device)


def check(a, b, c=None):
    before = (a.clone(), b.clone())
    if c is None:
        c = liger_core.call("int2_matmul", a, b, impl="triton")
    assert c.dtype == torch.int32
    assert c.shape == (a.shape[0], b.shape[1])
    assert c.device == a.device
    assert torch.equal(c.cpu().to(torch.int64), truth(a, b)), "the product must be exact"
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]), "inputs must not be modified"


def test_formula_matches_pack_weights():
    w = torch.randint(-1, 2, (12, 5), dtype=torch.int8)
    assert torch.equal(weights_of(pack_weights(w)), w.to(torch.int64))


@pytest.mark.parametrize("m, k, n", list(itertools.product((1, 3, 17), (4, 12, 260), (1, 7, 33))))
def test_odd_shapes(device, m, k, n):
    check(*make(m, k, n, device, seed=m * 1000 + k * 10 + n))


@pytest.mark.parametrize("value", (127, -128, -127))
@pytest.mark.parametrize("weight", (1, -1))
def test_extremes(device, value, weight):
    # K = 1024: 256 packed rows, several K steps (and split-K for the decode tiling on a few SMs).
    for m, k, n in ((3, 1024, 7), (17, 260, 33)):
        a = torch.full((m, k), value, dtype=torch.int8, device=device)
        b = pack_weights(torch.full((k, n), weight, dtype=torch.int8)).to(device)
        c = liger_core.call("int2_matmul", a, b, impl="triton")
        assert torch.equal(c.cpu(), torch.full((m, n), value * weight * k, dtype=torch.int32))
        check(a, b, c)


def test_every_byte(device):
    """All 256 bytes as packed rows, code 3 included (it decodes as weight 2, like the reference)."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(64, 4).to(device)
    a = torch.randint(-128, 128, (5, 256), dtype=torch.int8).to(device)
    check(a, b)


@pytest.mark.parametrize("weights_left", (False, True))
@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("m, k, n", ((40, 4 * 70, 50), (33, 4 * 64, 17), (16, 4 * 96, 48)))
def test_many_tiles(kernel_module, device, m, k, n, splits, weights_left):
    """16 x 16 tiles, 32 packed rows per step (int8 tensor-core products need K >= 32 on a GPU): several tiles along
    M, N and K/4, partial edge tiles, K/4 a multiple of BLOCK_K or not; the product computed as a @ w and as
    (wᵀ @ aᵀ)ᵀ."""
    a, b = make(m, k, n, device, seed=splits)
    check(a, b, kernel_module.int2_matmul_tiled(a, b, 16, 16, 32, splits, weights_left=weights_left))


def test_weights_left_with_uneven_tiles(kernel_module, device):
    """The transposed product with tiles of different sides (a wrong transposition shows as a wrong shape or a
    wrong value), strided inputs."""
    a, b = make(37, 4 * 80, 45, device, seed=11)
    check(a, b, kernel_module.int2_matmul_tiled(a, b, 16, 32, 32, 1, weights_left=True))
    check(a[::2], b[:, 1::2], kernel_module.int2_matmul_tiled(a[::2], b[:, 1::2], 32, 16, 32, 2, weights_left=True))


def test_strided(device):
    a, b = make(9, 48, 22, device, seed=5)
    a_t = a.t().contiguous().t()  # column-major
    b_slice = b[:, 3:17]  # row stride 22
    check(a_t, b_slice)
    check(a[::2], b[:, ::3])


@pytest.mark.parametrize("m, k, n", ((0, 8, 5), (3, 8, 0), (3, 0, 5)))
def test_empty(device, m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8).to(device)
    b = torch.randint(0, 256, (k // 4, n), dtype=torch.int32).to(torch.uint8).to(device)
    c = liger_core.call("int2_matmul", a, b, impl="triton")
    assert c.shape == (m, n) and c.dtype == torch.int32
    assert torch.equal(c.cpu(), torch.zeros((m, n), dtype=torch.int32))


def test_heuristics(kernel_module):
    assert kernel_module.tile(1)[0] == 16 and kernel_module.tile(16)[0] == 16
    assert kernel_module.tile(17)[0] == 64 and kernel_module.tile(8192)[:3] == (256, 128, 64)
    assert kernel_module.tile(8192)[5] and not kernel_module.tile(1)[5]  # weights on the left past decode
    # Decode on a 132-SM GPU: 64 output tiles of M=1, K=N=8192 are split along K; large M is not.
    assert kernel_module.split_k(64, 2048, 128, 264) > 1
    assert kernel_module.split_k(2048, 1024, 64, 264) == 1
    assert kernel_module.split_k(1, 3, 128, 264) == 1  # one K step: nothing to split


def test_large_m_tiling(device):
    """The 128 x 128 tiling, with a partial second tile along M."""
    check(*make(130, 4 * 70, 9, device, seed=7))


def test_supports(kernel_module):
    a = torch.empty((2, 8), dtype=torch.int8)
    b = torch.empty((2, 3), dtype=torch.uint8)
    assert kernel_module.supports((a, b), {}) == []
    big = torch.empty((1, kernel_module.MAX_K + 4), dtype=torch.int8)
    assert "limit" in kernel_module.supports((big, b), {})[0]
