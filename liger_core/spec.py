"""The three contracts of the framework: an operator (`OpSpec`), one operator in one backend (`KernelSpec`) and a
backend (`BackendSpec`). They are frozen pydantic models, so a malformed specification from a plugin fails when it
is loaded, with a message that names the field, instead of deep inside a training step.

Conventions shared by every kernel:

- ``inputs`` is a tuple in the order the OpSpec declares; an optional tensor is ``None`` when absent.
- ``attrs`` is a dict holding every declared attribute, defaults filled in.
- ``forward(inputs, attrs, needs_grad) -> (outputs, saved)``: ``outputs`` a tuple in declared order (``None`` for an
  output not asked for), ``saved`` anything ``backward`` needs (tensors in it are saved for backward properly).
- ``backward(saved, grad_outputs) -> grads``: one entry per *differentiable* input, in declared order, ``None``
  where there is none; ``grad_outputs`` has one entry per output, ``None`` for outputs without a gradient.
  ``backward=None`` means autograd differentiates through ``forward`` (the reference backend's way).
- ``supports(inputs, attrs) -> list[str]``: empty when the kernel can serve the call, else reasons a person can
  read. It looks at metadata only (shapes, strides, dtypes, attributes), never at the data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import SpecError

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
REFERENCE_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SIZES = ("tiny", "small", "llama8b")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ATTR_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "dtype": (torch.dtype,),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")


class InputSpec(_Frozen):
    """One positional input of an operator."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["tensor", "optional_tensor", "int"] = "tensor"
    differentiable: bool = False

    @model_validator(mode="after")
    def _int_inputs_are_not_differentiable(self) -> InputSpec:
        if self.kind == "int" and self.differentiable:
            raise ValueError(f"input {self.name!r} is an int and cannot be differentiable")
        return self


class AttrSpec(_Frozen):
    """One keyword attribute: a Python scalar, string or dtype, never a tensor."""

    name: str = Field(pattern=NAME_PATTERN)
    type: Literal["bool", "int", "float", "str", "dtype"]
    default: Any = None
    optional: bool = False  # whether None is allowed
    choices: tuple[Any, ...] | None = None

    def check(self, op: str, value: Any) -> Any:
        """Return the value (ints widened to float for float attributes) or raise a clear error."""
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{op}: argument {self.name!r} must not be None")
        allowed = _ATTR_TYPES[self.type]
        # bool is an int in Python; an int attribute given True is almost certainly a mistake.
        if not isinstance(value, allowed) or (self.type in ("int", "float") and isinstance(value, bool)):
            raise TypeError(f"{op}: argument {self.name!r} must be {self.type}, got {type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{op}: argument {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        return float(value) if self.type == "float" else value


class OutputSpec(_Frozen):
    name: str = Field(pattern=NAME_PATTERN)
    differentiable: bool = True


class OpSpec(_Frozen):
    """An operator: its signature, its backend-independent checks, its selection key and its test inputs."""

    name: str = Field(pattern=NAME_PATTERN)
    inputs: tuple[InputSpec, ...]
    attrs: tuple[AttrSpec, ...] = ()
    outputs: tuple[OutputSpec, ...]
    # check(inputs, attrs): raises ValueError/TypeError naming the argument; metadata only.
    check: Callable[[tuple, dict], None] | None = None
    # key_fn(inputs, attrs) -> tuple of hashables: everything any kernel's `supports` reads, shapes bucketed.
    key_fn: Callable[[tuple, dict], tuple]
    # make_inputs_fn(device, dtype, size, seed, **attrs) -> (inputs, attrs) with fresh random data.
    make_inputs_fn: Callable[..., tuple[tuple, dict]]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    # Attribute sets (passed to make_inputs) that the conformance suite runs for every backend.
    cases: tuple[dict[str, Any], ...] = ({},)
    reference_backend: str = "reference"
    # Conformance: an error at most twice the reference kernel's own error at that dtype plus this floor passes.
    error_floor: dict[torch.dtype, float] = Field(
        default_factory=lambda: {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-10}
    )

    def model_post_init(self, context: Any) -> None:
        # Derived once, so that binding a call only checks the attributes the caller passed. Kept in the instance
        # __dict__ rather than as pydantic private attributes: torch.compile traces plain attribute reads, not
        # pydantic's __getattr__.
        self.__dict__["_attr_specs"] = {a.name: a for a in self.attrs}
        self.__dict__["_defaults"] = {a.name: a.check(self.name, a.default) for a in self.attrs}
        self.__dict__["_differentiable"] = tuple(i for i, spec in enumerate(self.inputs) if spec.differentiable)

    @model_validator(mode="after")
    def _names_are_unique(self) -> OpSpec:
        names = [i.name for i in self.inputs] + [a.name for a in self.attrs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"operator {self.name!r}: argument names used twice: {duplicates}")
        if len({o.name for o in self.outputs}) != len(self.outputs):
            raise ValueError(f"operator {self.name!r}: output names must be unique")
        return self

    @property
    def differentiable_inputs(self) -> tuple[int, ...]:
        return self._differentiable

    def call_tensors(self, inputs: tuple) -> list[torch.Tensor]:
        """The tensors of a call, differentiable ones first: the first one sets the call's dtype and device."""
        order = sorted(range(len(self.inputs)), key=lambda i: not self.inputs[i].differentiable)
        return [inputs[i] for i in order if isinstance(inputs[i], torch.Tensor)]

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Map a call's positional inputs and keyword attributes onto this signature, defaults filled in, and run
        every backend-independent check. Raises TypeError/ValueError naming the offending argument."""
        if len(args) != len(self.inputs):
            expected = ", ".join(i.name for i in self.inputs)
            raise TypeError(f"{self.name}: expected {len(self.inputs)} inputs ({expected}), got {len(args)}")
        for spec, value in zip(self.inputs, args):
            if spec.kind == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError(f"{self.name}: argument {spec.name!r} must be an int, got {type(value).__name__}")
            elif value is None:
                if spec.kind == "tensor":
                    raise TypeError(f"{self.name}: argument {spec.name!r} must be a tensor, got None")
            elif not isinstance(value, torch.Tensor):
                raise TypeError(f"{self.name}: argument {spec.name!r} must be a tensor, got {type(value).__name__}")
        attrs = dict(self._defaults)
        for name, value in kwargs.items():
            attr = self._attr_specs.get(name)
            if attr is None:
                unknown = sorted(set(kwargs) - set(self._attr_specs))
                raise TypeError(f"{self.name}: unknown arguments {unknown}; accepted: {list(self._attr_specs)}")
            attrs[name] = attr.check(self.name, value)
        if self.check is not None:
            self.check(args, attrs)
        return tuple(args), attrs

    def key(self, inputs: tuple, attrs: dict) -> tuple:
        return self.key_fn(inputs, attrs)

    def make_inputs(self, device: str | torch.device, dtype: torch.dtype, size: str = "tiny", seed: int = 0, **attrs):
        if size not in SIZES:
            raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
        return self.make_inputs_fn(torch.device(device), dtype, size, seed, **attrs)


def _no_reasons(inputs: tuple, attrs: dict) -> list[str]:
    return []


class KernelSpec(_Frozen):
    """One operator implemented by one backend."""

    op: str = Field(pattern=NAME_PATTERN)
    forward: Callable[[tuple, dict, bool], tuple[tuple, Any]]
    backward: Callable[[Any, tuple], tuple] | None = None
    supports: Callable[[tuple, dict], list[str]] = _no_reasons
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype the operator defines
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (8, 0)
    mutates: tuple[str, ...] = ()  # inputs it may write into, only under API.md's in-place rule
    # When gradients are needed outside torch.compile, `forward` itself records the autograd node (a C++ autograd
    # function: the backward then runs without Python) and the dispatcher calls it directly. Under torch.compile the
    # generic bridge runs `forward` (grad mode off there, so it returns its saved state) and `backward` as usual.
    eager_autograd: bool = False


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: `t` itself when it already has it, else ``t.to(dtype)``. A kernel with a `backward` returns its
    outputs through this rather than a bare ``.to(dtype)``: under torch.compile on torch 2.11, an output made by a
    ``.to`` that changed nothing reaches the bridge's `backward` with a gradient of 0, and every input gradient comes
    out 0 (torch 2.13 is not affected)."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_reference(value: str, what: str) -> str:
    if not REFERENCE_PATTERN.match(value):
        raise ValueError(f"{what} must look like 'package.module:attribute', got {value!r}")
    return value


class BackendSpec(_Frozen):
    """A backend as registered under the entry-point group ``liger_kernel.backends``."""

    name: str = Field(pattern=NAME_PATTERN)
    priority: int = 50  # lower wins
    kernels: dict[str, str] = Field(default_factory=dict)  # op -> "module:attr" of a KernelSpec, imported lazily
    operators: dict[str, str] = Field(default_factory=dict)  # new op -> "module:attr" of an OpSpec, imported lazily
    # available() -> reasons this backend cannot serve anything on this machine (empty: it can).
    available: Callable[[], list[str]] = lambda: []
    version: str = "0"
    autotune: bool = True
    # Devices it can serve automatically; its kernels may narrow this further.
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Devices served only when the backend is forced, e.g. the CPU through Triton's interpreter.
    forced_only_devices: tuple[str, ...] = ()

    @field_validator("kernels", "operators")
    @classmethod
    def _references_are_well_formed(cls, mapping: dict[str, str]) -> dict[str, str]:
        for op, reference in mapping.items():
            if not re.match(NAME_PATTERN, op):
                raise ValueError(f"operator name {op!r} must match {NAME_PATTERN}")
            _check_reference(reference, f"the reference for operator {op!r}")
        return mapping


def import_reference(reference: str, expected: type, what: str) -> Any:
    """Import ``"module:attr"`` and check the object's type; errors name the reference and `what` wanted it."""
    import importlib

    module_name, _, attr_path = reference.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, expected) and not isinstance(obj, type):
        obj = obj()  # a zero-argument factory
    if not isinstance(obj, expected):
        raise SpecError(f"{what}: {reference!r} is a {type(obj).__name__}, expected a {expected.__name__}")
    return obj
