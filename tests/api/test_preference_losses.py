"""liger_kernel.chunked_loss (DPO, ORPO, CPO, SimPO) against the formulas of API.md written out here in plain PyTorch
on the full logits: log_softmax, gather, masks, per-sequence sums or means, the per-loss-type formulas, the NLL term
and every aux output; forward and every gradient (input, weight, bias)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from liger_core.testing import check_conformance
from liger_kernel.chunked_loss import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
    liger_fused_linear_cpo,
    liger_fused_linear_dpo,
    liger_fused_linear_orpo,
    liger_fused_linear_simpo,
)

B, T, H, V = 2, 7, 11, 37  # odd on purpose; the input is (2B, T, H)
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
]


# -- the formulas ------------------------------------------------------------------------------------------------


def full_logits(x, w, b):
    logits = x.float() @ w.float().T
    return logits + b.float() if b is not None else logits


def sequence_logps(x, w, b, target, ignore_index, average):
    """Per sequence: sum (or mean) over counted positions of log_softmax(logits) at the target; and the logits."""
    logits = full_logits(x, w, b)
    mask = target != ignore_index
    token = logits.log_softmax(-1).gather(-1, target.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
    total = token.sum(-1)
    return (total / mask.sum(-1) if average else total), logits


def nll_of(x, w, b, target, ignore_index):
    logits = full_logits(x, w, b)[: x.shape[0] // 2]
    chosen = target[: x.shape[0] // 2]
    return (
        F.cross_entropy(logits.reshape(-1, V), chosen.reshape(-1), ignore_index=ignore_index, reduction="sum")
        / (chosen != ignore_index).sum()
    )


def dpo_pair_loss(cr, rr, beta, ls, loss_type, tau):
    z = beta * (cr - rr)
    ls_ = F.logsigmoid
    if loss_type == "sigmoid":
        return -(1 - ls) * ls_(z) - ls * ls_(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (cr - rr - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (ls_(z) - math.log(1 - ls)) + torch.sigmoid(-z) * (ls_(-z) - math.log(ls))
    if loss_type == "nca_pair":
        return -ls_(beta * cr) - 0.5 * ls_(-beta * cr) - 0.5 * ls_(-beta * rr)
    if loss_type == "robust":
        return (-(1 - ls) * ls_(z) + ls * ls_(-z)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -ls_(beta * cr) - ls_(-beta * rr)
    if loss_type == "sppo_hard":
        return (cr - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * cr)) + torch.sigmoid(beta * rr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * cr) + (1 - torch.sigmoid(beta * (cr - rr)))
    assert loss_type == "discopop"
    m = torch.sigmoid(z / tau)
    return (1 - m) * -ls_(z) + m * torch.exp(-z)


def expected(op, x, w, target, b=None, extra=(), **opts):
    """(loss, aux) of API.md for operator `op` ("dpo", "orpo", "cpo", "simpo"), from the full logits."""
    ignore_index = opts.get("ignore_index", -100)
    beta = opts.get("beta", 0.1)
    ls = opts.get("label_smoothing", 0.0)
    average = {"dpo": opts.get("average_log_prob", False), "cpo": opts.get("average_log_prob", False)}.get(op, True)
    compute_nll = opts.get("compute_nll_loss", op != "dpo")
    alpha = opts.get("alpha", 1.0) if op != "orpo" else 1.0
    logps, logits = sequence_logps(x, w, b, target, ignore_index, average)
    c, r = logps[:B], logps[B:]
    nll_target = extra[0] if op == "orpo" and extra and extra[0] is not None else target
    nll = nll_of(x, w, b, nll_target, ignore_index) if compute_nll else torch.zeros(())
    if op == "dpo":
        if opts.get("use_ref_model", True):
            ref_x, ref_w, ref_b = extra
            with torch.no_grad():
                ref, _ = sequence_logps(ref_x, ref_w, ref_b, target, ignore_index, average)
            c0, r0 = ref[:B], ref[B:]
        else:
            c0 = r0 = torch.zeros(())
        cr, rr = c - c0, r - r0
        pairs = dpo_pair_loss(cr, rr, beta, ls, opts.get("loss_type", "sigmoid"), opts.get("discopop_tau", 0.05))
        extras = (beta * cr, beta * rr)
    elif op == "orpo":
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        pairs = -beta * F.logsigmoid(log_odds)
        extras = (beta * c, beta * r, F.logsigmoid(log_odds).mean(), log_odds.mean())
    else:
        z = beta * (c - r) - (opts.get("gamma", 0.5) if op == "simpo" else 0.0)
        pairs = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        extras = (beta * c, beta * r)
    loss = pairs.mean() + (alpha * nll if compute_nll else 0.0)
    aux = (c, r, logits[:B].mean(), logits[B:].mean(), nll) + extras
    return loss, tuple(a.detach() for a in aux)


# -- helpers -----------------------------------------------------------------------------------------------------


def make_inputs(dtype, seed, ignore_index=-100, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    b = (torch.randn(V, generator=g) * 0.2).to(dtype) if with_bias else None
    target = torch.randint(0, V, (2 * B, T), generator=g)
    ignored = (torch.arange(T) < torch.randint(0, T // 2 + 1, (2 * B, 1), generator=g)) | (
        torch.rand(2 * B, T, generator=g) < 0.15
    )
    ignored[:, -1] = False
    target = target.masked_fill(ignored, ignore_index)
    ref = (
        torch.randn(2 * B, T, H, generator=g).to(dtype),
        (torch.randn(V, H, generator=g) * 0.4).to(dtype),
        (torch.randn(V, generator=g) * 0.2).to(dtype) if with_bias else None,
    )
    return x, w, b, target, ref


def assert_close(actual, want, dtype, name):
    tol = TOLERANCE[dtype]
    scale = want.detach().float().abs().max().item() or 1.0
    torch.testing.assert_close(actual.float(), want.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


def check(op, ours, dtype, seed=0, with_bias=True, extra_kind=None, **opts):
    """`ours(x, w, target, b, extra)` returns (loss, aux): compare loss, aux and the gradients with the formula."""
    x, w, b, target, ref = make_inputs(dtype, seed, opts.get("ignore_index", -100), with_bias)
    if extra_kind == "ref":
        extra = ref
    elif extra_kind == "nll_target":
        g = torch.Generator().manual_seed(seed + 100)
        nll_target = torch.randint(0, V, (2 * B, T), generator=g)
        nll_target[:, : T // 3] = opts.get("ignore_index", -100)
        extra = (nll_target,)
    else:
        extra = ()
    leaves = [x, w] + ([b] if b is not None else [])
    mine = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().float().requires_grad_() for t in leaves]
    loss, aux = ours(mine[0], mine[1], target, mine[2] if b is not None else None, extra)
    want_loss, want_aux = expected(
        op,
        theirs[0],
        theirs[1],
        target,
        theirs[2] if b is not None else None,
        tuple(e.float() if e is not None and e.is_floating_point() else e for e in extra),
        **opts,
    )
    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, want_loss, dtype, "loss")
    assert len(aux) == len(want_aux)
    names = ["chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss", "extra"]
    for i, (got, want) in enumerate(zip(aux, want_aux)):
        assert not got.requires_grad, f"aux {i} must be detached"
        assert got.shape == want.shape, f"aux {i}: {got.shape} != {want.shape}"
        assert_close(got, want, dtype, names[min(i, 5)] + f" (aux {i})")
    upstream = 0.7  # not just 1: the backward must scale by the incoming gradient
    got_grads = torch.autograd.grad(loss * upstream, mine)
    want_grads = torch.autograd.grad(want_loss * upstream, theirs)
    for name, got, want, leaf in zip(["input", "weight", "bias"], got_grads, want_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert want.abs().max() > 0, f"d {name} should not vanish in this test"
        assert_close(got, want, dtype, f"d {name}")
    return loss, aux


def dpo_module(**opts):
    module = LigerFusedLinearDPOLoss(**opts)
    return lambda x, w, t, b, extra: module(w, x, t, b, *extra)


# -- DPO ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("use_ref_model", [True, False])
def test_dpo_every_loss_type(loss_type, use_ref_model):
    # hinge is flat once z > 1: a small beta keeps both pairs on its slope
    opts = dict(loss_type=loss_type, use_ref_model=use_ref_model, beta=0.01 if loss_type == "hinge" else 0.5)
    if loss_type in ("exo_pair", "robust", "sigmoid"):
        opts["label_smoothing"] = 0.2
    check("dpo", dpo_module(**opts), torch.float32, seed=1, extra_kind="ref" if use_ref_model else None, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_dpo_average_log_prob_nll_and_alpha(dtype, loss_type):
    opts = dict(loss_type=loss_type, average_log_prob=True, compute_nll_loss=True, alpha=0.3, beta=0.2)
    opts["discopop_tau"] = 0.3
    check("dpo", dpo_module(**opts), dtype, seed=2, extra_kind="ref", **opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dpo_defaults_without_bias_and_functional(dtype):
    check("dpo", dpo_module(), dtype, seed=3, with_bias=False, extra_kind="ref")
    check(
        "dpo",
        lambda x, w, t, b, extra: liger_fused_linear_dpo(x, w, t, b, *extra, beta=0.3, ignore_index=5),
        dtype,
        seed=4,
        extra_kind="ref",
        beta=0.3,
        ignore_index=5,
    )


def test_dpo_reference_model_gets_no_gradient_and_matters():
    x, w, b, target, (ref_x, ref_w, ref_b) = make_inputs(torch.float32, 5)
    ref_w.requires_grad_()
    x.requires_grad_()
    loss, aux = LigerFusedLinearDPOLoss()(w, x, target, b, ref_x, ref_w, ref_b)
    loss.backward()
    assert ref_w.grad is None and x.grad is not None
    no_ref, no_ref_aux = LigerFusedLinearDPOLoss(use_ref_model=False)(w, x, target, b, ref_x, ref_w, ref_b)
    assert not torch.allclose(aux[5], no_ref_aux[5])  # chosen rewards differ
    torch.testing.assert_close(no_ref_aux[5], 0.1 * no_ref_aux[0])  # beta·c without the reference


def test_nll_loss_is_zero_when_not_computed():
    x, w, b, target, _ = make_inputs(torch.float32, 6)
    _, aux = LigerFusedLinearDPOLoss(use_ref_model=False)(w, x, target, b)
    assert aux[4] == 0
    _, aux = LigerFusedLinearCPOLoss(compute_nll_loss=False)(w, x, target, b)
    assert aux[4] == 0


# -- ORPO, CPO, SimPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nll_target", [False, True])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_orpo(dtype, nll_target, compute_nll_loss):
    module = LigerFusedLinearORPOLoss(beta=0.4, compute_nll_loss=compute_nll_loss)
    loss, aux = check(
        "orpo",
        lambda x, w, t, b, extra: module(w, x, t, b, *extra),
        dtype,
        seed=7,
        extra_kind="nll_target" if nll_target else None,
        beta=0.4,
        compute_nll_loss=compute_nll_loss,
    )
    assert len(aux) == 9 and aux[7].shape == () and aux[8].shape == ()


def test_orpo_functional_and_ignore_index():
    check(
        "orpo",
        lambda x, w, t, b, extra: liger_fused_linear_orpo(x, w, t, b, *extra, ignore_index=0),
        torch.float32,
        seed=8,
        extra_kind="nll_target",
        ignore_index=0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_cpo(dtype, label_smoothing, average_log_prob):
    opts = dict(label_smoothing=label_smoothing, average_log_prob=average_log_prob, alpha=0.5, beta=0.3)
    module = LigerFusedLinearCPOLoss(**opts)
    check("cpo", lambda x, w, t, b, extra: module(w, x, t, b), dtype, seed=9, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_simpo(dtype, label_smoothing):
    opts = dict(label_smoothing=label_smoothing, gamma=0.8, beta=2.0, alpha=0.7)
    module = LigerFusedLinearSimPOLoss(**opts)
    check("simpo", lambda x, w, t, b, extra: module(w, x, t, b), dtype, seed=10, **opts)


def test_cpo_and_simpo_functionals_without_nll():
    opts = dict(compute_nll_loss=False, beta=0.5)
    check("cpo", lambda x, w, t, b, e: liger_fused_linear_cpo(x, w, t, b, **opts), torch.float32, seed=11, **opts)
    check("simpo", lambda x, w, t, b, e: liger_fused_linear_simpo(x, w, t, b, **opts), torch.float32, seed=12, **opts)


def test_module_and_functional_agree():
    x, w, b, target, ref = make_inputs(torch.float32, 13)
    pairs = [
        (
            LigerFusedLinearDPOLoss(loss_type="hinge")(w, x, target, b, *ref),
            liger_fused_linear_dpo(x, w, target, b, *ref, loss_type="hinge"),
        ),
        (LigerFusedLinearORPOLoss()(w, x, target, b), liger_fused_linear_orpo(x, w, target, b)),
        (LigerFusedLinearCPOLoss()(w, x, target, b), liger_fused_linear_cpo(x, w, target, b)),
        (LigerFusedLinearSimPOLoss()(w, x, target, b), liger_fused_linear_simpo(x, w, target, b)),
    ]
    for (loss_a, aux_a), (loss_b, aux_b) in pairs:
        torch.testing.assert_close(loss_a, loss_b)
        for a, bb in zip(aux_a, aux_b):
            torch.testing.assert_close(a, bb)


# -- no host sync in the data path: a bad class poisons instead of reading out of bounds ---------------------------


def test_out_of_range_target_is_nan_or_a_value_error_with_checks(monkeypatch):
    x, w, b, target, _ = make_inputs(torch.float32, 14)
    target[0, -1] = V
    loss, _ = LigerFusedLinearCPOLoss()(w, x, target, b)
    assert torch.isnan(loss)
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match=r"'target' holds classes outside \[0, 37\)"):
        LigerFusedLinearCPOLoss()(w, x, target, b)


# -- the chunking never builds the full logits ---------------------------------------------------------------------


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns, in forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _vocab_tensors_too_big(shapes, tile_rows):
    """Tensors with a vocabulary dimension holding more than `tile_rows` rows of logits (weight-shaped ones aside)."""
    return [s for s in shapes if V in s and s not in ((V, H), (H, V), (V,)) and math.prod(s) > tile_rows * V]


def test_chunking_never_materialises_the_full_logits(monkeypatch):
    """Method: the tile size is patched down to 3 rows of logits (TILE_ELEMENTS = 3·V), so the 2B·T = 28 tokens take
    10 tiles; a TorchDispatchMode then records the shape of every tensor that any aten op creates during forward and
    backward (with the reference model, bias and NLL on, for all four losses). No tensor that has a vocabulary-sized
    dimension may hold more than 3·V elements, except weight-shaped ones (the weight, its transpose, its gradient:
    (V, H) or (H, V)) and bias-shaped (V,) ones; in particular nothing (2B·T, V) or (2B, T, V). V = 37 appears in no
    other dimension, so the check is exact. The test's own full-logits formula, run under the same recorder, is
    caught: the detector works."""
    import liger_backends.reference.preference as reference

    monkeypatch.setattr(reference, "TILE_ELEMENTS", 3 * V)
    assert reference.rows_per_tile(V) == 3
    x, w, b, target, ref = make_inputs(torch.float32, 15)
    calls = [
        lambda x, w: LigerFusedLinearDPOLoss(compute_nll_loss=True, impl="reference")(w, x, target, b, *ref),
        lambda x, w: LigerFusedLinearORPOLoss()(w, x, target, b, target.flip(0)),
        lambda x, w: LigerFusedLinearCPOLoss()(w, x, target, b),
        lambda x, w: LigerFusedLinearSimPOLoss()(w, x, target, b),
    ]
    for fn in calls:
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with _ShapeRecorder() as recorder:
            loss, _ = fn(xs, ws)
            loss.backward()
        assert xs.grad is not None and ws.grad is not None
        assert (3, V) in recorder.shapes  # the tiles were there, and were seen
        assert _vocab_tensors_too_big(recorder.shapes, 3) == []
    with _ShapeRecorder() as recorder:
        expected("cpo", x, w, target, b)
    assert (2 * B, T, V) in _vocab_tensors_too_big(recorder.shapes, 3)


# -- backends, compile, conformance ------------------------------------------------------------------------------


def test_impl_argument_runs_the_reference_backend(monkeypatch):
    import liger_core.dispatch as dispatch

    chosen = []
    original = dispatch.run_kernel

    def spy(spec, backend, *args):
        chosen.append((spec.name, backend))
        return original(spec, backend, *args)

    monkeypatch.setattr(dispatch, "run_kernel", spy)
    for cls, op in [
        (LigerFusedLinearDPOLoss, "dpo"),
        (LigerFusedLinearORPOLoss, "orpo"),
        (LigerFusedLinearCPOLoss, "cpo"),
        (LigerFusedLinearSimPOLoss, "simpo"),
    ]:
        module = cls(impl="reference") if op != "dpo" else cls(impl="reference", use_ref_model=False)
        check(op, lambda x, w, t, b, extra, m=module: m(w, x, t, b), torch.float32, seed=16, use_ref_model=False)
    assert chosen == [(f"fused_linear_{op}", "reference") for op in ("dpo", "orpo", "cpo", "simpo")]
    assert LigerFusedLinearCPOLoss(backend="reference").impl == "reference"
    with pytest.raises(ValueError, match="registered backends"):
        LigerFusedLinearSimPOLoss(impl="nonesuch")


@pytest.mark.parametrize("which", ["dpo", "orpo"])
def test_compile_fullgraph_matches_eager(which):
    torch._dynamo.reset()
    x, w, b, target, ref = make_inputs(torch.float32, 17)
    if which == "dpo":
        module = LigerFusedLinearDPOLoss(loss_type="apo_zero", compute_nll_loss=True)
        fn = lambda x, w, b: module(w, x, target, b, *ref)  # noqa: E731
    else:
        module = LigerFusedLinearORPOLoss()
        fn = lambda x, w, b: module(w, x, target, b, target.roll(1, 0))  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    leaves_eager = [t.clone().requires_grad_() for t in (x, w, b)]
    leaves_compiled = [t.clone().requires_grad_() for t in (x, w, b)]
    loss_eager, aux_eager = fn(*leaves_eager)
    loss_compiled, aux_compiled = compiled(*leaves_compiled)
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, e in zip(aux_compiled, aux_eager):
        torch.testing.assert_close(a, e)
    for got, want in zip(
        torch.autograd.grad(loss_compiled, leaves_compiled), torch.autograd.grad(loss_eager, leaves_eager)
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["fused_linear_dpo", "fused_linear_orpo", "fused_linear_cpo", "fused_linear_simpo"])
def test_operator_spec_is_sound_for_conformance(op):
    from liger_core.registry import get_registry

    for case in get_registry().operator(op).cases:
        result = check_conformance(op, "reference", torch.float32, attrs=case)
        assert result.passed, result.report()
    assert check_conformance(op, "reference", torch.bfloat16).passed


# -- the public surface ------------------------------------------------------------------------------------------


def test_signatures_match_the_api():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    tail = [("impl", None), ("backend", None)]
    assert (
        defaults(LigerFusedLinearDPOLoss)
        == [
            ("ignore_index", -100),
            ("beta", 0.1),
            ("alpha", 1.0),
            ("compute_nll_loss", False),
            ("compiled", True),
            ("use_ref_model", True),
            ("average_log_prob", False),
            ("chunk_size", 1),
            ("loss_type", "sigmoid"),
            ("label_smoothing", 0.0),
            ("discopop_tau", 0.05),
        ]
        + tail
    )
    assert (
        defaults(LigerFusedLinearORPOLoss)
        == [
            ("ignore_index", -100),
            ("beta", 0.1),
            ("compute_nll_loss", True),
            ("compiled", True),
            ("chunk_size", 1),
        ]
        + tail
    )
    assert (
        defaults(LigerFusedLinearCPOLoss)
        == [
            ("ignore_index", -100),
            ("beta", 0.1),
            ("alpha", 1.0),
            ("label_smoothing", 0.0),
            ("compute_nll_loss", True),
            ("compiled", True),
            ("average_log_prob", False),
            ("chunk_size", 1),
        ]
        + tail
    )
    assert (
        defaults(LigerFusedLinearSimPOLoss)
        == [
            ("ignore_index", -100),
            ("beta", 0.1),
            ("alpha", 1.0),
            ("label_smoothing", 0.0),
            ("compute_nll_loss", True),
            ("compiled", True),
            ("gamma", 0.5),
            ("chunk_size", 1),
        ]
        + tail
    )
    base = ["self", "lin_weight", "_input", "target", "bias"]
    assert [n for n, _ in defaults(LigerFusedLinearDPOLoss.forward)] == base + ["ref_input", "ref_weight", "ref_bias"]
    assert [n for n, _ in defaults(LigerFusedLinearORPOLoss.forward)] == base + ["nll_target"]
    assert [n for n, _ in defaults(LigerFusedLinearCPOLoss.forward)] == base
    assert [n for n, _ in defaults(LigerFusedLinearSimPOLoss.forward)] == base


def test_compiled_and_chunk_size_are_accepted_and_change_nothing():
    x, w, b, target, _ = make_inputs(torch.float32, 18)
    plain, _ = LigerFusedLinearSimPOLoss()(w, x, target, b)
    other, _ = LigerFusedLinearSimPOLoss(compiled=False, chunk_size=4)(w, x, target, b)
    torch.testing.assert_close(plain, other)
    module = LigerFusedLinearDPOLoss(beta=0.2, loss_type="ipo")
    assert (module.beta, module.loss_type, module.use_ref_model) == (0.2, "ipo", True)
    assert "loss_type='ipo'" in repr(module)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_unknown_loss_type_lists_the_loss_types():
    with pytest.raises(ValueError, match=r"(?s)loss_type.*sigmoid.*hinge.*ipo.*exo_pair.*apo_down.*discopop"):
        LigerFusedLinearDPOLoss(loss_type="kto")
    x, w, b, target, ref = make_inputs(torch.float32, 19)
    with pytest.raises(ValueError, match="loss_type"):
        liger_fused_linear_dpo(x, w, target, b, *ref, loss_type="Sigmoid")


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (LigerFusedLinearDPOLoss, dict(loss_type="exo_pair"), "exo_pair.*label_smoothing"),
        (LigerFusedLinearDPOLoss, dict(loss_type="exo_pair", label_smoothing=1.0), "exo_pair.*label_smoothing"),
        (LigerFusedLinearDPOLoss, dict(loss_type="robust", label_smoothing=0.5), "robust.*label_smoothing"),
        (LigerFusedLinearDPOLoss, dict(label_smoothing=-0.1), "label_smoothing"),
        (LigerFusedLinearDPOLoss, dict(loss_type="ipo", beta=0.0), "beta"),
        (LigerFusedLinearDPOLoss, dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
        (LigerFusedLinearCPOLoss, dict(label_smoothing=1.5), "label_smoothing"),
        (LigerFusedLinearSimPOLoss, dict(label_smoothing=2.0), "label_smoothing"),
    ],
)
def test_invalid_options_are_value_errors(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_option_types_are_checked():
    with pytest.raises(TypeError, match="ignore_index"):
        LigerFusedLinearORPOLoss(ignore_index=-100.0)
    with pytest.raises(TypeError, match="compute_nll_loss"):
        LigerFusedLinearCPOLoss(compute_nll_loss="yes")
    with pytest.raises(TypeError, match="beta"):
        liger_fused_linear_simpo(*make_inputs(torch.float32, 20)[:2], torch.zeros(4, 7, dtype=torch.long), beta="x")


def test_bad_inputs_name_the_argument():
    x, w, b, target, ref = make_inputs(torch.float32, 21)
    cpo = LigerFusedLinearCPOLoss()
    with pytest.raises(ValueError, match="'input'.*even"):
        cpo(w, x[:3], target[:3], b)
    with pytest.raises(ValueError, match="'input' must be 3-D"):
        cpo(w, x.reshape(-1, H), target, b)
    with pytest.raises(ValueError, match=r"'weight' must have shape \(V, 11\)"):
        cpo(w[:, :5], x, target, b)
    with pytest.raises(ValueError, match=r"'target' must have shape \(4, 7\)"):
        cpo(w, x, target[:, :5], b)
    with pytest.raises(TypeError, match="'target'.*int64"):
        cpo(w, x, target.float(), b)
    with pytest.raises(ValueError, match=r"'bias' must have shape \(37,\)"):
        cpo(w, x, target, b[:5])
    with pytest.raises(TypeError, match="'input'.*floating-point"):
        cpo(w, x.long(), target, b)
    dpo = LigerFusedLinearDPOLoss()
    with pytest.raises(ValueError, match="use_ref_model.*ref_input"):
        dpo(w, x, target, b)
    with pytest.raises(ValueError, match="'ref_input' must have shape"):
        dpo(w, x, target, b, ref[0][:, :3], ref[1], ref[2])
    with pytest.raises(ValueError, match="'ref_weight' must have 37 rows"):
        dpo(w, x, target, b, ref[0], ref[1][:5], None)
    with pytest.raises(ValueError, match=r"'ref_weight' must have shape \(V, 11\)"):
        dpo(w, x, target, b, ref[0], ref[1][:, :4], None)
    with pytest.raises(ValueError, match=r"'nll_target' must have shape \(4, 7\)"):
        LigerFusedLinearORPOLoss()(w, x, target, b, target[:2])


@pytest.mark.parametrize("name", ["LigerFusedLinearGRPOLoss", "LigerFusedLinearKTOLoss", "LigerFusedLinearJSDLoss"])
def test_losses_trl_imports_but_we_do_not_implement_exist_and_refuse_clearly(name):
    # TRL imports these at module level when a liger_kernel is installed: the import must work, building must not.
    import liger_kernel.chunked_loss as chunked_loss

    with pytest.raises(NotImplementedError, match=rf"{name} is not implemented.*LigerFusedLinearDPOLoss"):
        getattr(chunked_loss, name)(beta=0.1)


@pytest.mark.parametrize("op", ["fused_linear_dpo", "fused_linear_orpo", "fused_linear_cpo", "fused_linear_simpo"])
def test_reference_kernels_work_under_saved_tensor_hooks(op):
    # Activation offloading (TRL's, or torch.autograd.graph.save_on_cpu) installs saved-tensor hooks, under which
    # torch.func.vjp refuses to run: the per-pair derivatives come from jvp instead.
    import liger_core
    from liger_core.registry import get_registry

    spec = get_registry().operator(op)

    def gradients(offload: bool):
        inputs, attrs = spec.make_inputs("cpu", torch.float32, "tiny", 3)
        inputs = tuple(
            t.requires_grad_(True) if isinstance(t, torch.Tensor) and i in spec.differentiable_inputs else t
            for i, t in enumerate(inputs)
        )
        wrt = [t for i, t in enumerate(inputs) if i in spec.differentiable_inputs and isinstance(t, torch.Tensor)]
        if offload:
            with torch.autograd.graph.save_on_cpu():
                loss = liger_core.call(op, *inputs, impl="reference", **attrs)[0]
        else:
            loss = liger_core.call(op, *inputs, impl="reference", **attrs)[0]
        return torch.autograd.grad(loss, wrt)

    for got, expected in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
