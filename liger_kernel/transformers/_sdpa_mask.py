"""Causal attention without a materialised mask under torch.compile, as in eager mode.

transformers builds the attention mask of an sdpa model in ``masking_utils.sdpa_mask``. When nothing is masked
but causality (no padding mask, as many queries as keys), eager mode returns no mask at all and the attention
call uses ``is_causal=True``: a flash kernel that skips the masked half. While tracing for torch.compile,
transformers up to 5.2x (``_ignore_causal_mask_sdpa``, and later releases on torch < 2.14) refuses that skip and
builds a ``(B, 1, T, T)`` mask instead, because it cannot tell ``torch.compile`` from ``torch.export`` there. The
attention then runs with an explicit mask: on the H200 (transformers 5.17, torch 2.11) the cuDNN forward and
backward of a Llama-style model took 3.5 and 10.5 ms a step compiled against 1.2 and 3.4 ms eager, for every model
compiled, patched or not (benchmarks/results/2026-11-29-h200-train_step-profile.md).

`install` wraps ``_ignore_causal_mask_sdpa`` so that, while compiling, the cases eager mode skips are skipped too:
no padding mask and either one query or as many queries as keys, with no sliding window that the keys reach past.
That is exactly eager mode's decision for those inputs, so the compiled model computes what the eager one does; in
every other case (a padding mask, whose values cannot be read while tracing; static-cache tensor offsets; a
window) transformers decides as before. Traced by ``torch.export``, a model patched this way also relies on
``is_causal`` for mask-free inputs of equal query and key lengths, which such a model's inputs always are.

The patchers call `install` (once per process; a no-op on a transformers whose function differs from the one this
is written for).
"""

from __future__ import annotations

import inspect

import torch

# The signature of masking_utils._ignore_causal_mask_sdpa this wrapper is written for (transformers 5.x).
_PARAMETERS = ("padding_mask", "q_length", "kv_length", "q_offset", "kv_offset", "local_attention_size")


def _compile_aware(original):
    def _ignore_causal_mask_sdpa(
        padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None
    ) -> bool:
        compiling = torch.compiler.is_compiling()
        if (
            not compiling
            or padding_mask is not None
            or isinstance(q_offset, torch.Tensor)
            or isinstance(kv_offset, torch.Tensor)
        ):
            return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)
        if local_attention_size is not None and kv_length >= local_attention_size:
            return False
        return q_length == 1 or kv_length == q_length

    _ignore_causal_mask_sdpa.__wrapped__ = original
    _ignore_causal_mask_sdpa.__doc__ = (
        "transformers' _ignore_causal_mask_sdpa, which also skips the mask while compiling where eager mode does "
        "(liger_kernel.transformers._sdpa_mask)."
    )
    _ignore_causal_mask_sdpa._liger_compile_aware = True
    return _ignore_causal_mask_sdpa


def install() -> bool:
    """Wrap transformers' ``_ignore_causal_mask_sdpa`` (see the module's doc). Returns whether it is wrapped."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    current = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if current is None:
        return False
    if getattr(current, "_liger_compile_aware", False):
        return True
    try:
        parameters = tuple(inspect.signature(current).parameters)
    except (TypeError, ValueError):
        return False
    if parameters != _PARAMETERS:
        return False
    masking_utils._ignore_causal_mask_sdpa = _compile_aware(current)
    return True
