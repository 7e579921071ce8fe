"""Every Triton operator under torch.compile(fullgraph=True), forward and backward, on the CPU through Triton's
interpreter: the launchers run as custom ops opaque to torch.compile, so the compiled graph calls the same launchers
with real tensors, and their fake runs give the outputs' metadata. Compiled and eager must agree, and a second step
on fresh inputs of the same shapes must reuse the graph. (tests/gpu runs the same on a GPU with Inductor.)

The backend is aot_eager: Dynamo's trace, AOTAutograd's functionalisation and joint graph, no code generation
(Inductor's C++ code generation would only slow the CPU run down; the kernels are opaque to it either way).
"""

import os

import pytest
import torch

import liger_core
from liger_core.registry import get_registry

# CPU tensors reach Triton only through its interpreter, which tests/conftest.py turns on where there is no GPU.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (on a GPU, tests/gpu compiles the same operators)",
)


def _inputs(op: str, seed: int, case: dict):
    spec = get_registry().operator(op)
    # fp32: the interpreter's bf16 tl.dot is wrong (DESIGN.md), and compiled and eager must agree to rounding.
    dtype = torch.float32 if torch.float32 in spec.dtypes else spec.dtypes[0]  # int2_matmul takes int8
    inputs, attrs = spec.make_inputs("cpu", dtype, "tiny", seed, **case)
    inputs = tuple(
        t.requires_grad_(True) if isinstance(t, torch.Tensor) and i in spec.differentiable_inputs else t
        for i, t in enumerate(inputs)
    )
    return spec, inputs, attrs


def _forward_backward(fn, spec, inputs):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    wrt = [inputs[i] for i in spec.differentiable_inputs if isinstance(inputs[i], torch.Tensor)]
    if not wrt:
        return outputs, ()
    loss = sum(
        out.float().sum() for out, out_spec in zip(outputs, spec.outputs) if out is not None and out_spec.differentiable
    )
    return outputs, torch.autograd.grad(loss, wrt)


def _assert_close(got, expected):
    if got is None or expected is None:
        assert got is None and expected is None
        return
    if not expected.is_floating_point():
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        return
    # The same kernels run in both; only glue (a scaling done out of place under compile) may round differently.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


OPS = [
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "embedding", "cross_entropy", "fused_linear_cross_entropy",
    "kl_div", "jsd", "fused_linear_jsd", "int2_matmul", "fused_linear_dpo", "fused_linear_orpo", "fused_linear_cpo",
    "fused_linear_simpo",
]  # fmt: skip


def test_the_list_covers_every_triton_operator():
    registry = get_registry()
    assert sorted(OPS) == sorted(op for op in registry.operator_names() if "triton" in registry.implementations(op))


def _cases():
    registry = get_registry()
    for op in OPS:
        for index, case in enumerate(registry.operator(op).cases):
            yield pytest.param(op, case, id=f"{op}-case{index}")


@pytest.mark.parametrize("op, case", list(_cases()))
def test_triton_operator_compiles_and_matches_eager(op, case):
    """Every conformance case of every operator (its attribute sets: options, optional inputs)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    spec, _, attrs = _inputs(op, 0, case)
    eager = lambda *xs: liger_core.call(op, *xs, impl="triton", **attrs)  # noqa: E731
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second step must reuse the first step's graph
        got_outputs, got_grads = _forward_backward(compiled, spec, _inputs(op, seed, case)[1])
    expected_outputs, expected_grads = _forward_backward(eager, spec, _inputs(op, 1, case)[1])
    for got, expected in zip(got_outputs, expected_outputs):
        _assert_close(got, expected)
    assert len(got_grads) == len(expected_grads)
    for got, expected in zip(got_grads, expected_grads):
        _assert_close(got, expected)
    assert counter.frame_count == 1


def _row_inputs(op: str, rows: int) -> tuple:
    """Inputs of `op` with `rows` token rows (the dimension that changes from batch to batch in training)."""
    g = torch.Generator().manual_seed(rows)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if op in ("rms_norm", "layer_norm"):
        x, w = randn(rows, 37).requires_grad_(), randn(37).requires_grad_()
        return (x, w) if op == "rms_norm" else (x, w, randn(37).requires_grad_())
    if op == "swiglu":
        return randn(rows, 29).requires_grad_(), randn(rows, 29).requires_grad_()
    if op == "cross_entropy":
        return randn(rows, 53).requires_grad_(), torch.randint(0, 53, (rows,), generator=g), None
    if op == "fused_linear_cross_entropy":
        target = torch.randint(0, 53, (rows,), generator=g)
        return randn(rows, 19).requires_grad_(), randn(53, 19).requires_grad_(), target, None, None
    if op == "jsd":
        return randn(rows, 53).log_softmax(-1).requires_grad_(), randn(rows, 53).log_softmax(-1), None
    if op == "fused_linear_jsd":
        return randn(rows, 19).requires_grad_(), randn(53, 19).requires_grad_(), randn(rows, 23), randn(53, 23), None
    if op == "kl_div":  # batchmean divides by the number of rows: a size the traced code must not specialise
        return randn(rows, 53).log_softmax(-1).requires_grad_(), randn(rows, 53).softmax(-1)
    if op == "fused_linear_dpo":  # 2 pairs of sequences of `rows` tokens, with a reference model
        target = torch.randint(0, 53, (4, rows), generator=g)
        target[0, :2] = -100  # a prompt
        weight, ref_weight = randn(53, 19).requires_grad_(), randn(53, 19)
        return randn(4, rows, 19).requires_grad_(), weight, target, None, randn(4, rows, 19), ref_weight, None
    if op == "rope":  # Hugging Face's layout: (B, T, H, D) projections seen as (B, H, T, D)
        q, k = randn(2, rows, 4, 8).transpose(1, 2), randn(2, rows, 2, 8).transpose(1, 2)
        angles = randn(2, rows, 4)
        angles = torch.cat([angles, angles], dim=-1)
        return q.requires_grad_(), k.requires_grad_(), angles.cos(), angles.sin()
    raise AssertionError(op)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize(
    "op",
    [
        "rms_norm",
        "layer_norm",
        "rope",
        "swiglu",
        "cross_entropy",
        "fused_linear_cross_entropy",
        "kl_div",
        "jsd",
        "fused_linear_jsd",
        "fused_linear_dpo",
    ],
)
def test_a_new_number_of_rows_does_not_recompile_again(op, impl):
    """As for PyTorch's own operators: the first new size makes Dynamo recompile with dynamic sizes, and further
    sizes reuse that graph. (A launcher's grid or chunk arithmetic must not put guards on the sizes in its fake
    run: liger_core.opaque. The reference's fused-linear losses run their chunk loops as such ops too.)"""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    attrs = {"kl_div": {"reduction": "batchmean"}, "fused_linear_dpo": {"use_ref_model": True}}.get(op, {})
    eager = lambda *xs: liger_core.call(op, *xs, impl=impl, **attrs)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    spec = get_registry().operator(op)
    for rows in (5, 7, 11, 13):
        got_outputs, got_grads = _forward_backward(compiled, spec, _row_inputs(op, rows))
        expected_outputs, expected_grads = _forward_backward(eager, spec, _row_inputs(op, rows))
        for got, expected in zip((*got_outputs, *got_grads), (*expected_outputs, *expected_grads)):
            _assert_close(got, expected)
    assert counter.frame_count == 2
