"""Sweep the launch constants of the Triton kernels on a GPU (the values in backends/triton/ come from these runs).

    python benchmarks/tune.py [--only int2,cross_entropy,...] [--out sweep.json]

For each kernel the module constants are set, the operator is timed forward+backward (``triton.testing.do_bench``
median) at the issues' reference shape through ``liger_core.call(..., impl="triton")``, and peak extra memory is
recorded. Each setting's loss and gradients are compared with those of the module's own constants (relative error of
the norm under 1e-2): a setting that computes something else is recorded as an error, not timed. Prints one table
per kernel, fastest first.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
from triton.testing import do_bench

import liger_core

BF16 = torch.bfloat16


def time_step(step) -> tuple[float, float]:
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return float(do_bench(step, warmup=50, rep=300, return_mode="median")), peak


def outputs_of(step) -> list[torch.Tensor]:
    return [t.detach().float().clone() for t in step()]


def check_against(expected: list[torch.Tensor], step) -> None:
    for index, (got, want) in enumerate(zip(outputs_of(step), expected)):
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        if not error < 1e-2:  # NaN fails too
            raise AssertionError(f"output {index} differs from the module's constants: relative error {error:.3g}")


def sweep(name: str, module, settings: list[dict], step) -> list[dict]:
    """`step` runs forward+backward and returns the loss and the gradients (the comparison's operands)."""
    original = {key: getattr(module, key) for key in settings[0]}
    expected = outputs_of(step)
    rows = []
    for setting in settings:
        for key, value in setting.items():
            setattr(module, key, value)
        try:
            check_against(expected, step)
            ms, peak = time_step(step)
            rows.append({"kernel": name, **{k: str(v) for k, v in setting.items()}, "ms": ms, "peak_mib": peak})
        except Exception as error:  # a tile that does not fit (shared memory, registers), a wrong result: go on
            rows.append({"kernel": name, **{k: str(v) for k, v in setting.items()}, "error": str(error)[:200]})
        torch.cuda.empty_cache()
    for key, value in original.items():
        setattr(module, key, value)
    print(f"\n{name}")
    for row in sorted(rows, key=lambda r: r.get("ms", 1e9)):
        print("  ", json.dumps(row))
    return rows


def grid(**axes) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def cross_entropy():
    from liger_backends.triton import cross_entropy as module

    logits = torch.randn(8192, 128256, device="cuda", dtype=BF16, requires_grad=True)
    target = torch.randint(0, 128256, (8192,), device="cuda")

    def step():
        loss = liger_core.call("cross_entropy", logits, target, None, impl="triton")[0]
        loss.backward()
        grad, logits.grad = logits.grad, None
        return loss, grad

    settings = grid(BLOCK_V=[2048, 4096, 8192], ROW_WARPS=[4, 8, 16], ROW_STAGES=[1, 2, 3])
    return sweep("cross_entropy (8192, 128256) bf16", module, settings, step)


def kl_div():
    from liger_backends.triton import kl_div as module

    log_q = torch.randn(4096, 128256, device="cuda").log_softmax(-1).requires_grad_(True)
    p = torch.randn(4096, 128256, device="cuda").softmax(-1)

    def step():
        loss = liger_core.call("kl_div", log_q, p, reduction="batchmean", impl="triton")
        loss.backward()
        grad, log_q.grad = log_q.grad, None
        return loss, grad

    return sweep("kl_div (4096, 128256) fp32", module,
                 grid(BLOCK=[2048, 4096, 8192], NUM_WARPS=[4, 8], PROGRAMS_PER_SM=[4, 8], STAGES=[1, 3]),
                 step)  # fmt: skip


def jsd():
    from liger_backends.triton import jsd as module

    log_q = torch.randn(4096, 128256, device="cuda").log_softmax(-1).requires_grad_(True)
    log_p = torch.randn(4096, 128256, device="cuda").log_softmax(-1)

    def step():
        loss = liger_core.call("jsd", log_q, log_p, None, impl="triton")
        loss.backward()
        grad, log_q.grad = log_q.grad, None
        return loss, grad

    return sweep("jsd (4096, 128256) fp32", module,
                 grid(TILE=[4096, 8192, 16384], NUM_WARPS=[4, 8, 16], STAGES=[1, 3]), step)  # fmt: skip


def fused_linear_cross_entropy_step(hidden: int, vocab: int):
    """Forward+backward of the Triton fused-linear CE on 8192 bf16 tokens, returning the loss and the gradients."""
    x = torch.randn(8192, hidden, device="cuda", dtype=BF16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=BF16) * hidden**-0.5).requires_grad_(True)
    target = torch.randint(0, vocab, (8192,), device="cuda")

    def step():
        loss = liger_core.call("fused_linear_cross_entropy", x, w, target, None, None, impl="triton")[0]
        loss.backward()
        grads = (x.grad, w.grad)
        x.grad = w.grad = None
        return loss, *grads

    return step


def fused_linear_cross_entropy_at(hidden: int) -> list[dict]:
    from liger_backends.triton import fused_linear_cross_entropy as module

    settings = [{"CHUNK_BYTES": {"cuda": mib << 20, "cpu": 64 << 10}} for mib in (64, 128, 256, 512, 1024)]
    step = fused_linear_cross_entropy_step(hidden, 128256)
    return sweep(f"fused_linear_cross_entropy x (8192, {hidden}) W (128256, {hidden})", module, settings, step)


def fused_linear_cross_entropy():
    # Issue 5's shape (hidden 4096) and the training step's (hidden 2048): the chunk trades memory for the depth of
    # the grad_W GEMM, which does not depend on the hidden size, while grad_W's size does.
    return fused_linear_cross_entropy_at(4096) + fused_linear_cross_entropy_at(2048)


def fused_linear_cross_entropy_gemma():
    """Gemma's vocabulary (x (8192, 3584), W (256000, 3584)): the 256 MiB budget alone gives 512-row chunks; the floor
    of MIN_CHUNK_ROWS rows gives 1024, in 500 MiB."""
    from liger_backends.triton import fused_linear_cross_entropy as module

    settings = [{"MIN_CHUNK_ROWS": floor} for floor in ({"cuda": 1024}, {}, {"cuda": 2048})]
    step = fused_linear_cross_entropy_step(3584, 256000)
    return sweep("fused_linear_cross_entropy x (8192, 3584) W (256000, 3584)", module, settings, step)


def fused_linear_jsd():
    from liger_backends.triton import fused_linear_jsd as module

    xs = torch.randn(4096, 2048, device="cuda", dtype=BF16, requires_grad=True)
    ws = (torch.randn(128256, 2048, device="cuda", dtype=BF16) * 2048**-0.5).requires_grad_(True)
    xt = torch.randn(4096, 4096, device="cuda", dtype=BF16)
    wt = torch.randn(128256, 4096, device="cuda", dtype=BF16) * 4096**-0.5

    def step():
        loss = liger_core.call("fused_linear_jsd", xs, ws, xt, wt, None, impl="triton")
        loss.backward()
        grads = (xs.grad, ws.grad)
        xs.grad = ws.grad = None
        return loss, *grads

    settings = grid(BLOCK_COLS=[2048, 1024, 4096], NUM_WARPS=[8, 4, 16], STAGES=[1, 2])
    return sweep("fused_linear_jsd student (4096, 2048) teacher (4096, 4096) V 128256", module, settings, step)


def int2():
    """The kernel's tilings (weights on either side) at M 8192 and 64 and at decode sizes M 1 to 16. Decode shapes
    are also timed as CUDA-graph replays, which leave out the host's launch cost: that is the kernel's own time, to
    compare with reading the packed weights once (timed the same way, as an int32 sum of their bytes)."""
    from liger_backends.triton import int2_matmul as module
    from triton.testing import do_bench_cudagraph

    # (tile, weights_left); the shipped tiling of each size first.
    large = [((256, 128, 64, 8, 3), True), ((256, 128, 32, 8, 4), True), ((256, 128, 32, 8, 5), True),
             ((256, 128, 128, 8, 2), True), ((128, 256, 64, 8, 3), True), ((256, 256, 32, 16, 3), True),
             ((256, 256, 64, 16, 2), True), ((256, 128, 64, 16, 3), True), ((128, 128, 64, 4, 4), True),
             ((256, 128, 64, 8, 3), False), ((128, 256, 64, 8, 3), False)]  # fmt: skip
    medium = [((64, 64, 64, 4, 4), True), ((64, 64, 128, 4, 3), True), ((64, 128, 64, 4, 4), True)]
    decode = [((16, 128, 128, 4, 4), False), ((16, 64, 128, 4, 4), False), ((16, 64, 256, 4, 3), False),
              ((16, 32, 128, 4, 4), False), ((16, 64, 128, 2, 4), False), ((16, 32, 256, 2, 4), False)]  # fmt: skip
    rows = []

    def time_call(row, call, expected, as_graph):
        try:
            assert torch.equal(call(), expected), "wrong result"
            row["ms"] = float(do_bench(call, warmup=50, rep=300, return_mode="median"))
            if as_graph:
                row["graph_ms"] = float(do_bench_cudagraph(call, rep=100, return_mode="median"))
        except Exception as error:
            row["error"] = str(error)[:200]
        rows.append(row)

    shapes = ((8192, 4096, 4096), (64, 8192, 8192), (16, 8192, 8192), (8, 8192, 8192), (4, 8192, 8192),
              (2, 8192, 8192), (1, 8192, 8192))  # fmt: skip
    for m, k, n in shapes:
        a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
        b = torch.randint(0, 256, (k // 4, n), device="cuda", dtype=torch.uint8)
        w = torch.stack([(b >> (2 * i)) & 3 for i in range(4)]).reshape(k, n).double() - 1
        expected = (a.double() @ w).to(torch.int32)  # exact: every partial sum is an integer below 2^53
        del w
        name = f"int2 M {m} K {k} N {n}"
        is_decode = m <= 16
        if is_decode:
            read_once = functools.partial(torch.sum, b.view(torch.int32), dtype=torch.int32)
            read = {"kernel": name, "reference": "read the packed weights once (int32 sum)"}
            read["graph_ms"] = float(do_bench_cudagraph(read_once, rep=100, return_mode="median"))
            rows.append(read)
        tilings = {8192: large, 64: medium}.get(m, decode if m in (1, 16) else decode[:2])
        for (bm, bn, bk, warps, stages), left in tilings:
            tiles = -(-m // bm) * -(-n // bn)
            splits = module.split_k(tiles, k // 4, bk, module.SPLIT_K_PROGRAMS_PER_SM * 132)
            call = functools.partial(module.int2_matmul_tiled, a, b, bm, bn, bk, splits, warps, stages, left)
            row = {"kernel": name, "tile": [bm, bn, bk, warps, stages], "weights_left": left, "splits": splits}
            time_call(row, call, expected, is_decode)
        print(f"\n{name} (current tile {module.tile(m)})")
        for row in sorted((r for r in rows if r["kernel"] == name), key=lambda r: r.get("graph_ms", r.get("ms", 1e9))):
            print("  ", json.dumps(row))
    return rows


SWEEPS = {
    "int2": int2,
    "cross_entropy": cross_entropy,
    "kl_div": kl_div,
    "jsd": jsd,
    "fused_linear_cross_entropy": fused_linear_cross_entropy,
    "fused_linear_cross_entropy_gemma": fused_linear_cross_entropy_gemma,
    "fused_linear_jsd": fused_linear_jsd,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SWEEPS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for name in args.only.split(","):
        results[name] = SWEEPS[name]()
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, handle)


if __name__ == "__main__":
    main()
