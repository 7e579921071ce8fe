"""Compilation behaviour: once per shape bucket (token dimensions dynamic), chunked fused-linear operators, nesting in
an outer torch.compile, and the CPU gate."""

import pytest
import torch
import torch._dynamo.testing
from liger_inductor import compiler
from torch._dynamo.utils import counters

import liger_core
from liger_core.errors import BackendUnavailableError
from liger_core.registry import get_registry
from liger_core.testing import assert_conforms


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _rms_norm_step(rows: int):
    x = torch.randn(rows, 19, requires_grad=True)
    w = torch.randn(19, requires_grad=True)
    y = liger_core.call("rms_norm", x, w, impl="inductor")
    y.backward(torch.randn_like(y))
    expected = liger_core.call("rms_norm", x, w, impl="reference")
    torch.testing.assert_close(y, expected)
    return x


def test_second_call_in_the_same_shape_bucket_does_not_recompile():
    kernel = get_registry().kernel("rms_norm", "inductor")
    _rms_norm_step(37)
    graphs, copies = _graphs(), kernel.forward.compiled.compilations
    # same bucket (37 and 41 round up to 64), and other token counts too: the token dimension is dynamic
    for rows in (41, 37, 100, 7):
        x = _rms_norm_step(rows)
    assert _graphs() == graphs
    assert kernel.forward.compiled.compilations == copies
    assert not hasattr(x, "_dynamo_dynamic_indices")  # the caller's tensors carry no mark


def test_each_signature_gets_its_own_compiled_copy():
    compiled = get_registry().kernel("swiglu", "inductor").forward.compiled
    a, b = torch.randn(3, 11), torch.randn(3, 11)
    before = compiled.compilations
    liger_core.call("swiglu", a, b, impl="inductor")
    liger_core.call("swiglu", torch.randn(9, 11), torch.randn(9, 11), impl="inductor")  # other token count: same
    assert compiled.compilations == before + 1
    liger_core.call("swiglu", torch.randn(3, 13), torch.randn(3, 13), impl="inductor")  # other hidden size: new
    assert compiled.compilations == before + 2
    sizes = {signature[0][0][3] for signature in compiled.signatures()}
    assert {(None, 11), (None, 13)} <= sizes


def test_fused_linear_cross_entropy_chunks_share_one_graph(monkeypatch):
    from liger_inductor import fused_linear_cross_entropy

    # 37 tiny rows at vocabulary 53: 8 rows per chunk, so four full chunks and a last one of 5 rows
    monkeypatch.setattr(compiler, "CHUNK_BYTES", 8 * 53 * 4)
    assert compiler.chunk_rows(37, 53) == 8
    before = fused_linear_cross_entropy.CHUNK.compilations
    assert_conforms("fused_linear_cross_entropy", "inductor", torch.float32, attrs={"with_bias": True})
    assert fused_linear_cross_entropy.CHUNK.compilations == before + 1


def test_preference_tiles_share_one_graph(monkeypatch):
    from liger_inductor import preference

    monkeypatch.setattr(compiler, "CHUNK_BYTES", 4 * 4 * 1024)  # a few rows per tile at any tiny vocabulary
    before = preference.TOKEN_PASS.compilations, preference.GRADIENT_PASS.compilations
    assert_conforms("fused_linear_simpo", "inductor", torch.float32)
    after = preference.TOKEN_PASS.compilations, preference.GRADIENT_PASS.compilations
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1


def test_works_inside_an_outer_torch_compile():
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(x, w):
        return liger_core.call("rms_norm", x, w, impl="inductor") * 2

    x, w = torch.randn(5, 19, requires_grad=True), torch.randn(19, requires_grad=True)
    for _ in range(2):
        got = step(x, w)
    torch.testing.assert_close(got, liger_core.call("rms_norm", x, w, impl="reference") * 2)
    got.sum().backward()
    assert counter.frame_count == 1
    assert x.grad is not None and w.grad is not None


def test_cpu_needs_the_variable_and_is_never_picked_automatically(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(8)
    assert liger_core.dispatch.select_backend("rms_norm", x, w) == "reference"
    monkeypatch.delenv(compiler.CPU_VARIABLE)
    liger_core.dispatch.clear_memo()
    with pytest.raises(BackendUnavailableError, match=compiler.CPU_VARIABLE):
        liger_core.call("rms_norm", x, w, impl="inductor")
