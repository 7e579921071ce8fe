"""Tiny random-weight models of the eight supported families, and comparison helpers, for tests/hf."""

from __future__ import annotations

import copy

import torch
import transformers

import liger_core
from liger_kernel.transformers import MODEL_TYPE_TO_APPLY_LIGER_FN

MODEL_TYPES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
VOCAB = 101

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    intermediate_size=96,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_SPECIFIC = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    # output_router_logits: the load-balancing loss is part of the loss compared
    "mixtral": (
        transformers.MixtralConfig,
        {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    ),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "gemma": (transformers.GemmaConfig, {"head_dim": 16}),
    # a small cap, so that the softcapping changes the loss visibly
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16, "final_logit_softcapping": 2.0}),
    # partial rotary: only half of each head is rotated
    "phi3": (transformers.Phi3Config, {"partial_rotary_factor": 0.5}),
}

# the operators every patched model must run (besides fused_linear_cross_entropy when training with labels)
MLP_OP = {"gemma": "geglu", "gemma2": "geglu"}


def tiny_config(model_type: str, **overrides):
    cls, specific = _SPECIFIC[model_type]
    config = cls(**{**_COMMON, **specific, **overrides})
    config._attn_implementation = "eager"  # the same attention on every side; no sdpa/flash differences
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model; every parameter perturbed (Gemma's zero-initialised norm weights included)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def patched_copy(model: torch.nn.Module, way: str, **options) -> torch.nn.Module:
    """The same model (same weights) patched at class level before building ("class") or in place ("instance")."""
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type]
    if way == "instance":
        patched = copy.deepcopy(model)
        apply(model=patched, **options)
        return patched
    apply(**options)
    patched = type(model)(copy.deepcopy(model.config))
    patched.load_state_dict(model.state_dict())
    return patched


def batch(seed: int = 1, rows: int = 2, length: int = 11):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[-1, -2:] = -100
    return input_ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(expected: torch.nn.Module, actual: torch.nn.Module, rtol=1e-4, atol=1e-6) -> None:
    want, got = grads(expected), grads(actual)
    assert want.keys() == got.keys()
    assert want, "no gradients"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_training_step(reference, patched, run_patched, **inputs) -> torch.Tensor:
    """One forward and backward of `reference` and of `run_patched` (the patched model, or a compiled wrapper of
    it) on `inputs`: the losses and every parameter's gradient agree. Returns the reference's loss."""
    expected = reference(**inputs).loss
    expected.backward()
    got = run_patched(**inputs).loss
    got.backward()
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-4, atol=1e-5)
    assert_same_grads(reference, patched, rtol=1e-3, atol=1e-5)
    return expected


class OpRecorder:
    """Records the operators called through ``liger_core.call`` (installed with monkeypatch)."""

    def __init__(self, monkeypatch):
        self.ops: list[str] = []
        original = liger_core.call

        def call(op, *args, **kwargs):
            self.ops.append(op)
            return original(op, *args, **kwargs)

        monkeypatch.setattr(liger_core, "call", call)

    def clear(self) -> None:
        self.ops.clear()
