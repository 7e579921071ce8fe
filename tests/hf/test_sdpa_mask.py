"""Under torch.compile, a patched sdpa model skips the causal mask where eager mode does (liger_kernel's
``_sdpa_mask``): transformers otherwise builds a (B, 1, T, T) mask while tracing, which made the compiled attention
3x slower on the H200. The compiled model must still compute what the eager one does, and a real padding mask must
still be built."""

import pytest
import torch
from tiny_hf import assert_same_training_step, batch, patched_copy, tiny_config, tiny_model
from transformers import masking_utils

from liger_kernel.transformers import apply_liger_kernel_to_llama
from liger_kernel.transformers._sdpa_mask import install


def _like_transformers_5_17(original):
    """transformers 5.17's decision (the GPU machine's release): never skip while tracing. Later releases skip under
    compile on torch >= 2.14, and on the torch of this test they may already; the wrapper must skip either way."""

    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if torch.compiler.is_compiling():
            return False
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    return _ignore_causal_mask_sdpa


@pytest.fixture
def like_5_17(monkeypatch):
    """transformers' function replaced by 5.17's behaviour for this test (put back afterwards)."""
    original = getattr(masking_utils._ignore_causal_mask_sdpa, "__wrapped__", masking_utils._ignore_causal_mask_sdpa)
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", _like_transformers_5_17(original))


@pytest.fixture
def wrapped(like_5_17):
    """The wrapper installed over 5.17's behaviour, for this test only."""
    assert install()
    assert install()  # a second install keeps the one wrapper
    assert masking_utils._ignore_causal_mask_sdpa._liger_compile_aware
    assert not getattr(masking_utils._ignore_causal_mask_sdpa.__wrapped__, "_liger_compile_aware", False)


def _compiled_mask(length: int, attention_mask=None, local_size=None):
    torch._dynamo.reset()

    def make():
        return masking_utils.sdpa_mask(
            batch_size=2, q_length=length, kv_length=length, attention_mask=attention_mask, local_size=local_size
        )

    return torch.compile(make, backend="eager", fullgraph=True)()


def test_without_the_wrapper_a_compiled_causal_mask_is_built(like_5_17):
    mask = _compiled_mask(7)
    assert mask is not None and torch.equal(mask[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_compiled_mask_is_skipped_without_padding(wrapped):
    assert _compiled_mask(7) is None
    assert masking_utils.sdpa_mask(batch_size=2, q_length=7, kv_length=7) is None  # eager: as before


def test_compiled_padding_mask_is_still_built(wrapped):
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :3] = False  # left padding of the second row
    got = _compiled_mask(7, attention_mask=padding)
    expected = masking_utils.sdpa_mask(batch_size=2, q_length=7, kv_length=7, attention_mask=padding)
    assert got is not None and expected is not None
    assert torch.equal(got, expected)
    assert not got[1, 0, :, :3].any() and torch.equal(got[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_compiled_sliding_window_mask_is_still_built(wrapped):
    got = _compiled_mask(7, local_size=3)
    assert got is not None
    expected = masking_utils.sdpa_mask(batch_size=2, q_length=7, kv_length=7, local_size=3, allow_is_causal_skip=False)
    assert torch.equal(got, expected)


def _sdpa_calls(counter):
    return [
        node
        for graph in counter.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target)
    ]


def _compiled_sdpa_llama(monkeypatch, use_cache: bool):
    """(unpatched sdpa Llama, patched copy, compile counter, the patched copy compiled whole with aot_eager)."""
    import torch._dynamo.testing

    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "reference")
    torch._dynamo.reset()
    reference = tiny_model("llama", use_cache=use_cache)
    reference.config._attn_implementation = "sdpa"
    patched = patched_copy(reference, "instance")
    assert patched.config._attn_implementation == "sdpa" and patched.config.use_cache == use_cache
    reference.train()
    patched.train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return reference, patched, counter, torch.compile(patched, backend=counter)


# use_cache=False (as training runs) is the case where transformers also looks for packed sequences
@pytest.mark.parametrize("use_cache", [False, True])
def test_compiled_patched_sdpa_llama_attends_causally_and_matches_eager(wrapped, monkeypatch, use_cache):
    # The whole patched model compiled (aot_eager): its attention calls sdpa with is_causal=True and no mask, and the
    # loss and gradients are those of the eager unpatched model.
    reference, patched, counter, compiled = _compiled_sdpa_llama(monkeypatch, use_cache)
    input_ids, labels = batch()
    assert_same_training_step(reference, patched, compiled, input_ids=input_ids, labels=labels)
    calls = _sdpa_calls(counter)
    assert len(calls) == reference.config.num_hidden_layers
    for node in calls:
        assert node.kwargs.get("is_causal") is True, node.kwargs
        assert node.kwargs.get("attn_mask") is None, node.kwargs


def test_compiled_patched_sdpa_llama_keeps_the_mask_of_packed_positions(wrapped, monkeypatch):
    # Position ids from the caller (two sequences packed in each row) are examined as before: the compiled model
    # builds the block mask and computes what the eager unpatched model computes.
    reference, patched, counter, compiled = _compiled_sdpa_llama(monkeypatch, use_cache=False)
    input_ids, labels = batch()
    length = input_ids.shape[1]
    split = length // 2
    position_ids = torch.cat([torch.arange(split), torch.arange(length - split)]).expand(input_ids.shape[0], -1)
    expected = assert_same_training_step(
        reference, patched, compiled, input_ids=input_ids, labels=labels, position_ids=position_ids
    )
    unpacked = reference(input_ids=input_ids, labels=labels).loss
    assert abs(unpacked.item() - expected.item()) > 1e-4  # the packing changes the loss: the mask matters
    calls = _sdpa_calls(counter)
    assert calls and all(node.kwargs.get("attn_mask") is not None for node in calls)


def _unwrapped(function):
    return getattr(function, "__wrapped__", function)


def test_patchers_install_it(monkeypatch):
    # transformers' own functions (an earlier patch in this process may have wrapped them already)
    originals = {}
    for name in ("_ignore_causal_mask_sdpa", "find_packed_sequence_indices"):
        originals[name] = _unwrapped(getattr(masking_utils, name))
        monkeypatch.setattr(masking_utils, name, originals[name])
    apply_liger_kernel_to_llama(model=_tiny_llama())
    for name, original in originals.items():
        assert getattr(masking_utils, name).__wrapped__ is original, name


def _tiny_llama():
    import transformers

    return transformers.LlamaForCausalLM(tiny_config("llama"))
