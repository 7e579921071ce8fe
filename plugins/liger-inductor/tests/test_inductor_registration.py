"""The distribution registers backend `inductor` through its entry point, with a kernel for every operator."""

import importlib.metadata

import liger_inductor

from liger_core.registry import CATALOGUE, get_registry


def test_entry_point_is_declared_by_the_distribution():
    points = [ep for ep in importlib.metadata.entry_points(group="liger_kernel.backends") if ep.name == "inductor"]
    assert [(ep.value, ep.dist.metadata["Name"]) for ep in points] == [("liger_inductor:BACKEND", "liger-inductor")]
    assert importlib.metadata.version("liger-inductor") == liger_inductor.__version__


def test_registry_loads_the_backend():
    backend = get_registry().backends["inductor"]
    assert backend.spec is liger_inductor.BACKEND
    assert backend.distribution == "liger-inductor" and not backend.first_party
    # lower wins: behind triton (10) and cuda (20), ahead of reference (100); on CUDA the autotuner decides
    assert backend.spec.priority == 50
    assert backend.spec.devices == ("cuda",) and backend.spec.forced_only_devices == ("cpu",)
    assert backend.unavailable_reasons() == []


def test_every_operator_has_a_kernel_that_imports():
    registry = get_registry()
    assert set(liger_inductor.BACKEND.kernels) == set(CATALOGUE)
    for op in CATALOGUE:
        assert registry.kernel(op, "inductor").op == op
        assert "inductor" in registry.implementations(op)
