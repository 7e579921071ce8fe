"""Host time per call of the dispatch layers on a GPU, at a shape small enough for the host to be the bottleneck.

    python benchmarks/dispatch_overhead.py

Each figure is the mean wall time of 300 back-to-back calls followed by one synchronisation, in microseconds.
"""

import time

import torch

import liger_core
from liger_core.registry import get_registry


def per_call_us(fn, repeats: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    attrs = {"eps": 1e-6, "offset": 0.0, "casting_mode": "llama", "in_place": True}
    kernel = get_registry().kernel("rms_norm", "triton")
    from liger_backends.triton import rms_norm as triton_rms_norm

    def forward_backward():
        liger_core.call("rms_norm", x, w).backward(dy)

    def eager_forward_backward():
        variance = x.float().pow(2).mean(-1, keepdim=True)
        (w * (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)).backward(dy)

    rows = {
        "raw launcher, forward": lambda: triton_rms_norm.rms_norm_forward(x.detach(), w.detach(), 1e-6, 0.0, 0),
        "kernel.forward (no dispatch)": lambda: kernel.forward((x.detach(), w.detach()), attrs, False),
        "liger_core.call, no grad": lambda: liger_core.call("rms_norm", x.detach(), w.detach()),
        "liger_core.call, forward+backward": forward_backward,
        "PyTorch eager, forward+backward": eager_forward_backward,
    }
    for name, fn in rows.items():
        print(f"{name:40s} {per_call_us(fn):8.1f} us")


if __name__ == "__main__":
    main()
