"""Picking the kernel for one call, and running it under autograd.

Selection order (DESIGN.md), strongest first:

1. ``LIGER_KERNEL_BACKEND_<OP>`` (or upstream's ``LIGER_KERNEL_IMPL_<OP>``): required for that operator;
2. a module's ``impl=`` argument, then ``use_backend(...)`` scopes, innermost first: required;
3. ``LIGER_KERNEL_BACKEND=a,b`` (or ``LIGER_KERNEL_IMPL``): a preference list; the listed backends that implement
   the operator are tried in order as a requirement; if none implements it, automatic selection;
4. automatic: the available backends whose kernel supports the call; one is chosen by autotuning when several
   can serve on CUDA (or ``LIGER_KERNEL_AUTOTUNE=1``), else by priority (lower wins, ties by name).

A required backend that cannot serve raises `BackendUnavailableError` with the call's inputs and every reason:
never a silent fallback. The choice is memoised per (operator, key, forcing state) in a plain dict.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch

from . import env
from .errors import BackendUnavailableError
from .registry import get_registry
from .spec import KernelSpec, OpSpec

# Active use_backend scopes, outermost first: ((backend names...), op or None).
_scopes: contextvars.ContextVar[tuple[tuple[tuple[str, ...], str | None], ...]] = contextvars.ContextVar(
    "liger_kernel_backend_scopes", default=()
)
_memo: dict[tuple, str] = {}
_environment_checked = False


def clear_memo() -> None:
    global _environment_checked
    _memo.clear()
    _checked.clear()
    _environment_checked = False


# -- forcing ----------------------------------------------------------------------------------------------------


def normalise_backend_names(names: str | Sequence[str], what: str) -> tuple[str, ...]:
    """Map names (ours or upstream's aliases) onto registered backends; unknown ones are a ValueError."""
    registry = get_registry()
    if isinstance(names, str):
        names = [names]
    resolved = []
    for raw in names:
        if not isinstance(raw, str):
            raise TypeError(f"{what}: backend names must be strings, got {type(raw).__name__}")
        name = raw.strip().lower()
        if name not in registry.backends and name not in _failed_backend_names():
            name = env.UPSTREAM_IMPL_NAMES.get(name, name)
        if name not in registry.backends and name not in _failed_backend_names():
            raise ValueError(
                f"{what}: unknown backend {raw!r}; registered backends: {sorted(registry.backends)}"
                + (f" (failed to load: {sorted(_failed_backend_names())})" if _failed_backend_names() else "")
            )
        resolved.append(name)
    if not resolved:
        raise ValueError(f"{what}: expected at least one backend name")
    return tuple(resolved)


def _failed_backend_names() -> set[str]:
    return {where.split(" ", 1)[0] for where in get_registry().failures if "." not in where.split(" ", 1)[0]}


@contextlib.contextmanager
def use_backend(names: str | Sequence[str], op: str | None = None) -> Iterator[None]:
    """Require `names` (tried in order) for every operator, or only for `op`, inside the ``with`` block.

    Scopes nest (the innermost applicable one decides) and are thread- and task-local.
    """
    resolved = normalise_backend_names(names, "use_backend")
    if op is not None and op not in get_registry().operator_names():
        raise ValueError(f"use_backend: unknown operator {op!r}; the operators are: {get_registry().operator_names()}")
    token = _scopes.set(_scopes.get() + ((resolved, op),))
    try:
        yield
    finally:
        _scopes.reset(token)


def _forcing(op: str, impl: str | Sequence[str] | None) -> tuple:
    """The forcing state for `op`: (requirement or None, where it came from, preference list, autotune setting)."""
    global _environment_checked
    if not _environment_checked:
        env.check_operator_variables(get_registry().operator_names())
        _environment_checked = True
    required, preferred, autotune = env.forcing_for(op)
    if required is not None:
        variable = env.op_variable(env.BACKEND, op)
        return _checked_names(required, variable), variable, (), autotune
    if impl is not None:
        return (
            _checked_names(impl if isinstance(impl, str) else tuple(impl), f"{op}: argument 'impl'"),
            "the impl= argument",
            (),
            autotune,
        )
    for names, scope_op in reversed(_scopes.get()):
        if scope_op is None or scope_op == op:
            return names, "use_backend(...)", (), autotune
    return None, "", _checked_names(preferred, env.BACKEND) if preferred else (), autotune


_checked: dict[tuple, tuple[str, ...]] = {}


def _checked_names(names: str | tuple[str, ...], what: str) -> tuple[str, ...]:
    """`normalise_backend_names`, memoised: environment values are checked once, not at every call."""
    checked = _checked.get((names, what))
    if checked is None:
        checked = _checked[(names, what)] = normalise_backend_names(names, what)
    return checked


# -- candidates ------------------------------------------------------------------------------------------------


def _describe_call(spec: OpSpec, inputs: tuple, attrs: dict) -> str:
    parts = []
    for input_spec, value in zip(spec.inputs, inputs):
        if isinstance(value, torch.Tensor):
            parts.append(f"{input_spec.name}={tuple(value.shape)} {value.dtype} on {value.device}")
        else:
            parts.append(f"{input_spec.name}={value!r}")
    changed = {k: v for k, v in attrs.items() if v != next(a.default for a in spec.attrs if a.name == k)}
    if changed:
        parts.append(", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return f"{spec.name}({', '.join(parts)})"


def _reasons(spec: OpSpec, backend_name: str, inputs: tuple, attrs: dict, forced: bool) -> list[str]:
    """Why `backend_name` cannot serve this call (empty list: it can)."""
    registry = get_registry()
    backend = registry.backends[backend_name]
    if spec.name not in backend.spec.kernels:
        return [f"it has no kernel for {spec.name}"]
    reasons = list(backend.unavailable_reasons())
    if reasons:
        return reasons
    tensors = spec.call_tensors(inputs)
    device = tensors[0].device if tensors else torch.device("cpu")
    devices = backend.spec.devices + (backend.spec.forced_only_devices if forced else ())
    if device.type not in devices:
        only_forced = device.type in backend.spec.forced_only_devices
        return [
            f"it does not serve {device.type} tensors"
            + (f" unless forced (e.g. LIGER_KERNEL_BACKEND_{spec.name.upper()}={backend_name})" if only_forced else "")
        ]
    try:
        kernel = registry.kernel(spec.name, backend_name)
    except ImportError as error:
        return [str(error)]
    forced_only = backend.spec.forced_only_devices if forced else ()
    return _kernel_reasons(spec, kernel, forced_only, device, inputs, attrs)


def _kernel_reasons(
    spec: OpSpec, kernel: KernelSpec, forced_only: tuple[str, ...], device: torch.device, inputs: tuple, attrs: dict
) -> list[str]:
    reasons = []
    if device.type not in kernel.devices and device.type not in forced_only:
        reasons.append(f"its {spec.name} kernel does not serve {device.type} tensors (serves {list(kernel.devices)})")
    tensors = spec.call_tensors(inputs)
    dtype = tensors[0].dtype if tensors else None
    allowed = kernel.dtypes if kernel.dtypes is not None else spec.dtypes
    if dtype is not None and dtype not in allowed:
        reasons.append(f"its {spec.name} kernel does not take {dtype} (takes {[str(d) for d in allowed]})")
    if kernel.min_capability is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < kernel.min_capability:
            reasons.append(f"it needs compute capability {kernel.min_capability}, this GPU has {capability}")
    if not reasons:
        try:
            reasons.extend(kernel.supports(inputs, attrs))
        except Exception as error:
            reasons.append(f"its supports() raised {type(error).__name__}: {error}")
    return reasons


def _require(spec: OpSpec, names: tuple[str, ...], source: str, inputs: tuple, attrs: dict) -> str:
    """The first of `names` that can serve this call; otherwise BackendUnavailableError with every reason."""
    registry = get_registry()
    all_reasons: dict[str, list[str]] = {}
    for name in names:
        if name not in registry.backends:
            failures = [msg for where, msg in registry.failures.items() if where.split(" ", 1)[0] == name]
            all_reasons[name] = [f"it failed to load: {failures[0] if failures else 'unknown error'}"]
            continue
        reasons = _reasons(spec, name, inputs, attrs, forced=True)
        if not reasons:
            return name
        all_reasons[name] = reasons
    raise _unavailable(spec, inputs, attrs, f"required by {source}", all_reasons)


def _unavailable(spec: OpSpec, inputs: tuple, attrs: dict, context: str, reasons: dict[str, list[str]]):
    lines = [f"no backend can serve {_describe_call(spec, inputs, attrs)} ({context}):"]
    for name, why in reasons.items():
        lines.append(f"  {name}: " + "; ".join(why))
    return BackendUnavailableError("\n".join(lines), reasons)


def _select(spec: OpSpec, inputs: tuple, attrs: dict, impl, tracing: bool) -> str:
    required, source, preferred, autotune = _forcing(spec.name, impl)
    memo_key = (spec.name, spec.key(inputs, attrs), required, preferred, autotune, tracing)
    chosen = _memo.get(memo_key)
    if chosen is not None:
        return chosen
    registry = get_registry()
    if required is not None:
        chosen = _require(spec, required, source, inputs, attrs)
    else:
        implementing = [
            name
            for name in preferred
            if name in registry.backends and spec.name in registry.backends[name].spec.kernels
        ]
        if implementing:
            chosen = _require(spec, tuple(implementing), env.BACKEND, inputs, attrs)
        else:
            chosen = _automatic(spec, inputs, attrs, tracing)
    _memo[memo_key] = chosen
    return chosen


def _automatic(spec: OpSpec, inputs: tuple, attrs: dict, tracing: bool) -> str:
    registry = get_registry()
    candidates, reasons = [], {}
    for name in registry.implementations(spec.name):
        why = _reasons(spec, name, inputs, attrs, forced=False)
        if why:
            reasons[name] = why
        else:
            candidates.append(name)
    if not candidates:
        raise _unavailable(spec, inputs, attrs, "automatic selection", reasons)
    if len(candidates) == 1:
        return candidates[0]
    tunable = [name for name in candidates if registry.backends[name].spec.autotune]
    if len(tunable) >= 2:
        from . import autotune

        tensors = spec.call_tensors(inputs)
        device = tensors[0].device if tensors else torch.device("cpu")
        setting = env.autotune_setting()
        if setting if setting is not None else device.type == "cuda":
            winner = autotune.choose(spec, tunable, inputs, attrs, device, may_time=not tracing and not _capturing())
            if winner is not None:
                return winner
    if len(tunable) == 1:
        return tunable[0]
    return candidates[0]  # implementations() is sorted by priority, then name


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _describe_for_tracing(value) -> tuple:
    """A call input as Python constants for the trace-time selection. Traced by Dynamo, which can hand over only
    constants: a tensor's dtype, device, number of dimensions, whether its last dimension is contiguous, and for
    floating-point tensors the size of that last dimension (a hidden or vocabulary size: specialising on it costs
    no recompilation in practice). Other sizes may be symbolic under torch.compile, so they are not passed."""
    if isinstance(value, torch.Tensor):
        last = _constant_while_tracing(value.shape[-1]) if value.dim() and value.is_floating_point() else -1
        last_contiguous = bool(value.dim() == 0 or value.stride(-1) == 1)
        return ("tensor", value.dtype, value.device, value.dim(), last, last_contiguous, value.requires_grad)
    return ("value", value)


def _stand_in(described: tuple):
    """A data-less (fake) tensor with the described metadata, its unknown sizes taken as 1; or the plain value."""
    if described[0] == "value":
        return described[1]
    _, dtype, device, dims, last, last_contiguous, requires_grad = described
    sizes = (1,) * max(dims - 1, 0) + ((max(last, 1),) if dims else ())
    strides = torch.empty(sizes, device="meta").stride()
    if not last_contiguous:
        strides = tuple(2 * s for s in strides[:-1]) + (2,)
    tensor = torch.empty_strided(sizes, strides, dtype=dtype, device=device)
    return tensor.requires_grad_(requires_grad) if tensor.is_floating_point() else tensor


def _constant_while_tracing(value):
    """`value`, a number made a constant of the trace. Under torch.compile(dynamic=True) Dynamo turns numbers it reads
    from objects (an operator's default eps, a module's epsilon, a tensor's size) into symbolic values, which the
    trace-time selection cannot take, and which the kernels need no more than constants. frexp makes Dynamo
    specialise the value (with a guard on it); ldexp gives the same number back exactly (ints below 2**53)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    exact = math.ldexp(*math.frexp(value))
    return exact if isinstance(value, float) else int(exact)


def _select_while_tracing(op: str, attrs: dict, impl, described: tuple) -> str:
    # Runs once at trace time, outside the trace; Dynamo bakes the returned name into the graph as a constant. It
    # gets metadata, not tensors: given a tensor, Dynamo would compute its real value, i.e. run the graph so far.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        inputs = tuple(_stand_in(item) for item in described)
        return _select(get_registry().operator(op), inputs, attrs, impl, tracing=True)


def _load_while_tracing(op: str) -> bool:
    """Import every operator spec and every kernel of the available backends, outside Dynamo's trace.

    Imports take locks Dynamo cannot trace. And Dynamo reads the registry's dicts once per trace: a kernel imported
    later in the same trace (by the selection, which runs outside it) would be missing from the traced view. So the
    first traced call of any operator loads everything that a compiled graph could need."""
    get_registry().operator(op)
    get_registry().load_everything()
    return True


# What torch.compiler.assume_constant_result does, without its import of torch._dynamo (a second at startup).
# tests/core/test_compile.py proves that Dynamo still treats the result as a constant.
_select_while_tracing._dynamo_marked_constant = True
_load_while_tracing._dynamo_marked_constant = True


def select_backend(op: str, *inputs, impl: str | Sequence[str] | None = None, **attrs) -> str:
    """The backend that `call(op, *inputs, **attrs)` would run now (for tools and tests)."""
    spec = get_registry().operator(op)
    inputs, attrs = spec.bind(inputs, attrs)
    return _select(spec, inputs, attrs, impl, tracing=False)


# -- running ---------------------------------------------------------------------------------------------------


def call(op: str, *inputs, impl: str | Sequence[str] | None = None, **attrs):
    """Run operator `op` on `inputs` with keyword `attrs` through the selected backend.

    Returns the single output, or a tuple when the operator has several (``None`` for outputs not asked for).
    """
    if torch.compiler.is_compiling():
        _load_while_tracing(op)
    spec = get_registry().operator(op)
    inputs, attrs = spec.bind(inputs, attrs)
    if torch.compiler.is_compiling():
        attrs = {name: _constant_while_tracing(value) for name, value in attrs.items()}
        backend = _select_while_tracing(op, attrs, impl, tuple(_describe_for_tracing(v) for v in inputs))
    else:
        backend = _select(spec, inputs, attrs, impl, tracing=False)
    outputs = run_kernel(spec, backend, inputs, attrs)
    return outputs[0] if len(outputs) == 1 else outputs


def _autocast_off(inputs: tuple):
    """A context that turns autocast off for the device of the first tensor input while a kernel runs, or a null
    context when it is not on. An operator computes in its inputs' dtypes (its spec's dtype rules); under autocast the
    torch ops inside some kernels would otherwise run in another dtype than the one they allocated for (a chunk
    product in bf16 written into an fp32 buffer fails) and backends would disagree."""
    for value in inputs:
        if isinstance(value, torch.Tensor):
            device_type = value.device.type
            if torch.is_autocast_enabled(device_type):
                return torch.autocast(device_type, enabled=False)
            break
    return contextlib.nullcontext()


def run_kernel(spec: OpSpec, backend: str, inputs: tuple, attrs: dict) -> tuple:
    """Run one backend's kernel, with autocast off (`_autocast_off`): directly when no gradient is needed, when autograd
    differentiates its forward, or when its forward records its own autograd node (`eager_autograd`, outside
    torch.compile); otherwise through the generic autograd bridge that calls its backward."""
    kernel = get_registry().kernel(spec.name, backend)
    needs_grad = torch.is_grad_enabled() and any(
        inputs[i] is not None and inputs[i].requires_grad for i in spec.differentiable_inputs
    )
    with _autocast_off(inputs):
        records_own_graph = kernel.eager_autograd and not torch.compiler.is_compiling()
        if kernel.backward is None or not needs_grad or records_own_graph:
            outputs, _ = kernel.forward(inputs, attrs, needs_grad)
            return tuple(outputs)
        return KernelFunction.apply(spec.name, backend, tuple(attrs.values()), *inputs)


class KernelFunction(torch.autograd.Function):
    """The one autograd bridge: forward runs a kernel's `forward`, backward its `backward`."""

    @staticmethod
    def forward(ctx, op: str, backend: str, attr_values: tuple, *inputs):
        registry = get_registry()
        spec = registry.operator(op)
        kernel = registry.kernel(op, backend)
        attrs = dict(zip((a.name for a in spec.attrs), attr_values))
        outputs, saved = kernel.forward(inputs, attrs, True)
        saved = tuple(saved) if isinstance(saved, (tuple, list)) else (saved,)
        # Tensors go through save_for_backward so autograd's version checks cover them.
        ctx.save_for_backward(*(item for item in saved if isinstance(item, torch.Tensor)))
        ctx.saved_layout = tuple(None if isinstance(item, torch.Tensor) else item for item in saved)
        ctx.tensor_slots = tuple(isinstance(item, torch.Tensor) for item in saved)
        ctx.op, ctx.backend, ctx.input_count = op, backend, len(inputs)
        ctx.set_materialize_grads(False)
        non_differentiable = [
            out
            for out, out_spec in zip(outputs, spec.outputs)
            if isinstance(out, torch.Tensor) and not out_spec.differentiable
        ]
        if non_differentiable:
            ctx.mark_non_differentiable(*non_differentiable)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        registry = get_registry()
        spec = registry.operator(ctx.op)
        kernel = registry.kernel(ctx.op, ctx.backend)
        tensors = iter(ctx.saved_tensors)
        saved = tuple(
            next(tensors) if is_tensor else item for is_tensor, item in zip(ctx.tensor_slots, ctx.saved_layout)
        )
        with _autocast_off(grad_outputs):  # a backward run inside an autocast region (the CPU's engine thread)
            grads = kernel.backward(saved, grad_outputs)
        full: list = [None] * ctx.input_count
        for index, grad in zip(spec.differentiable_inputs, grads):
            full[index] = grad
        return (None, None, None, *full)
