"""apply_liger_kernel_to_<model>: patched and unpatched tiny models agree (loss, logits, gradients), fp32,
reference backend, for the eight supported model types, patched at class level and in place."""

import copy
import importlib
import inspect
import os

import pytest
import torch
from tiny_hf import MLP_OP, MODEL_TYPES, OpRecorder, assert_same_grads, batch, patched_copy, tiny_config, tiny_model

from liger_kernel.transformers import (
    MODEL_TYPE_TO_APPLY_LIGER_FN,
    LigerGEGLUMLP,
    LigerPhi3SwiGLUMLP,
    LigerRMSNorm,
    LigerRMSNormForGemma,
    LigerRMSNormForGemma2,
    LigerSwiGLUMLP,
    apply_liger_kernel_to_gemma2,
    apply_liger_kernel_to_llama,
    apply_liger_kernel_to_mistral,
    liger_rotary_pos_emb,
)
from liger_kernel.transformers.monkey_patch import _FAMILIES, liger_phi3_rotary_pos_emb

NORMS = {"gemma": LigerRMSNormForGemma, "gemma2": LigerRMSNormForGemma2}
MLPS = {"gemma": LigerGEGLUMLP, "gemma2": LigerGEGLUMLP, "phi3": LigerPhi3SwiGLUMLP}


def modeling(model_type):
    return importlib.import_module(_FAMILIES[model_type].module)


def assert_patched(model, model_type):
    """Every norm and MLP (Mixtral: experts) of `model` is ours; its forward is the patched one."""
    hf = modeling(model_type)
    prefix = _FAMILIES[model_type].prefix
    norm_type = NORMS.get(model_type, LigerRMSNorm)
    names = {type(m).__name__ for m in model.modules()}
    assert f"{prefix}RMSNorm" not in names and f"{prefix}MLP" not in names, names
    norms = [m for m in model.modules() if isinstance(m, norm_type)]
    extra_norms = {"qwen3": 4, "gemma2": 4}.get(model_type, 2)  # per layer
    assert len(norms) == 2 * extra_norms + 1
    if model_type == "mixtral":
        experts = [m for m in model.modules() if type(m).__name__ == "LigerMixtralExperts"]
        assert len(experts) == 2
    else:
        assert len([m for m in model.modules() if isinstance(m, MLPS.get(model_type, LigerSwiGLUMLP))]) == 2
    assert getattr(model.forward, "_liger_mode", None) == "fused_linear_cross_entropy"
    rope = liger_phi3_rotary_pos_emb if model_type == "phi3" else liger_rotary_pos_emb
    assert hf.apply_rotary_pos_emb is rope


def scenarios(model, recorder=None) -> dict:
    """Losses, logits and gradients of `model` in every case the patched forward must honour."""
    results = {}
    input_ids, labels = batch()
    keep = 7
    model.train()

    def run(name, backward=False, **kwargs):
        if recorder is not None:
            recorder.clear()
        model.zero_grad()
        output = model(input_ids=input_ids, **kwargs)
        results[name] = {"loss": output.loss, "logits": output.logits}
        if getattr(output, "aux_loss", None) is not None:
            results[name]["aux_loss"] = output.aux_loss
        if recorder is not None:
            results[name]["ops"] = set(recorder.ops)
        if backward:
            output.loss.backward()
            results[name]["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # training with labels (some -100)
    run("labels", backward=True, labels=labels)
    # gradient accumulation: the sum over tokens divided by num_items_in_batch, as transformers does
    run("num_items_in_batch", backward=True, labels=labels, num_items_in_batch=torch.tensor(23))
    # already shifted labels (sequence packing, context parallelism), with logits_to_keep
    run("shift_labels", labels=labels, shift_labels=labels[:, -keep:].clone(), logits_to_keep=keep)
    # logits_to_keep on its own: labels as long as the kept positions
    run("logits_to_keep", labels=labels[:, -keep:], logits_to_keep=keep)
    # logits when asked for, while training
    run("skip_logits=False", labels=labels, skip_logits=False)
    model.eval()
    with torch.no_grad():
        # not training: logits (of the last `keep` positions), the loss when labels are given
        run("eval", logits_to_keep=keep)
        run("eval labels", labels=labels)
    model.train()
    return results


def compare(expected: dict, got: dict) -> None:
    for case, want in expected.items():
        have = got[case]
        for key in ("loss", "aux_loss"):
            if want.get(key) is not None:
                torch.testing.assert_close(have[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{case}: {key}")
        if have["logits"] is not None:
            torch.testing.assert_close(have["logits"], want["logits"], rtol=1e-5, atol=1e-5, msg=f"{case}: logits")
        for name, grad in want.get("grads", {}).items():
            torch.testing.assert_close(have["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{case}: {name}")


@pytest.mark.parametrize("way", ["class", "instance"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_model_matches_unpatched(model_type, way, monkeypatch):
    reference = tiny_model(model_type)
    expected = scenarios(reference)  # before any patch: transformers' own code throughout
    patched = patched_copy(reference, way)
    assert_patched(patched, model_type)
    got = scenarios(patched, OpRecorder(monkeypatch))
    compare(expected, got)

    # training with labels: the fused loss; the logits are never materialised
    for case in ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep"):
        assert got[case]["logits"] is None
        ops = got[case]["ops"]
        assert {"rms_norm", "rope", MLP_OP.get(model_type, "swiglu"), "fused_linear_cross_entropy"} <= ops, ops
        assert "cross_entropy" not in ops
    # asked for, or not training: the logits
    for case in ("skip_logits=False", "eval", "eval labels"):
        assert got[case]["logits"] is not None
    assert got["eval"]["logits"].shape == (2, 7, 101) and got["eval"]["loss"] is None
    if model_type == "mixtral":  # the router's load-balancing loss is kept
        assert got["labels"]["aux_loss"] is not None

    # skip_logits=True when evaluating (transformers' Trainer with prediction_loss_only): the fused loss
    input_ids, labels = batch()
    patched.eval()
    with torch.no_grad():
        output = patched(input_ids=input_ids, labels=labels, skip_logits=True)
    assert output.logits is None
    torch.testing.assert_close(output.loss, expected["eval labels"]["loss"], rtol=1e-5, atol=1e-6)


def train_curve(model, steps: int = 5) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    input_ids, labels = batch(seed=10)  # the same batch at every step: the loss must fall
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_training_follows_the_same_loss_curve(model_type):
    """5 AdamW steps on the same batches: the patched model's losses are the unpatched model's."""
    reference = tiny_model(model_type, seed=3)
    initial = copy.deepcopy(reference.state_dict())
    expected = train_curve(reference)
    reference.load_state_dict(initial)
    patched = patched_copy(reference, "class")
    assert train_curve(patched) == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]  # it learns


def test_gemma2_final_logit_softcapping_is_in_the_loss():
    reference = tiny_model("gemma2")
    input_ids, labels = batch()
    reference.train()
    capped = reference(input_ids=input_ids, labels=labels).loss
    reference.config.final_logit_softcapping = None
    uncapped = reference(input_ids=input_ids, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 0.05  # the cap matters here
    reference.config.final_logit_softcapping = 2.0

    patched = patched_copy(reference, "instance")
    patched.train()
    torch.testing.assert_close(patched(input_ids=input_ids, labels=labels).loss, capped, rtol=1e-5, atol=1e-6)
    patched.config.final_logit_softcapping = None
    torch.testing.assert_close(patched(input_ids=input_ids, labels=labels).loss, uncapped, rtol=1e-5, atol=1e-6)
    patched.config.final_logit_softcapping = 2.0
    patched.eval()
    with torch.no_grad():
        logits = patched(input_ids=input_ids).logits
    assert logits.abs().max() <= 2.0


@pytest.mark.parametrize("way", ["class", "instance"])
def test_cross_entropy_option(way, monkeypatch):
    """cross_entropy=True: materialised logits and LigerCrossEntropy's operator; the fused one is not used."""
    reference = tiny_model("llama")
    input_ids, labels = batch()
    items = torch.tensor(19)
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels, num_items_in_batch=items)
    expected.loss.backward()

    patched = patched_copy(reference, way, cross_entropy=True, fused_linear_cross_entropy=False)
    assert patched.forward._liger_mode == "cross_entropy"
    recorder = OpRecorder(monkeypatch)
    patched.train()
    patched.zero_grad()
    got = patched(input_ids=input_ids, labels=labels, num_items_in_batch=items)
    assert "cross_entropy" in recorder.ops and "fused_linear_cross_entropy" not in recorder.ops
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    assert_same_grads(reference, patched)


def test_cross_entropy_and_fused_are_mutually_exclusive():
    hf = modeling("llama")
    before = dict(vars(hf))
    with pytest.raises(ValueError, match="cross_entropy.*fused_linear_cross_entropy"):
        apply_liger_kernel_to_llama(cross_entropy=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        apply_liger_kernel_to_gemma2(cross_entropy=True, fused_linear_cross_entropy=True, model=tiny_model("gemma2"))
    assert dict(vars(hf)) == before  # nothing was patched


def test_options_switch_parts_off():
    reference = tiny_model("llama")
    input_ids, labels = batch()
    expected = reference(input_ids=input_ids, labels=labels).loss
    hf = modeling("llama")
    original_rope = hf.apply_rotary_pos_emb
    patched = copy.deepcopy(reference)
    apply_liger_kernel_to_llama(rope=False, rms_norm=False, fused_linear_cross_entropy=False, model=patched)
    assert hf.apply_rotary_pos_emb is original_rope
    assert not any(isinstance(m, LigerRMSNorm) for m in patched.modules())
    assert sum(isinstance(m, LigerSwiGLUMLP) for m in patched.modules()) == 2
    assert "forward" not in vars(patched)
    torch.testing.assert_close(patched(input_ids=input_ids, labels=labels).loss, expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mixtral", "phi3"])
def test_patching_twice_is_harmless(model_type):
    reference = tiny_model(model_type)
    input_ids, labels = batch()
    reference.train()
    expected = reference(input_ids=input_ids, labels=labels).loss
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    hf = modeling(model_type)
    causal_lm = type(reference)

    # in place, twice: nothing is replaced again
    patched = copy.deepcopy(reference)
    apply(model=patched)
    modules = dict(patched.named_modules())
    forward = patched.forward
    apply(model=patched)
    assert dict(patched.named_modules()) == modules
    assert patched.forward.__func__ is forward.__func__

    # class level, twice: the same classes and forward; a model built then and patched in place again
    apply()
    first = dict(vars(hf))
    first_forward = causal_lm.forward
    apply()
    assert dict(vars(hf)) == first
    assert causal_lm.forward is first_forward
    built = causal_lm(copy.deepcopy(reference.config))
    built.load_state_dict(reference.state_dict())
    built_modules = dict(built.named_modules())
    apply(model=built)
    assert dict(built.named_modules()) == built_modules

    for model in (patched, built):
        assert_patched(model, model_type)
        model.train()
        torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss, expected, rtol=1e-5, atol=1e-6)


def test_instance_patch_keeps_the_parameters_and_leaves_classes_alone():
    model = tiny_model("qwen3")
    hf = modeling("qwen3")
    classes = {name: value for name, value in vars(hf).items() if isinstance(value, type)}
    before = dict(model.named_parameters())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    MODEL_TYPE_TO_APPLY_LIGER_FN["qwen3"](model=model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[name] is before[name] for name in before)  # the very same Parameter objects
    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # the classes are transformers' own: a model built now is unpatched
    assert {name: value for name, value in vars(hf).items() if isinstance(value, type)} == classes
    assert "forward" not in vars(hf.Qwen3ForCausalLM) or not hasattr(hf.Qwen3ForCausalLM.forward, "_liger_mode")
    fresh = hf.Qwen3ForCausalLM(tiny_config("qwen3"))
    assert not any(isinstance(m, LigerRMSNorm) for m in fresh.modules())
    assert getattr(fresh.forward, "_liger_mode", None) is None


def test_forward_signature_positional_arguments_and_tuples():
    reference = tiny_model("mistral")
    reference.eval()
    input_ids, labels = batch()
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected_logits = reference(input_ids, mask).logits
        expected_loss = reference(input_ids=input_ids, labels=labels).loss
        expected_tokens = reference.generate(input_ids[:1], max_new_tokens=4, do_sample=False)

    patched = copy.deepcopy(reference)
    apply_liger_kernel_to_mistral(model=patched)
    parameters = inspect.signature(patched.forward).parameters
    # the Trainer keeps the dataset columns that the forward names; generation looks for logits_to_keep
    assert {"input_ids", "attention_mask", "labels", "logits_to_keep", "skip_logits"} <= parameters.keys()
    assert any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids, mask).logits, expected_logits, rtol=1e-5, atol=1e-5)
        as_tuple = patched(input_ids=input_ids, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], expected_loss)
        with pytest.raises(TypeError, match="multiple values"):
            patched(input_ids, input_ids=input_ids)
        with pytest.raises(ValueError, match="skip_logits"):
            patched(input_ids=input_ids, skip_logits=True)
        # generation (a cache, logits_to_keep=1) gives the same tokens
        tokens = patched.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


def test_bad_arguments():
    with pytest.raises(TypeError, match="'rope' must be a bool"):
        apply_liger_kernel_to_llama(rope="yes")
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module"):
        apply_liger_kernel_to_llama(model="meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match="not a llama model"):
        apply_liger_kernel_to_llama(model=tiny_model("gemma"))
    with pytest.warns(UserWarning, match="ignoring the keyword argument.*layer_norm"):
        apply_liger_kernel_to_llama(layer_norm=True, rope=False, rms_norm=False, swiglu=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_precision_training_step_matches_the_unpatched_model(backend, device, monkeypatch):
    """An fp32 model in a bf16 autocast region (transformers' Trainer with ``bf16=True``): the patched model's loss
    and gradients agree with the unpatched model's within bf16 rounding, and the fused loss gets the lm head's
    operands in bf16, as autocast gives ``lm_head(hidden)`` in the unpatched model."""
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", backend)
    from liger_kernel.transformers import _hf_forward

    seen = []
    fused = _hf_forward.liger_fused_linear_cross_entropy

    def recording(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return fused(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(_hf_forward, "liger_fused_linear_cross_entropy", recording)
    reference = tiny_model("llama").to(device)
    patched = patched_copy(reference, "instance")
    input_ids, labels = (t.to(device) for t in batch())
    losses = []
    for model in (reference, patched):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(loss.float())
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-3)
    # bf16 products round differently on the two sides: compare each gradient against its own scale
    patched_grads = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        expected, got = parameter.grad, patched_grads[name].grad
        assert got is not None and got.dtype == expected.dtype == torch.float32, name
        error = (got - expected).abs().max()
        assert error <= 2e-2 * expected.abs().max(), f"{name}: error {float(error):.3g}"
