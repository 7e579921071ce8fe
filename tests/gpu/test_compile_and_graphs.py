"""On a CUDA GPU: every first-party backend's kernels under torch.compile(fullgraph=True) and in a CUDA graph,
forward and backward, against the same kernels run eagerly."""

import pytest
import torch

import liger_core
from liger_core.registry import get_registry

pytestmark = pytest.mark.gpu


def _cuda_cases():
    registry = get_registry()
    for op in registry.operator_names():
        for backend in registry.implementations(op):
            if registry.backends[backend].first_party:
                yield pytest.param(op, backend, id=f"{op}-{backend}")


def _inputs(op, seed=0):
    spec = get_registry().operator(op)
    dtype = torch.bfloat16 if torch.bfloat16 in spec.dtypes else spec.dtypes[0]  # int2_matmul takes int8
    inputs, attrs = spec.make_inputs("cuda", dtype, "small", seed)
    inputs = tuple(
        t.requires_grad_(True) if isinstance(t, torch.Tensor) and i in spec.differentiable_inputs else t
        for i, t in enumerate(inputs)
    )
    return spec, inputs, attrs


def _assert_close_bf16(got, expected):
    if not expected.is_floating_point():
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        return
    # Inductor may round bf16 intermediates at other points than eager does: allow two bf16 ulps of the largest value.
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, atol=2 * 2**-7 * scale, rtol=2 * 2**-7)


def _forward_backward(fn, spec, inputs):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    wrt = [inputs[i] for i in spec.differentiable_inputs if isinstance(inputs[i], torch.Tensor)]
    if not wrt:  # int2_matmul
        return outputs[0], ()
    # Every differentiable output takes part (rope's k is reached only through its second output).
    loss = sum(
        out.float().sum() for out, out_spec in zip(outputs, spec.outputs) if out is not None and out_spec.differentiable
    )
    return outputs[0], torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("op, backend", list(_cuda_cases()))
def test_compiled_matches_eager_without_recompiling(op, backend):
    import torch._dynamo.testing

    torch._dynamo.reset()
    spec, _, attrs = _inputs(op)
    eager = lambda *xs: liger_core.call(op, *xs, impl=backend, **attrs)  # noqa: E731
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second step must reuse the first step's graph
        got_out, got_grads = _forward_backward(compiled, spec, _inputs(op, seed)[1])
    _, last_inputs, _ = _inputs(op, 1)
    expected_out, expected_grads = _forward_backward(eager, spec, last_inputs)
    _assert_close_bf16(got_out, expected_out)
    for got, expected in zip(got_grads, expected_grads):
        _assert_close_bf16(got, expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("op, backend", list(_cuda_cases()))
def test_cuda_graph_capture_and_replay(op, backend):
    spec, inputs, attrs = _inputs(op)
    fn = lambda *xs: liger_core.call(op, *xs, impl=backend, **attrs)  # noqa: E731
    static_inputs = tuple(
        t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compiles kernels, selects the backend (may synchronise) outside the capture
            _forward_backward(fn, spec, static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = _forward_backward(fn, spec, static_inputs)
    _, fresh, _ = _inputs(op, seed=3)
    with torch.no_grad():
        for target, source in zip(static_inputs, fresh):
            if isinstance(target, torch.Tensor):
                target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    expected_out, expected_grads = _forward_backward(fn, spec, fresh)
    torch.testing.assert_close(static_out, expected_out, atol=1e-2, rtol=1e-2)
    for got, expected in zip(static_grads, expected_grads):
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_compiled_patched_llama_matches_eager_and_compiles_twice_over_lengths():
    """A patched Llama compiled whole (graph breaks allowed, Inductor) on the GPU, automatic backends: the same loss
    and gradients as the same model run eagerly, and two graphs over four sequence lengths (the compiled Llama
    training step crashed on the H200 while Inductor inlined our Triton kernels)."""
    import copy

    import torch._dynamo.testing

    transformers = pytest.importorskip("transformers")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    torch._dynamo.reset()
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).cuda()
    apply_liger_kernel_to_llama(model=model)
    model.train()
    twin = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, backend=counter)
    for length in (33, 47, 64, 80):
        generator = torch.Generator(device="cuda").manual_seed(length)
        ids = torch.randint(0, 1000, (2, length), device="cuda", generator=generator)
        labels = ids.clone()
        labels[0, :5] = -100
        expected = model(input_ids=ids, labels=labels).loss
        expected.backward()
        got = compiled(input_ids=ids, labels=labels).loss
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
            p.grad = q.grad = None
    assert counter.frame_count == 2
