"""The cuda backend where nothing it builds can run (CI's CPU machines):

- every CUDA source compiles with nvcc to an object for sm_90, and the binding compiles against torch's headers
  (nvcc is installed on CI: a broken kernel fails CI rather than a user's first run);
- ``available()`` says exactly why the backend cannot serve, for every reason it knows, and a failed build is
  recorded once, with the compiler's output, and then reported instead of rebuilt;
- the kernels of all seven operators are registered and import without building anything.

The kernels themselves run on a GPU: ``python -m pytest -m gpu tests/conformance -k cuda`` and ``tests/gpu``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from liger_backends.cuda import _extension

import liger_core
from liger_core.registry import get_registry

OPERATORS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "embedding")
CSRC = _extension.CSRC
# What torch.utils.cpp_extension passes nvcc besides the architecture (COMMON_NVCC_FLAGS), and our own flags.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


# -- registration -------------------------------------------------------------------------------------------------


def test_kernels_of_all_seven_operators_are_registered_and_import_without_building():
    registry = get_registry()
    backend = registry.backends["cuda"]
    assert backend.first_party
    assert backend.spec.priority == 20
    assert set(backend.spec.kernels) == set(OPERATORS)
    for op in OPERATORS:
        assert "cuda" in registry.implementations(op)
        kernel = registry.kernel(op, "cuda")
        assert kernel.op == op
        assert kernel.backward is not None
        assert kernel.devices == ("cuda",)
        assert kernel.dtypes == (torch.float32, torch.bfloat16, torch.float16)
        assert kernel.min_capability == (7, 0)
    assert _extension._module is None  # importing the kernels built nothing


def test_fake_implementations_give_the_outputs_metadata():
    # What torch.compile traces: each extension entry point is a liger_cuda:: custom op with a fake implementation.
    from liger_backends.cuda import _gated, cross_entropy, embedding, layer_norm, rms_norm, rope

    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(6, 32, dtype=torch.bfloat16)
        y, rstd = rms_norm.rms_norm_forward_op(x, torch.empty(32, dtype=torch.float32), 1e-6, 0.0, 0)
        assert y.shape == x.shape and y.dtype == torch.bfloat16 and rstd.shape == (6,) and rstd.dtype == torch.float32
        q = torch.empty(2, 7, 4, 16).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D) memory
        q_out, _ = rope.rope_forward_op(q, q, torch.empty(2, 7, 16), torch.empty(2, 7, 16), 1, 16)
        assert q_out.shape == q.shape and q_out.stride() == q.stride()
        logits = torch.empty(5, 11, dtype=torch.float16)
        target = torch.empty(5, dtype=torch.int64)
        outs = cross_entropy.cross_entropy_forward_op(
            logits, target, None, -100, 0.0, 0.0, None, 2, True, True, True, True
        )
        assert [tuple(o.shape) for o in outs] == [(5,), (5,), (5,), (5,), (5, 11)]
        assert [o.dtype for o in outs] == [torch.float16, torch.float16, torch.float32, torch.int64, torch.float16]
        dw = embedding.embedding_backward_op(torch.empty(9, 8), torch.empty(9, dtype=torch.int32), 40, -1)
        assert dw.shape == (40, 8)
        _, dw, db = layer_norm.layer_norm_backward_op(x, x, torch.empty(32), None, rstd, rstd)
        assert dw.shape == (32,) and dw.dtype == torch.float32 and db.shape == (0,)
        da, db = _gated.gated_backward_op(x, x, x, 1)
        assert da.shape == db.shape == x.shape


# -- availability -------------------------------------------------------------------------------------------------


def test_available_says_why_not_on_this_machine():
    reasons = _extension.problems()
    if torch.version.cuda is None:
        assert reasons[0] == f"this torch ({torch.__version__}) is built without CUDA"
    elif not torch.cuda.is_available():
        assert reasons[0] == "no CUDA GPU is visible"
    if _extension.nvcc_path() is None:
        assert any("nvcc" in r for r in reasons)
    if not torch.cuda.is_available():
        assert reasons
        # liger-kernel info shows it, and forcing the backend is an error that names it
        assert get_registry().backends["cuda"].unavailable_reasons() == reasons
        with pytest.raises(liger_core.BackendUnavailableError, match=re.escape(f"cuda: {reasons[0]}")):
            liger_core.call("rms_norm", torch.randn(3, 8), torch.ones(8), impl="cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA torch with one GPU of the given capability, nvcc and ninja present, nothing built in this process."""

    def install(capability=(9, 0), name="NVIDIA H200"):
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(_extension, "nvcc_path", lambda: "/opt/cuda/bin/nvcc")
        monkeypatch.setattr(_extension, "nvcc_version", lambda path: "Cuda compilation tools, release 12.8")
        monkeypatch.setattr(_extension, "ninja_available", lambda: True)
        monkeypatch.setattr(_extension, "_module", None)
        monkeypatch.setattr(_extension, "_failures", {})

    return install


def test_available_without_cuda_torch_gpu_nvcc_or_ninja(monkeypatch, fake_gpu):
    fake_gpu()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _extension.problems() == [f"this torch ({torch.__version__}) is built without CUDA"]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_extension, "nvcc_path", lambda: None)
    monkeypatch.setattr(_extension, "ninja_available", lambda: False)
    reasons = _extension.problems()
    assert reasons[0] == "no CUDA GPU is visible"
    assert "nvcc (the CUDA compiler" in reasons[1] and "CUDA_HOME" in reasons[1]
    assert "ninja" in reasons[2] and "pip install ninja" in reasons[2]


def test_available_on_an_unsupported_gpu(fake_gpu):
    fake_gpu(capability=(6, 1), name="Tesla P100")
    (reason,) = _extension.problems()
    assert reason == "GPU 0 (Tesla P100) has compute capability 6.1; the CUDA kernels need 7.0 (Volta) or newer"


def test_a_failed_build_is_recorded_once_with_the_compilers_error(monkeypatch, fake_gpu, tmp_path, caplog):
    fake_gpu()
    calls = []

    def failing_compile(name, directory, caps):
        calls.append((name, caps))
        raise RuntimeError(
            f"Error building extension '{name}': [1/8] nvcc ... rms_norm.cu\n"
            'rms_norm.cu(42): error: identifier "undefined_thing" is undefined\n'
            '1 error detected in the compilation of "rms_norm.cu".\nninja: build stopped: subcommand failed.'
        )

    monkeypatch.setattr(_extension, "_compile", failing_compile)
    (reason,) = _extension.problems()
    assert calls and calls[0][1] == [(9, 0)]
    assert 'error: identifier "undefined_thing" is undefined' in reason
    log = next((tmp_path / "liger-cache" / "cuda_extension").glob("liger_cuda_*/build-failed.log"))
    assert str(log) in reason and "delete it to try again" in reason
    assert "undefined_thing" in log.read_text()
    assert "building the CUDA kernels for sm_90" in caplog.text
    # This process does not try again...
    assert _extension.problems() == [reason]
    with pytest.raises(_extension.BuildError):
        _extension.module()
    # ...nor does a later one: it reads the log.
    monkeypatch.setattr(_extension, "_failures", {})
    (later,) = _extension.problems()
    assert later.startswith("an earlier build of the CUDA extension failed") and "undefined_thing" in later
    assert len(calls) == 1
    # Deleting the log retries.
    log.unlink()
    monkeypatch.setattr(_extension, "_failures", {})
    _extension.problems()
    assert len(calls) == 2


def test_a_successful_build_is_loaded_once_from_a_directory_named_by_its_key(monkeypatch, fake_gpu, tmp_path):
    fake_gpu()
    built = []
    sentinel = object()

    def compile_ok(name, directory, caps):
        built.append((name, directory))
        return sentinel

    monkeypatch.setattr(_extension, "_compile", compile_ok)
    assert _extension.problems() == []
    assert _extension.module() is sentinel
    assert _extension.problems() == []
    assert len(built) == 1
    name, directory = built[0]
    assert directory.parent == tmp_path / "liger-cache" / "cuda_extension"
    assert directory.name == name == f"liger_cuda_{_extension.build_key([(9, 0)], '/opt/cuda/bin/nvcc')}"


def test_the_build_key_follows_the_architecture_and_the_sources(monkeypatch):
    monkeypatch.setattr(_extension, "nvcc_version", lambda path: "release 12.8")
    hopper = _extension.build_key([(9, 0)], "/opt/cuda/bin/nvcc")
    assert hopper == _extension.build_key([(9, 0)], "/opt/cuda/bin/nvcc")
    assert hopper != _extension.build_key([(8, 0)], "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(_extension, "HEADERS", _extension.HEADERS[:-1])
    assert hopper != _extension.build_key([(9, 0)], "/opt/cuda/bin/nvcc")
    assert _extension.arch_flags([(9, 0), (12, 0)]) == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_120,code=sm_120",
    ]


# -- compiling the sources ----------------------------------------------------------------------------------------


def _nvcc_or_skip() -> str:
    nvcc = _extension.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is neither on PATH nor under CUDA_HOME/CUDA_PATH: the CUDA sources cannot be compiled here")
    return nvcc


def _compile(command: list[str]) -> tuple[str, int, str, float]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return command[-3], result.returncode, result.stdout + result.stderr, time.perf_counter() - started


def test_every_source_compiles(tmp_path):
    """nvcc -c each kernel file for sm_90 (they include only CUDA's headers and ours), and the host compiler the
    binding against torch's headers (it includes no CUDA header, so a CPU-only torch wheel is enough), in parallel."""
    nvcc = _nvcc_or_skip()
    include = [f"-I{CSRC}"] + [f"-I{path}" for path in _torch_include_paths()]
    commands = []
    for source in _extension.SOURCES:
        if source.endswith(".cu"):
            flags = [
                "-std=c++17",
                "-O3",
                "-gencode=arch=compute_90,code=sm_90",
                *TORCH_NVCC_FLAGS,
                "-Xcompiler",
                "-fPIC",
            ]
            commands.append([nvcc, "-c", *flags, *include, str(CSRC / source), "-o", str(tmp_path / f"{source}.o")])
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    python_include = sysconfig.get_paths()["include"]
    binding = None
    if cxx is not None and Path(python_include, "Python.h").exists():
        binding = [
            cxx, "-c", "-std=c++20", "-O1", "-fPIC", "-w",
            "-DTORCH_EXTENSION_NAME=liger_cuda_ci", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *include, f"-I{python_include}", str(CSRC / "bindings.cpp"), "-o", str(tmp_path / "bindings.o"),
        ]  # fmt: skip
        commands.append(binding)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(_compile, commands))
    elapsed = time.perf_counter() - started
    failures = [f"{source} (exit {code}):\n{output[-4000:]}" for source, code, output, _ in results if code != 0]
    assert not failures, "\n\n".join(failures)
    compiled = {Path(source).name for source, *_ in results}
    assert {s for s in _extension.SOURCES if s.endswith(".cu")} <= compiled
    timings = ", ".join(f"{Path(source).name} {seconds:.0f}s" for source, _, _, seconds in results)
    print(f"compiled {len(results)} sources in {elapsed:.0f}s ({timings})")
    if binding is None:
        pytest.skip(f"compiled every .cu; not the binding: no C++ compiler or no Python.h under {python_include}")


def _torch_include_paths() -> list[str]:
    # include_paths() asks for CUDA_HOME when torch was built with CUDA; only torch's own headers are needed here.
    from torch.utils import cpp_extension

    try:
        return cpp_extension.include_paths()
    except OSError:
        root = Path(torch.__file__).parent / "include"
        return [str(root), str(root / "torch" / "csrc" / "api" / "include")]


def test_a_forward_records_its_own_graph_only_where_autograd_records():
    """The dispatcher calls an eager_autograd forward directly only eagerly with gradients needed; inside the bridge
    (grad mode off) the same forward must return its saved state instead."""
    from liger_backends.cuda._common import records_own_graph

    assert records_own_graph(True)
    assert not records_own_graph(False)
    with torch.no_grad():
        assert not records_own_graph(True)
