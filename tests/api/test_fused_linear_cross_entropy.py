"""LigerFusedLinearCrossEntropyLoss and liger_fused_linear_cross_entropy against F.cross_entropy on the logits
``x @ W.T + b`` (with every option of API.md written out here in plain PyTorch), and proof that the reference
backend never materialises the (BT, V) logits."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from liger_backends.reference import fused_linear_cross_entropy as reference_flce
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from liger_core import BackendUnavailableError
from liger_core.testing import check_conformance
from liger_kernel.transformers import CrossEntropyOutput, LigerFusedLinearCrossEntropyLoss
from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
REDUCTIONS = ["mean", "sum", "none"]
ROWS, HIDDEN, VOCAB = 37, 19, 53


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 5 rows (37 rows: 8 chunks, the last one short), so every test crosses chunk boundaries."""
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 5 * VOCAB * 4)


# -- the formula -------------------------------------------------------------------------------------------------


def expected_outputs(
    x,
    weight,
    target,
    bias=None,
    ce_weight=None,
    ignore_index=-100,
    lse_square_scale=0.0,
    label_smoothing=0.0,
    reduction="mean",
    softcap=None,
    use_token_scaling=False,
):
    """(loss, z_loss, token_accuracy, predicted_tokens) from the full logits in fp32, with F.cross_entropy."""
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    counted = target != ignore_index
    w = None if ce_weight is None else ce_weight.float()
    rows = F.cross_entropy(
        logits, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    if use_token_scaling:
        safe = torch.where(counted, target, 0)
        rows = rows * torch.softmax(logits, -1).gather(1, safe[:, None]).squeeze(1).detach()
    lse = torch.logsumexp(logits, -1)
    z_rows = torch.where(counted, lse_square_scale * lse.pow(2), torch.zeros_like(lse))
    count = counted.sum()
    if reduction == "mean":
        # F.cross_entropy's mean: divided by the class weights of the counted targets (their count without weights)
        denominator = counted.float().sum() if w is None else (w[torch.where(counted, target, 0)] * counted).sum()
        loss = rows.sum() / denominator.clamp(min=1e-30) if count > 0 else rows.sum() * 0
        z_loss = z_rows.sum() / count.clamp(min=1)
    elif reduction == "sum":
        loss, z_loss = rows.sum(), z_rows.sum()
    else:
        loss, z_loss = rows, z_rows
    if lse_square_scale > 0:
        loss = loss + z_loss
    predicted = logits.argmax(-1)
    correct = ((predicted == target) & counted).float()
    accuracy = correct if reduction == "none" else correct.sum() / count.clamp(min=1)
    return loss, z_loss, accuracy, torch.where(counted, predicted, -1)


# -- helpers -----------------------------------------------------------------------------------------------------


def make_inputs(dtype, seed, rows=ROWS, hidden=HIDDEN, vocab=VOCAB, ignore_index=-100, ignored_share=0.2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=generator) * 3.0 / hidden**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=generator) * 0.5).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < ignored_share] = ignore_index
    ce_weight = torch.rand(vocab, generator=generator) + 0.5
    return x, weight, bias, target, ce_weight


def assert_close(actual, expected, dtype, name):
    tol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def check_against_formula(ours, x, weight, bias, target, dtype, **options):
    """`ours(x, weight, bias)` returns the loss: compare it and the gradients of x, weight and bias."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref_leaves = [t.clone().float().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    loss = ours(*leaves)
    expected = expected_outputs(*ref_leaves[:2], target, ref_leaves[2], **options)[0]
    assert loss.dtype == torch.promote_types(x.dtype, torch.float32) and loss.shape == expected.shape
    assert_close(loss, expected, dtype, "loss")
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)) + 0.5  # not just ones
    wrt = [t for t in leaves if t is not None]
    ref_wrt = [t for t in ref_leaves if t is not None]
    ours_grads = torch.autograd.grad(loss, wrt, grad_out.to(loss.dtype))
    ref_grads = torch.autograd.grad(expected, ref_wrt, grad_out)
    for name, got, want, leaf in zip(("d input", "d weight", "d bias"), ours_grads, ref_grads, wrt):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_close(got, want, dtype, name)


# -- against F.cross_entropy -------------------------------------------------------------------------------------


OPTION_SETS = [
    {},
    {"with_bias": True, "with_ce_weight": True, "label_smoothing": 0.1},
    {"with_bias": True, "softcap": 4.0, "lse_square_scale": 1e-2},
    {"with_ce_weight": True, "ignore_index": 3, "use_token_scaling": True},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "bias-weight-smoothing", "softcap-zloss", "scaling"])
def test_module_matches_cross_entropy_on_the_logits(dtype, reduction, options):
    options = dict(options)
    with_bias, with_ce_weight = options.pop("with_bias", False), options.pop("with_ce_weight", False)
    x, weight, bias, target, ce_weight = make_inputs(dtype, seed=1, ignore_index=options.get("ignore_index", -100))
    bias = bias if with_bias else None
    ce_weight = ce_weight if with_ce_weight else None
    module = LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight, reduction=reduction, **options)
    check_against_formula(
        lambda x_, w_, b_: module(w_, x_, target, b_),
        x,
        weight,
        bias,
        target,
        dtype,
        ce_weight=ce_weight,
        reduction=reduction,
        **options,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functional_matches_cross_entropy_on_the_logits(dtype, reduction):
    x, weight, bias, target, ce_weight = make_inputs(dtype, seed=2)
    options = dict(label_smoothing=0.05, lse_square_scale=1e-3, softcap=6.0, reduction=reduction)
    check_against_formula(
        lambda x_, w_, b_: liger_fused_linear_cross_entropy(x_, w_, target, b_, ce_weight, **options),
        x,
        weight,
        bias,
        target,
        dtype,
        ce_weight=ce_weight,
        **options,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_chunk_and_many_chunks_agree(reduction, monkeypatch):
    x, weight, bias, target, ce_weight = make_inputs(torch.float32, seed=3)
    results = []
    for chunk_bytes in (VOCAB * 4, 5 * VOCAB * 4, 2**30):  # 1 row, 5 rows, everything in one chunk
        monkeypatch.setattr(reference_flce, "CHUNK_BYTES", chunk_bytes)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss = liger_fused_linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], ce_weight, reduction=reduction)
        grads = torch.autograd.grad(loss, leaves, torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
        results.append((loss, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_flags_z_loss_accuracy_and_predicted_tokens(reduction):
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=4, ignore_index=3)
    # make about half of the counted rows correct, so accuracy is neither 0 nor 1
    argmax = F.linear(x, weight, bias).argmax(-1)
    hit = (torch.rand(ROWS, generator=torch.Generator().manual_seed(6)) < 0.5) & (target != 3)
    target = torch.where(hit, argmax, target)
    options = dict(ignore_index=3, reduction=reduction, lse_square_scale=1e-2, softcap=30.0)
    module = LigerFusedLinearCrossEntropyLoss(
        return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True, **options
    )
    out = module(weight.clone().requires_grad_(), x, target, bias)
    assert isinstance(out, CrossEntropyOutput)
    loss, z_loss, accuracy, predicted = expected_outputs(x, weight, target, bias, **options)
    assert_close(out.loss, loss, torch.float32, "loss")
    assert_close(out.z_loss, z_loss, torch.float32, "z_loss")
    torch.testing.assert_close(out.token_accuracy, accuracy)
    assert torch.equal(out.predicted_tokens, predicted)
    assert 0 < accuracy.mean() < 1
    assert out.loss.requires_grad
    assert not (out.z_loss.requires_grad or out.token_accuracy.requires_grad or out.predicted_tokens.requires_grad)
    only = liger_fused_linear_cross_entropy(x, weight, target, bias, return_token_accuracy=True, **options)
    assert only.z_loss is None and only.predicted_tokens is None
    torch.testing.assert_close(only.token_accuracy, accuracy)


def test_returns_a_tensor_unless_a_flag_is_set():
    x, weight, _, target, _ = make_inputs(torch.float32, seed=7)
    assert isinstance(LigerFusedLinearCrossEntropyLoss()(weight, x, target), torch.Tensor)
    assert isinstance(liger_fused_linear_cross_entropy(x, weight, target, lse_square_scale=1e-3), torch.Tensor)
    for flag in ("return_z_loss", "return_token_accuracy", "return_predicted_tokens"):
        assert isinstance(LigerFusedLinearCrossEntropyLoss(**{flag: True})(weight, x, target), CrossEntropyOutput)
        assert isinstance(liger_fused_linear_cross_entropy(x, weight, target, **{flag: True}), CrossEntropyOutput)


def test_token_scaling_changes_only_the_ce_term():
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=8)
    plain = LigerFusedLinearCrossEntropyLoss(lse_square_scale=0.1, return_z_loss=True)(weight, x, target, bias)
    scaled = LigerFusedLinearCrossEntropyLoss(lse_square_scale=0.1, return_z_loss=True, use_token_scaling=True)(
        weight, x, target, bias
    )
    torch.testing.assert_close(plain.z_loss, scaled.z_loss)
    assert scaled.loss - scaled.z_loss < plain.loss - plain.z_loss  # probabilities < 1 shrink the CE term


@pytest.mark.parametrize("accum_dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accum_dtype(accum_dtype, dtype):
    x, weight, bias, target, _ = make_inputs(dtype, seed=9)
    module = LigerFusedLinearCrossEntropyLoss(accum_dtype=accum_dtype, reduction="sum")
    check_against_formula(
        lambda x_, w_, b_: module(w_, x_, target, b_), x, weight, bias, target, dtype, reduction="sum"
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_frozen_weight_and_bias_get_no_gradient(reduction):
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=10)
    x_leaf = x.clone().requires_grad_()
    loss = LigerFusedLinearCrossEntropyLoss(reduction=reduction)(weight, x_leaf, target, bias)
    loss.sum().backward()
    assert weight.grad is None and bias.grad is None
    x_ref = x.clone().requires_grad_()
    expected_outputs(x_ref, weight, target, bias, reduction=reduction)[0].sum().backward()
    torch.testing.assert_close(x_leaf.grad, x_ref.grad)


def test_ce_weight_gets_no_gradient_and_no_grad_mode_gives_the_same_loss():
    x, weight, bias, target, ce_weight = make_inputs(torch.float32, seed=11)
    ce_weight.requires_grad_()
    w = weight.clone().requires_grad_()
    loss = liger_fused_linear_cross_entropy(x, w, target, bias, ce_weight)
    loss.backward()
    assert ce_weight.grad is None and w.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(liger_fused_linear_cross_entropy(x, w, target, bias, ce_weight), loss.detach())
    # nothing requires grad: the forward alone, still no gradient path to ce_weight
    assert not liger_fused_linear_cross_entropy(x, weight, target, bias, ce_weight).requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(reduction):
    x, weight, bias, _, ce_weight = make_inputs(torch.float32, seed=12)
    target = torch.full((ROWS,), -100)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = LigerFusedLinearCrossEntropyLoss(
        ce_weight=ce_weight,
        reduction=reduction,
        lse_square_scale=0.01,
        label_smoothing=0.1,
        return_z_loss=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
        use_token_scaling=True,
    )(leaves[1], leaves[0], target, leaves[2])
    assert torch.equal(out.loss, torch.zeros_like(out.loss))
    assert torch.equal(out.z_loss, torch.zeros_like(out.z_loss))
    assert torch.equal(out.token_accuracy, torch.zeros_like(out.token_accuracy))
    assert torch.equal(out.predicted_tokens, torch.full((ROWS,), -1))
    out.loss.sum().backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_upstream_gradient_scales_the_gradients():
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=13)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    loss = LigerFusedLinearCrossEntropyLoss()(leaves[1], leaves[0], target, leaves[2])
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    scaled = torch.autograd.grad(loss * 0.3, leaves)
    for a, b in zip(once, scaled):
        torch.testing.assert_close(a * 0.3, b)


# -- the chunking: no (BT, V) tensor, ever -----------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor any ATen operator returns while it is active.

    Every tensor PyTorch creates on the CPU comes out of an ATen operator, and a dispatch mode sees them all,
    including those the autograd engine runs in backward. So if the largest output is smaller than BT·V, the full
    logits (or any tensor of their size: probabilities, their gradient) never existed. (tracemalloc cannot see
    PyTorch's allocator, and peak-RSS measures are noisy; this check is exact.)
    """

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        self.operators += 1
        return out


def test_llama_sized_head_never_materialises_the_logits(monkeypatch):
    """BT=4096, V=32768, H=64 in fp32: the full logits would take 512 MB; with the default chunk size (256 MB of
    fp32 logits) no tensor of forward or backward may hold more than 2048 rows of V."""
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 256 * 2**20)  # undo the fixture: the shipped default
    rows, hidden, vocab = 4096, 64, 32768
    generator = torch.Generator().manual_seed(14)
    x = torch.randn(rows, hidden, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=generator) / 8).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator)
    with LargestTensor() as seen:
        loss = LigerFusedLinearCrossEntropyLoss()(weight, x, target)
        forward_operators = seen.operators
        loss.backward()
    assert seen.operators > forward_operators  # the backward ran under the mode too
    assert seen.largest <= 2048 * vocab < rows * vocab
    assert torch.isfinite(loss) and 9.0 < loss.item() < 12.0  # about log(V) = 10.4 for a random head
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_logits_sized_tensor_in_any_reduction(reduction, monkeypatch):
    """The same check for every reduction ("none" recomputes the chunks in backward), with 8-row chunks."""
    rows, hidden, vocab = 96, 4, 512
    monkeypatch.setattr(reference_flce, "CHUNK_BYTES", 8 * vocab * 4)
    x, weight, bias, target, ce_weight = make_inputs(torch.float32, 15, rows=rows, hidden=hidden, vocab=vocab)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    options = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-3, use_token_scaling=True)
    with LargestTensor() as seen:
        out = liger_fused_linear_cross_entropy(
            leaves[0], leaves[1], target, leaves[2], ce_weight, return_token_accuracy=True, **options
        )
        out.loss.sum().backward()
    assert seen.largest <= 8 * vocab
    expected = expected_outputs(x, weight, target, bias, ce_weight, **options)[0]
    torch.testing.assert_close(out.loss, expected)


# -- the public surface ------------------------------------------------------------------------------------------


def test_signatures_match_liger_kernel_0_8():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert defaults(LigerFusedLinearCrossEntropyLoss) == [
        ("ce_weight", None),
        ("ignore_index", -100),
        ("lse_square_scale", 0.0),
        ("label_smoothing", 0.0),
        ("reduction", "mean"),
        ("softcap", None),
        ("return_z_loss", False),
        ("accum_dtype", None),
        ("use_token_scaling", False),
        ("return_token_accuracy", False),
        ("return_predicted_tokens", False),
        ("impl", None),
        ("backend", None),
    ]
    assert defaults(LigerFusedLinearCrossEntropyLoss.forward) == [
        ("self", inspect.Parameter.empty),
        ("lin_weight", inspect.Parameter.empty),
        ("_input", inspect.Parameter.empty),
        ("target", inspect.Parameter.empty),
        ("bias", None),
    ]
    empty = inspect.Parameter.empty
    assert defaults(liger_fused_linear_cross_entropy) == [
        ("input", empty),
        ("weight", empty),
        ("target", empty),
        ("bias", None),
        ("ce_weight", None),
        ("ignore_index", -100),
        ("lse_square_scale", 0.0),
        ("label_smoothing", 0.0),
        ("reduction", "mean"),
        ("softcap", None),
        ("return_z_loss", False),
        ("accum_dtype", None),
        ("use_token_scaling", False),
        ("return_token_accuracy", False),
        ("return_predicted_tokens", False),
        ("chunk_mem_const", 1),
    ]


def test_ce_weight_moves_with_to_but_stays_out_of_the_state_dict():
    x, weight, _, target, ce_weight = make_inputs(torch.float64, seed=16)
    module = LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight.float())
    assert "ce_weight" not in module.state_dict()
    module = module.to(torch.float64)
    assert module.ce_weight.dtype == torch.float64
    torch.testing.assert_close(
        module(weight, x, target), F.cross_entropy(x @ weight.T, target, weight=ce_weight.double())
    )
    assert LigerFusedLinearCrossEntropyLoss().ce_weight is None


def test_attributes_and_repr():
    module = LigerFusedLinearCrossEntropyLoss(
        ignore_index=0, softcap=30, accum_dtype=torch.float32, use_token_scaling=True, impl="reference"
    )
    assert (module.ignore_index, module.softcap, module.accum_dtype, module.use_token_scaling) == (
        0,
        30.0,
        torch.float32,
        True,
    )
    text = repr(module)
    assert "softcap=30.0" in text and "accum_dtype=torch.float32" in text and "use_token_scaling=True" in text
    assert "impl='reference'" in text


def test_chunk_mem_const_is_accepted_and_ignored():
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=17)
    expected = liger_fused_linear_cross_entropy(x, weight, target, bias)
    torch.testing.assert_close(liger_fused_linear_cross_entropy(x, weight, target, bias, chunk_mem_const=8), expected)


@pytest.mark.parametrize("kwargs", [{"impl": "reference"}, {"backend": "reference"}, {"impl": "torch"}])
def test_impl_argument(kwargs, monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append(backend)
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    x, weight, bias, target, _ = make_inputs(torch.float32, seed=18)
    module = LigerFusedLinearCrossEntropyLoss(**kwargs)
    check_against_formula(lambda x_, w_, b_: module(w_, x_, target, b_), x, weight, bias, target, torch.float32)
    assert chosen == ["reference"]


def test_unknown_or_unavailable_impl():
    with pytest.raises(ValueError, match="registered backends"):
        LigerFusedLinearCrossEntropyLoss(impl="nonesuch")
    x, weight, _, target, _ = make_inputs(torch.float32, seed=19)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        LigerFusedLinearCrossEntropyLoss(impl="cuda")(weight, x, target)


def test_conformance_harness_accepts_every_case():
    from liger_core.registry import get_registry

    for case in get_registry().operator("fused_linear_cross_entropy").cases:
        result = check_conformance("fused_linear_cross_entropy", "reference", torch.float32, attrs=case)
        assert result.passed, result.report()


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="reduction"):
        LigerFusedLinearCrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerFusedLinearCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        LigerFusedLinearCrossEntropyLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="lse_square_scale"):
        LigerFusedLinearCrossEntropyLoss(lse_square_scale=-1.0)
    with pytest.raises(TypeError, match="accum_dtype"):
        LigerFusedLinearCrossEntropyLoss(accum_dtype="float32")
    with pytest.raises(TypeError, match="accum_dtype"):
        LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.int32)
    with pytest.raises(TypeError, match="use_token_scaling"):
        LigerFusedLinearCrossEntropyLoss(use_token_scaling=1)
    with pytest.raises(ValueError, match="ce_weight"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=torch.ones(3, 3))
    with pytest.raises(TypeError, match="ce_weight"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=[1.0])
    with pytest.raises(TypeError, match="accum_dtype"):
        liger_fused_linear_cross_entropy(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2).long(), accum_dtype=1)


def test_bad_call_arguments():
    x, weight, bias, target, ce_weight = make_inputs(torch.float32, seed=20)
    module = LigerFusedLinearCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"'weight' must have shape \(V, 19\)"):
        module(weight[:, :7], x, target)
    with pytest.raises(ValueError, match=r"'target' must have shape \(53,\)"):
        module(x, weight, target)  # the arguments swapped (the weight comes first): 53 "tokens" now
    with pytest.raises(ValueError, match="'input' must be 2-D"):
        module(weight, x.view(1, ROWS, HIDDEN), target)
    with pytest.raises(ValueError, match="'target' must have shape"):
        module(weight, x, target[:5])
    with pytest.raises(TypeError, match="'target'.*int64"):
        module(weight, x, target.float())
    with pytest.raises(ValueError, match=r"'bias' must have shape \(53,\)"):
        module(weight, x, target, bias[:10])
    with pytest.raises(TypeError, match="'weight' must have the dtype of 'input'"):
        module(weight.double(), x, target)
    with pytest.raises(TypeError, match="'bias' must have the dtype"):
        module(weight, x, target, bias.double())
    with pytest.raises(ValueError, match=r"'ce_weight' must have shape \(53,\)"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight[:3])(weight, x, target)
    with pytest.raises(TypeError, match="'input'.*floating-point"):
        liger_fused_linear_cross_entropy(x.long(), weight, target)


def test_out_of_range_target(monkeypatch):
    x, weight, _, target, _ = make_inputs(torch.float32, seed=21, ignored_share=0.0)
    target[2] = VOCAB
    assert torch.isnan(LigerFusedLinearCrossEntropyLoss()(weight, x, target))  # no host sync: NaN, no bad read
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match="target"):
        LigerFusedLinearCrossEntropyLoss()(weight, x, target)


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, reduction", [("module", "mean"), ("functional", "none")])
def test_compile_fullgraph_matches_eager(which, reduction):
    torch._dynamo.reset()
    x, weight, bias, target, ce_weight = make_inputs(torch.float32, seed=22)
    options = dict(
        reduction=reduction,
        label_smoothing=0.1,
        lse_square_scale=1e-2,
        softcap=10.0,
        return_z_loss=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
        use_token_scaling=True,
    )
    if which == "module":
        module = LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight, **options)
        fn = lambda x_, w_, b_: module(w_, x_, target, b_)  # noqa: E731
    else:
        fn = lambda x_, w_, b_: liger_fused_linear_cross_entropy(x_, w_, target, b_, ce_weight, **options)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    eager, got = fn(*eager_leaves), compiled(*compiled_leaves)
    for field in ("loss", "z_loss", "token_accuracy", "predicted_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(eager, field))
    eager.loss.sum().backward()
    got.loss.sum().backward()
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
