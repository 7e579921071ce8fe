"""Which operators exist and which backends implement them.

Backends are found through the entry-point group ``liger_kernel.backends`` with stevedore; each entry point names a
`BackendSpec` (or a zero-argument callable returning one). Loading a backend imports only its small spec module:
kernel modules (and so Triton, compilers, ...) are imported the first time a kernel of theirs is needed.

A backend that fails to load costs one warning and is recorded in `Registry.failures`; everything else keeps
working. stevedore keeps an on-disk cache of entry points that can go stale after an editable install, so the
registry checks stevedore's list against importlib.metadata and hands stevedore the fresh one when they differ.
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from dataclasses import dataclass, field

from .errors import SpecError
from .spec import BackendSpec, KernelSpec, OpSpec, import_reference

GROUP = "liger_kernel.backends"
FIRST_PARTY_DISTRIBUTION = "liger-core"

# The operators of the catalogue: name -> "module:attr" of their OpSpec, imported on first use.
CATALOGUE: dict[str, str] = {
    "rms_norm": "liger_core.operators.rms_norm:SPEC",
    "cross_entropy": "liger_core.operators.cross_entropy:SPEC",
    "fused_linear_cross_entropy": "liger_core.operators.fused_linear_cross_entropy:SPEC",
    "kl_div": "liger_core.operators.kl_div:SPEC",
    "jsd": "liger_core.operators.jsd:SPEC",
    "fused_linear_jsd": "liger_core.operators.fused_linear_jsd:SPEC",
    "fused_linear_dpo": "liger_core.operators.preference:DPO_SPEC",
    "fused_linear_orpo": "liger_core.operators.preference:ORPO_SPEC",
    "fused_linear_cpo": "liger_core.operators.preference:CPO_SPEC",
    "fused_linear_simpo": "liger_core.operators.preference:SIMPO_SPEC",
    "layer_norm": "liger_core.operators.layer_norm:SPEC",
    "rope": "liger_core.operators.rope:SPEC",
    "swiglu": "liger_core.operators.swiglu:SPEC",
    "geglu": "liger_core.operators.geglu:SPEC",
    "embedding": "liger_core.operators.embedding:SPEC",
    "int2_matmul": "liger_core.operators.int2_matmul:SPEC",
}


@dataclass
class Backend:
    """A loaded backend: its spec, where it came from, and what went wrong with its kernels so far."""

    spec: BackendSpec
    distribution: str
    kernel_errors: dict[str, str] = field(default_factory=dict)
    _available: list[str] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def first_party(self) -> bool:
        return self.distribution == FIRST_PARTY_DISTRIBUTION

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot serve anything here (memoised: it checks hardware and installed software)."""
        if self._available is None:
            try:
                self._available = list(self.spec.available())
            except Exception as error:  # a plugin's probe must not take the process down
                self._available = [f"its availability check raised {type(error).__name__}: {error}"]
        return self._available


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown distribution>"


def _fresh_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points as importlib.metadata sees them now, one per (name, value, distribution)."""
    seen: dict[tuple, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        seen.setdefault((ep.name, ep.value, _distribution_name(ep)), ep)
    return list(seen.values())


def _stevedore_entry_points(fresh: list[importlib.metadata.EntryPoint]) -> list[importlib.metadata.EntryPoint]:
    """The entry points stevedore will load: its cached list, or the fresh one when the cache went stale."""
    from stevedore import ExtensionManager

    try:
        cached = ExtensionManager(GROUP).list_entry_points()
    except Exception:  # an unreadable cache file is as stale as a wrong one
        cached = []
    if {(ep.name, ep.value) for ep in cached} != {(ep.name, ep.value) for ep in fresh}:
        ExtensionManager.ENTRY_POINT_CACHE[GROUP] = fresh
    return ExtensionManager.ENTRY_POINT_CACHE.get(GROUP, fresh)


class Registry:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.failures: dict[str, str] = {}  # entry point (or kernel) -> error, for `liger-kernel info`
        self._operator_sources: dict[str, str] = dict(CATALOGUE)
        self._operators: dict[str, OpSpec] = {}
        self._kernels: dict[tuple[str, str], KernelSpec] = {}
        self._lock = threading.RLock()
        self._everything_loaded = False
        self._load_backends()

    # -- discovery -------------------------------------------------------------------------------------------

    def _load_backends(self) -> None:
        from stevedore import ExtensionManager

        fresh = _fresh_entry_points()
        # stevedore's cached entry points carry no distribution: take it from importlib.metadata's.
        self._distributions = {(ep.name, ep.value): _distribution_name(ep) for ep in fresh}
        _stevedore_entry_points(fresh)
        manager = ExtensionManager(GROUP, invoke_on_load=False, on_load_failure_callback=self._on_load_failure)
        loaded: list[tuple[BackendSpec, str, str]] = []
        for extension in manager.extensions:
            distribution = self._distribution(extension.entry_point)
            where = f"{extension.name} ({distribution})"
            try:
                spec = extension.plugin
                if not isinstance(spec, BackendSpec):
                    spec = spec()
                if not isinstance(spec, BackendSpec):
                    raise SpecError(f"it gives a {type(spec).__name__}, expected a liger_core.spec.BackendSpec")
                if spec.name != extension.name:
                    raise SpecError(f"the entry-point name {extension.name!r} differs from the spec name {spec.name!r}")
            except Exception as error:
                self._fail(where, error)
                continue
            loaded.append((spec, distribution, where))
        # First-party backends first, so that they win a name clash whatever the load order.
        loaded.sort(key=lambda item: item[1] != FIRST_PARTY_DISTRIBUTION)
        for spec, distribution, where in loaded:
            self._add(spec, distribution, where)
        self._reject_unknown_operators()

    def _reject_unknown_operators(self) -> None:
        """A kernel for an operator that neither the catalogue nor any backend defines is a plugin bug."""
        unknown = {
            (backend.name, op)
            for backend in self.backends.values()
            for op in backend.spec.kernels
            if op not in self._operator_sources
        }
        for backend_name, op in sorted(unknown):
            backend = self.backends.pop(backend_name, None)
            if backend is not None:
                self._fail(
                    f"{backend_name} ({backend.distribution})",
                    SpecError(
                        f"it has a kernel for the unknown operator {op!r}; known: {sorted(self._operator_sources)}"
                    ),
                )

    def _add(self, spec: BackendSpec, distribution: str, where: str) -> None:
        existing = self.backends.get(spec.name)
        if existing is not None:
            self._fail(
                where,
                SpecError(f"backend name {spec.name!r} is already taken by distribution {existing.distribution!r}"),
            )
            return
        clashes = sorted(set(spec.operators) & set(self._operator_sources))
        if clashes:
            self._fail(where, SpecError(f"it defines operators that already exist: {clashes}"))
            return
        self.backends[spec.name] = Backend(spec, distribution)
        self._operator_sources.update(spec.operators)

    def _distribution(self, entry_point: importlib.metadata.EntryPoint) -> str:
        return self._distributions.get((entry_point.name, entry_point.value)) or _distribution_name(entry_point)

    def _on_load_failure(self, manager, entry_point, error: Exception) -> None:
        self._fail(f"{entry_point.name} ({self._distribution(entry_point)})", error)

    def _fail(self, where: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        self.failures[where] = message
        warnings.warn(f"liger_kernel: backend plugin {where} was not loaded: {message}", RuntimeWarning, stacklevel=3)

    # -- lookups ---------------------------------------------------------------------------------------------

    def operator_names(self) -> list[str]:
        return sorted(self._operator_sources)

    def operator(self, name: str) -> OpSpec:
        spec = self._operators.get(name)
        if spec is None:
            if name not in self._operator_sources:
                raise ValueError(f"unknown operator {name!r}; the operators are: {self.operator_names()}")
            with self._lock:
                spec = import_reference(self._operator_sources[name], OpSpec, f"operator {name!r}")
                if spec.name != name:
                    raise SpecError(f"operator {name!r} is registered with a spec named {spec.name!r}")
                self._operators[name] = spec
        return spec

    def load_everything(self) -> None:
        """Import every operator spec, and every kernel of the backends available here (once; for torch.compile)."""
        if self._everything_loaded:
            return
        for op in self.operator_names():
            self.operator(op)
            for name in self.implementations(op):
                if not self.backends[name].unavailable_reasons():
                    try:
                        self.kernel(op, name)
                    except ImportError:
                        pass  # recorded in failures; selection reports it
        self._everything_loaded = True

    def implementations(self, op: str) -> list[str]:
        """Names of the backends with a kernel for `op`, best priority first (ties by name)."""
        return sorted(
            (b.name for b in self.backends.values() if op in b.spec.kernels),
            key=lambda n: (self.backends[n].spec.priority, n),
        )

    def kernel(self, op: str, backend_name: str) -> KernelSpec:
        """Import (once) and return the kernel of `backend_name` for `op`. Raises ImportError/SpecError."""
        kernel = self._kernels.get((op, backend_name))
        if kernel is None:
            backend = self.backends[backend_name]
            if op in backend.kernel_errors:
                raise ImportError(backend.kernel_errors[op])
            with self._lock:
                try:
                    kernel = import_reference(backend.spec.kernels[op], KernelSpec, f"{backend_name} kernel for {op!r}")
                    if kernel.op != op:
                        raise SpecError(f"{backend.spec.kernels[op]!r} is a kernel for {kernel.op!r}, not {op!r}")
                except Exception as error:
                    message = f"its kernel module failed to import: {type(error).__name__}: {error}"
                    backend.kernel_errors[op] = message
                    self.failures[f"{backend_name}.{op}"] = message
                    raise ImportError(message) from error
                self._kernels[(op, backend_name)] = kernel
        return kernel


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reload_registry() -> Registry:
    """Discover the backends again (after installing a plugin in a running process, and in tests)."""
    global _registry
    from . import dispatch

    with _registry_lock:
        _registry = Registry()
    dispatch.clear_memo()
    return _registry
