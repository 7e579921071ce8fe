"""torch.compile(fullgraph=True) through the dispatcher: selection happens at trace time as a constant, kernels with
a backward run through the autograd bridge, and a second step does not recompile."""

import pytest
import torch
import torch._dynamo.testing

import liger_core


def compile_counted(fn):
    counter = torch._dynamo.testing.CompileCounter()
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def test_reference_rms_norm_compiles_without_graph_break_or_recompile():
    torch._dynamo.reset()
    fn, counter = compile_counted(lambda x, w: liger_core.call("rms_norm", x, w, eps=1e-5) * 2)
    x, w = torch.randn(5, 19, requires_grad=True), torch.randn(19, requires_grad=True)
    expected = liger_core.call("rms_norm", x, w, eps=1e-5) * 2
    for _ in range(2):
        got = fn(x, w)
        torch.testing.assert_close(got, expected)
    assert counter.frame_count == 1
    got.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_cross_entropy_compiles_with_all_outputs():
    torch._dynamo.reset()
    fn, counter = compile_counted(
        lambda z, t: liger_core.call("cross_entropy", z, t, None, return_z_loss=True, lse_square_scale=1e-3)
    )
    z, t = torch.randn(9, 31, requires_grad=True), torch.randint(0, 31, (9,))
    loss, z_loss, _, _ = fn(z, t)
    expected = liger_core.call("cross_entropy", z, t, None, return_z_loss=True, lse_square_scale=1e-3)
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(z_loss, expected[1])
    loss.backward()
    assert counter.frame_count == 1


def test_plugin_kernel_with_backward_compiles_through_the_bridge():
    torch._dynamo.reset()
    fn, counter = compile_counted(lambda x, w: liger_core.call("rms_norm", x, w, impl="testplug"))
    x, w = torch.randn(5, 19, requires_grad=True), torch.randn(19, requires_grad=True)
    y = fn(x, w)
    y.backward(torch.ones_like(y))
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    liger_core.call("rms_norm", x2, w2, impl="reference").backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert counter.frame_count == 1


def test_as_dtype_leaves_a_tensor_of_that_dtype_untouched_and_converts_others():
    """Kernels with a backward return outputs through as_dtype: on torch 2.11 a no-op ``.to`` as an output's last op
    zeroes its gradient under torch.compile (the test above failed there with the test plugin's bare ``.to``; CI's
    torch 2.13 cannot show it, the GPU machine's 2.11 does). Here: no copy where the dtype matches, a conversion
    otherwise."""
    from liger_core.spec import as_dtype

    t = torch.randn(3, 5)
    assert as_dtype(t, torch.float32) is t
    converted = as_dtype(t, torch.bfloat16)
    assert converted.dtype == torch.bfloat16 and converted is not t
    torch.testing.assert_close(converted.float(), t, rtol=2**-8, atol=0)


def test_selection_inside_compile_follows_forcing_at_trace_time(monkeypatch):
    torch._dynamo.reset()
    calls = []
    import liger_core.dispatch as dispatch

    original = dispatch._select

    def spy(spec, inputs, attrs, impl, tracing):
        calls.append(tracing)
        return original(spec, inputs, attrs, impl, tracing)

    monkeypatch.setattr(dispatch, "_select", spy)
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "testplug")
    fn = torch.compile(lambda x: liger_core.call("rms_norm", x, None), fullgraph=True, backend="eager")
    fn(torch.randn(3, 8))
    fn(torch.randn(3, 8))
    assert calls == [True]  # once, at trace time


def test_trace_time_selection_sees_metadata_not_data_and_follows_dynamic_shapes(monkeypatch):
    """Dynamo computes the real value of any tensor handed to a constant function, which would run the graph so far
    at trace time: the selection must get metadata only. Sizes that become symbolic must not break it either."""
    torch._dynamo.reset()
    import liger_core.dispatch as dispatch

    seen = []
    original = dispatch._select

    def spy(spec, inputs, attrs, impl, tracing):
        seen.append((tracing, type(inputs[0]).__name__))
        return original(spec, inputs, attrs, impl, tracing)

    monkeypatch.setattr(dispatch, "_select", spy)
    w = torch.randn(8)
    fn, counter = compile_counted(lambda x: liger_core.call("rms_norm", torch.sin(x) * 2, w))
    for rows in (3, 5, 7):  # the second shape makes the rows dimension dynamic; the third reuses that graph
        x = torch.randn(rows, 8)
        torch.testing.assert_close(fn(x), liger_core.call("rms_norm", torch.sin(x) * 2, w))
    traced = [kind for tracing, kind in seen if tracing]
    assert traced == ["FakeTensor", "FakeTensor"]
    assert counter.frame_count == 2


@pytest.mark.parametrize(
    "options",
    [
        dict(reduction="mean"),
        dict(reduction="sum", with_bias=True, return_z_loss=True, lse_square_scale=1e-3),
        dict(reduction="mean", return_token_accuracy=True, return_predicted_tokens=True, label_smoothing=0.1),
        dict(reduction="none", with_bias=True),
    ],
    ids=["mean", "sum-bias-z", "mean-stats", "none-bias"],
)
def test_reference_fused_linear_cross_entropy_compiled_matches_eager(options):
    # The reference's forward runs as one custom op under compile (on the H200, torch 2.11, its traced chunk loop
    # gave all-zero gradients): outputs and gradients must equal eager's for every kind of output.
    from liger_core.registry import get_registry

    torch._dynamo.reset()
    options = dict(options)
    with_bias = options.pop("with_bias", False)
    spec = get_registry().operator("fused_linear_cross_entropy")

    def make(seed):
        inputs, _ = spec.make_inputs("cpu", torch.float32, "tiny", seed, with_bias=with_bias)
        return tuple(
            t.requires_grad_(True) if t is not None and i in spec.differentiable_inputs else t
            for i, t in enumerate(inputs)
        )

    eager = lambda *xs: liger_core.call("fused_linear_cross_entropy", *xs, impl="reference", **options)  # noqa: E731
    fn, counter = compile_counted(eager)
    for seed in (0, 1):
        inputs = make(seed)
        got = fn(*inputs)
    expected_inputs = make(1)
    expected = eager(*expected_inputs)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e)
    wrt = [i for i in (0, 1, 3) if inputs[i] is not None]
    got_grads = torch.autograd.grad(got[0].sum(), [inputs[i] for i in wrt])
    expected_grads = torch.autograd.grad(expected[0].sum(), [expected_inputs[i] for i in wrt])
    for g, e in zip(got_grads, expected_grads):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e)
    assert counter.frame_count == 1


def test_dynamic_true_with_attributes_read_from_a_module():
    # Under dynamic=True Dynamo makes the floats and sizes it reads from objects symbolic (a module's eps, the
    # operator's defaults, a tensor's hidden size); the trace-time selection needs them as constants.
    torch._dynamo.reset()

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(19))
            self.eps = 1e-5

        def forward(self, x):
            return liger_core.call("rms_norm", x, self.weight, eps=self.eps, impl="reference")

    norm = Norm()
    fn, counter = compile_counted_dynamic(norm)
    for rows in (5, 8, 13):
        x = torch.randn(rows, 19, requires_grad=True)
        torch.testing.assert_close(fn(x), norm(x))
    assert counter.frame_count == 1


def compile_counted_dynamic(fn):
    counter = torch._dynamo.testing.CompileCounter()
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=counter), counter
