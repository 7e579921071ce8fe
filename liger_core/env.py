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

# os.environ.get costs about half a microsecond (it encodes the key and decodes the value); dispatch reads five
# variables per call, so on POSIX it reads os.environ's own bytes mapping, which os.environ keeps up to date.
_environ_bytes = getattr(os.environ, "_data", None)
if not (isinstance(_environ_bytes, dict) and all(isinstance(k, bytes) for k in list(_environ_bytes)[:1])):
    _environ_bytes = None


def raw(variable: str) -> str | None:
    """The value of `variable`, or None when unset; fast enough for every dispatch."""
    if _environ_bytes is None:
        return os.environ.get(variable)
    value = _environ_bytes.get(variable.encode())
    return None if value is None else os.fsdecode(value)


def _read_bool(variable: str) -> bool | None:
    value = raw(variable)
    return _parse_bool(variable, value)


def _parse_bool(variable: str, raw: str | None) -> bool | None:
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
    value = os.environ.get(CACHE_DIR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "liger_kernel"


def op_variable(prefix: str, op: str) -> str:
    return f"{prefix}_{op.upper()}"


_parsed: dict[tuple, tuple[tuple[str, ...] | None, tuple[str, ...], bool | None]] = {}
_op_variables: dict[str, tuple[str, str]] = {}


def forcing_for(op: str) -> tuple[tuple[str, ...] | None, tuple[str, ...], bool | None]:
    """Return ``(required, preferred, autotune)`` for `op` from the environment.

    ``required``: the backends named by LIGER_KERNEL_BACKEND_<OP> (or LIGER_KERNEL_IMPL_<OP>), tried in order, or
    None. ``preferred``: the global list of LIGER_KERNEL_BACKEND (or LIGER_KERNEL_IMPL). ``autotune``: as
    `autotune_setting`. Names are not checked against the registry here (the dispatcher does, to list the
    registered ones)."""
    names = _op_variables.get(op)
    if names is None:
        names = _op_variables[op] = (op_variable(BACKEND, op), op_variable(IMPL, op))
    values = (op, raw(names[0]), raw(names[1]), raw(BACKEND), raw(IMPL), raw(AUTOTUNE))
    cached = _parsed.get(values)
    if cached is None:
        _, op_backend, op_impl, backend, impl, autotune = values
        required = _names(names[0], op_backend) or _upstream(names[1], op_impl)
        preferred = _names(BACKEND, backend) or _upstream(IMPL, impl) or ()
        cached = _parsed[values] = (required, preferred, _parse_bool(AUTOTUNE, autotune))
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
