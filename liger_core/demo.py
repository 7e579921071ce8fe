"""``liger-kernel demo``: train a small Llama-style decoder twice and show that the Liger modules change nothing.

The first run uses plain PyTorch layers; the second the very same model (identical initial weights, identical
batches) with its RMSNorms, SwiGLU MLPs and token embedding replaced by ours and the lm head + loss computed by
`LigerFusedLinearCrossEntropyLoss`, which never materialises the logits. A transformers model is patched for run 2
by ``apply_liger_kernel_to_llama(model=...)`` (norms, MLPs, rotary embedding and the causal-LM forward, whose loss
is the fused linear cross entropy); the plain PyTorch decoder by hand. Both loss curves are printed side by side
with tokens/s and peak memory; the exit status is non-zero when the curves disagree.

The model is transformers' ``LlamaForCausalLM`` with random weights when transformers is installed (nothing is
downloaded), else a small decoder written here in plain PyTorch. The data is a fixed synthetic corpus of repeating
motifs, so the loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DemoConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int = 512
    seq_len: int = 64
    batch: int = 8
    lr: float = 3e-3
    eps: float = 1e-6
    motifs: int = 24


@dataclass
class RunResult:
    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    peak_memory_mib: float = float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


# -- the plain PyTorch model (used when transformers is not installed) -------------------------------------------


class TorchRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, written out: variance in fp32, cast back before the weight multiply."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden = hidden_states.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden.to(input_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DemoConfig):
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.head_dim = config.hidden // config.heads
        self.q_proj = nn.Linear(config.hidden, config.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * self.head_dim, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: DemoConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: DemoConfig):
        super().__init__()
        self.input_layernorm = TorchRMSNorm(config.hidden, config.eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = TorchRMSNorm(config.hidden, config.eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TorchDecoder(nn.Module):
    """A Llama-style decoder: embedding, pre-norm blocks (RoPE attention, SwiGLU MLP), final norm, lm head."""

    def __init__(self, config: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.norm = TorchRMSNorm(config.hidden, config.eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        head_dim = config.hidden // config.heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(config.seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))


# -- building the model ------------------------------------------------------------------------------------------


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(config: DemoConfig, model: str) -> tuple[nn.Module, Callable, Callable, str]:
    """(module, (module, input_ids) -> logits, (module, input_ids) -> final hidden states, description) for
    ``model`` in {"transformers", "torch"}."""
    if model == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama_config = LlamaConfig(
            vocab_size=config.vocab,
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            max_position_embeddings=config.seq_len,
            rms_norm_eps=config.eps,
            tie_word_embeddings=False,
        )
        llama_config._attn_implementation = "sdpa"
        llama = LlamaForCausalLM(llama_config)
        return (
            llama,
            lambda module, ids: module(input_ids=ids, use_cache=False).logits,
            lambda module, ids: module.model(input_ids=ids, use_cache=False).last_hidden_state,
            "transformers LlamaForCausalLM",
        )
    return (
        TorchDecoder(config),
        lambda module, ids: module(ids),
        lambda module, ids: module.hidden_states(ids),
        "a plain PyTorch Llama-style decoder",
    )


def use_liger_modules(model: nn.Module) -> dict[str, int]:
    """Replace, keeping their weights, every RMSNorm of `model` (transformers' or ours) by `LigerRMSNorm`, every
    SwiGLU MLP (gate_proj, up_proj, down_proj) by `LigerSwiGLUMLP` and the token embedding by `LigerEmbedding`;
    returns how many of each."""
    from types import SimpleNamespace

    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    from liger_kernel.transformers.experimental import LigerEmbedding

    def swap(parent: nn.Module, name: str, ours: nn.Module, old: nn.Module) -> nn.Module:
        ours.load_state_dict(old.state_dict())
        setattr(parent, name, ours.to(next(old.parameters()).device, next(old.parameters()).dtype))
        return ours

    counts = {"LigerRMSNorm": 0, "LigerSwiGLUMLP": 0, "LigerEmbedding": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and not isinstance(child, LigerRMSNorm):
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
                swap(parent, name, LigerRMSNorm(child.weight.shape[0], eps=eps), child)
                counts["LigerRMSNorm"] += 1
            elif all(hasattr(child, p) for p in ("gate_proj", "up_proj", "down_proj")) and not isinstance(
                child, LigerSwiGLUMLP
            ):
                shape = SimpleNamespace(
                    hidden_size=child.gate_proj.in_features,
                    intermediate_size=child.gate_proj.out_features,
                    hidden_act="silu",
                )
                swap(parent, name, LigerSwiGLUMLP(shape), child)
                counts["LigerSwiGLUMLP"] += 1
            elif type(child) is nn.Embedding:
                swap(parent, name, LigerEmbedding(child.num_embeddings, child.embedding_dim, child.padding_idx), child)
                counts["LigerEmbedding"] += 1
    return counts


@contextmanager
def patched_llama(model: nn.Module) -> Iterator[None]:
    """``apply_liger_kernel_to_llama(model=model)`` for the ``with`` block: the instance keeps its Liger modules and
    forward; the module-level rotary function, the one patch that cannot be per instance, is put back afterwards so
    that other Llama models of this process (the plain run) stay unpatched."""
    from transformers.models.llama import modeling_llama

    from liger_kernel.transformers import apply_liger_kernel_to_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    apply_liger_kernel_to_llama(model=model)
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary


def count_liger_modules(model: nn.Module) -> dict[str, int]:
    """How many modules of each Liger class `model` holds."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.startswith("Liger"):
            counts[name] = counts.get(name, 0) + 1
    return counts


# -- data --------------------------------------------------------------------------------------------------------


def make_corpus(config: DemoConfig, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len + 1) tokens: random sequences of a fixed bank of motifs (4 to 12 tokens each).

    Inside a motif every next token is determined; at a motif's end the next motif is random: a model that learns
    the motifs gets far below the ln(vocab) of the first step."""
    generator = torch.Generator().manual_seed(seed)
    bank = [
        torch.randint(0, config.vocab, (int(torch.randint(4, 13, (), generator=generator)),), generator=generator)
        for _ in range(config.motifs)
    ]
    rows = []
    for _ in range(steps * config.batch):
        pieces, length = [], 0
        while length < config.seq_len + 1:
            motif = bank[int(torch.randint(0, config.motifs, (), generator=generator))]
            pieces.append(motif)
            length += motif.numel()
        rows.append(torch.cat(pieces)[: config.seq_len + 1])
    return torch.stack(rows).view(steps, config.batch, config.seq_len + 1)


# -- measuring ---------------------------------------------------------------------------------------------------


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place."""

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width

    def update(self, done: int, loss: float) -> None:
        # Redrawn at every step on a terminal; elsewhere (a log file, a captured stream) only the final state.
        if not self.enabled or (done < self.total and not sys.stderr.isatty()):
            return
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.label:<8} [{bar}] {done}/{self.total} loss {loss:.4f}")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(
    name: str,
    model: nn.Module,
    loss_of: Callable,
    corpus: torch.Tensor,
    config: DemoConfig,
    device: torch.device,
    progress: bool,
) -> RunResult:
    result = RunResult(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    bar = ProgressBar(len(corpus), name, progress)
    _reset_peak_memory(device)
    start = time.perf_counter()
    for step, batch in enumerate(corpus, start=1):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = loss_of(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())  # the demo prints it: one sync per step is fine here
        result.tokens += inputs.numel()
        bar.update(step, result.losses[-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    result.peak_memory_mib = _peak_memory_mib(device)
    return result


# -- the demo ----------------------------------------------------------------------------------------------------


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo: device 'cuda' was asked for, but no CUDA GPU is visible")
    return device


def _max_relative_difference(first: list[float], second: list[float]) -> float:
    worst = 0.0
    for a, b in zip(first, second):
        if not (math.isfinite(a) and math.isfinite(b)):
            return float("inf")
        worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return worst


def _backends_serving(config: DemoConfig, device: torch.device, embedding: bool = True) -> str:
    """Which backend automatic selection picks for the demo's calls."""
    import liger_core

    tokens = config.batch * config.seq_len
    x = torch.empty(tokens, config.hidden, device=device)
    gate = torch.empty(tokens, config.intermediate, device=device)
    head = torch.empty(config.vocab, config.hidden, device=device)
    target = torch.zeros(tokens, dtype=torch.long, device=device)
    try:
        chosen = {
            "rms_norm": liger_core.select_backend("rms_norm", x, head[0]),
            "swiglu": liger_core.select_backend("swiglu", gate, gate),
            **({"embedding": liger_core.select_backend("embedding", target, head)} if embedding else {}),
            "fused_linear_cross_entropy": liger_core.select_backend(
                "fused_linear_cross_entropy", x, head, target, None, None
            ),
        }
    except Exception as error:  # shown, not fatal: the runs themselves will raise with the full story
        return f"selection failed: {type(error).__name__}: {error}"
    return ", ".join(f"{op} -> {backend}" for op, backend in chosen.items())


def run(
    steps: int = 40,
    device: str | torch.device | None = None,
    model: str = "auto",
    seed: int = 0,
    tolerance: float = 1e-3,
    config: DemoConfig | None = None,
    progress: bool = True,
    out=None,
) -> int:
    """Train the plain and the Liger model for `steps` steps; print both curves; return 0 when they agree within
    `tolerance` (max over steps of the relative loss difference), else 1.

    ``model``: "transformers" (LlamaForCausalLM), "torch" (the plain decoder here) or "auto" (the first when
    transformers is installed).
    """
    out = out if out is not None else sys.stdout
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"demo: 'steps' must be a positive int, got {steps!r}")
    if model not in ("auto", "transformers", "torch"):
        raise ValueError(f"demo: 'model' must be one of ['auto', 'transformers', 'torch'], got {model!r}")
    if model == "auto":
        model = "transformers" if _transformers_available() else "torch"
    config = config or DemoConfig()
    device = _pick_device(device)

    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    torch.manual_seed(seed)
    plain_model, logits_of, hidden_of, description = build_model(config, model)
    plain_model = plain_model.to(device)
    liger_model = copy.deepcopy(plain_model)  # identical initial weights
    # transformers' model is patched by apply_liger_kernel_to_llama right before run 2 (see patched_llama)
    replaced = None if model == "transformers" else use_liger_modules(liger_model)
    corpus = make_corpus(config, steps, seed)
    fused_loss = LigerFusedLinearCrossEntropyLoss()

    def plain_loss(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits_of(module, inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def liger_loss(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The lm head and the loss in one operator: the (tokens, vocab) logits are never materialised.
        if model == "transformers":  # the patched forward does it when training with labels
            return module(input_ids=inputs, shift_labels=targets, use_cache=False).loss
        hidden = hidden_of(module, inputs)
        return fused_loss(module.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))

    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"liger-kernel demo: {description}, random init, {sum(p.numel() for p in plain_model.parameters()):,} params")
    say(
        f"  hidden {config.hidden}, {config.layers} layers, vocab {config.vocab}, seq {config.seq_len}, "
        f"batch {config.batch}, {steps} steps, AdamW lr {config.lr}, float32 on {device}"
    )
    say("  run 1 'pytorch': plain PyTorch modules, lm head + F.cross_entropy")

    def describe_run_2(how: str) -> None:
        swapped = ", ".join(f"{count} x {name}" for name, count in replaced.items() if count)
        say(f"  run 2 'liger':   {how}{swapped}, LigerFusedLinearCrossEntropyLoss")
        say(f"                   (selected: {_backends_serving(config, device, model != 'transformers')})")
        say()

    if model == "transformers":
        plain = train("pytorch", plain_model, plain_loss, corpus, config, device, progress)
        with patched_llama(liger_model):
            replaced = count_liger_modules(liger_model)
            describe_run_2("apply_liger_kernel_to_llama(model=...): liger rotary embedding, ")
            liger = train("liger", liger_model, liger_loss, corpus, config, device, progress)
    else:
        describe_run_2("")
        plain = train("pytorch", plain_model, plain_loss, corpus, config, device, progress)
        liger = train("liger", liger_model, liger_loss, corpus, config, device, progress)

    every = max(1, steps // 10)
    say(f"{'step':>5}  {'pytorch loss':>12}  {'liger loss':>12}  {'rel diff':>9}")
    for index, (a, b) in enumerate(zip(plain.losses, liger.losses)):
        step = index + 1
        if step == 1 or step % every == 0 or step == steps:
            diff = abs(a - b) / max(abs(a), 1e-12) if math.isfinite(a) and math.isfinite(b) else float("inf")
            say(f"{step:>5}  {a:>12.6f}  {b:>12.6f}  {diff:>9.2e}")
    say()
    memory = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS of the process so far"
    say(f"{'':<38}{'pytorch':>12}  {'liger':>12}")
    say(f"{'tokens/s':<38}{plain.tokens_per_second:>12,.0f}  {liger.tokens_per_second:>12,.0f}")
    say(f"{memory + ' (MiB)':<38}{plain.peak_memory_mib:>12,.1f}  {liger.peak_memory_mib:>12,.1f}")
    say(f"{'final loss':<38}{plain.losses[-1]:>12.6f}  {liger.losses[-1]:>12.6f}")
    worst = _max_relative_difference(plain.losses, liger.losses)
    agree = worst <= tolerance
    verdict = "OK: the curves agree" if agree else "FAILED: the curves disagree"
    say(f"max relative loss difference over {steps} steps: {worst:.2e} (tolerance {tolerance:.0e}) -- {verdict}")
    if steps >= 10 and agree and not plain.losses[-1] < plain.losses[0]:
        say("note: the loss did not fall; try more steps")
    return 0 if agree else 1
