"""tests/hf: every test leaves transformers' modeling modules as it found them.

A class-level patch (``apply_liger_kernel_to_<model>()`` without ``model=``) rewrites attributes of transformers'
modeling modules and the ``forward`` of their ``*ForCausalLM`` classes for the whole process, and ``rope=True``
rewrites ``apply_rotary_pos_emb`` even for an instance patch. The autouse fixture below snapshots all of that
before each test and puts it back afterwards, so other tests (and other test files) see transformers unpatched.
"""

import importlib

import pytest
import torch

pytest.importorskip("transformers")

from tiny_hf import MODEL_TYPES  # noqa: E402

from liger_kernel.transformers.monkey_patch import _FAMILIES  # noqa: E402


def _snapshot():
    saved = []
    for model_type in MODEL_TYPES:
        module = importlib.import_module(_FAMILIES[model_type].module)
        classes = {
            name: (value, value.__dict__.get("forward"))
            for name, value in vars(module).items()
            if isinstance(value, type) and name.endswith("ForCausalLM")
        }
        saved.append((module, dict(vars(module)), classes))
    return saved


def _restore(saved) -> None:
    for module, attributes, classes in saved:
        for name in set(vars(module)) - set(attributes):
            delattr(module, name)
        for name, value in attributes.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for cls, forward in classes.values():
            if cls.__dict__.get("forward") is not forward:
                if forward is None:
                    delattr(cls, "forward")
                else:
                    cls.forward = forward


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to the oversubscription of a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_transformers():
    """Snapshot the modeling modules (and their causal-LM forwards) and restore them after the test."""
    saved = _snapshot()
    yield
    _restore(saved)
