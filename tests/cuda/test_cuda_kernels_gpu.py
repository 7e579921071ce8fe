"""On a CUDA GPU: the cuda backend's kernels on the paths the conformance suite's "small" and "llama8b" shapes do
not reach — odd sizes and misaligned views (the scalar fallbacks), rows too long for registers (the chunked norm
backwards and the re-reading forwards), mixed parameter dtypes, GQA with partial rotary, long runs of one embedding
index — each against the reference backend at the same dtypes, plus bitwise determinism of every backward.

Run with ``python -m pytest -m gpu tests/cuda -q``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import liger_core
from liger_core.registry import get_registry
from liger_core.testing import assert_conforms

pytestmark = pytest.mark.gpu

OPERATORS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "embedding")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The conformance suite's rule: an error against the fp64 truth at most twice the reference's own plus this floor
# (times 1 + the largest expected value).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _widen(t, dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(dtype).requires_grad_(t.requires_grad)
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _run(op, backend, inputs, attrs, truth=False):
    inputs = tuple(_widen(t, torch.float64 if truth else t.dtype) if isinstance(t, torch.Tensor) else t for t in inputs)
    outputs = liger_core.call(op, *inputs, impl=backend, **attrs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    spec = get_registry().operator(op)
    generator = torch.Generator().manual_seed(1)
    pairs = [
        (out, torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype))
        for out, out_spec in zip(outputs, spec.outputs)
        if out_spec.differentiable and isinstance(out, torch.Tensor) and out.requires_grad
    ]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad([p[0] for p in pairs], wrt, [p[1] for p in pairs]) if pairs and wrt else ()
    return [o for o in outputs if isinstance(o, torch.Tensor)] + list(grads)


def _error(a, b):
    diff = (a.detach().double() - b.detach().double()).abs()
    diff = torch.where(a.isnan() & b.isnan(), torch.zeros_like(diff), diff)
    return float(diff.max()) if diff.numel() else 0.0


def _check(op, inputs, attrs=None):
    attrs = attrs or {}
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    got = _run(op, "cuda", inputs, attrs)
    reference = _run(op, "reference", inputs, attrs)
    truth = _run(op, "reference", inputs, attrs, truth=True)
    assert len(got) == len(reference) == len(truth)
    for index, (g, r, t) in enumerate(zip(got, reference, truth)):
        assert g.shape == r.shape and g.dtype == r.dtype, f"result {index}: {g.shape} {g.dtype} vs {r.shape} {r.dtype}"
        if not r.is_floating_point():
            assert torch.equal(g, r), f"result {index} (integers) differs from the reference"
            continue
        scale = 1.0 + (float(t.detach().double().abs().nan_to_num().max()) if t.numel() else 0.0)
        allowed = 2 * _error(r, t) + FLOOR[dtype] * scale
        assert _error(g, t) <= allowed, f"result {index}: error {_error(g, t):.3g} > allowed {allowed:.3g}"
    # Deterministic: a second run gives the same bits, gradients included.
    for first, second in zip(got, _run(op, "cuda", inputs, attrs)):
        assert torch.equal(first.nan_to_num(), second.nan_to_num())


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


def _randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return torch.randn(*shape, device="cuda").mul(scale).to(dtype)


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_odd_shapes_conform(op, dtype):
    # The conformance suite's "tiny" inputs (odd sizes: every kernel's element-wise fallback) on the GPU.
    for case in get_registry().operator(op).cases:
        assert_conforms(op, "cuda", dtype, device="cuda", size="tiny", seed=5, attrs=case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [8192, 20000, 65536, 262144, 4099])
def test_rms_norm_long_and_odd_rows(dtype, hidden):
    rows = max(4, min(64, (1 << 21) // hidden))
    x = _grad(_randn(rows, hidden, dtype=dtype))
    weight = _grad(1 + _randn(hidden, dtype=dtype, scale=0.1))
    for attrs in ({}, {"casting_mode": "gemma", "offset": 1.0}, {"casting_mode": "none"}):
        _check("rms_norm", (x, weight), attrs)
    _check("rms_norm", (x, None), {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4096, 12288, 65537])
def test_layer_norm_long_and_odd_rows(dtype, hidden):
    rows = max(4, min(64, (1 << 21) // hidden))
    x = _grad((_randn(rows, hidden, dtype=torch.float32, scale=2.0) + 3.0).to(dtype))  # mean far from 0
    weight = _grad(1 + _randn(hidden, dtype=dtype, scale=0.1))
    bias = _grad(_randn(hidden, dtype=dtype, scale=0.1))
    _check("layer_norm", (x, weight, bias))
    _check("layer_norm", (x, weight, None))


def test_norms_with_parameters_in_another_dtype():
    x = _grad(_randn(33, 4096))
    for weight_dtype in (torch.float32, torch.float16):
        weight = _grad(1 + _randn(4096, dtype=weight_dtype, scale=0.1))
        for mode in ("llama", "gemma", "none"):
            _check("rms_norm", (x, weight), {"casting_mode": mode, "offset": 0.5})
        _check("layer_norm", (x, weight, _grad(_randn(4096, dtype=weight_dtype, scale=0.1))))


def test_misaligned_views_take_the_scalar_path():
    # Rows that start one element past a 16-byte boundary, with an odd row stride.
    base = _randn(48, 1025)
    x = _grad(base[:, 1:].detach())
    _check("rms_norm", (x, _grad(1 + _randn(1024, scale=0.1))))
    _check("layer_norm", (x, _grad(1 + _randn(1024, scale=0.1)), _grad(_randn(1024, scale=0.1))))
    both = _randn(64, 2 * 1001)
    a, b = (_grad(t.detach()) for t in both.chunk(2, dim=-1))
    _check("swiglu", (a, b))
    _check("geglu", (a, b))
    logits = _grad(_randn(40, 50258, scale=2.0)[:, 1:].detach())  # GPT-2's vocabulary, misaligned
    target = torch.randint(0, 50257, (40,), device="cuda")
    _check("cross_entropy", (logits, target, None), {"label_smoothing": 0.1})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_every_option_on_a_real_vocabulary(dtype):
    rows, vocab = 96, 32000
    logits = _grad(_randn(rows, vocab, dtype=dtype, scale=2.0))
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    weight = torch.rand(vocab, device="cuda").add(0.5)
    for attrs in (
        {"reduction": "sum", "label_smoothing": 0.1},
        {"reduction": "none", "softcap": 30.0, "lse_square_scale": 1e-4, "return_z_loss": True},
        {"return_token_accuracy": True, "return_predicted_tokens": True},
    ):
        _check("cross_entropy", (logits, target.to(torch.int32), weight.to(dtype)), attrs)
        _check("cross_entropy", (logits, target, weight), attrs)  # fp32 class weights
    all_ignored = torch.full((rows,), -100, device="cuda")
    _check("cross_entropy", (logits, all_ignored, None), {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_lean_and_optioned_kernels_on_llama_vocabulary(dtype):
    # The row kernel comes in two builds: without softcap, label smoothing and argmax (the common call), and with
    # them. Each at Llama-3's vocabulary and at a misaligned GPT-2 one (one element at a time), with class weights,
    # int32 targets, the three reductions (_check's backward feeds a random upstream gradient: never exactly 1).
    rows = 40
    for vocab, misaligned in ((128256, False), (50257, True)):
        if misaligned:
            logits = _grad(_randn(rows, vocab + 1, dtype=dtype, scale=2.0)[:, 1:].detach())
        else:
            logits = _grad(_randn(rows, vocab, dtype=dtype, scale=2.0))
        target = torch.randint(0, vocab, (rows,), device="cuda")
        target[::7] = -100
        weight = torch.rand(vocab, device="cuda").add(0.5)
        for attrs in ({}, {"reduction": "none"}, {"reduction": "sum", "label_smoothing": 0.1}):
            _check("cross_entropy", (logits, target, None), attrs)
            _check("cross_entropy", (logits, target.to(torch.int32), weight.to(dtype)), attrs)
        _check("cross_entropy", (logits, target, weight), {"softcap": 20.0, "return_token_accuracy": True})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_gqa_partial_rotary_and_fp32_tables(dtype):
    batch, seq, q_heads, k_heads, head_dim = 2, 33, 12, 4, 96
    for unsqueeze_dim, rotary_dim in ((1, 64), (2, 32), (1, None)):
        heads_first = unsqueeze_dim == 1
        q_shape = (batch, q_heads, seq, head_dim) if heads_first else (batch, seq, q_heads, head_dim)
        k_shape = (batch, k_heads, seq, head_dim) if heads_first else (batch, seq, k_heads, head_dim)
        q, k = _grad(_randn(*q_shape, dtype=dtype)), _grad(_randn(*k_shape, dtype=dtype))
        width = rotary_dim or head_dim
        angles = torch.arange(seq, device="cuda")[:, None] * torch.rand(width // 2, device="cuda")
        angles = torch.cat((angles, angles), dim=-1).expand(batch, seq, width)
        attrs = {"unsqueeze_dim": unsqueeze_dim, "rotary_dim": rotary_dim}
        _check("rope", (q, k, angles.cos().to(dtype), angles.sin().to(dtype)), attrs)
        _check("rope", (q, k, angles.cos(), angles.sin()), attrs)  # fp32 tables with low-precision q and k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_long_runs_of_one_index(dtype):
    weight = _grad(_randn(1000, 4096, dtype=dtype))
    indices = torch.randint(0, 1000, (4096,), device="cuda")
    indices[::2] = 7  # one run of 2048 tokens
    indices[1::16] = 0  # the padding row
    _check("embedding", (indices, weight), {"padding_idx": 0})
    _check("embedding", (indices.to(torch.int32), weight), {})
    odd = _grad(_randn(300, 77, dtype=dtype))
    _check("embedding", (torch.randint(-5, 305, (3, 50), device="cuda"), odd), {"padding_idx": -1})


def test_extension_is_cached_and_the_backend_is_selected():
    from liger_backends.cuda import _extension

    assert get_registry().backends["cuda"].unavailable_reasons() == []
    module = _extension.module()
    assert module is _extension.module()
    # Loaded from the cache folder named by the build key (of the test that built it: each test has its own cache).
    assert Path(module.__file__).parent.name.startswith("liger_cuda_")
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    assert liger_core.select_backend("rms_norm", x, None, impl="cuda") == "cuda"
