"""The causal-LM forward that the Hugging Face patchers install (see `monkey_patch`).

One forward serves every supported family: it runs the decoder (``self.model``), keeps the positions that
``logits_to_keep`` asks for, and then either

- training with labels (or ``skip_logits=True``): the lm head and the loss in one `fused_linear_cross_entropy` call,
  so the ``(tokens, vocab)`` logits never exist; ``logits`` is None in the output; or
- otherwise: the logits (final-logit softcapping applied, as Gemma 2 does), and the loss, when labels are given,
  by the model's own ``loss_function`` (or by `liger_cross_entropy` for a ``cross_entropy=True`` patch).

The loss follows transformers' ``ForCausalLMLoss``: labels are shifted left by one and padded with
``ignore_index`` unless ``shift_labels`` is given; with ``num_items_in_batch`` (gradient accumulation) the loss is
the sum over tokens divided by it, else the mean over non-ignored tokens. Mixtral adds its router's load-balancing
loss when ``output_router_logits``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import torch
import torch.nn.functional as F

from . import _sdpa_mask
from ._distributed import call_through
from .functional import liger_cross_entropy, liger_fused_linear_cross_entropy

FUSED = "fused_linear_cross_entropy"
CROSS_ENTROPY = "cross_entropy"

# the keyword arguments this forward consumes itself; everything else goes to the decoder (``self.model``)
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def keep_positions(hidden_states: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions of ``(B, T, H)`` hidden states whose logits are wanted, as transformers reads
    ``logits_to_keep``: an int keeps the last ones (0 keeps all), a 1-D tensor holds positions for every row, a 2-D
    integer tensor positions per row, a 2-D bool tensor a mask (the result is then ``(kept, H)``)."""
    if isinstance(logits_to_keep, bool):
        raise TypeError(f"'logits_to_keep' must be an int or a tensor, got {logits_to_keep!r}")
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"'logits_to_keep' must be >= 0, got {logits_to_keep}")
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    return hidden_states[:, logits_to_keep, :]


def shifted_targets(labels, shift_labels, ignore_index: int) -> torch.Tensor:
    """The flat next-token targets: ``shift_labels`` as given, else ``labels`` shifted left, padded with
    ``ignore_index`` (transformers' ``ForCausalLMLoss``)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _divide(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fused_loss(
    lm_head,
    kept: torch.Tensor,
    targets,
    num_items_in_batch,
    ignore_index: int,
    softcap,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
):
    """The lm head and the cross entropy in one operator: the logits are never materialised. Returns
    ``(loss, token_accuracy)``; the accuracy is None unless asked for.

    The loss runs as the lm head's own forward (`call_through`): a wrapper that gathers the lm head's weight in
    its hooks (FSDP2's ``fully_shard(lm_head)``, DeepSpeed ZeRO-3) hands the gathered weight to this call, exactly
    as for ``lm_head(hidden)``, and reduces its gradient afterwards. The weight is read inside, never before."""
    hidden = kept.reshape(-1, kept.shape[-1])

    def lm_head_loss(hidden: torch.Tensor, targets: torch.Tensor) -> tuple:
        weight, bias = lm_head.weight, lm_head.bias
        if torch.is_autocast_enabled(hidden.device.type):
            # Mixed precision: the unpatched ``lm_head(hidden)`` is a linear, which autocast runs in its low dtype;
            # our operators compute in their inputs' dtypes (autocast is off inside them), so cast as autocast would.
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        result = liger_fused_linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum",
            softcap=softcap,
            use_token_scaling=use_token_scaling,
            return_token_accuracy=return_token_accuracy,
        )
        # a tuple of tensors, not the CrossEntropyOutput dataclass: what the lm head's hooks can see through
        return (result.loss, result.token_accuracy) if return_token_accuracy else (result, None)

    loss, token_accuracy = call_through(lm_head, lm_head_loss, hidden, targets.to(hidden.device))
    return _divide(loss, num_items_in_batch), token_accuracy


def scaled_logits_loss(logits: torch.Tensor, targets, num_items_in_batch, ignore_index: int) -> torch.Tensor:
    """``use_token_scaling`` over materialised logits (TRL's DFT loss): each token's cross entropy times its
    detached predicted probability of the target, reduced like ``ForCausalLMLoss``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.to(flat.device)
    valid = targets != ignore_index
    nll = -flat.log_softmax(-1).gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    total = torch.where(valid, nll * torch.exp(-nll).detach(), 0.0).sum()
    if num_items_in_batch is None:
        return total / valid.sum().clamp(min=1)
    return _divide(total, num_items_in_batch)


def logits_token_accuracy(logits: torch.Tensor, targets, ignore_index: int) -> torch.Tensor:
    """The share of non-ignored targets that are the argmax of their logits (0 when all are ignored)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    targets = targets.to(flat.device)
    valid = targets != ignore_index
    return ((flat.argmax(-1) == targets) & valid).sum() / valid.sum().clamp(min=1)


def logits_loss(logits: torch.Tensor, targets, num_items_in_batch, ignore_index: int) -> torch.Tensor:
    """`liger_cross_entropy` over materialised (already softcapped) logits, reduced like ``ForCausalLMLoss``."""
    flat = logits.reshape(-1, logits.shape[-1])
    loss = liger_cross_entropy(
        flat,
        targets.to(flat.device),
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    return _divide(loss, num_items_in_batch)


def output_class(moe: bool) -> tuple[type, frozenset]:
    """transformers' causal-LM output class and its field names (looked up at patch time, not while tracing)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    base = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
    if base not in _OUTPUT_CLASSES:
        # transformers' output with liger-kernel's ``token_accuracy`` field (TRL's SFTTrainer reads it); None,
        # and so absent from ``to_tuple()``, unless ``return_token_accuracy=True``
        cls = dataclasses.make_dataclass(
            f"Liger{base.__name__}",
            [("token_accuracy", "torch.FloatTensor | None", dataclasses.field(default=None))],
            bases=(base,),
            namespace={"__module__": __name__},
        )
        _OUTPUT_CLASSES[base] = cls
    cls = _OUTPUT_CLASSES[base]
    return cls, frozenset(field.name for field in dataclasses.fields(cls))


_OUTPUT_CLASSES: dict[type, type] = {}


def causal_lm_forward(self, mode: str, moe: bool, output: tuple[type, frozenset], kwargs: dict):
    """The body of the patched forward; ``kwargs`` holds every argument by name; ``output`` is `output_class`'s."""
    labels = kwargs.pop("labels", None)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    skip_logits = kwargs.pop("skip_logits", None)
    return_dict = kwargs.pop("return_dict", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    # liger-kernel's forward options that TRL's SFTTrainer(use_liger_kernel=True) passes (DFT loss, metrics)
    use_token_scaling = kwargs.pop("use_token_scaling", False)
    return_token_accuracy = kwargs.pop("return_token_accuracy", False)
    if moe:
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        kwargs["output_router_logits"] = output_router_logits

    # No positions, mask or cache from the caller: the decoder numbers the tokens itself, so nothing is packed and,
    # under torch.compile, its sdpa attention can go without a mask as in eager mode (_sdpa_mask)
    decoder_positions = all(
        kwargs.get(name) is None for name in ("position_ids", "attention_mask", "past_key_values", "cache_position")
    )
    previous = _sdpa_mask.default_positions(decoder_positions)
    try:
        outputs = self.model(**kwargs)
    finally:
        _sdpa_mask.default_positions(previous)
    kept = keep_positions(outputs.last_hidden_state, logits_to_keep)

    wants_loss = labels is not None or shift_labels is not None
    if skip_logits is None:
        skip_logits = mode == FUSED and self.training and wants_loss
    if skip_logits and not wants_loss:
        raise ValueError("skip_logits=True computes only the loss: pass 'labels' or 'shift_labels'")
    softcap = getattr(self.config, "final_logit_softcapping", None)

    logits = loss = token_accuracy = None
    if skip_logits:
        targets = shifted_targets(labels, shift_labels, ignore_index)
        loss, token_accuracy = fused_loss(
            self.lm_head,
            kept,
            targets,
            num_items_in_batch,
            ignore_index,
            softcap,
            use_token_scaling,
            return_token_accuracy,
        )
    else:
        logits = self.lm_head(kept)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if wants_loss and (use_token_scaling or return_token_accuracy):
            targets = shifted_targets(labels, shift_labels, ignore_index)
            if return_token_accuracy:
                token_accuracy = logits_token_accuracy(logits, targets, ignore_index)
        if wants_loss and use_token_scaling:
            loss = scaled_logits_loss(logits, targets, num_items_in_batch, ignore_index)
        elif wants_loss and mode == CROSS_ENTROPY:
            targets = shifted_targets(labels, shift_labels, ignore_index)
            loss = logits_loss(logits, targets, num_items_in_batch, ignore_index)
        elif wants_loss:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
            )

    output_type, fields = output
    extra = {name: value for name, value in outputs.items() if name != "last_hidden_state" and name in fields}
    if moe:
        aux_loss = None
        if kwargs["output_router_logits"]:
            balancing = sys.modules[type(self).__module__].load_balancing_loss_func
            aux_loss = balancing(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, kwargs.get("attention_mask")
            )
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        extra["aux_loss"] = aux_loss
    result = output_type(loss=loss, logits=logits, **extra, token_accuracy=token_accuracy)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


_FORWARDS: dict = {}


def _signature(original) -> inspect.Signature:
    """The original forward's signature with ``skip_logits`` added (keyword-only, before ``**kwargs``): the
    Trainer reads it to decide which dataset columns the model takes, generation to see ``logits_to_keep``."""
    parameters = [p for p in inspect.signature(original).parameters.values() if p.kind != p.VAR_POSITIONAL]
    var_keyword = [p for p in parameters if p.kind == p.VAR_KEYWORD]
    named = [p for p in parameters if p.kind != p.VAR_KEYWORD]
    if not any(p.name == "skip_logits" for p in named):
        named.append(inspect.Parameter("skip_logits", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(named + (var_keyword or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]))


def make_forward(causal_lm_class: type, original, mode: str, moe: bool):
    """The patched forward of `causal_lm_class` (one function object per class and mode, so patching twice
    installs the same function), taking the arguments of `original` (the class's own forward)."""
    key = (causal_lm_class, mode)
    if key in _FORWARDS:
        return _FORWARDS[key]
    signature = _signature(original)
    output = output_class(moe)
    positional = tuple(
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments, got {len(args)}")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        return causal_lm_forward(self, mode, moe, output, kwargs)

    forward.__signature__ = signature
    forward.__name__ = "forward"
    forward.__qualname__ = f"{causal_lm_class.__name__}.forward"
    forward.__doc__ = (
        f"{causal_lm_class.__name__}.forward patched by liger_kernel ({mode}): when training with labels the loss "
        "is computed without materialising the logits."
    )
    forward._liger_mode = mode
    _FORWARDS[key] = forward
    return forward


def is_liger_forward(function) -> bool:
    return getattr(function, "_liger_mode", None) is not None
