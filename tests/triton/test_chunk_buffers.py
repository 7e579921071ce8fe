"""The Triton fused-linear losses hold one chunk of logits at a time: every chunk of the loop is written into the
same buffer. (Allocating a chunk's logits while the previous chunk's were still referenced held two chunks at once:
on an H200 the fused-linear CE's peak grew by twice its chunk size.) Each chunk's logits must also be what
``F.linear`` gives, which the kernel tests check through the losses; here the product itself is compared."""

import os

import pytest
import torch
import torch.nn.functional as F

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

ROWS, HIDDEN, VOCAB = 29, 11, 37


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def chunks_seen(monkeypatch):
    """Records (storage address, rows, equal to F.linear) of every chunk product the fused-linear losses compute."""
    from liger_backends.triton import fused_linear_cross_entropy as flce
    from liger_backends.triton import fused_linear_jsd as fljsd

    seen = []
    original = flce.chunk_logits

    def recording(x_chunk, weight, bias, buffer):
        logits = original(x_chunk, weight, bias, buffer)
        expected = F.linear(x_chunk, weight, bias)
        seen.append((logits.untyped_storage().data_ptr(), x_chunk.shape[0], torch.equal(logits, expected)))
        return logits

    monkeypatch.setattr(flce, "chunk_logits", recording)  # the fused-linear CE and the preference pass
    monkeypatch.setattr(fljsd, "chunk_logits", recording)
    return seen


@pytest.fixture
def small_chunks(device, monkeypatch):
    """8 rows a chunk (fp32): 29 rows take four chunks, the last of 5 rows, on a GPU too."""
    from liger_backends.triton import _target_logprobs, fused_linear_jsd
    from liger_backends.triton import fused_linear_cross_entropy as flce

    monkeypatch.setitem(flce.CHUNK_BYTES, device, 8 * VOCAB * 4)
    monkeypatch.setattr(flce, "MIN_CHUNK_ROWS", {})  # the GPU's floor on chunk rows would make one chunk
    monkeypatch.setitem(_target_logprobs.CHUNK_BYTES, device, 8 * VOCAB * 4)
    monkeypatch.setattr(fused_linear_jsd, "CHUNK_BYTES", 8 * VOCAB * 4 * 2)


def inputs(device, rows=ROWS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).to(device).requires_grad_()
    bias = (0.3 * torch.randn(VOCAB, generator=generator)).to(device).requires_grad_()
    target = torch.randint(0, VOCAB, (rows,), generator=generator).to(device)
    return x, weight, bias, target


def assert_one_buffer(seen, passes: int, buffers: int = 1):
    """`passes` walks over four chunks (8, 8, 8, 5 rows), all in `buffers` distinct buffers."""
    assert [rows for _, rows, _ in seen] == [8, 8, 8, 5] * passes
    assert all(same for _, _, same in seen), "a chunk's logits differ from F.linear's"
    assert len({address for address, _, _ in seen}) == buffers


def test_fused_linear_cross_entropy_reuses_one_chunk_buffer(device, small_chunks, chunks_seen):
    x, weight, bias, target = inputs(device)
    loss = liger_core.call("fused_linear_cross_entropy", x, weight, target, bias, None, impl="triton")[0]
    loss.backward()
    assert_one_buffer(chunks_seen, passes=1)


def test_fused_linear_cross_entropy_none_reduction_reuses_it_in_the_backward_too(device, small_chunks, chunks_seen):
    x, weight, bias, target = inputs(device)
    losses = liger_core.call(
        "fused_linear_cross_entropy", x, weight, target, bias, None, reduction="none", impl="triton"
    )[0]
    losses.sum().backward()
    forward_chunks, backward_chunks = chunks_seen[:4], chunks_seen[4:]
    assert_one_buffer(forward_chunks, passes=1)
    assert_one_buffer(backward_chunks, passes=1)


def test_preference_pass_reuses_one_chunk_buffer_each_way(device, small_chunks, chunks_seen):
    """The target log-prob pass all four preference losses share, driven directly, forward and backward."""
    from liger_backends.triton import _target_logprobs

    x, weight, bias, target = inputs(device)
    lse, logp, _, _ = _target_logprobs.target_logprobs_forward(
        x.detach(), weight.detach(), bias.detach(), target, None, -100, False
    )
    coef = torch.linspace(-1.0, 1.0, ROWS, device=device)
    _target_logprobs.target_logprobs_backward(
        x.detach(), weight.detach(), bias.detach(), target, None, lse, coef, None, -100, True, True, True
    )
    assert_one_buffer(chunks_seen[:4], passes=1)
    assert_one_buffer(chunks_seen[4:], passes=1)


def test_fused_linear_jsd_reuses_one_buffer_for_each_model(device, small_chunks, chunks_seen):
    x, weight, _, _ = inputs(device)
    teacher_x, teacher_weight, _, _ = inputs(device, seed=1)
    loss = liger_core.call(
        "fused_linear_jsd", x, weight, teacher_x.detach(), teacher_weight.detach(), None, impl="triton"
    )
    loss.backward()
    student, teacher = chunks_seen[0::2], chunks_seen[1::2]
    assert_one_buffer(student, passes=1)
    assert_one_buffer(teacher, passes=1)
    assert student[0][0] != teacher[0][0]


@pytest.mark.parametrize("vocab", [37, 48, 50257])
def test_buffer_rows_are_padded_to_sixteen_elements_and_the_product_lands_in_them(device, vocab):
    # A row stride divisible by 16 is what lets the row kernels load whole vectors (Triton specialises on it). The
    # padding columns are never part of the view; the product written through the stride equals F.linear.
    from liger_backends.triton import fused_linear_cross_entropy as flce

    buffer = flce.chunk_buffer(10, 4, vocab, torch.float32, torch.device(device))
    assert buffer.shape == (4, vocab)
    assert buffer.stride() == (-(-vocab // 16) * 16, 1)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, HIDDEN, generator=generator).to(device)
    weight = torch.randn(vocab, HIDDEN, generator=generator).to(device)
    logits = flce.chunk_logits(x, weight, None, buffer)
    assert logits.data_ptr() == buffer.data_ptr() and logits.stride() == buffer.stride()
    torch.testing.assert_close(logits, F.linear(x, weight))
