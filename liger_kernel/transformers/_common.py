"""Argument handling shared by the public modules: the ``impl=``/``backend=`` choice and early option checks."""

from __future__ import annotations

from collections.abc import Sequence

from liger_core import dispatch
from liger_core.registry import get_registry


def resolve_impl(owner: str, impl: str | Sequence[str] | None, backend: str | Sequence[str] | None):
    """The backend requirement a module passes to ``liger_core.call(..., impl=...)``.

    ``backend=`` is liger-kernel 0.8's legacy alias of ``impl=``. Names are checked now, so a misspelt backend is a
    ValueError listing the registered ones when the module is built, not at its first call.
    """
    if impl is not None and backend is not None and impl != backend:
        raise ValueError(f"{owner}: 'impl' ({impl!r}) and its legacy alias 'backend' ({backend!r}) disagree; pass one")
    chosen = impl if impl is not None else backend
    if chosen is None:
        return None
    if not isinstance(chosen, str):
        chosen = tuple(chosen)
    dispatch.normalise_backend_names(chosen, f"{owner}: argument 'impl'")
    return chosen


def check_attr(op: str, owner: str, name: str, value):
    """Run the operator's own type and choice check of attribute `name`, reporting it under `owner`."""
    spec = get_registry().operator(op)
    attr = next(a for a in spec.attrs if a.name == name)
    return attr.check(owner, value)
