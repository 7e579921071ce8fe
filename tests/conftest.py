"""Test-wide setup.

Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported, which is why it is set here, at collection, and not in a fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from liger_core.testing import clean_state  # noqa: E402


@pytest.fixture(autouse=True)
def clean_liger_environment(tmp_path):
    """Each test starts with no forcing variable set, an empty selection memo and its own autotune cache."""
    with clean_state(tmp_path / "liger-cache"):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
