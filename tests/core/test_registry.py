"""Backend discovery through entry points: the installed test plugins, a broken one, stevedore's stale cache, and
the validation of specs."""

import os
import subprocess
import sys
import warnings

import pydantic
import pytest
import torch

import liger_core
from liger_core import registry as registry_module
from liger_core.registry import Registry, get_registry
from liger_core.spec import AttrSpec, BackendSpec, InputSpec, KernelSpec, OpSpec, OutputSpec


def test_installed_plugin_backends_and_operator_are_discovered():
    registry = get_registry()
    assert registry.backends["testplug"].distribution == "liger-test-plugin"
    assert registry.backends["testslow"].distribution == "liger-test-plugin"  # from a factory entry point
    assert registry.backends["reference"].first_party
    assert "scale" in registry.operator_names()
    x = torch.randn(4, 3, requires_grad=True)
    y = liger_core.call("scale", x, factor=3.0)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_kernel_modules_are_imported_on_first_use_only():
    code = (
        "import sys, torch, liger_core; from liger_core.registry import get_registry; get_registry();"
        "assert 'liger_test_plugin.kernels' not in sys.modules;"
        "assert 'liger_backends.triton.rms_norm' not in sys.modules and 'triton' not in sys.modules;"
        "liger_core.call('rms_norm', torch.randn(2, 3), None, impl='testplug');"
        "assert 'liger_test_plugin.kernels' in sys.modules; print('lazy')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"


def test_a_broken_plugin_costs_one_warning_and_nothing_else():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry()
    messages = [str(w.message) for w in caught if "liger_kernel" in str(w.message)]
    assert messages == [
        "liger_kernel: backend plugin broken (liger-broken-plugin) was not loaded: "
        "RuntimeError: liger_broken_plugin is broken on purpose (a missing dependency, say)"
    ]
    assert "broken (liger-broken-plugin)" in registry.failures
    assert {"reference", "triton", "cuda", "testplug", "testslow"} <= set(registry.backends)


def test_stale_stevedore_cache_does_not_hide_a_plugin(tmp_path):
    """Write stevedore's on-disk entry-point cache for this interpreter's path with our group reduced to one
    backend (as a stale cache after an editable install looks), check that stevedore itself now sees only that one,
    and that the registry of a new process still finds every backend."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    group = registry_module.GROUP
    doctor = (
        "import json, os, sys; from stevedore import _cache;"
        "digest, values = _cache._hash_settings_for_path(tuple(sys.path));"
        "data = _cache._build_cacheable_data(); data['path_values'] = values;"
        f"data['groups']['{group}'] = [['reference', 'liger_backends.reference:BACKEND', '{group}']];"
        "folder = _cache._get_cache_dir(); os.makedirs(folder, exist_ok=True);"
        "open(os.path.join(folder, digest), 'w').write(json.dumps(data))"
    )
    subprocess.run([sys.executable, "-c", doctor], check=True, env=env)
    probe = f"from stevedore import ExtensionManager as M; print(len(M('{group}').list_entry_points()))"
    stale = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert stale.stdout.strip() == "1", "the doctored cache is not in use: the test would prove nothing"
    list_backends = "from liger_core.registry import get_registry; print(sorted(get_registry().backends))"
    found = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", list_backends], capture_output=True, text=True, env=env
    )
    assert found.returncode == 0, found.stderr
    # Other installed plugins (liger-inductor) may add to the list; the test plugin must be in it.
    assert {"cuda", "reference", "testplug", "testslow", "triton"} <= set(eval(found.stdout))


def _backend(name, **kwargs):
    return BackendSpec(name=name, **kwargs)


def test_duplicate_backend_name_keeps_the_first_party_one_and_warns_naming_both():
    registry = get_registry()
    with pytest.warns(RuntimeWarning, match="backend name 'reference' is already taken by distribution 'liger-core'"):
        registry._add(
            _backend("reference", kernels={"rms_norm": "evil.module:KERNEL"}), "evil-dist", "reference (evil-dist)"
        )
    assert registry.backends["reference"].distribution == "liger-core"


def test_backend_with_a_kernel_for_an_unknown_operator_is_rejected():
    registry = Registry()
    registry.backends["odd"] = registry_module.Backend(_backend("odd", kernels={"no_such_op": "x.y:K"}), "odd-dist")
    with pytest.warns(RuntimeWarning, match="kernel for the unknown operator 'no_such_op'"):
        registry._reject_unknown_operators()
    assert "odd" not in registry.backends


def test_backend_redefining_an_existing_operator_is_rejected():
    registry = Registry()
    with pytest.warns(RuntimeWarning, match=r"defines operators that already exist: \['rms_norm'\]"):
        registry._add(_backend("sneaky", operators={"rms_norm": "x.y:SPEC"}), "sneaky-dist", "sneaky (sneaky-dist)")
    assert "sneaky" not in registry.backends


@pytest.mark.parametrize("reference", ["nocolon", "a.b:", ":attr", "a b:c", "mod:attr:more"])
def test_malformed_module_references_are_rejected(reference):
    with pytest.raises(pydantic.ValidationError, match="must look like 'package.module:attribute'"):
        _backend("ok", kernels={"rms_norm": reference})


def test_spec_field_validation():
    with pytest.raises(pydantic.ValidationError, match="String should match pattern"):
        _backend("Bad-Name")
    with pytest.raises(pydantic.ValidationError, match="cannot be differentiable"):
        InputSpec(name="n", kind="int", differentiable=True)
    with pytest.raises(pydantic.ValidationError, match="argument names used twice"):
        OpSpec(
            name="twice",
            inputs=(InputSpec(name="x"),),
            attrs=(AttrSpec(name="x", type="int", default=0),),
            outputs=(OutputSpec(name="y"),),
            key_fn=lambda i, a: (),
            make_inputs_fn=lambda *a, **k: ((), {}),
        )
    with pytest.raises(pydantic.ValidationError):
        KernelSpec(op="rms_norm", forward=lambda *a: None, unknown_field=1)
    spec = BackendSpec(name="frozen")
    with pytest.raises(pydantic.ValidationError):
        spec.priority = 1


def test_entry_point_naming_a_wrong_object_is_a_recorded_failure(monkeypatch):
    registry = get_registry()
    with pytest.raises(registry_module.SpecError, match="is a str, expected a KernelSpec"):
        registry_module.import_reference("liger_core:__version__", KernelSpec, "test")
    assert registry.failures.get("broken (liger-broken-plugin)")


def test_plugin_kit_runs_every_case_and_returns_what_the_backend_declines():
    from liger_core.testing import assert_conforms_all, declines

    # The test plugin's rms_norm serves float32 CPU tensors only (and not every option): every case of every other
    # dtype is declined, with its reason; the default float32 case is served, and conforms.
    declined = assert_conforms_all("rms_norm", "testplug")
    spec = get_registry().operator("rms_norm")
    other_dtypes = [dtype for dtype in spec.dtypes if dtype != torch.float32]
    assert len(declined) >= len(other_dtypes) * len(spec.cases)
    assert {dtype for dtype, _, _ in declined} >= set(other_dtypes)
    assert not any(dtype == torch.float32 and case == {} for dtype, case, _ in declined)
    assert all(reasons for _, _, reasons in declined)
    assert declines("rms_norm", "testplug", torch.float32) == []
    assert declines("rms_norm", "testplug", torch.bfloat16)


def test_clean_state_clears_and_restores_the_environment(tmp_path, monkeypatch):
    from liger_core import dispatch
    from liger_core.testing import clean_state

    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "reference")
    dispatch._memo[("marker",)] = "x"
    with clean_state(tmp_path / "cache"):
        assert "LIGER_KERNEL_BACKEND_RMS_NORM" not in os.environ
        assert os.environ["LIGER_KERNEL_CACHE_DIR"] == str(tmp_path / "cache")
        assert ("marker",) not in dispatch._memo
        os.environ["LIGER_KERNEL_BACKEND_SWIGLU"] = "reference"  # a test's own setting does not leak out
    assert os.environ["LIGER_KERNEL_BACKEND_RMS_NORM"] == "reference"
    assert "LIGER_KERNEL_BACKEND_SWIGLU" not in os.environ
