"""The benchmark cases: one operator at one shape, and how each kind of competitor computes it.

Three kinds of competitor build a case:

- ``"api"``: through the public API of liger-kernel 0.8 (`liger_kernel.transformers`, `liger_kernel.chunked_loss`,
  ...). Our package provides that API, so the same code measures ours (with a backend forced or automatic selection)
  and the PyPI liger-kernel, run in a process whose path puts it first.
- ``"eager"``: what a user writes in plain PyTorch, the Hugging Face formulas (logits upcast to fp32 for the losses).
- ``"compile"``: the eager formula under ``torch.compile``.

A case builds its inputs from a fixed seed, so every competitor computes the same numbers, and returns a `Prepared`:
a forward closure, the tensors whose gradients one step produces, and the gradients fed to the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
FP32 = torch.float32


@dataclass
class Prepared:
    forward: Callable[[], object]  # returns a tensor or a tuple whose first items are fed `grads`
    leaves: list[torch.Tensor]  # their .grad is cleared after every step
    grads: tuple[torch.Tensor, ...] | None = None  # None: backward of a scalar loss (the first output)
    backward: bool = True  # False: forward only (nothing is differentiable)


@dataclass(frozen=True)
class Case:
    name: str  # unique, e.g. "rms_norm 8192x4096"
    op: str  # the operator it measures (forcing a backend in the child forces it for this operator)
    group: str  # "target" (the issues' reference shapes), "small" (overhead-bound), "sweep" (for plots)
    build: Callable[[str, torch.device], Prepared] = field(repr=False)
    ideal_bytes: int = 0  # the bytes an ideal kernel moves for forward+backward (memory-bound operators)
    flops: int = 0  # the floating-point (or integer) operations of forward+backward (GEMM-bound operators)
    axis: tuple[str, int] | None = None  # (name, value) of the swept dimension, for plots


def _generator(device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(1234)
    return generator


def _randn(shape, device, dtype, generator, grad=False, scale=1.0):
    tensor = torch.randn(shape, device=device, dtype=FP32, generator=generator).mul_(scale).to(dtype)
    return tensor.requires_grad_(grad)


def _targets(rows: int, vocab: int, device, generator, ignored: float = 0.0) -> torch.Tensor:
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    if ignored:
        drop = torch.rand(rows, device=device, generator=generator) < ignored
        target = target.masked_fill(drop, -100)
    return target


def _finish(kind: str, forward: Callable, leaves, grads=None, backward=True) -> Prepared:
    if kind == "compile":
        forward = torch.compile(forward)
    return Prepared(forward, list(leaves), grads, backward)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------------------------------------------------------
# Normalisations, RoPE, gated activations, embedding: memory-bound.


def rms_norm(rows: int, hidden: int, group: str, axis=None) -> Case:
    def build(kind, device):
        g = _generator(device)
        x = _randn((rows, hidden), device, BF16, g, grad=True)
        dy = _randn((rows, hidden), device, BF16, g)
        if kind == "api":
            from liger_kernel.transformers import LigerRMSNorm

            norm = LigerRMSNorm(hidden, eps=1e-6).to(device, BF16)
            return _finish(kind, lambda: norm(x), [x, norm.weight], (dy,))
        weight = torch.nn.Parameter(torch.ones(hidden, device=device, dtype=BF16))

        def forward():  # Hugging Face's LlamaRMSNorm
            variance = x.float().pow(2).mean(-1, keepdim=True)
            return weight * (x.float() * torch.rsqrt(variance + 1e-6)).to(BF16)

        return _finish(kind, forward, [x, weight], (dy,))

    return Case(f"rms_norm {rows}x{hidden}", "rms_norm", group, build, ideal_bytes=5 * rows * hidden * 2, axis=axis)


def layer_norm(rows: int, hidden: int, group: str, axis=None) -> Case:
    def build(kind, device):
        g = _generator(device)
        x = _randn((rows, hidden), device, BF16, g, grad=True)
        dy = _randn((rows, hidden), device, BF16, g)
        weight = torch.nn.Parameter(_randn((hidden,), device, BF16, g, scale=0.1) + 1)
        bias = torch.nn.Parameter(_randn((hidden,), device, BF16, g, scale=0.1))
        if kind == "api":
            from liger_kernel.transformers.functional import liger_layer_norm

            return _finish(kind, lambda: liger_layer_norm(x, weight, bias, 1e-5), [x, weight, bias], (dy,))
        return _finish(kind, lambda: F.layer_norm(x, (hidden,), weight, bias, 1e-5), [x, weight, bias], (dy,))

    return Case(f"layer_norm {rows}x{hidden}", "layer_norm", group, build, ideal_bytes=5 * rows * hidden * 2, axis=axis)


def rope(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, group: str, axis=None) -> Case:
    """q and k as Hugging Face makes them: (B, T, H, D) projections viewed as (B, H, T, D) by a transpose."""

    def build(kind, device):
        g = _generator(device)
        q_proj = _randn((batch, seq, heads, head_dim), device, BF16, g, grad=True)
        k_proj = _randn((batch, seq, kv_heads, head_dim), device, BF16, g, grad=True)
        angles = torch.arange(seq, device=device, dtype=FP32)[:, None] * torch.rand(
            head_dim // 2, device=device, generator=g
        )
        angles = torch.cat([angles, angles], dim=-1)[None].expand(batch, -1, -1)
        cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
        dq = _randn((batch, heads, seq, head_dim), device, BF16, g)
        dk = _randn((batch, kv_heads, seq, head_dim), device, BF16, g)
        if kind == "api":
            from liger_kernel.transformers import liger_rotary_pos_emb

            def forward():
                return liger_rotary_pos_emb(q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin)

            return _finish(kind, forward, [q_proj, k_proj], (dq, dk))

        def rotate_half(t):
            half = t.shape[-1] // 2
            return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

        def forward():  # Hugging Face's apply_rotary_pos_emb
            q, k = q_proj.transpose(1, 2), k_proj.transpose(1, 2)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

        return _finish(kind, forward, [q_proj, k_proj], (dq, dk))

    elements = batch * seq * (heads + kv_heads) * head_dim
    name = f"rope q ({batch},{heads},{seq},{head_dim}) k ({batch},{kv_heads},{seq},{head_dim})"
    return Case(name, "rope", group, build, ideal_bytes=4 * elements * 2 + 4 * batch * seq * head_dim * 2, axis=axis)


def gated(op: str, rows: int, intermediate: int, group: str, axis=None) -> Case:
    """swiglu: silu(a) * b; geglu: gelu_tanh(a) * b."""

    def build(kind, device):
        g = _generator(device)
        a = _randn((rows, intermediate), device, BF16, g, grad=True)
        b = _randn((rows, intermediate), device, BF16, g, grad=True)
        dy = _randn((rows, intermediate), device, BF16, g)
        if kind == "api":
            from liger_kernel.transformers import functional

            function = functional.liger_swiglu if op == "swiglu" else functional.liger_geglu
            return _finish(kind, lambda: function(a, b), [a, b], (dy,))
        if op == "swiglu":
            return _finish(kind, lambda: F.silu(a) * b, [a, b], (dy,))
        return _finish(kind, lambda: F.gelu(a, approximate="tanh") * b, [a, b], (dy,))

    return Case(f"{op} {rows}x{intermediate}", op, group, build, ideal_bytes=8 * rows * intermediate * 2, axis=axis)


def embedding(vocab: int, hidden: int, tokens: int, group: str) -> Case:
    def build(kind, device):
        g = _generator(device)
        indices = torch.randint(0, vocab, (tokens,), device=device, generator=g)
        dy = _randn((tokens, hidden), device, BF16, g)
        weight = torch.nn.Parameter(_randn((vocab, hidden), device, BF16, g))
        if kind == "api":
            from liger_kernel.transformers.experimental.embedding import LigerEmbedding

            table = LigerEmbedding(vocab, hidden).to(device, BF16)
            table.weight = weight
            return _finish(kind, lambda: table(indices), [table.weight], (dy,))
        return _finish(kind, lambda: F.embedding(indices, weight), [weight], (dy,))

    # Gather (read + write the rows), then the dense (V, H) gradient: the rows' gradients read, the table written.
    return Case(f"embedding ({vocab},{hidden}) {tokens} indices", "embedding", group, build,
                ideal_bytes=(3 * tokens * hidden + vocab * hidden) * 2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Losses over a large vocabulary.


def cross_entropy(rows: int, vocab: int, group: str, ignored: float = 0.1) -> Case:
    def build(kind, device):
        g = _generator(device)
        logits = _randn((rows, vocab), device, BF16, g, grad=True, scale=2.0)
        target = _targets(rows, vocab, device, g, ignored)
        if kind == "api":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            loss = LigerCrossEntropyLoss(ignore_index=-100)
            return _finish(kind, lambda: loss(logits, target), [logits])
        return _finish(kind, lambda: F.cross_entropy(logits.float(), target, ignore_index=-100), [logits])

    name = f"cross_entropy ({rows},{vocab}) bf16, {ignored:.0%} ignored"
    return Case(name, "cross_entropy", group, build, ideal_bytes=2 * rows * vocab * 2)


def fused_linear_cross_entropy(rows: int, hidden: int, vocab: int, group: str, axis=None) -> Case:
    def build(kind, device):
        g = _generator(device)
        x = _randn((rows, hidden), device, BF16, g, grad=True)
        weight = torch.nn.Parameter(_randn((vocab, hidden), device, BF16, g, scale=hidden**-0.5))
        target = _targets(rows, vocab, device, g, 0.1)
        if kind == "api":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            return _finish(kind, lambda: loss(weight, x, target), [x, weight])
        return _finish(kind, lambda: F.cross_entropy(F.linear(x, weight).float(), target), [x, weight])

    name = f"fused_linear_cross_entropy x ({rows},{hidden}) W ({vocab},{hidden})"
    return Case(name, "fused_linear_cross_entropy", group, build, flops=6 * rows * hidden * vocab, axis=axis)


def kl_div(rows: int, vocab: int, group: str) -> Case:
    def build(kind, device):
        g = _generator(device)
        log_q = torch.log_softmax(_randn((rows, vocab), device, FP32, g), -1).requires_grad_(True)
        p = torch.softmax(_randn((rows, vocab), device, FP32, g), -1)
        if kind == "api":
            from liger_kernel.transformers import LigerKLDIVLoss

            loss = LigerKLDIVLoss(reduction="batchmean")
            return _finish(kind, lambda: loss(log_q, p), [log_q])
        return _finish(kind, lambda: F.kl_div(log_q, p, reduction="batchmean"), [log_q])

    return Case(f"kl_div ({rows},{vocab}) fp32 batchmean", "kl_div", group, build, ideal_bytes=3 * rows * vocab * 4)


def _jsd_formula(log_q, log_p, beta):
    # beta·KL(P‖M) + (1−beta)·KL(Q‖M), M = beta·P + (1−beta)·Q, mean over rows.
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log(beta * p + (1 - beta) * q)
    per_row = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    return per_row.mean()


def jsd(rows: int, vocab: int, group: str, beta: float = 0.5) -> Case:
    def build(kind, device):
        g = _generator(device)
        log_q = torch.log_softmax(_randn((rows, vocab), device, FP32, g), -1).requires_grad_(True)
        log_p = torch.log_softmax(_randn((rows, vocab), device, FP32, g), -1)
        if kind == "api":
            from liger_kernel.transformers import LigerJSD

            loss = LigerJSD(beta=beta)
            return _finish(kind, lambda: loss(log_q, log_p), [log_q])
        return _finish(kind, lambda: _jsd_formula(log_q, log_p, beta), [log_q])

    return Case(f"jsd beta {beta} ({rows},{vocab}) fp32", "jsd", group, build, ideal_bytes=3 * rows * vocab * 4)


def fused_linear_jsd(rows: int, student_hidden: int, teacher_hidden: int, vocab: int, group: str) -> Case:
    def build(kind, device):
        g = _generator(device)
        xs = _randn((rows, student_hidden), device, BF16, g, grad=True)
        ws = torch.nn.Parameter(_randn((vocab, student_hidden), device, BF16, g, scale=student_hidden**-0.5))
        xt = _randn((rows, teacher_hidden), device, BF16, g)
        wt = _randn((vocab, teacher_hidden), device, BF16, g, scale=teacher_hidden**-0.5)
        if kind == "api":
            from liger_kernel.transformers import LigerFusedLinearJSD

            loss = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
            return _finish(kind, lambda: loss(xs, ws, xt, wt, None), [xs, ws])

        def forward():
            log_q = torch.log_softmax(F.linear(xs, ws).float(), -1)
            log_p = torch.log_softmax(F.linear(xt, wt).float(), -1)
            return _jsd_formula(log_q, log_p, 0.5)

        return _finish(kind, forward, [xs, ws])

    name = f"fused_linear_jsd student ({rows},{student_hidden}) teacher ({rows},{teacher_hidden}) V {vocab}"
    flops = 6 * rows * student_hidden * vocab + 2 * rows * teacher_hidden * vocab
    return Case(name, "fused_linear_jsd", group, build, flops=flops)


# ---------------------------------------------------------------------------------------------------------------
# Fused-linear preference losses: chosen rows first, then rejected (liger-kernel's layout).

PREFERENCE_CLASSES = {
    "fused_linear_dpo": "LigerFusedLinearDPOLoss",
    "fused_linear_orpo": "LigerFusedLinearORPOLoss",
    "fused_linear_cpo": "LigerFusedLinearCPOLoss",
    "fused_linear_simpo": "LigerFusedLinearSimPOLoss",
}


def _token_logps(x, weight, target):
    logits = F.linear(x, weight).float()
    mask = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def _eager_preference(op: str, x, weight, target, ref_x, ref_weight, beta: float):
    pairs = x.shape[0] // 2
    logp, mask = _token_logps(x, weight, target)
    total, count = logp.sum(-1), mask.sum(-1)
    sequence = total / count if op in ("fused_linear_orpo", "fused_linear_simpo") else total
    chosen, rejected = sequence[:pairs], sequence[pairs:]
    nll = -total[:pairs].sum() / count[:pairs].sum()
    if op == "fused_linear_dpo":
        with torch.no_grad():
            ref_total = _token_logps(ref_x, ref_weight, target)[0].sum(-1)
        margin = (chosen - ref_total[:pairs]) - (rejected - ref_total[pairs:])
        return -F.logsigmoid(beta * margin).mean()
    if op == "fused_linear_orpo":
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        return nll - beta * F.logsigmoid(log_odds).mean()
    if op == "fused_linear_cpo":
        return nll - F.logsigmoid(beta * (chosen - rejected)).mean()
    return nll - F.logsigmoid(beta * (chosen - rejected) - 0.5).mean()  # simpo, gamma 0.5, with the NLL term


def preference(op: str, pairs: int, seq: int, hidden: int, vocab: int, group: str) -> Case:
    with_reference = op == "fused_linear_dpo"

    def build(kind, device):
        g = _generator(device)
        x = _randn((2 * pairs, seq, hidden), device, BF16, g, grad=True)
        weight = torch.nn.Parameter(_randn((vocab, hidden), device, BF16, g, scale=hidden**-0.5))
        target = torch.randint(0, vocab, (2 * pairs, seq), device=device, generator=g)
        target[:, : seq // 8] = -100  # the prompt
        ref_x = _randn((2 * pairs, seq, hidden), device, BF16, g) if with_reference else None
        ref_weight = _randn((vocab, hidden), device, BF16, g, scale=hidden**-0.5) if with_reference else None
        if kind == "api":
            from liger_kernel import chunked_loss

            loss = getattr(chunked_loss, PREFERENCE_CLASSES[op])(beta=0.1)
            if with_reference:
                return _finish(kind, lambda: _first(loss(weight, x, target, None, ref_x, ref_weight)), [x, weight])
            return _finish(kind, lambda: _first(loss(weight, x, target)), [x, weight])
        return _finish(kind, lambda: _eager_preference(op, x, weight, target, ref_x, ref_weight, 0.1), [x, weight])

    tokens = 2 * pairs * seq
    flops = (8 if with_reference else 6) * tokens * hidden * vocab
    name = f"{op.removeprefix('fused_linear_')} x ({2 * pairs},{seq},{hidden}) V {vocab}" + (
        " with reference model" if with_reference else ""
    )
    return Case(name, op, group, build, flops=flops)


# ---------------------------------------------------------------------------------------------------------------
# int2 x int8 matmul: forward only.


def int2_matmul(m: int, k: int, n: int, group: str) -> Case:
    def build(kind, device):
        g = _generator(device)
        a = torch.randint(-128, 128, (m, k), device=device, dtype=torch.int8, generator=g)
        ternary = torch.randint(-1, 2, (k, n), device=device, dtype=torch.int8, generator=g)
        if kind == "api":
            from liger_kernel.ops.experimental.mm_int8int2 import matmul, pack_weights

            packed = pack_weights(ternary.clone())  # 0.8.5's pack_weights changes its argument
            return _finish(kind, lambda: matmul(a, packed), [], backward=False)
        # The unfused baseline: int8 tensor-core GEMM on weights already unpacked to int8.
        return _finish(kind, lambda: torch._int_mm(a, ternary), [], backward=False)

    case = Case(f"int2_matmul M {m} K {k} N {n}", "int2_matmul", group, build, flops=2 * m * k * n)
    return case if m > 16 else Case(case.name, case.op, group, build, ideal_bytes=k * n // 4 + m * k)


# ---------------------------------------------------------------------------------------------------------------
# The suites.

LLAMA_HIDDEN, LLAMA_INTERMEDIATE, LLAMA_VOCAB, TOKENS = 4096, 14336, 128256, 8192


def gpu_cases() -> list[Case]:
    """The issues' reference shapes (Llama-3-8B, bf16), small overhead-bound shapes, and sweeps for the plots."""
    cases = [
        rms_norm(TOKENS, LLAMA_HIDDEN, "target"),
        rms_norm(1024, 1024, "small"),
        layer_norm(TOKENS, LLAMA_HIDDEN, "target"),
        layer_norm(1024, 1024, "small"),
        rope(4, 32, 8, 2048, 128, "target"),
        rope(1, 8, 8, 1024, 128, "small"),
        gated("swiglu", TOKENS, LLAMA_INTERMEDIATE, "target"),
        gated("swiglu", 1024, 2816, "small"),
        gated("geglu", TOKENS, LLAMA_INTERMEDIATE, "target"),
        gated("geglu", 1024, 2816, "small"),
        embedding(LLAMA_VOCAB, LLAMA_HIDDEN, TOKENS, "target"),
        embedding(32000, 1024, 1024, "small"),
        cross_entropy(TOKENS, LLAMA_VOCAB, "target"),
        cross_entropy(1024, 32000, "small"),
        fused_linear_cross_entropy(TOKENS, LLAMA_HIDDEN, LLAMA_VOCAB, "target", axis=("tokens", TOKENS)),
        fused_linear_cross_entropy(1024, 1024, 32000, "small"),
        kl_div(4096, LLAMA_VOCAB, "target"),
        kl_div(1024, 32000, "small"),
        jsd(4096, LLAMA_VOCAB, "target"),
        jsd(1024, 32000, "small"),
        fused_linear_jsd(4096, 2048, 4096, LLAMA_VOCAB, "target"),
        fused_linear_jsd(1024, 512, 1024, 32000, "small"),
        int2_matmul(8192, 4096, 4096, "target"),
        int2_matmul(1, 8192, 8192, "target"),
        int2_matmul(16, 8192, 8192, "small"),
    ]
    for op in PREFERENCE_CLASSES:
        cases.append(preference(op, 2, 1024, LLAMA_HIDDEN, LLAMA_VOCAB, "target"))
    for tokens in (2048, 16384):
        cases.append(fused_linear_cross_entropy(tokens, LLAMA_HIDDEN, LLAMA_VOCAB, "sweep", axis=("tokens", tokens)))
    cases.append(fused_linear_cross_entropy(TOKENS, 3584, 256000, "sweep"))  # Gemma-2-9B's vocabulary
    for hidden in (1024, 2048, 8192, 16384, 32768, 65536, 131072, 262144):
        rows = max(64, TOKENS * LLAMA_HIDDEN // hidden // 2)
        cases.append(rms_norm(rows, hidden, "sweep", axis=("hidden", hidden)))
        cases.append(layer_norm(rows, hidden, "sweep", axis=("hidden", hidden)))
    for tokens in (1024, 2048, 4096, 16384):
        cases.append(gated("swiglu", tokens, LLAMA_INTERMEDIATE, "sweep", axis=("tokens", tokens)))
    return cases


def smoke_cases() -> list[Case]:
    """Tiny shapes of every operator: the machinery's own test, on any device."""
    return [
        rms_norm(5, 33, "small"),
        layer_norm(5, 33, "small"),
        rope(1, 4, 2, 6, 8, "small"),
        gated("swiglu", 5, 17, "small"),
        gated("geglu", 5, 17, "small"),
        embedding(40, 9, 7, "small"),
        cross_entropy(6, 51, "small"),
        fused_linear_cross_entropy(6, 9, 51, "small"),
        kl_div(6, 51, "small"),
        jsd(6, 51, "small"),
        fused_linear_jsd(6, 9, 11, 51, "small"),
        *(preference(op, 1, 6, 9, 51, "small") for op in PREFERENCE_CLASSES),
        int2_matmul(5, 16, 8, "small"),
    ]


def by_name(cases: list[Case]) -> dict[str, Case]:
    table = {case.name: case for case in cases}
    assert len(table) == len(cases), "benchmark case names must be unique"
    return table


def bandwidth_note(case: Case, ms: float) -> str:
    if case.ideal_bytes:
        return f"{case.ideal_bytes / ms / 1e6:.0f} GB/s"
    if case.flops:
        return (
            f"{case.flops / ms / 1e9:.0f} TFLOP/s" if case.op != "int2_matmul" else f"{case.flops / ms / 1e9:.0f} TOP/s"
        )
    return ""
