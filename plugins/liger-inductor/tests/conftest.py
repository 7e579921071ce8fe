"""Setup of the plugin's tests, as a third party's would be: the repository's tests/conftest.py does not apply here
(conftest files apply by directory), so this one does the same resets for these tests.

Each test starts with no LIGER_KERNEL_* forcing variable, an empty selection memo and its own autotune cache, and
with LIGER_INDUCTOR_CPU=1 so that the inductor backend serves CPU tensors when forced.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before triton is imported

from liger_inductor.compiler import CPU_VARIABLE  # noqa: E402

from liger_core.testing import clean_state  # noqa: E402


@pytest.fixture(autouse=True)
def clean_liger_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CPU_VARIABLE, "1")
    with clean_state(tmp_path / "liger-cache"):
        yield
