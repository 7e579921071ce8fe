"""Every patched model type trained one step on the triton backend (through Triton's interpreter on the CPU): the
loss and every parameter's gradient match the unpatched model. This covers what the reference backend does not:
the MLP modules and the MoE experts hand their projections over (``in_place=True``), so the triton swiglu/geglu
backward writes its gradients into their storage."""

import os

import pytest
import torch
from tiny_hf import MODEL_TYPES, assert_same_training_step, batch, patched_copy, tiny_model

from liger_core import dispatch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_one_training_step_on_triton_matches_the_unpatched_model(model_type, monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "triton")
    served = set()
    select = dispatch._select

    def recording_select(spec, *args, **kwargs):
        chosen = select(spec, *args, **kwargs)
        served.add((spec.name, chosen))
        return chosen

    monkeypatch.setattr(dispatch, "_select", recording_select)
    reference = tiny_model(model_type)
    patched = patched_copy(reference, "instance")
    reference.train()
    patched.train()
    input_ids, labels = batch()
    assert_same_training_step(reference, patched, patched, input_ids=input_ids, labels=labels)
    ops = {op for op, _ in served}
    assert {"rms_norm", "fused_linear_cross_entropy"} <= ops and ({"swiglu", "geglu"} & ops), served
    assert {backend for _, backend in served} == {"triton"}, served


def _compiled_patched_llama(monkeypatch):
    """(unpatched Llama, patched copy on triton, compile counter, the patched copy compiled whole with aot_eager)."""
    import torch._dynamo.testing

    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "triton")
    torch._dynamo.reset()
    reference = tiny_model("llama")
    patched = patched_copy(reference, "instance")
    reference.train()
    patched.train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return reference, patched, counter, torch.compile(patched, backend=counter)


def test_compiled_patched_llama_on_triton_matches_the_unpatched_model(monkeypatch):
    # torch.compile over the whole patched model (graph breaks allowed, as users compile): the Triton launchers run
    # as custom ops inside the compiled graph. On the H200 this path crashed while Inductor inlined the kernels.
    reference, patched, counter, compiled = _compiled_patched_llama(monkeypatch)
    input_ids, labels = batch()
    assert_same_training_step(reference, patched, compiled, input_ids=input_ids, labels=labels)
    traced = "".join(graph.print_readable(print_output=False) for graph in counter.graphs)
    for launcher in ("rms_norm_forward", "rope_forward", "gated_forward", "fused_linear_cross_entropy_forward"):
        assert f"liger_triton.{launcher}" in traced, launcher


def test_compiled_patched_llama_does_not_recompile_for_each_sequence_length(monkeypatch):
    # Batches padded to their longest sequence change length from step to step; like the unpatched model, the
    # patched one compiles twice (static, then dynamic) and not once per length.
    _, _, counter, compiled = _compiled_patched_llama(monkeypatch)
    for length in (9, 11, 13, 17):
        input_ids, labels = batch(length=length)
        compiled(input_ids=input_ids, labels=labels).loss.backward()
    assert counter.frame_count == 2
