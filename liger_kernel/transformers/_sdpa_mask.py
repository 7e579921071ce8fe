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
window) transformers decides as before. ``torch.export`` traces through the same code, so an exported patched
model also uses ``is_causal`` for inputs without a padding mask and with as many queries as keys (the exported
graph then guards on that equality).

The flag of `default_positions` is a plain attribute, one per process. It is only read while compiling, where the
patched forward sets it and the mask code reads it in the same traced call: Dynamo tracks that assignment itself
rather than reading another thread's value.

A second condition blocks the skip while compiling a model without a cache (``use_cache=False``, as in training):
transformers looks for packed sequences in the position ids (``find_packed_sequence_indices``), which it cannot
rule out while tracing, and then builds the mask whatever the positions. When the patched causal-LM forward is
called without position ids, attention mask, cache or cache positions, the decoder makes its positions itself
(``0 .. T-1`` in every row): nothing is packed. The forward says so around its decoder call
(`default_positions`), and the wrapped ``find_packed_sequence_indices`` then answers "not packed" while compiling,
as eager mode finds from the values. Position ids given by the caller are examined as before.

The patchers call `install` (once per process; a no-op on a transformers whose functions differ from the ones this
is written for).
"""

from __future__ import annotations

import inspect

import torch


class _DecoderCall:
    """Whether the decoder now running makes its own position ids (see `default_positions`)."""

    default_positions = False


_DECODER_CALL = _DecoderCall()


def default_positions(value: bool) -> bool:
    """Set whether the decoder about to run makes its own position ids; returns the previous value, to put back."""
    previous = _DECODER_CALL.default_positions
    _DECODER_CALL.default_positions = value
    return previous


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


def _packed_aware(original):
    def find_packed_sequence_indices(position_ids):
        if _DECODER_CALL.default_positions and torch.compiler.is_compiling():
            return None  # positions 0 .. T-1 made by the decoder itself: one sequence per row
        return original(position_ids)

    find_packed_sequence_indices.__wrapped__ = original
    find_packed_sequence_indices.__doc__ = (
        "transformers' find_packed_sequence_indices, which also knows, while compiling, that positions the decoder "
        "made itself are not packed (liger_kernel.transformers._sdpa_mask)."
    )
    find_packed_sequence_indices._liger_compile_aware = True
    return find_packed_sequence_indices


def install() -> bool:
    """Wrap transformers' ``_ignore_causal_mask_sdpa`` and ``find_packed_sequence_indices`` (see the module's doc).
    Returns whether they are wrapped."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    packed = getattr(masking_utils, "find_packed_sequence_indices", None)
    if packed is not None and not getattr(packed, "_liger_compile_aware", False):
        try:
            if tuple(inspect.signature(packed).parameters) == ("position_ids",):
                masking_utils.find_packed_sequence_indices = _packed_aware(packed)
        except (TypeError, ValueError):
            pass
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
