"""The supported transformers range (>= 5.0, < 6, as pyproject's test extra pins it): an older transformers is a
clear ImportError naming the range, before anything is patched; a newer major version is patched with a warning.
The version is faked on ``sys.modules["transformers"]``, what the patchers import (transformers' lazy module may have
been replaced there since this file imported it)."""

import importlib
import sys

import pytest
from tiny_hf import batch, tiny_model

from liger_kernel.transformers import _apply_liger_kernel_to_instance, apply_liger_kernel_to_llama
from liger_kernel.transformers.monkey_patch import _FAMILIES


def test_transformers_4_is_refused_clearly(monkeypatch):
    modeling = importlib.import_module(_FAMILIES["llama"].module)
    before = dict(vars(modeling))
    model = tiny_model("llama")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"apply_liger_kernel_to_llama: needs .*transformers >= 5.0, < 6 .*4\.57\.1"):
        apply_liger_kernel_to_llama()
    with pytest.raises(ImportError, match="found 4.57.1"):  # what transformers' Trainer calls
        _apply_liger_kernel_to_instance(model)
    assert dict(vars(modeling)) == before
    assert "forward" not in vars(model)


def test_a_later_major_version_warns_and_patches(monkeypatch):
    model = tiny_model("llama")
    input_ids, labels = batch()
    expected = model(input_ids=input_ids, labels=labels).loss
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "6.0.0.dev0")
    with pytest.warns(UserWarning, match="written for transformers 5.x, found 6.0.0.dev0"):
        apply_liger_kernel_to_llama(model=model)
    assert model.forward._liger_mode == "fused_linear_cross_entropy"
    assert model(input_ids=input_ids, labels=labels).loss.item() == pytest.approx(expected.item(), rel=1e-5)
