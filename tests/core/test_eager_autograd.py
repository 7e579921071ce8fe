"""A kernel declaring ``eager_autograd`` records its own autograd node when called eagerly with gradients needed (the
CUDA backend's C++ autograd functions); the generic bridge still serves it under torch.compile, and serves every
kernel that does not declare it."""

import pytest
import torch

from liger_core import dispatch
from liger_core.registry import get_registry
from liger_core.spec import KernelSpec


def toy_kernel(eager_autograd: bool) -> KernelSpec:
    """rms_norm's signature, y = 3 x. Its `backward` deliberately returns 5 × the upstream gradient, so a gradient of
    5 says the bridge ran it and a gradient of 3 says autograd differentiated the forward's own graph."""

    def forward(inputs, attrs, needs_grad):
        x, weight = inputs
        return (x * 3.0,), None

    def backward(saved, grad_outputs):
        return grad_outputs[0] * 5.0, None

    return KernelSpec(op="rms_norm", forward=forward, backward=backward, eager_autograd=eager_autograd)


@pytest.fixture
def run_toy(monkeypatch):
    def run(eager_autograd: bool, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        kernel = toy_kernel(eager_autograd)
        registry = get_registry()
        original = registry.kernel
        monkeypatch.setattr(
            registry, "kernel", lambda op, backend: kernel if backend == "toy" else original(op, backend)
        )
        spec = registry.operator("rms_norm")
        inputs, attrs = spec.bind((x, None), {})

        def call(x):
            return dispatch.run_kernel(spec, "toy", (x, inputs[1]), attrs)[0]

        if compiled:
            torch._dynamo.reset()
            call = torch.compile(call, backend="eager", fullgraph=True)
        return call(x)

    return run


def gradient_factor(y: torch.Tensor, x: torch.Tensor) -> float:
    y.backward(torch.ones_like(y))
    factor = x.grad.flatten()[0].item()
    torch.testing.assert_close(x.grad, torch.full_like(x, factor))
    return factor


def test_eagerly_with_gradients_the_forward_records_its_own_node(run_toy):
    x = torch.randn(4, 7, requires_grad=True)
    y = run_toy(True, x)
    assert "KernelFunction" not in type(y.grad_fn).__name__
    assert gradient_factor(y, x) == 3.0  # autograd differentiated the forward; the kernel's `backward` never ran


def test_other_kernels_keep_the_bridge(run_toy):
    x = torch.randn(4, 7, requires_grad=True)
    y = run_toy(False, x)
    assert "KernelFunction" in type(y.grad_fn).__name__
    assert gradient_factor(y, x) == 5.0


def test_under_compile_the_bridge_serves_an_eager_autograd_kernel(run_toy):
    x = torch.randn(4, 7, requires_grad=True)
    y = run_toy(True, x, compiled=True)
    torch.testing.assert_close(y, x.detach() * 3.0)
    assert gradient_factor(y, x) == 5.0
