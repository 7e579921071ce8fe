"""Host time of the pieces of one small rms_norm step, on a GPU (at 64 x 1024 every piece is host-bound).

    python benchmarks/host_breakdown.py [--steps 500]

Each line is the mean wall time of back-to-back repetitions of one piece, with a synchronise only at the end, so it is
the host's cost of issuing that piece: a torch op, a raw Triton launch, the same launch through Triton's compiled
kernel handle, our launchers, our dispatch with and without autograd, and the autograd engine's share (the backward
runs on the engine's device thread unless multithreading is turned off).
"""

import argparse

import torch
import triton
from dispatch_overhead import per_call_us  # this folder is on sys.path when a script here runs
from liger_backends.triton import rms_norm as triton_rms_norm

import liger_core


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    xd, wd = x.detach(), w.detach()
    y, rstd = triton_rms_norm.rms_norm_forward(xd, wd, 1e-6, 0.0, 0)
    kernel = triton_rms_norm.rms_norm_forward_kernel
    block_rows, num_warps = triton_rms_norm.forward_tile(1024, 64)
    grid = (triton.cdiv(64, block_rows),)
    launch_args = (xd, y, wd, rstd, 64, 1024, 1024, 1024, 1e-6, 0.0)
    constexprs = dict(CASTING=0, HAS_WEIGHT=True, BLOCK_ROWS=block_rows, BLOCK_COLS=1024)

    def raw_launch():
        kernel[grid](*launch_args, **constexprs, num_warps=num_warps)

    compiled = kernel[grid](*launch_args, **constexprs, num_warps=num_warps)
    runner = compiled[grid]
    all_args = (*launch_args, *constexprs.values())

    def compiled_launch():
        runner(*all_args)

    stream = torch.cuda.current_stream().cuda_stream

    def compiled_run():
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *all_args)

    pieces = {
        "torch.empty": lambda: torch.empty(64, 1024, device="cuda"),
        "torch op (x.sum())": lambda: xd.sum(),
        "triton launch kernel[grid](...)": raw_launch,
        "triton CompiledKernel[grid](...)": compiled_launch,
        "triton CompiledKernel.run(...)": compiled_run,
        "our rms_norm_forward launcher": lambda: triton_rms_norm.rms_norm_forward(xd, wd, 1e-6, 0.0, 0),
        "our rms_norm_backward launcher": lambda: triton_rms_norm.rms_norm_backward(dy, xd, wd, rstd, 0.0, 0, True),
    }
    for impl in ("triton", "cuda"):
        pieces[f"call {impl}, no grad"] = lambda impl=impl: liger_core.call("rms_norm", xd, wd, impl=impl)
        pieces[f"call {impl}, forward with grad"] = lambda impl=impl: liger_core.call("rms_norm", x, w, impl=impl)
        pieces[f"call {impl}, forward+backward"] = lambda impl=impl: liger_core.call(
            "rms_norm", x, w, impl=impl
        ).backward(dy)
    pieces["eager torch rms_norm forward+backward"] = lambda: torch.nn.functional.rms_norm(
        x, (1024,), w, 1e-6
    ).backward(dy)
    for name, fn in pieces.items():
        try:
            print(f"{name:48s} {per_call_us(fn, args.steps):8.1f} us", flush=True)
        except Exception as error:
            print(f"{name:48s} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
    torch.autograd.set_multithreading_enabled(False)
    for impl in ("triton", "cuda"):
        fn = pieces[f"call {impl}, forward+backward"]
        print(f"{'call ' + impl + ', fwd+bwd, single-threaded autograd':48s} {per_call_us(fn, args.steps):8.1f} us")


if __name__ == "__main__":
    main()
