"""The Triton preference losses' own paths, which the generic conformance test does not reach: the shared target
log-prob pass walked over several chunks with a ragged last one (the chunk budget patched small), its gradient for
arbitrary per-row coefficients and a second target, ignored tokens and a sequence with none counted, bias, fp32 and
bf16, gradients for only some inputs, a non-unit upstream gradient, a reference-model pass that builds no graph, no
(rows, V) logits kept for the backward, out-of-range targets and mismatched dtypes. Truth is written here in plain
PyTorch (float64) on the full logits."""

import os

import pytest
import torch
import torch.nn.functional as F

import liger_core

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU",
)

B, T, H, V = 2, 9, 13, 41  # 2B·T = 36 rows: with 7 rows per chunk (fp32) six chunks, the last one ragged
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def machinery():
    from liger_backends.triton import _target_logprobs

    return _target_logprobs


@pytest.fixture(scope="module")
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def small_chunks(machinery, device, monkeypatch):
    """7 rows per chunk in fp32, 14 in bf16."""
    monkeypatch.setitem(machinery.CHUNK_BYTES, device, 7 * V * 4)


def close(got, expected, dtype):
    expected = expected.detach().double()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), expected, atol=TOLERANCE[dtype] * scale, rtol=0)


def make(dtype, device, seed, with_bias=True, ignore_index=-100, pairs=B):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * pairs, T, H, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) * 1.5 / H**0.5).to(device=device, dtype=dtype)
    b = (0.3 * torch.randn(V, generator=g)).to(device=device, dtype=dtype) if with_bias else None
    target = torch.randint(0, V, (2 * pairs, T), generator=g)
    target[torch.rand(2 * pairs, T, generator=g) < 0.3] = ignore_index
    target[:, :2] = ignore_index  # a prompt
    target[:, -1] = torch.randint(0, V, (2 * pairs,), generator=g)
    return x, w, b, target.to(device)


# -- the formulas ------------------------------------------------------------------------------------------------


def token_logps(x, w, b, target, ignore_index):
    """(2B, T) log-probs of the targets (0 where ignored) and the full logits, in float64."""
    logits = x.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    mask = target != ignore_index
    logp = logits.log_softmax(-1).gather(-1, target.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp)), logits


def per_sequence(logp, target, ignore_index, average):
    total = logp.sum(-1)
    return total / (target != ignore_index).sum(-1).clamp(min=1) if average else total


def nll(logp, target, ignore_index):
    half = logp.shape[0] // 2
    return -logp[:half].sum() / (target[:half] != ignore_index).sum().clamp(min=1)


def smoothed(z, ls):
    return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)


def expected_outputs(op, x, w, b, target, attrs, ref=None, nll_target=None):
    """Every output of `op` from the formulas of API.md."""
    ii = attrs.get("ignore_index", -100)
    beta = attrs.get("beta", 0.1)
    logp, logits = token_logps(x, w, b, target, ii)
    average = op in ("fused_linear_orpo", "fused_linear_simpo") or attrs.get("average_log_prob", False)
    seq = per_sequence(logp, target, ii, average)
    c, r = seq.chunk(2)
    half = logits.shape[0] // 2
    means = (logits[:half].mean(), logits[half:].mean())
    if nll_target is not None:
        nll_value = nll(token_logps(x, w, b, nll_target, ii)[0], nll_target, ii)
    else:
        nll_value = nll(logp, target, ii)
    compute_nll = attrs.get("compute_nll_loss", op != "fused_linear_dpo")
    nll_value = nll_value if compute_nll else torch.zeros_like(nll_value)
    alpha = attrs.get("alpha", 1.0)
    extras = ()
    if op == "fused_linear_dpo":
        c0 = r0 = torch.zeros((), dtype=torch.float64)
        if ref is not None:
            c0, r0 = per_sequence(token_logps(*ref, target, ii)[0], target, ii, average).chunk(2)
        z = beta * ((c - c0) - (r - r0))
        pair = (
            smoothed(z, attrs.get("label_smoothing", 0.0)) if attrs.get("loss_type", "sigmoid") == "sigmoid" else None
        )
        if attrs.get("loss_type") == "hinge":
            pair = torch.relu(1 - z)
        rewards = (beta * (c - c0), beta * (r - r0))
    elif op == "fused_linear_orpo":
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        pair = -beta * F.logsigmoid(log_odds)
        rewards = (beta * c, beta * r)
        extras = (F.logsigmoid(log_odds).mean(), log_odds.mean())
        alpha = 1.0
    elif op == "fused_linear_cpo":
        pair = smoothed(beta * (c - r), attrs.get("label_smoothing", 0.0))
        rewards = (beta * c, beta * r)
    else:
        pair = smoothed(beta * (c - r) - attrs.get("gamma", 0.5), attrs.get("label_smoothing", 0.0))
        rewards = (beta * c, beta * r)
    loss = pair.mean() + alpha * nll_value
    return (loss, c, r, *means, nll_value, *rewards, *extras)


def call(op, x, w, b, target, extra, attrs, wrt=(True, True, True)):
    leaves = [None if t is None else t.detach().requires_grad_(want) for t, want in zip((x, w, b), wrt)]
    outputs = liger_core.call(op, leaves[0], leaves[1], target, leaves[2], *extra, impl="triton", **attrs)
    return outputs, leaves


CASES = [
    ("fused_linear_dpo", {"beta": 0.7, "compute_nll_loss": True, "alpha": 0.4, "label_smoothing": 0.1}),
    ("fused_linear_dpo", {"use_ref_model": False, "loss_type": "hinge", "average_log_prob": True, "beta": 0.3}),
    ("fused_linear_orpo", {"beta": 0.5}),
    ("fused_linear_cpo", {"beta": 0.4, "alpha": 0.6, "label_smoothing": 0.2, "average_log_prob": True}),
    ("fused_linear_simpo", {"beta": 1.5, "gamma": 0.3, "ignore_index": 5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, attrs", CASES, ids=[f"{op[13:]}{i}" for i, (op, _) in enumerate(CASES)])
def test_losses_over_several_chunks_match_the_formulas(op, attrs, dtype, device, small_chunks):
    seed = 11 + len(attrs)
    ii = attrs.get("ignore_index", -100)
    x, w, b, target = make(dtype, device, seed, ignore_index=ii)
    extra, ref, nll_target = (), None, None
    if op == "fused_linear_dpo":
        if attrs.get("use_ref_model", True):
            rx, rw, rb, _ = make(dtype, device, seed + 100)
            ref = (rx, rw, rb)
            extra = ref
        else:
            extra = (None, None, None)
    if op == "fused_linear_orpo":
        nll_target = make(dtype, device, seed + 200, ignore_index=ii)[3]
        extra = (nll_target,)
    outputs, leaves = call(op, x, w, b, target, extra, attrs)
    upstream = 1.7  # the backward scales by the incoming gradient
    (outputs[0] * upstream).backward()

    truth_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref64 = None if ref is None else tuple(t.double() for t in ref)
    expected = expected_outputs(op, *truth_leaves, target, attrs, ref64, nll_target)
    (expected[0] * upstream).backward()
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.dtype == dtype
        close(got, want, dtype)
    for leaf, truth in zip(leaves, truth_leaves):
        assert leaf.grad.dtype == dtype
        close(leaf.grad, truth.grad, dtype)


def test_target_logprob_pass_and_its_gradient_for_any_coefficients(machinery, device, small_chunks):
    """The pass itself, against log_softmax: log-prob of two targets, log-sum-exp, row sums; and its backward for
    random per-row coefficients against autograd of Σ coef·logp."""
    g = torch.Generator().manual_seed(3)
    n, ii = 31, -7
    x = torch.randn(n, H, generator=g).to(device)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device)
    b = torch.randn(V, generator=g).to(device)
    targets = []
    for _ in range(2):
        t = torch.randint(0, V, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.3] = ii
        targets.append(t.to(device))
    lse, logp, second_logp, row_sum = machinery.forward_pass(x, w, b, targets[0], targets[1], ii, True)

    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    logits = xd @ wd.T + bd
    full = logits.log_softmax(-1)
    expected = [
        torch.where(t != ii, full.gather(1, t.clamp(0).unsqueeze(1)).squeeze(1), torch.zeros_like(full[:, 0]))
        for t in targets
    ]
    close(lse, logits.logsumexp(-1), torch.float32)
    close(logp, expected[0], torch.float32)
    close(second_logp, expected[1], torch.float32)
    close(row_sum, logits.sum(-1), torch.float32)

    coefs = [torch.randn(n, generator=g).to(device) for _ in range(2)]
    grads = machinery.backward_pass(x, w, b, targets[0], targets[1], lse, *coefs, ii, (True, True, True))
    (expected[0] * coefs[0].double() + expected[1] * coefs[1].double()).sum().backward()
    for got, leaf in zip(grads, (xd, wd, bd)):
        close(got, leaf.grad, torch.float32)
    only_weight = machinery.backward_pass(x, w, None, targets[0], None, lse, coefs[0], None, ii, (False, True, False))
    assert only_weight[0] is None and only_weight[2] is None
    assert only_weight[1].shape == w.shape


def test_gradients_for_only_some_inputs_and_without_grad(device, small_chunks):
    attrs = {"beta": 0.2, "compute_nll_loss": True}
    x, w, b, target = make(torch.float32, device, 5)
    rx, rw, rb, _ = make(torch.float32, device, 6)
    full, leaves = call("fused_linear_dpo", x, w, b, target, (rx, rw, rb), attrs)
    full[0].backward()
    for wrt in ((True, False, False), (False, True, False), (False, False, True)):
        outputs, partial = call("fused_linear_dpo", x, w, b, target, (rx, rw, rb), attrs, wrt)
        outputs[0].backward()
        for leaf, reference, wanted in zip(partial, leaves, wrt):
            assert (leaf.grad is not None) == wanted
            if wanted:
                torch.testing.assert_close(leaf.grad, reference.grad)
    with torch.no_grad():
        plain = liger_core.call("fused_linear_dpo", x, w, target, b, rx, rw, rb, impl="triton", **attrs)
    for got, expected in zip(plain, full):
        torch.testing.assert_close(got, expected.detach())


def test_reference_pass_builds_no_graph_and_no_logits_are_kept(device, small_chunks):
    """Nothing the backward keeps is a (rows, V) block, and the reference model gets no gradient and is not saved."""
    x, w, b, target = make(torch.float32, device, 8)
    rx, rw, rb, _ = make(torch.float32, device, 9)
    ref = [t.detach().requires_grad_() for t in (rx, rw, rb)]
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outputs = liger_core.call("fused_linear_dpo", leaves[0], leaves[1], target, leaves[2], *ref, impl="triton")
    assert outputs[0].grad_fn is not None
    assert all(o.grad_fn is None for o in outputs[1:])
    for t in saved:
        assert not (t.dim() == 2 and t.shape[-1] == V and t.shape[0] > 1), f"saved a logits block {tuple(t.shape)}"
        assert all(t.data_ptr() != r.data_ptr() for r in ref), "the reference model was saved for backward"
    grads = torch.autograd.grad(outputs[0], [*leaves, *ref], allow_unused=True)
    assert all(g is not None for g in grads[:3])
    assert all(g is None for g in grads[3:])


def test_sequence_without_counted_tokens_and_out_of_range_target(device):
    x, w, b, target = make(torch.float32, device, 12, with_bias=False)
    target[1] = -100  # a chosen sequence with nothing counted: log-prob 0 (sum and mean)
    for op, attrs in (("fused_linear_cpo", {}), ("fused_linear_simpo", {})):
        outputs, leaves = call(op, x, w, None, target, (), attrs, wrt=(True, True, False))
        expected = expected_outputs(op, x.double(), w.double(), None, target, attrs)
        for got, want in zip(outputs, expected):
            close(got, want, torch.float32)
        outputs[0].backward()
        assert torch.isfinite(leaves[0].grad).all() and (leaves[0].grad[1] == 0).all()
    bad = target.clone()
    bad[2, -1] = V + 3  # not ignore_index and outside [0, V): NaN, as the reference backend
    loss = liger_core.call("fused_linear_cpo", x, w, bad, None, impl="triton")[0]
    assert torch.isnan(loss)


def test_declines_mismatched_dtypes(device):
    from liger_backends.triton.preference import DPO_KERNEL

    x, w, b, target = make(torch.float32, device, 1)
    rx, rw, rb, _ = make(torch.float32, device, 2)
    assert DPO_KERNEL.supports((x, w, target, b, rx, rw, rb), {"use_ref_model": True}) == []
    reasons = DPO_KERNEL.supports((x, w.bfloat16(), target, b, rx, rw.half(), rb), {"use_ref_model": True})
    assert len(reasons) == 2 and "weight" in reasons[0] and "ref_weight" in reasons[1]


@pytest.mark.parametrize(
    "op, case",
    [
        ("fused_linear_dpo", {"compute_nll_loss": True}),
        ("fused_linear_orpo", {"with_nll_target": True, "with_bias": True}),
    ],
)
def test_compiles_without_graph_break(op, case, device):
    """torch.compile(fullgraph=True) around the loss head (jvp of the pair loss, coefficients, the autograd bridge,
    the two passes as opaque custom ops): one graph for two steps, the same loss and gradients as eagerly."""
    import torch._dynamo.testing

    spec = liger_core.registry.get_registry().operator(op)

    def inputs(seed):
        made, attrs = spec.make_inputs(device, torch.float32, "tiny", seed, **case)
        diff = spec.differentiable_inputs
        return [t.requires_grad_() if i in diff and t is not None else t for i, t in enumerate(made)], attrs

    def step(fn, xs):
        wrt = [xs[i] for i in spec.differentiable_inputs if xs[i] is not None]
        out = fn(*xs)
        return out, torch.autograd.grad(out[0] * 1.3, wrt)

    torch._dynamo.reset()
    attrs = inputs(0)[1]
    eager = lambda *xs: liger_core.call(op, *xs, impl="triton", **attrs)  # noqa: E731
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    for seed in (0, 1):
        got, got_grads = step(compiled, inputs(seed)[0])
    expected, expected_grads = step(eager, inputs(1)[0])
    assert counter.frame_count == 1
    for a, b in zip((*got, *got_grads), (*expected, *expected_grads)):
        torch.testing.assert_close(a, b)
