"""Building, caching and loading the CUDA extension (csrc/), once per machine and once per process.

The extension is compiled on first use by ``torch.utils.cpp_extension.load`` (ninja, nvcc), for the architectures of
the visible GPUs themselves (``sm_90`` on an H100/H200, never PTX for an older one), into a folder of
``LIGER_KERNEL_CACHE_DIR`` (default ``~/.cache/liger_kernel``) named by a hash of the sources, the torch version, its
CUDA version, the nvcc that compiles, the Python version and the architectures: later processes load the built
library in well under a second, and any change to one of those builds afresh beside it.

A build failure is recorded once: the compiler's output goes to ``build-failed.log`` in that folder, and from then on
this process and every later one report the backend unavailable with that reason instead of compiling again (delete
the log to retry). Every other backend keeps working.

Importing this module builds nothing; `load` does, and `problems` (the backend's ``available()``) calls it only when
every cheaper requirement is met.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

from liger_core import env

CSRC = Path(__file__).resolve().parent / "csrc"
# One .cu per operator (swiglu and geglu share gated.cuh, rms_norm and layer_norm norm_rows.cuh) and the binding,
# compiled in parallel by ninja.
SOURCES = (
    "bindings.cpp",
    "rms_norm.cu",
    "layer_norm.cu",
    "rope.cu",
    "swiglu.cu",
    "geglu.cu",
    "cross_entropy.cu",
    "embedding.cu",
)
HEADERS = ("liger_cuda.h", "common.cuh", "gated.cuh", "norm_rows.cuh")
# Volta and newer: the kernels use warp shuffles with masks and 16-byte vector accesses; bf16 is converted in
# software below sm_80. (CUDA 13's nvcc itself starts at sm_75; an older GPU then fails to build, with the reason.)
MIN_CAPABILITY = (7, 0)
# No --use_fast_math: it would flush denormals and approximate every division, tanh and exp. The kernels call the
# fast intrinsics themselves where the accuracy allows (__expf on arguments <= 0 in cross_entropy, rsqrtf).
# The C++ standard is torch's choice (C++17 or C++20 by version); the sources are valid in both.
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3",)
FAILURE_LOG = "build-failed.log"

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_module = None  # the loaded extension
_failures: dict[str, str] = {}  # build key -> why it cannot be built, for this process


class BuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; the message says why and where the log is."""


def nvcc_path() -> str | None:
    """The nvcc that torch's build would run: under CUDA_HOME (or CUDA_PATH) when set, else the one on PATH."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.exists(candidate):
                return candidate
    return shutil.which("nvcc")


def ninja_available() -> bool:
    """torch's build runs ``ninja`` from PATH (the pip package ``ninja`` puts one there)."""
    return shutil.which("ninja") is not None


@lru_cache(maxsize=4)
def nvcc_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else out.strip()


def capabilities() -> list[tuple[int, int]]:
    import torch

    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def arch_flags(caps: list[tuple[int, int]]) -> list[str]:
    """``-gencode`` for each architecture's own machine code (so torch adds no flags of its own)."""
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}" for major, minor in caps]


def build_key(caps: list[tuple[int, int]], nvcc: str) -> str:
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    facts = (
        torch.__version__,
        str(torch.version.cuda),
        os.path.realpath(nvcc),
        nvcc_version(nvcc),
        f"{sys.version_info.major}.{sys.version_info.minor}",
        " ".join(CXX_FLAGS + NVCC_FLAGS),
        " ".join(arch_flags(caps)),
    )
    digest.update("\n".join(facts).encode())
    return digest.hexdigest()[:16]


def build_directory(key: str) -> Path:
    return env.cache_dir() / "cuda_extension" / f"liger_cuda_{key}"


def problems() -> list[str]:
    """Why the CUDA backend cannot serve on this machine, most basic first; empty when the extension is loaded.

    Builds the extension (or loads the cached build) when everything else is in place, so that a failing build makes
    the backend unavailable before any call is routed to it."""
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is built without CUDA")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    nvcc = nvcc_path()
    if nvcc is None:
        reasons.append("nvcc (the CUDA compiler, needed to build the CUDA kernels) is not on PATH nor under CUDA_HOME")
    if not ninja_available():
        reasons.append("ninja (torch builds the CUDA kernels with it) is not on PATH: pip install ninja")
    if reasons:
        return reasons
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(index)
            reasons.append(
                f"GPU {index} ({name}) has compute capability {capability[0]}.{capability[1]}; the CUDA kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Volta) or newer"
            )
    if reasons:
        return reasons
    try:
        load()
    except BuildError as error:
        return [str(error)]
    return []


def module():
    """The loaded extension (building it on first use); raises BuildError."""
    loaded = _module
    return loaded if loaded is not None else load()


def load():
    global _module
    with _lock:
        if _module is not None:
            return _module
        nvcc = nvcc_path()
        if nvcc is None:
            raise BuildError("nvcc (the CUDA compiler) is not on PATH nor under CUDA_HOME")
        caps = capabilities()
        key = build_key(caps, nvcc)
        if key in _failures:
            raise BuildError(_failures[key])
        directory = build_directory(key)
        log = directory / FAILURE_LOG
        if log.exists():
            _failures[key] = _failure_reason(log, earlier=True)
            raise BuildError(_failures[key])
        name = f"liger_cuda_{key}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob(f"{name}*.so")):
                logger.warning(
                    "liger_kernel: building the CUDA kernels for %s into %s (once per machine; a minute or two)",
                    ", ".join(f"sm_{a}{b}" for a, b in caps),
                    directory,
                )
            _module = _compile(name, directory, caps)
        except Exception as error:  # the compiler's output is in the message of torch's RuntimeError
            try:
                log.write_text(f"{type(error).__name__}: {error}\n")
                _failures[key] = _failure_reason(log, earlier=False)
            except OSError:
                _failures[key] = f"building the CUDA extension failed: {_tail(str(error))}"
            raise BuildError(_failures[key]) from error
        return _module


def _compile(name: str, directory: Path, caps: list[tuple[int, int]]):
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / source) for source in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS) + arch_flags(caps),
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        verbose=False,
    )


def _tail(text: str, lines: int = 12) -> str:
    """The compiler's error lines (or the last lines), for a one-paragraph reason."""
    all_lines = [line for line in text.splitlines() if line.strip()]
    errors = [line.strip() for line in all_lines if "error" in line.lower()]
    chosen = errors[:lines] if errors else [line.strip() for line in all_lines[-lines:]]
    return " | ".join(chosen)


def _failure_reason(log: Path, earlier: bool) -> str:
    when = "an earlier build" if earlier else "building"
    return (
        f"{when} of the CUDA extension failed ({_tail(log.read_text(errors='replace'))}); the full compiler output is "
        f"in {log} (delete it to try again)"
    )
