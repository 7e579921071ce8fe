"""The conformance check: does a backend's kernel compute what the reference backend computes?

Truth is the operator's reference kernel run in float64 (float32 where float64 is not defined). A kernel passes when,
for every output and every gradient, its largest error against the truth is at most twice the reference kernel's
own error at the same dtype plus a small floor (scaled by the size of the values). Gradients are taken against fresh
random upstream gradients, so a kernel cannot pass by getting only ``sum()`` right.

Plugin authors call it in one line from their tests::

    from liger_core.testing import assert_conforms, assert_conforms_all, clean_state
    assert_conforms("rms_norm", "mybackend", torch.bfloat16, device="cuda", size="small")
    assert_conforms_all("rms_norm", "mybackend", device="cuda")  # every dtype and case the operator lists

and isolate each test with ``clean_state`` (no forcing variable, an empty selection memo, its own autotune cache).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import autotune, dispatch
from .dispatch import call, run_kernel
from .registry import get_registry

_WIDE = {torch.float32, torch.float16, torch.bfloat16}


@dataclass
class Comparison:
    name: str
    error: float  # largest absolute error of the kernel against the truth
    reference_error: float  # the same for the reference kernel at the tested dtype
    allowed: float
    exact: bool = False  # integer outputs must match the reference exactly

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed


@dataclass
class ConformanceResult:
    op: str
    backend: str
    dtype: torch.dtype
    attrs: dict
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def report(self) -> str:
        lines = [f"{self.op} on {self.backend}, {self.dtype}, attrs {self.attrs}:"]
        for c in self.comparisons:
            verdict = "ok" if c.passed else "FAIL"
            lines.append(
                f"  {verdict:4} {c.name}: error {c.error:.3g}, allowed {c.allowed:.3g} "
                f"(reference's own error {c.reference_error:.3g})"
            )
        return "\n".join(lines)


def _widen(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype in _WIDE:
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def _run(op: str, backend: str, inputs: tuple, attrs: dict, grad_seed: int, through_dispatch: bool):
    """Outputs and gradients (w.r.t. the differentiable inputs that require grad) of one kernel."""
    spec = get_registry().operator(op)
    if through_dispatch:  # the candidate goes through forcing, so selection and the bridge are tested too
        outputs = call(op, *inputs, impl=backend, **attrs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    else:
        outputs = run_kernel(spec, backend, inputs, attrs)
    wrt = [
        inputs[i] for i in spec.differentiable_inputs if isinstance(inputs[i], torch.Tensor) and inputs[i].requires_grad
    ]
    pairs = []
    generator = torch.Generator().manual_seed(grad_seed)
    for out, out_spec in zip(outputs, spec.outputs):
        if out_spec.differentiable and isinstance(out, torch.Tensor) and out.requires_grad:
            upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
            pairs.append((out, upstream))
    grads: list = []
    if pairs and wrt:
        grads = list(torch.autograd.grad([p[0] for p in pairs], wrt, [p[1] for p in pairs], allow_unused=True))
    names = [
        spec.inputs[i].name
        for i in spec.differentiable_inputs
        if isinstance(inputs[i], torch.Tensor) and inputs[i].requires_grad
    ]
    results = {f"output {s.name}": o for s, o in zip(spec.outputs, outputs)}
    results.update({f"grad {n}": g for n, g in zip(names, grads)})
    return results


def _max_error(a, b) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    return float(diff.max()) if diff.numel() else 0.0


def check_conformance(
    op: str,
    backend: str,
    dtype: torch.dtype,
    *,
    device: str | torch.device = "cpu",
    size: str = "tiny",
    seed: int = 0,
    attrs: dict | None = None,
    floor: float | None = None,
) -> ConformanceResult:
    """Compare `backend`'s kernel for `op` with the reference on fresh random inputs; see the module docstring."""
    spec = get_registry().operator(op)
    inputs, made_attrs = spec.make_inputs(device, dtype, size, seed, **(attrs or {}))
    inputs, attrs = spec.bind(
        tuple(
            v.requires_grad_(True)
            if isinstance(v, torch.Tensor) and i in spec.differentiable_inputs and v.is_floating_point()
            else v
            for i, v in enumerate(inputs)
        ),
        made_attrs,
    )
    reference = spec.reference_backend
    reference_kernel = get_registry().kernel(op, reference)
    truth_dtype = (
        torch.float64 if reference_kernel.dtypes is None or torch.float64 in reference_kernel.dtypes else torch.float32
    )
    grad_seed = seed + 1
    truth = _run(op, reference, tuple(_widen(v, truth_dtype) for v in inputs), attrs, grad_seed, False)
    at_dtype = _run(op, reference, tuple(_widen(v, dtype) for v in inputs), attrs, grad_seed, False)
    candidate = _run(op, backend, tuple(_widen(v, dtype) for v in inputs), attrs, grad_seed, True)
    floor = spec.error_floor.get(dtype, 1e-5) if floor is None else floor

    result = ConformanceResult(op, backend, dtype, dict(attrs))
    for name, expected in truth.items():
        got = candidate.get(name)
        if isinstance(expected, torch.Tensor) and not expected.is_floating_point():
            # Integer outputs (predicted classes) must equal the reference's at the same dtype.
            error = _max_error(got, at_dtype[name])
            result.comparisons.append(Comparison(name, error, 0.0, 0.0, exact=True))
            continue
        reference_error = _max_error(at_dtype[name], expected)
        magnitude = expected.detach().double().abs().nan_to_num() if expected is not None else None
        scale = 1.0 + (float(magnitude.max()) if magnitude is not None and magnitude.numel() else 0.0)
        error = _max_error(got, expected)
        result.comparisons.append(Comparison(name, error, reference_error, 2 * reference_error + floor * scale))
    return result


def assert_conforms(op: str, backend: str, dtype: torch.dtype, **kwargs) -> ConformanceResult:
    """`check_conformance`, raising AssertionError with a per-output report when the kernel does not conform."""
    result = check_conformance(op, backend, dtype, **kwargs)
    if not result.passed:
        raise AssertionError(result.report())
    return result


def declines(
    op: str, backend: str, dtype: torch.dtype, *, device: str | torch.device = "cpu", size: str = "tiny", attrs=None
) -> list[str]:
    """Why `backend` would not serve `op` on the inputs `check_conformance` makes for these arguments (empty when
    it serves them): availability, device, dtype, capability and the kernel's own ``supports``."""
    spec = get_registry().operator(op)
    inputs, made_attrs = spec.make_inputs(device, dtype, size, 0, **(attrs or {}))
    return dispatch._reasons(spec, backend, *spec.bind(inputs, made_attrs), forced=True)


def assert_conforms_all(
    op: str, backend: str, *, dtypes=None, device: str | torch.device = "cpu", size: str = "tiny", seed: int = 0
) -> list[tuple[torch.dtype, dict, list[str]]]:
    """`assert_conforms` for every dtype (default: the operator's) and every case the operator lists. Cases the
    backend declines are not run: they are returned as (dtype, case, reasons), for the caller to check that it
    declines exactly what it means to. Raises AssertionError on the first case that does not conform."""
    spec = get_registry().operator(op)
    declined = []
    for dtype in dtypes or spec.dtypes:
        for case in spec.cases:
            reasons = declines(op, backend, dtype, device=device, size=size, attrs=case)
            if reasons:
                declined.append((dtype, case, reasons))
            else:
                assert_conforms(op, backend, dtype, device=device, size=size, seed=seed, attrs=case)
    return declined


@contextlib.contextmanager
def clean_state(cache_dir: str | os.PathLike) -> Iterator[None]:
    """A test's isolation: no LIGER_KERNEL_* variable (they are restored afterwards), the autotune cache in
    `cache_dir`, an empty selection memo and no remembered autotune decision, before and after."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("LIGER_KERNEL_")}
    for name in saved:
        del os.environ[name]
    os.environ["LIGER_KERNEL_CACHE_DIR"] = str(Path(cache_dir))
    dispatch.clear_memo()
    autotune.forget()
    try:
        yield
    finally:
        dispatch.clear_memo()
        autotune.forget()
        for name in [name for name in os.environ if name.startswith("LIGER_KERNEL_")]:
            del os.environ[name]
        os.environ.update(saved)
