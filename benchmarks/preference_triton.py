"""The fused-linear preference losses on a GPU, forward+backward in bf16: the Triton backend against the reference
backend and the plain PyTorch formula (full logits upcast to fp32, what a user writes), at the issue's shape
x (2B=4, T=1024, H=4096), V=128256; then the memory check at T=8192 (Triton only; the issue asks < 3 GB extra).

    python benchmarks/preference_triton.py                       # DPO with reference model, then ORPO, CPO, SimPO
    python benchmarks/preference_triton.py --ops dpo --chunk-mib 64,128,256   # sweep the Triton chunk budget

Time: median of triton.testing.do_bench over forward+backward (gradients of input and weight). Memory: peak
torch.cuda.max_memory_allocated() during one forward+backward minus what was allocated before it (the inputs, no
gradients held), so it includes the gradients of input and weight. GEMM floor ms: the 3 GEMMs (+1 with a reference
model) that any implementation needs, plus the policy forward GEMM that our recomputing backward repeats, each timed
as one bf16 (rows, H) x (H, V) cuBLAS product in this process.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import liger_core

OPS = {"dpo": "fused_linear_dpo", "orpo": "fused_linear_orpo", "cpo": "fused_linear_cpo", "simpo": "fused_linear_simpo"}


def inputs(op: str, pairs: int, seq: int, hidden: int, vocab: int):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(shape, device="cuda", generator=g) * scale).bfloat16().requires_grad_(grad)

    x = randn(2 * pairs, seq, hidden, grad=True)
    weight = randn(vocab, hidden, scale=hidden**-0.5, grad=True)
    target = torch.randint(0, vocab, (2 * pairs, seq), device="cuda", generator=g)
    target[:, : seq // 8] = -100  # a prompt
    extra = ()
    if op == "fused_linear_dpo":
        extra = (randn(2 * pairs, seq, hidden), randn(vocab, hidden, scale=hidden**-0.5), None)
    elif op == "fused_linear_orpo":
        extra = (None,)  # nll_target
    return x, weight, target, extra


def eager(op: str, x, weight, target, extra, beta=0.1):
    """The plain PyTorch formula: full fp32 logits, log_softmax, gather (API.md)."""

    def logps(x, w):
        logp = F.linear(x, w).float().log_softmax(-1)
        mask = target != -100
        return (logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1), mask.sum(-1)

    pairs = x.shape[0] // 2
    total, count = logps(x, weight)
    seq = total / count if op in ("fused_linear_orpo", "fused_linear_simpo") else total
    c, r = seq[:pairs], seq[pairs:]
    nll = -total[:pairs].sum() / count[:pairs].sum()
    if op == "fused_linear_dpo":
        with torch.no_grad():
            ref = logps(extra[0], extra[1])[0]
        return -F.logsigmoid(beta * ((c - ref[:pairs]) - (r - ref[pairs:]))).mean()  # no NLL term by default
    if op == "fused_linear_orpo":
        log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
        return nll - beta * F.logsigmoid(log_odds).mean()
    if op == "fused_linear_cpo":
        return nll - F.logsigmoid(beta * (c - r)).mean()
    return nll - F.logsigmoid(beta * (c - r) - 0.5).mean()


def step_fn(impl: str, op: str, x, weight, target, extra):
    def step():
        x.grad = weight.grad = None
        if impl == "eager":
            loss = eager(op, x, weight, target, extra)
        else:
            loss = liger_core.call(op, x, weight, target, None, *extra, impl=impl, beta=0.1)[0]
        loss.backward()

    return step


def measure(step, leaves, reps_ms: int) -> tuple[float, float]:
    step()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    return do_bench(step, rep=reps_ms), peak


def gemm_ms(rows: int, hidden: int, vocab: int) -> float:
    a = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    return do_bench(lambda: a @ b.T)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="dpo,orpo,cpo,simpo")
    parser.add_argument("--impls", default="triton,reference,eager")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--long-seq", type=int, default=8192, help="the memory check's T (0: skip)")
    parser.add_argument("--chunk-mib", default="", help="comma-separated Triton chunk budgets to sweep")
    args = parser.parse_args()
    from liger_backends.triton import _target_logprobs

    rows = 2 * args.pairs * args.seq
    one_gemm = gemm_ms(rows, args.hidden, args.vocab)
    print(f"one bf16 GEMM ({rows}, {args.hidden}) x ({args.hidden}, {args.vocab}): {one_gemm:.2f} ms")
    budgets = [int(m) << 20 for m in args.chunk_mib.split(",") if m] or [_target_logprobs.CHUNK_BYTES["cuda"]]
    print("| op | impl | chunk MiB | ms | GEMM floor ms | peak extra GiB |")
    print("|---|---|---|---|---|---|")
    for name in args.ops.split(","):
        op = OPS[name]
        x, weight, target, extra = inputs(op, args.pairs, args.seq, args.hidden, args.vocab)
        floor = one_gemm * (4 + (op == "fused_linear_dpo"))  # + 1: the recomputed policy GEMM
        for impl in args.impls.split(","):
            for budget in budgets if impl == "triton" else [None]:
                if budget is not None:
                    _target_logprobs.CHUNK_BYTES["cuda"] = budget
                try:
                    step = step_fn(impl, op, x, weight, target, extra)
                    ms, gib = measure(step, (x, weight), 200 if impl == "triton" else 50)
                    result = f"{ms:.2f} | {floor:.2f} | {gib:.2f}"
                except torch.OutOfMemoryError:
                    result = "OOM | | "
                mib = "" if budget is None else budget >> 20
                print(f"| {name} | {impl} | {mib} | {result} |", flush=True)
                x.grad = weight.grad = None
                torch.cuda.empty_cache()
        del x, weight, target, extra
        torch.cuda.empty_cache()
    if args.long_seq:
        x, weight, target, extra = inputs("fused_linear_dpo", args.pairs, args.long_seq, args.hidden, args.vocab)
        ms, gib = measure(step_fn("triton", "fused_linear_dpo", x, weight, target, extra), (x, weight), 100)
        verdict = "ok" if gib < 3 else "OVER"
        print(f"DPO with reference model, T={args.long_seq}: {ms:.1f} ms, peak extra {gib:.2f} GiB ({verdict}: < 3 GB)")


if __name__ == "__main__":
    main()
