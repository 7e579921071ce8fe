"""Where the host time of one small forward+backward goes, on a GPU (where the host is the bottleneck).

    python benchmarks/host_profile.py [--op rms_norm|swiglu|layer_norm] [--impl triton]

Prints the mean wall time per step of back-to-back steps (host-bound at this shape), then cProfile's top functions
by own time over the same steps.
"""

import argparse
import cProfile
import pstats
import time

import torch

import liger_core


def make_step(op: str, impl: str | None):
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    if op == "rms_norm":
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return lambda: liger_core.call("rms_norm", x, w, impl=impl).backward(dy)
    if op == "layer_norm":
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return lambda: liger_core.call("layer_norm", x, w, b, impl=impl).backward(dy)
    b = torch.randn_like(x).requires_grad_(True)
    return lambda: liger_core.call(op, x, b, impl=impl).backward(dy)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", default="rms_norm")
    parser.add_argument("--impl", default=None)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    step = make_step(args.op, args.impl)
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"{args.op} ({args.impl or 'auto'}): {(time.perf_counter() - started) / args.steps * 1e6:.1f} us per step")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(28)


if __name__ == "__main__":
    main()
