"""Choosing between several kernels that can serve a call by timing them.

On a miss, each candidate's forward+backward runs on clones of the real inputs (this first call synchronises: the
one allowed exception to "no host sync"); the winner is kept in memory and in a JSON file under
``LIGER_KERNEL_CACHE_DIR``, named by a fingerprint of the software versions and the GPU, so later processes reuse it.
The file is updated read-merge-write under a lock, then renamed into place atomically.

While tracing for torch.compile or capturing a CUDA graph nothing is timed: a cached winner is used if there is
one, else the dispatcher falls back to priority (and does not memoise that under the eager key).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from . import env
from .registry import get_registry
from .spec import OpSpec

FILE_FORMAT = 1
_decisions: dict[str, dict] = {}  # decision key -> record, for this process
_loaded_files: set[Path] = set()
_lock = threading.Lock()
# Statistics of this process, for benchmarks and `liger-kernel info --autotune`.
tuning_seconds = 0.0


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def fingerprint_fields(device: torch.device) -> dict[str, str]:
    """Everything that can change which kernel is fastest: our version, every backend's, torch, triton, CUDA, GPU."""
    registry = get_registry()
    fields = {
        "liger-core": _version("liger-core"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": str(torch.version.cuda),
        "device": device_name(device),
    }
    for name, backend in sorted(registry.backends.items()):
        fields[f"backend:{name}"] = f"{backend.distribution}=={backend.spec.version}"
    return fields


def fingerprint(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cache_file(device: torch.device) -> Path:
    return env.cache_dir() / f"autotune-{fingerprint(fingerprint_fields(device))}.json"


def decision_key(op: str, device: torch.device, key: tuple, candidates: list[str]) -> str:
    # repr of the key is stable: ints, strings, bools, None and torch dtypes ("torch.bfloat16").
    return repr((op, device_name(device), key, tuple(sorted(candidates))))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not on POSIX: the atomic rename still keeps the file whole
            pass
        yield


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        return {}
    return data.get("decisions", {})


def _load(path: Path) -> None:
    if path not in _loaded_files:
        _loaded_files.add(path)
        for k, record in _read(path).items():
            _decisions.setdefault(k, record)


def _store(path: Path, device: torch.device, k: str, record: dict) -> None:
    try:
        with _file_lock(path):
            decisions = _read(path)
            decisions[k] = record
            payload = {"format": FILE_FORMAT, "fingerprint": fingerprint_fields(device), "decisions": decisions}
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                json.dump(payload, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)
    except OSError as error:  # a read-only home must not stop training: keep the decision in memory
        warnings.warn(f"liger_kernel: could not write the autotune cache {path}: {error}", RuntimeWarning, stacklevel=2)


def lookup(spec: OpSpec, candidates: list[str], inputs: tuple, attrs: dict, device: torch.device) -> str | None:
    k = decision_key(spec.name, device, spec.key(inputs, attrs), candidates)
    with _lock:
        _load(cache_file(device))
        record = _decisions.get(k)
    return record["winner"] if record and record.get("winner") in candidates else None


def choose(
    spec: OpSpec, candidates: list[str], inputs: tuple, attrs: dict, device: torch.device, may_time: bool
) -> str | None:
    """The fastest of `candidates` for this call: remembered, or timed now when `may_time`; None if neither."""
    winner = lookup(spec, candidates, inputs, attrs, device)
    if winner is not None or not may_time:
        return winner
    global tuning_seconds
    started = time.perf_counter()
    times, failures = {}, {}
    for name in candidates:
        try:
            times[name] = time_kernel(spec, name, inputs, attrs, device)
        except Exception as error:  # a candidate that cannot run here must not take the user's call down with it
            failures[name] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"liger_kernel: autotuning {spec.name}: backend {name!r} failed and is left out of this decision: "
                f"{failures[name]}",
                RuntimeWarning,
                stacklevel=2,
            )
    tuning_seconds += time.perf_counter() - started
    if not times:
        raise RuntimeError(f"liger_kernel: autotuning {spec.name}: every candidate failed: {failures}")
    winner = min(times, key=lambda name: (times[name], candidates.index(name)))
    record = {
        "op": spec.name,
        "device": device_name(device),
        "key": repr(spec.key(inputs, attrs)),
        "candidates": sorted(candidates),
        "times_ms": {name: round(t * 1e3, 6) for name, t in times.items()},
        "failed": failures,
        "winner": winner,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    k = decision_key(spec.name, device, spec.key(inputs, attrs), candidates)
    with _lock:
        _decisions[k] = record
    _store(cache_file(device), device, k, record)
    return winner


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


BURST = 4  # forward+backward steps per timed measurement


def time_kernel(spec: OpSpec, backend: str, inputs: tuple, attrs: dict, device: torch.device) -> float:
    """Median seconds of one forward+backward of `backend`'s kernel on clones of `inputs`."""
    from .dispatch import run_kernel

    clones = tuple(_clone(v) for v in inputs)
    differentiable = [v for v in clones if isinstance(v, torch.Tensor) and v.requires_grad]

    def step() -> None:
        outputs = run_kernel(spec, backend, clones, attrs)
        pairs = [
            (out, torch.ones_like(out))
            for out, out_spec in zip(outputs, spec.outputs)
            if out_spec.differentiable and isinstance(out, torch.Tensor) and out.requires_grad
        ]
        if pairs and differentiable:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs], inputs=differentiable)
            for v in differentiable:
                v.grad = None

    def timed() -> float:
        # BURST steps back to back between two marks: the host runs ahead of the GPU as in a training loop, so the
        # figure is the throughput of whichever side limits (host launch overhead on small shapes, the GPU on large
        # ones), not the latency of one isolated step, which would add the two and mis-rank the backends.
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(BURST):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / BURST
        started = time.perf_counter()
        for _ in range(BURST):
            step()
        return (time.perf_counter() - started) / BURST

    step()  # warm-up: compiles kernels, fills allocator caches
    first = timed()
    # About 50 ms of measurement, at least 3 and at most 40 bursts.
    repetitions = max(3, min(40, int(0.05 / max(first * BURST, 1e-6))))
    return statistics.median([first] + [timed() for _ in range(repetitions - 1)])


def cached_decisions(device: torch.device | None = None) -> list[dict]:
    """Every decision in memory and in the cache file of `device` (default: the current GPU, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with _lock:
        _load(cache_file(device))
        return [dict(record) for record in _decisions.values()]


def forget() -> None:
    """Drop the in-memory decisions (tests; the files stay)."""
    global tuning_seconds
    with _lock:
        _decisions.clear()
        _loaded_files.clear()
        tuning_seconds = 0.0
