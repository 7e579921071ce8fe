"""The chunked fused-linear operators hold one chunk at a time: when a chunk's compiled function runs, none of the
tensors an earlier chunk returned (its logits' gradient above all, a (rows, V) block) is still alive. A loop variable
that outlives its iteration would keep them through the next chunk's computation: twice the peak."""

import gc
import weakref

import pytest
import torch
from liger_inductor import compiler
from liger_inductor import fused_linear_cross_entropy as flce
from liger_inductor import fused_linear_jsd as fljsd

import liger_core

ROWS, HIDDEN, VOCAB = 23, 9, 31


class ChunkWatch:
    """Stands in for a module's compiled CHUNK: records weak references to the chunk-sized gradients each chunk
    returns (the outputs at `watched`: grad_x's rows and the logits' gradient), and at each call how many of an
    earlier chunk's are still alive. (The per-row loss terms are kept on purpose, to be concatenated at the end.)"""

    def __init__(self, chunk, watched: tuple[int, ...]):
        self.chunk, self.watched = chunk, watched
        self.alive_at_call: list[int] = []
        self.refs: list[weakref.ref] = []

    def __call__(self, args, static):
        gc.collect()
        self.alive_at_call.append(sum(ref() is not None for ref in self.refs))
        outputs = self.chunk(args, static)
        self.refs += [weakref.ref(outputs[index]) for index in self.watched]
        return outputs


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(compiler, "CHUNK_BYTES", 6 * VOCAB * 4 * 2)  # 12 rows, or 6 with two logits blocks


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / 3).requires_grad_()
    return x, weight, torch.randint(0, VOCAB, (ROWS,), generator=generator)


def test_fused_linear_cross_entropy_holds_one_chunk(small_chunks, monkeypatch):
    watch = ChunkWatch(flce.CHUNK, watched=(3, 4))  # (ce, z, argmax, grad_x rows, grad of the logits, grad_b)
    monkeypatch.setattr(flce, "CHUNK", watch)
    x, weight, target = inputs()
    liger_core.call("fused_linear_cross_entropy", x, weight, target, None, None, impl="inductor")[0].backward()
    assert len(watch.alive_at_call) > 1
    assert watch.alive_at_call == [0] * len(watch.alive_at_call)


def test_fused_linear_jsd_holds_one_chunk(small_chunks, monkeypatch):
    watch = ChunkWatch(fljsd.CHUNK, watched=(1, 2))  # (row losses, grad_x rows, grad of the student logits)
    monkeypatch.setattr(fljsd, "CHUNK", watch)
    x, weight, _ = inputs()
    teacher_x, teacher_weight, _ = inputs(seed=1)
    liger_core.call(
        "fused_linear_jsd", x, weight, teacher_x.detach(), teacher_weight.detach(), None, impl="inductor"
    ).backward()
    assert len(watch.alive_at_call) > 1
    assert watch.alive_at_call == [0] * len(watch.alive_at_call)
