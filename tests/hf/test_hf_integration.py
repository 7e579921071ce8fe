"""The ways in: _apply_liger_kernel_to_instance (transformers' Trainer with use_liger_kernel=True),
AutoLigerKernelForCausalLM, an unsupported model type, Mixtral's experts implementations, the triton backend."""

import copy

import pytest
import torch
import transformers
from tiny_hf import MODEL_TYPES, OpRecorder, assert_same_grads, batch, patched_copy, tiny_config, tiny_model

import liger_core
from liger_kernel.transformers import (
    MODEL_TYPE_TO_APPLY_LIGER_FN,
    AutoLigerKernelForCausalLM,
    LigerRMSNorm,
    LigerSwiGLUMLP,
    _apply_liger_kernel_to_instance,
)


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=101, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def test_the_model_type_table():
    assert sorted(MODEL_TYPE_TO_APPLY_LIGER_FN) == sorted(MODEL_TYPES)


def test_instance_patch_picks_by_model_type_and_filters_kwargs():
    model = tiny_model("gemma")
    # swiglu is not a gemma option (geglu is): dropped, as transformers' Trainer passes one config to every model
    _apply_liger_kernel_to_instance(model, swiglu=False, rms_norm=False, unknown=1)
    assert type(model.model.layers[0].mlp).__name__ == "LigerGEGLUMLP"
    assert type(model.model.norm).__name__ == "GemmaRMSNorm"
    assert model.forward._liger_mode == "fused_linear_cross_entropy"


def test_unsupported_model_type_warns_and_leaves_the_model_unchanged():
    model = tiny_gpt2()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.warns(UserWarning, match=r"'gpt2'.*not supported.*supported model types: \['gemma', 'gemma2'"):
        _apply_liger_kernel_to_instance(model, rope=True)
    assert dict(model.named_modules()) == modules
    assert "forward" not in vars(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])
    with pytest.warns(UserWarning, match="not supported"):
        loaded = AutoLigerKernelForCausalLM.from_config(model.config)
    assert type(loaded) is transformers.GPT2LMHeadModel


def test_auto_model_from_config_and_from_pretrained(tmp_path):
    reference = tiny_model("qwen2")
    input_ids, labels = batch()
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels).loss
    reference.save_pretrained(tmp_path)

    loaded = AutoLigerKernelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is transformers.Qwen2ForCausalLM
    assert sum(isinstance(m, LigerSwiGLUMLP) for m in loaded.modules()) == 2
    assert sum(isinstance(m, LigerRMSNorm) for m in loaded.modules()) == 5
    for name, tensor in reference.state_dict().items():  # the loaded weights are kept
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded.train()
    torch.testing.assert_close(loaded(input_ids=input_ids, labels=labels).loss, expected, rtol=1e-5, atol=1e-6)

    # patcher options pass through; the rest goes to transformers
    partial = AutoLigerKernelForCausalLM.from_pretrained(tmp_path, rms_norm=False, dtype=torch.float64)
    assert not any(isinstance(m, LigerRMSNorm) for m in partial.modules())
    assert partial.lm_head.weight.dtype == torch.float64
    built = AutoLigerKernelForCausalLM.from_config(tiny_config("phi3"), swiglu=False)
    assert type(built.model.layers[0].mlp).__name__ == "Phi3MLP"
    assert sum(isinstance(m, LigerRMSNorm) for m in built.modules()) == 5
    assert built.forward._liger_mode == "fused_linear_cross_entropy"


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: int = 8):
        self.rows = [batch(seed=100 + i, rows=1, length=12) for i in range(rows)]
        for i, (_, labels) in enumerate(self.rows):
            labels[0, : i % 5] = -100  # rows with different numbers of trained tokens: num_items_in_batch matters

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        input_ids, labels = self.rows[index]
        return {"input_ids": input_ids[0], "labels": labels[0]}


def train_with_trainer(model, tmp_path, use_liger_kernel: bool, **extra):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (in the test extra)")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("liger" if use_liger_kernel else "plain")),
        use_liger_kernel=use_liger_kernel,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_use_liger_kernel_patches_the_model(tmp_path, monkeypatch):
    from transformers.utils import is_liger_kernel_available

    assert is_liger_kernel_available()  # the distribution liger-core provides liger_kernel, version >= 0.3.0
    reference = tiny_model("llama")
    initial = copy.deepcopy(reference)
    expected = train_with_trainer(reference, tmp_path, use_liger_kernel=False)

    recorder = OpRecorder(monkeypatch)
    model = initial
    got = train_with_trainer(model, tmp_path, use_liger_kernel=True)
    assert sum(isinstance(m, LigerRMSNorm) for m in model.modules()) == 5
    assert sum(isinstance(m, LigerSwiGLUMLP) for m in model.modules()) == 2
    assert model.forward._liger_mode == "fused_linear_cross_entropy"
    assert {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"} <= set(recorder.ops)
    # gradient accumulation over 2 micro-batches: the Trainer passes num_items_in_batch; the same losses
    assert len(got) == 2
    assert got == pytest.approx(expected, rel=1e-4)


def test_trainer_liger_kernel_config(tmp_path):
    """TrainingArguments.liger_kernel_config reaches the patcher (TRL passes fused_linear_cross_entropy=False)."""
    model = tiny_model("qwen3")
    train_with_trainer(
        model, tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": False, "rope": True}
    )
    assert sum(isinstance(m, LigerRMSNorm) for m in model.modules()) == 9
    assert "forward" not in vars(model)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_mixtral_experts_implementations(implementation, monkeypatch):
    reference = tiny_model("mixtral")
    reference.config._experts_implementation = implementation
    input_ids, labels = batch()
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels)
    expected.loss.backward()
    patched = patched_copy(reference, "instance")
    patched.zero_grad()
    recorder = OpRecorder(monkeypatch)
    got = patched(input_ids=input_ids, labels=labels)
    # grouped_mm / batched_mm: one gating call per layer over all routed tokens; eager: one per expert hit
    calls = recorder.ops.count("swiglu")
    assert calls == 2 if implementation != "eager" else 2 < calls <= 8
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    assert_same_grads(reference, patched)


def test_llama_with_the_triton_rms_norm():
    """rms_norm forced onto the triton backend (on the CPU: Triton's interpreter, TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from liger_core import env

    if not torch.cuda.is_available() and not env.triton_interpret():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    reference = tiny_model("llama")
    input_ids, labels = batch(rows=1, length=9)
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels).loss
    expected.backward()
    patched = patched_copy(reference, "instance")
    patched.zero_grad()
    with liger_core.use_backend("triton", op="rms_norm"):
        hidden = torch.randn(6, 64)
        assert liger_core.select_backend("rms_norm", hidden, torch.ones(64)) == "triton"
        got = patched(input_ids=input_ids, labels=labels).loss
        got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_same_grads(reference, patched, rtol=1e-3, atol=1e-5)


def test_patched_llama_under_torch_compile_fullgraph():
    """The patched forward traces as one graph (aot_eager: no C++ compiler needed) and gives the eager numbers,
    also when its first call is the compiled one (kernels are then loaded at trace time)."""
    reference = tiny_model("llama")
    input_ids, labels = batch()
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels).loss
    expected.backward()
    patched = patched_copy(reference, "instance")
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    got = compiled(input_ids=input_ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    assert_same_grads(reference, patched)
    torch._dynamo.reset()
