"""What a memoised dispatch costs over calling the kernel directly. A pytest-benchmark measurement: it reports
(run with --benchmark-enable), it never fails CI on a noisy machine. The assertions check results, not time."""

import torch

import liger_core
from liger_core.registry import get_registry


def _inputs():
    return torch.randn(4, 64), torch.randn(64)


def test_benchmark_kernel_called_directly(benchmark):
    kernel = get_registry().kernel("rms_norm", "reference")
    x, w = _inputs()
    attrs = {"eps": 1e-6, "offset": 0.0, "casting_mode": "llama", "in_place": True}
    (y,), _ = benchmark(kernel.forward, (x, w), attrs, False)
    assert y.shape == x.shape


def test_benchmark_memoised_dispatch(benchmark):
    x, w = _inputs()
    liger_core.call("rms_norm", x, w)  # fills the memo
    y = benchmark(liger_core.call, "rms_norm", x, w)
    kernel = get_registry().kernel("rms_norm", "reference")
    attrs = {"eps": 1e-6, "offset": 0.0, "casting_mode": "llama", "in_place": True}
    torch.testing.assert_close(y, kernel.forward((x, w), attrs, False)[0][0])
