"""fused_linear_dpo, fused_linear_orpo, fused_linear_cpo, fused_linear_simpo: preference losses on top of the final
linear layer (API.md, "Alignment kernels"), without ever holding the full (2B·T, V) logits.

Shared convention: ``input (2B, T, H)`` holds the B chosen sequences, then the B rejected ones; ``target (2B, T)`` is
already shifted and ``ignore_index`` marks positions that do not count. Token log-probs are ``log_softmax`` in fp32
of ``input @ weight.T (+ bias)``. A sequence's log-prob c (chosen) or r (rejected) is the sum of its token log-probs,
or their mean with ``average_log_prob`` (ORPO and SimPO always average). The NLL is the summed negative log-prob of
the non-ignored tokens of the chosen half over their count (ORPO's ``nll_target`` replaces ``target`` for it).

``loss = alpha·nll (when compute_nll_loss) + mean over pairs of the preference loss``. The other outputs are not
differentiable: chosen_logps, rejected_logps (B,); the means of the chosen and rejected halves' logits over every
position and the whole vocabulary; the NLL (0 when not computed, as liger-kernel 0.8); then the per-loss extras:
chosen_rewards and rejected_rewards (B,), and for ORPO log_odds_ratio and log_odds_chosen (scalars).

DPO, with reference log-probs c₀, r₀ (from ref_input/ref_weight/ref_bias, no gradient; 0 without use_ref_model),
``cr = c − c₀``, ``rr = r − r₀``, ``z = beta·(cr − rr)``, ls = label_smoothing, per pair:

- sigmoid ``−(1−ls)·logσ(z) − ls·logσ(−z)``; hinge ``relu(1 − z)``; ipo ``(cr − rr − 1/(2·beta))²``;
- exo_pair (0 < ls < 1) ``σ(z)·(logσ(z) − log(1−ls)) + σ(−z)·(logσ(−z) − log ls)``;
- nca_pair ``−logσ(beta·cr) − ½·logσ(−beta·cr) − ½·logσ(−beta·rr)``;
- robust (0 ≤ ls < ½) ``(−(1−ls)·logσ(z) + ls·logσ(−z)) / (1 − 2·ls)``; bco_pair ``−logσ(beta·cr) − logσ(−beta·rr)``;
- sppo_hard ``(cr − 1/(2·beta))² + (rr + 1/(2·beta))²``; apo_zero ``(1 − σ(beta·cr)) + σ(beta·rr)``;
- apo_down ``σ(beta·cr) + (1 − σ(beta·(cr − rr)))``; discopop ``m = σ(z/τ)``, ``(1 − m)·(−logσ(z)) + m·exp(−z)``.

Rewards: DPO ``beta·cr``, ``beta·rr``; the others ``beta·c``, ``beta·r``. ORPO: ``log_odds = (c − r) −
(log1p(−exp(c)) − log1p(−exp(r)))``, loss ``−beta·logσ(log_odds)``. CPO: sigmoid with ``z = beta·(c − r)``. SimPO:
sigmoid with ``z = beta·(c − r) − gamma``. A target outside [0, V) that is not ignore_index gives a NaN loss (a
ValueError under LIGER_KERNEL_CHECKS=1).
"""

from __future__ import annotations

import torch

from .. import env
from ..spec import AttrSpec, InputSpec, OpSpec, OutputSpec
from ._common import bucket, randn, require_dim, require_float, require_index, require_same_device, tensor_key

DPO_LOSS_TYPES = (
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
)
# (pairs B, sequence length T, hidden H, vocabulary V); the input is (2B, T, H).
SHAPES = {"tiny": (2, 7, 11, 37), "small": (4, 256, 1024, 32000), "llama8b": (2, 1024, 4096, 128256)}

_COMMON_OUTPUTS = (
    OutputSpec(name="loss"),
    OutputSpec(name="chosen_logps", differentiable=False),
    OutputSpec(name="rejected_logps", differentiable=False),
    OutputSpec(name="chosen_logits_mean", differentiable=False),
    OutputSpec(name="rejected_logits_mean", differentiable=False),
    OutputSpec(name="nll_loss", differentiable=False),
    OutputSpec(name="chosen_rewards", differentiable=False),
    OutputSpec(name="rejected_rewards", differentiable=False),
)
_COMMON_INPUTS = (
    InputSpec(name="input", differentiable=True),
    InputSpec(name="weight", differentiable=True),
    InputSpec(name="target"),
    InputSpec(name="bias", kind="optional_tensor", differentiable=True),
)


# -- checks ------------------------------------------------------------------------------------------------------


def check_options(op: str, attrs: dict, owner: str | None = None) -> None:
    """The range checks of the options (types and choices are the AttrSpecs'); `owner` names the caller."""
    who = owner or op
    smoothing = attrs.get("label_smoothing", 0.0)
    loss_type = attrs.get("loss_type")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{who}: 'label_smoothing' must be in [0, 1], got {smoothing}")
    if loss_type == "exo_pair" and not 0.0 < smoothing < 1.0:
        raise ValueError(
            f"{who}: loss_type 'exo_pair' needs 0 < 'label_smoothing' < 1 (it takes log(label_smoothing)), "
            f"got {smoothing}"
        )
    if loss_type == "robust" and not 0.0 <= smoothing < 0.5:
        raise ValueError(f"{who}: loss_type 'robust' needs 0 <= 'label_smoothing' < 0.5, got {smoothing}")
    if loss_type in ("ipo", "sppo_hard") and attrs["beta"] == 0:
        raise ValueError(f"{who}: loss_type {loss_type!r} divides by 'beta', which must not be 0")
    if loss_type == "discopop" and attrs["discopop_tau"] <= 0:
        raise ValueError(f"{who}: loss_type 'discopop' needs 'discopop_tau' > 0, got {attrs['discopop_tau']}")


def _check_linear(op: str, prefix: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    require_float(op, f"{prefix}input", x)
    require_dim(op, f"{prefix}input", x, 3)
    require_float(op, f"{prefix}weight", weight)
    require_dim(op, f"{prefix}weight", weight, 2)
    if weight.shape[1] != x.shape[2]:
        raise ValueError(
            f"{op}: '{prefix}weight' must have shape (V, {x.shape[2]}) to match the hidden size of "
            f"'{prefix}input' {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: '{prefix}weight' must have a non-empty vocabulary and hidden size")
    require_same_device(op, f"{prefix}input", x, f"{prefix}weight", weight)
    if bias is not None:
        require_float(op, f"{prefix}bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: '{prefix}bias' must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        require_same_device(op, f"{prefix}input", x, f"{prefix}bias", bias)


def _check_target(op: str, name: str, x: torch.Tensor, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    require_index(op, name, target)
    if target.shape != x.shape[:2]:
        raise ValueError(
            f"{op}: {name!r} must have shape {tuple(x.shape[:2])}, one class per position of input "
            f"{tuple(x.shape)}, got {tuple(target.shape)}"
        )
    require_same_device(op, "input", x, name, target)
    if env.checks_enabled():  # reads the data: synchronises, so only on request
        out_of_range = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(out_of_range.any()):
            bad = target[out_of_range][:5].tolist()
            raise ValueError(
                f"{op}: {name!r} holds classes outside [0, {vocab}) that are not ignore_index={ignore_index}: {bad}"
            )


def _make_check(op: str):
    def check(inputs: tuple, attrs: dict) -> None:
        x, weight, target, bias = inputs[:4]
        _check_linear(op, "", x, weight, bias)
        if x.shape[0] == 0 or x.shape[0] % 2:
            raise ValueError(
                f"{op}: 'input' must hold B chosen then B rejected sequences, so its first dimension must be even "
                f"and > 0, got shape {tuple(x.shape)}"
            )
        vocab = weight.shape[0]
        _check_target(op, "target", x, target, vocab, attrs["ignore_index"])
        if op == "fused_linear_dpo" and attrs["use_ref_model"]:
            ref_input, ref_weight, ref_bias = inputs[4:]
            if ref_input is None or ref_weight is None:
                raise ValueError(
                    f"{op}: use_ref_model=True needs 'ref_input' and 'ref_weight' (the reference model's hidden "
                    "states and output weight); pass them or set use_ref_model=False"
                )
            _check_linear(op, "ref_", ref_input, ref_weight, ref_bias)
            if ref_input.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"{op}: 'ref_input' must have shape {tuple(x.shape[:2])} + (H_ref,) like 'input', "
                    f"got {tuple(ref_input.shape)}"
                )
            if ref_weight.shape[0] != vocab:
                raise ValueError(
                    f"{op}: 'ref_weight' must have {vocab} rows (the vocabulary of 'weight'), "
                    f"got {tuple(ref_weight.shape)}"
                )
            require_same_device(op, "input", x, "ref_input", ref_input)
        if op == "fused_linear_orpo" and inputs[4] is not None:
            _check_target(op, "nll_target", x, inputs[4], vocab, attrs["ignore_index"])
        check_options(op, attrs)

    return check


# -- key and inputs ----------------------------------------------------------------------------------------------


def _make_key(op: str):
    def key(inputs: tuple, attrs: dict) -> tuple:
        x, weight, target, bias = inputs[:4]
        extra = tuple(t is not None for t in inputs[4:])
        return (
            tensor_key(x),
            weight.dtype,
            weight.shape[0],  # exact: kernels choose tiles from V and H
            x.shape[2],
            bucket(x.shape[0] * x.shape[1]),
            target.dtype,
            bias is not None,
            extra,
            tuple(sorted(attrs.items())),  # scalars and strings: every option a kernel might look at
        )

    return key


def _make_inputs_for(op: str):
    def make_inputs(
        device: torch.device,
        dtype: torch.dtype,
        size: str,
        seed: int,
        with_bias: bool = False,
        with_nll_target: bool = False,
        **attrs,
    ):
        generator = torch.Generator().manual_seed(seed)
        pairs, length, hidden, vocab = SHAPES[size]
        ignore_index = attrs.get("ignore_index", -100)

        def targets():
            t = torch.randint(0, vocab, (2 * pairs, length), generator=generator)
            # a prompt-like prefix of ignored positions of random length, and a few scattered ones
            prefix = torch.randint(0, length // 2 + 1, (2 * pairs, 1), generator=generator)
            ignored = (torch.arange(length) < prefix) | (torch.rand(2 * pairs, length, generator=generator) < 0.1)
            ignored[:, -1] = False  # every sequence keeps at least one counted token
            return t.masked_fill(ignored, ignore_index).to(device)

        x = randn((2 * pairs, length, hidden), dtype, device, generator)
        weight = randn((vocab, hidden), dtype, device, generator, scale=hidden**-0.5)
        target = targets()
        bias = randn((vocab,), dtype, device, generator, scale=0.1) if with_bias else None
        inputs: tuple = (x, weight, target, bias)
        if op == "fused_linear_dpo":
            if attrs.get("use_ref_model", True):
                ref_x = randn((2 * pairs, length, hidden), dtype, device, generator)
                ref_w = randn((vocab, hidden), dtype, device, generator, scale=hidden**-0.5)
                ref_b = randn((vocab,), dtype, device, generator, scale=0.1) if with_bias else None
                inputs += (ref_x, ref_w, ref_b)
            else:
                inputs += (None, None, None)
        elif op == "fused_linear_orpo":
            inputs += (targets() if with_nll_target else None,)
        return inputs, attrs

    return make_inputs


def _spec(op: str, extra_inputs: tuple, attrs: tuple, extra_outputs: tuple, cases: tuple) -> OpSpec:
    return OpSpec(
        name=op,
        inputs=_COMMON_INPUTS + extra_inputs,
        attrs=attrs,
        outputs=_COMMON_OUTPUTS + extra_outputs,
        check=_make_check(op),
        key_fn=_make_key(op),
        make_inputs_fn=_make_inputs_for(op),
        cases=cases,
    )


def _ignore_index() -> AttrSpec:
    return AttrSpec(name="ignore_index", type="int", default=-100)


def _beta() -> AttrSpec:
    return AttrSpec(name="beta", type="float", default=0.1)


DPO_SPEC = _spec(
    "fused_linear_dpo",
    (
        InputSpec(name="ref_input", kind="optional_tensor"),
        InputSpec(name="ref_weight", kind="optional_tensor"),
        InputSpec(name="ref_bias", kind="optional_tensor"),
    ),
    (
        _ignore_index(),
        _beta(),
        AttrSpec(name="alpha", type="float", default=1.0),
        AttrSpec(name="compute_nll_loss", type="bool", default=False),
        AttrSpec(name="use_ref_model", type="bool", default=True),
        AttrSpec(name="average_log_prob", type="bool", default=False),
        AttrSpec(name="loss_type", type="str", default="sigmoid", choices=DPO_LOSS_TYPES),
        AttrSpec(name="label_smoothing", type="float", default=0.0),
        AttrSpec(name="discopop_tau", type="float", default=0.05),
    ),
    (),
    (
        {},
        {"loss_type": "ipo", "average_log_prob": True, "with_bias": True},
        {"loss_type": "robust", "label_smoothing": 0.1, "use_ref_model": False, "compute_nll_loss": True},
        {"loss_type": "exo_pair", "label_smoothing": 0.2, "ignore_index": 3, "beta": 0.5},
        {"loss_type": "discopop", "discopop_tau": 0.5, "with_bias": True, "alpha": 0.5, "compute_nll_loss": True},
        {"loss_type": "apo_down", "beta": 1.0},
    ),
)

ORPO_SPEC = _spec(
    "fused_linear_orpo",
    (InputSpec(name="nll_target", kind="optional_tensor"),),
    (_ignore_index(), _beta(), AttrSpec(name="compute_nll_loss", type="bool", default=True)),
    (
        OutputSpec(name="log_odds_ratio", differentiable=False),
        OutputSpec(name="log_odds_chosen", differentiable=False),
    ),
    ({}, {"with_nll_target": True, "with_bias": True, "beta": 0.5}, {"compute_nll_loss": False, "ignore_index": 3}),
)

CPO_SPEC = _spec(
    "fused_linear_cpo",
    (),
    (
        _ignore_index(),
        _beta(),
        AttrSpec(name="alpha", type="float", default=1.0),
        AttrSpec(name="label_smoothing", type="float", default=0.0),
        AttrSpec(name="compute_nll_loss", type="bool", default=True),
        AttrSpec(name="average_log_prob", type="bool", default=False),
    ),
    (),
    ({}, {"label_smoothing": 0.1, "average_log_prob": True, "with_bias": True, "alpha": 0.3}),
)

SIMPO_SPEC = _spec(
    "fused_linear_simpo",
    (),
    (
        _ignore_index(),
        _beta(),
        AttrSpec(name="alpha", type="float", default=1.0),
        AttrSpec(name="label_smoothing", type="float", default=0.0),
        AttrSpec(name="compute_nll_loss", type="bool", default=True),
        AttrSpec(name="gamma", type="float", default=0.5),
    ),
    (),
    ({}, {"label_smoothing": 0.2, "gamma": 1.0, "beta": 2.0, "with_bias": True, "compute_nll_loss": False}),
)
