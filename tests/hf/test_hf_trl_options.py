"""The forward options that TRL's SFTTrainer(use_liger_kernel=True) passes to a patched model:
``return_token_accuracy=True`` (its mean_token_accuracy metric, read from ``outputs.token_accuracy``) and
``use_token_scaling`` (its DFT loss, ``loss_type="dft"``): each token's cross entropy times its detached predicted
probability of the target. Checked against formulas written here from the unpatched model's logits."""

import pytest
import torch
import torch.nn.functional as F
from tiny_hf import batch, patched_copy, tiny_model


def reference(model, input_ids, labels, num_items_in_batch=None):
    """(DFT loss, token accuracy) from the unpatched model's own logits, as TRL/liger-kernel define them."""
    logits = model(input_ids=input_ids).logits.float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    nll = F.cross_entropy(shift_logits[valid], targets[valid], reduction="none")
    per_token = nll * torch.exp(-nll).detach()
    loss = per_token.sum() / (valid.sum() if num_items_in_batch is None else num_items_in_batch)
    accuracy = (shift_logits[valid].argmax(-1) == targets[valid]).float().mean()
    return loss, accuracy


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: the softcap is in both
def test_token_scaling_and_token_accuracy(model_type):
    unpatched = tiny_model(model_type)
    unpatched.train()
    input_ids, labels = batch()
    items = torch.tensor(17)
    patched = patched_copy(unpatched, "instance")
    patched.train()
    for num_items_in_batch in (None, items):
        unpatched.zero_grad()
        want_loss, want_accuracy = reference(unpatched, input_ids, labels, num_items_in_batch)
        want_loss.backward()
        want_grads = {n: p.grad.clone() for n, p in unpatched.named_parameters() if p.grad is not None}
        kwargs = dict(use_token_scaling=True, return_token_accuracy=True, num_items_in_batch=num_items_in_batch)
        for skip_logits in (True, False):  # the fused loss, and the loss over materialised logits
            patched.zero_grad()
            output = patched(input_ids=input_ids, labels=labels, skip_logits=skip_logits, **kwargs)
            assert (output.logits is None) == skip_logits
            torch.testing.assert_close(output.loss, want_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(output.token_accuracy.float(), want_accuracy)
            output.loss.backward()
            for name, parameter in patched.named_parameters():
                torch.testing.assert_close(parameter.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_defaults_are_unchanged():
    """Without the options: the plain loss, no token_accuracy, and the same tuple as transformers'."""
    unpatched = tiny_model("qwen2")
    input_ids, labels = batch()
    patched = patched_copy(unpatched, "instance")
    unpatched.eval()
    patched.eval()
    with torch.no_grad():
        plain = patched(input_ids=input_ids, labels=labels, skip_logits=True)
        scaled = patched(input_ids=input_ids, labels=labels, skip_logits=True, use_token_scaling=True)
        want = unpatched(input_ids=input_ids, labels=labels, return_dict=False)
        got = patched(input_ids=input_ids, labels=labels, return_dict=False)
        accuracy_only = patched(input_ids=input_ids, labels=labels, return_token_accuracy=True)
    assert plain.token_accuracy is None and scaled.loss < plain.loss
    torch.testing.assert_close(plain.loss, want[0], rtol=1e-5, atol=1e-6)
    assert len(got) == len(want)
    torch.testing.assert_close(accuracy_only.loss, want[0], rtol=1e-5, atol=1e-6)  # accuracy alone: plain loss
    assert 0 <= accuracy_only.token_accuracy <= 1
    # no labels: nothing to measure
    with torch.no_grad():
        assert patched(input_ids=input_ids, return_token_accuracy=True).token_accuracy is None


def test_under_torch_compile_fullgraph():
    unpatched = tiny_model("llama")
    unpatched.train()
    input_ids, labels = batch()
    want_loss, want_accuracy = reference(unpatched, input_ids, labels)
    patched = patched_copy(unpatched, "instance")
    patched.train()
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    output = compiled(input_ids=input_ids, labels=labels, use_token_scaling=True, return_token_accuracy=True)
    torch.testing.assert_close(output.loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.token_accuracy.float(), want_accuracy)
    torch._dynamo.reset()
