"""Every environment variable this package reads, in one place, each value validated.

==============================  =====================================================================
``LIGER_KERNEL_BACKEND_<OP>``   backend required for one operator (``LIGER_KERNEL_BACKEND_RMS_NORM=cuda``)
``LIGER_KERNEL_BACKEND``        comma-separated preference list of backends, for every operator
``LIGER_KERNEL_IMPL[_<OP>]``    liger-kernel 0.8's names for the two above; values ``triton``/``nvidia-triton``
                                and ``torch``/``pytorch``/``native`` are mapped to ``triton`` and ``reference``
``LIGER_KERNEL_AUTOTUNE``       ``0`` never time kernels, ``1`` always (also on the CPU); unset: on CUDA only
``LIGER_KERNEL_CACHE_DIR``      where autotune decisions are kept (default ``~/.cache/liger_kernel``)
``LIGER_KERNEL_CHECKS``         ``1`` adds the checks that read the data (they synchronise with the GPU)
``TRITON_INTERPRET``            read, not set: ``1`` lets the triton backend serve CPU tensors when forced
==============================  =====================================================================

The forcing variables are read at every dispatch (a few dictionary lookups); their parsing is memoised on the raw
strings. Under ``torch.compile`` they are read while tracing: after changing one, call ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EnvironmentSettingError

PREFIX = "LIGER_KERNEL_"
BACKEND = "LIGER_KERNEL_BACKEND"
IMPL = "LIGER_KERNEL_IMPL"
AUTOTUNE = "LIGER_KERNEL_AUTOTUNE"
CACHE_DIR = "LIGER_KERNEL_CACHE_DIR"
CHECKS = "LIGER_KERNEL_CHECKS"
TRITON_INTERPRET = "TRITON_INTERPRET"

# liger-kernel 0.8's implementation names, mapped onto our backends.
UPSTREAM_IMPL_NAMES = {
    "triton": "triton",
    "nvidia-triton": "triton",
    "torch": "reference",
    "pytorch": "reference",
    "native": "reference",
}

_BOOLEAN_VALUES = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True}


def _read_bool(variable: str) -> bool | None:
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return None
    value = _BOOLEAN_VALUES.get(raw.strip().lower())
    if value is None:
        raise EnvironmentSettingError(f"{variable}={raw!r} is not allowed: use 1 (on) or 0 (off), or leave it unset")
    return value


def autotune_setting() -> bool | None:
    """True/False when LIGER_KERNEL_AUTOTUNE forces autotuning on/off; None for the default (on CUDA only)."""
    return _read_bool(AUTOTUNE)


def checks_enabled() -> bool:
    return bool(_read_bool(CHECKS))


def triton_interpret() -> bool:
    return os.environ.get(TRITON_INTERPRET, "0").strip() not in ("", "0")


def cache_dir() -> Path:
    raw = os.environ.get(CACHE_DIR)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "liger_kernel"


def op_variable(prefix: str, op: str) -> str:
    return f"{prefix}_{op.upper()}"


_parsed: dict[tuple, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {}


def forcing_for(op: str) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """Return ``(required, preferred)`` for `op` from the environment.

    ``required``: the backends named by LIGER_KERNEL_BACKEND_<OP> (or LIGER_KERNEL_IMPL_<OP>), tried in order, or
    None. ``preferred``: the global list of LIGER_KERNEL_BACKEND (or LIGER_KERNEL_IMPL). Names are not checked
    against the registry here (the dispatcher does, to list the registered ones)."""
    raw = (
        os.environ.get(op_variable(BACKEND, op)),
        os.environ.get(op_variable(IMPL, op)),
        os.environ.get(BACKEND),
        os.environ.get(IMPL),
    )
    cached = _parsed.get(raw)
    if cached is None:
        op_backend, op_impl, backend, impl = raw
        required = _names(op_variable(BACKEND, op), op_backend) or _upstream(op_variable(IMPL, op), op_impl)
        preferred = _names(BACKEND, backend) or _upstream(IMPL, impl) or ()
        cached = _parsed[raw] = (required, preferred)
    return cached


def _names(variable: str, raw: str | None) -> tuple[str, ...] | None:
    if raw is None or raw.strip() == "":
        return None
    names = tuple(part.strip().lower() for part in raw.split(","))
    if any(not name for name in names):
        raise EnvironmentSettingError(f"{variable}={raw!r}: expected backend names separated by commas")
    return names


def _upstream(variable: str, raw: str | None) -> tuple[str, ...] | None:
    names = _names(variable, raw)
    if names is None:
        return None
    mapped = []
    for name in names:
        if name not in UPSTREAM_IMPL_NAMES:
            raise EnvironmentSettingError(
                f"{variable}={raw!r}: {name!r} is not an implementation name; allowed: {sorted(UPSTREAM_IMPL_NAMES)} "
                f"(or set {BACKEND}{variable[len(IMPL) :]} to one of our backend names)"
            )
        mapped.append(UPSTREAM_IMPL_NAMES[name])
    return tuple(mapped)


def check_operator_variables(operators: list[str]) -> None:
    """Raise if a LIGER_KERNEL_BACKEND_<X> or LIGER_KERNEL_IMPL_<X> names no operator (a typo would otherwise be
    ignored silently)."""
    known = {op.upper() for op in operators}
    for variable in os.environ:
        for prefix in (BACKEND + "_", IMPL + "_"):
            if variable.startswith(prefix) and variable[len(prefix) :] not in known:
                raise EnvironmentSettingError(
                    f"{variable} names no operator; the operators are: "
                    + ", ".join(prefix + op for op in sorted(known))
                )


def overrides() -> dict[str, str]:
    """The variables of this package set now, for `liger-kernel info`."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(PREFIX) or k == TRITON_INTERPRET}
