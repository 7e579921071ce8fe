"""Test-wide setup.

Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported, which is why it is set here, at collection, and not in a fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from liger_core import autotune, dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def clean_liger_environment(monkeypatch, tmp_path):
    """Each test starts with no forcing variable set, an empty selection memo and its own autotune cache."""
    for variable in list(os.environ):
        if variable.startswith("LIGER_KERNEL_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("LIGER_KERNEL_CACHE_DIR", str(tmp_path / "liger-cache"))
    dispatch.clear_memo()
    autotune.forget()
    yield
    dispatch.clear_memo()
    autotune.forget()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
