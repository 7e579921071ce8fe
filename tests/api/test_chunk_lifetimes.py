"""The reference backend's fused-linear losses hold one chunk of logits at a time: when a chunk's logits are computed,
the previous chunk's are gone. (A loop variable that outlives its iteration keeps them alive while the next chunk is
computed, so two chunks' worth of (rows, V) tensors, and the peak memory, instead of one.) Checked with weak
references to each chunk's logits, on several chunks, with gradients (forward and, for reduction "none", backward)."""

import gc
import types
import weakref

import pytest
import torch
from liger_backends.reference import fused_linear_cross_entropy as reference_flce
from liger_backends.reference import fused_linear_jsd as reference_fljsd

import liger_core

ROWS, HIDDEN, VOCAB = 23, 9, 31


def alive(refs: list[weakref.ref]) -> int:
    """How many of the weakly referenced tensors still exist (after a collection, so only true references count)."""
    gc.collect()
    return sum(ref() is not None for ref in refs)


class ChunkWatch:
    """Wraps a function that returns a chunk's logits (first of its results, or the result): records a weak
    reference to each, and counts the calls at which an earlier chunk's logits were still alive."""

    def __init__(self, function, pick=lambda result: result[0]):
        self.function, self.pick = function, pick
        self.alive_at_call: list[int] = []
        self.refs: list[weakref.ref] = []

    def __call__(self, *args, **kwargs):
        self.alive_at_call.append(alive(self.refs))
        result = self.function(*args, **kwargs)
        self.refs.append(weakref.ref(self.pick(result)))
        return result


@pytest.fixture
def small_chunks(monkeypatch):
    """6-row chunks: 23 rows take four."""
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 6 * VOCAB * 4)
    assert reference_flce.chunk_rows(ROWS, VOCAB) == 6


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / 3).requires_grad_()
    return x, weight, torch.randint(0, VOCAB, (ROWS,), generator=generator)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_holds_one_chunk(small_chunks, monkeypatch, reduction):
    watch = ChunkWatch(reference_flce._chunk)
    monkeypatch.setattr(reference_flce, "_chunk", watch)
    x, weight, target = inputs()
    loss = liger_core.call(
        "fused_linear_cross_entropy", x, weight, target, None, None, reduction=reduction, impl="reference"
    )[0]
    loss.sum().backward()
    passes = 2 if reduction == "none" else 1  # "none" recomputes the chunks in its backward
    assert len(watch.alive_at_call) == 4 * passes
    assert watch.alive_at_call == [0] * (4 * passes)


def test_fused_linear_jsd_holds_one_chunk(small_chunks, monkeypatch):
    """The student's log-probabilities of each chunk (what the loop hands jsd_rows) are recorded; at every chunk
    product (F.linear, student and teacher) none of an earlier chunk's may be alive."""
    recorded: list[weakref.ref] = []
    alive_at_product: list[int] = []
    jsd_rows, linear = reference_fljsd.jsd.jsd_rows, torch.nn.functional.linear

    def recording_jsd_rows(log_q, log_p, beta):
        recorded.append(weakref.ref(log_q))
        return jsd_rows(log_q, log_p, beta)

    def checking_linear(*args, **kwargs):
        alive_at_product.append(alive(recorded))
        return linear(*args, **kwargs)

    monkeypatch.setattr(reference_fljsd.jsd, "jsd_rows", recording_jsd_rows)
    monkeypatch.setattr(reference_fljsd, "F", types.SimpleNamespace(linear=checking_linear))
    x, weight, _ = inputs()
    teacher_x, teacher_weight, _ = inputs(seed=1)
    liger_core.call(
        "fused_linear_jsd", x, weight, teacher_x.detach(), teacher_weight.detach(), None, impl="reference"
    ).backward()
    assert len(recorded) > 1 and len(alive_at_product) == 2 * len(recorded)
    assert alive_at_product == [0] * len(alive_at_product)


def test_preference_gradient_pass_holds_one_tile():
    """The reference preference losses' second pass (also the inductor plugin's, with its compiled tile)."""
    from liger_backends.reference import preference

    watch = ChunkWatch(preference._gradient_tile, pick=lambda result: result[1])  # d loss / d logits of the tile
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / 3
    rows = 2 * 11
    lse = torch.logsumexp(x.reshape(rows, HIDDEN) @ weight.T, dim=-1)
    safe = torch.randint(0, VOCAB, (rows,), generator=generator)
    coef = torch.randn(rows, generator=generator)
    preference._gradient_pass(x, weight, None, lse, safe, coef, coef.clone(), None, None, watch, lambda rows, vocab: 5)
    assert len(watch.alive_at_call) == 5  # 22 rows in tiles of 5
    assert watch.alive_at_call == [0] * 5


def test_preference_token_pass_holds_one_tile(monkeypatch):
    """The reference preference losses' first pass: at every tile's product (aten.mm), no earlier tile's logits (what
    logsumexp was given) are alive."""
    from liger_backends.reference import preference
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs: list[weakref.ref] = []
            self.alive_at_product: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                self.alive_at_product.append(alive(self.refs))
            if func is torch.ops.aten.logsumexp.default:
                self.refs.append(weakref.ref(args[0]))
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 11, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / 3
    gathers = [torch.randint(0, VOCAB, (22,), generator=generator)]
    monkeypatch.setattr(preference, "rows_per_tile", lambda vocab: 5)
    watch = Watch()
    with watch:
        preference._token_pass(x, weight, None, gathers, torch.float32)
    assert len(watch.refs) == 5 and len(watch.alive_at_product) == 5  # 22 rows in tiles of 5
    assert watch.alive_at_product == [0] * 5
