"""The selection order of DESIGN.md, step by step, with the test plugin's backends (tests/plugins)."""

import threading

import pytest
import torch

import liger_core
from liger_core import dispatch
from liger_core.errors import BackendUnavailableError, EnvironmentSettingError
from liger_core.registry import get_registry


def rms_inputs(dtype=torch.float32, rows=5, hidden=19):
    x = torch.randn(rows, hidden, dtype=dtype)
    w = torch.randn(hidden, dtype=dtype)
    return x, w


def test_priority_order_lists_backends_best_first():
    registry = get_registry()
    order = registry.implementations("rms_norm")
    assert order == sorted(order, key=lambda name: registry.backends[name].spec.priority)
    assert order[0] == "triton" and order.index("reference") < order.index("testplug") < order.index("testslow")


def test_automatic_selection_on_cpu_picks_reference():
    # triton serves CPU tensors only when forced; the test plugins rank behind reference.
    assert liger_core.select_backend("rms_norm", *rms_inputs()) == "reference"
    assert (
        liger_core.select_backend("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None) == "reference"
    )


def test_operator_variable_forces_that_operator_only(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "testplug")
    assert liger_core.select_backend("rms_norm", *rms_inputs()) == "testplug"
    assert (
        liger_core.select_backend("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None) == "reference"
    )


def test_operator_variable_beats_impl_and_scopes(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "testslow")
    with liger_core.use_backend("testplug"):
        assert liger_core.select_backend("rms_norm", *rms_inputs(), impl="reference") == "testslow"


def test_impl_beats_scope_and_inner_scope_beats_outer():
    x, w = rms_inputs()
    with liger_core.use_backend("testslow"):
        assert liger_core.select_backend("rms_norm", x, w) == "testslow"
        assert liger_core.select_backend("rms_norm", x, w, impl="testplug") == "testplug"
        with liger_core.use_backend("testplug"):
            assert liger_core.select_backend("rms_norm", x, w) == "testplug"
        assert liger_core.select_backend("rms_norm", x, w) == "testslow"
    assert liger_core.select_backend("rms_norm", x, w) == "reference"


def test_scope_for_one_operator_leaves_the_others_alone():
    x, w = rms_inputs()
    with liger_core.use_backend("testplug", op="rms_norm"), liger_core.use_backend("testslow", op="scale"):
        assert liger_core.select_backend("rms_norm", x, w) == "testplug"
        assert (
            liger_core.select_backend("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None)
            == "reference"
        )


def test_scope_that_names_a_backend_without_the_operator_is_an_error():
    with liger_core.use_backend("testplug"):
        with pytest.raises(BackendUnavailableError, match="testplug: it has no kernel for cross_entropy"):
            liger_core.call("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None)


def test_scopes_are_thread_local():
    seen = {}
    with liger_core.use_backend("testplug"):
        thread = threading.Thread(
            target=lambda: seen.setdefault("other", liger_core.select_backend("rms_norm", *rms_inputs()))
        )
        thread.start()
        thread.join()
        seen["this"] = liger_core.select_backend("rms_norm", *rms_inputs())
    assert seen == {"other": "reference", "this": "testplug"}


def test_preference_list_is_tried_in_order(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testslow,testplug")
    assert liger_core.select_backend("rms_norm", *rms_inputs()) == "testslow"
    # testslow cannot serve gemma casting, nor can testplug: the next listed that implements it is reference.
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testslow,testplug,reference")
    assert liger_core.select_backend("rms_norm", *rms_inputs(), casting_mode="gemma") == "reference"


def test_preference_list_without_the_operator_keeps_automatic_selection(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testplug")
    assert (
        liger_core.select_backend("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None) == "reference"
    )


def test_preference_list_that_cannot_serve_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testplug")
    with pytest.raises(BackendUnavailableError) as caught:
        liger_core.call("rms_norm", *rms_inputs(), casting_mode="gemma")
    assert "testplug only implements casting_mode='llama'" in str(caught.value)
    assert caught.value.reasons == {"testplug": ["testplug only implements casting_mode='llama'"]}


def test_forced_backend_that_cannot_serve_lists_the_inputs_and_every_reason(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "testplug")
    with pytest.raises(BackendUnavailableError) as caught:
        liger_core.call("rms_norm", *rms_inputs(torch.bfloat16), offset=1.0)
    message = str(caught.value)
    assert "rms_norm(x=(5, 19) torch.bfloat16 on cpu, weight=(19,) torch.bfloat16 on cpu, offset=1.0)" in message
    assert "LIGER_KERNEL_BACKEND_RMS_NORM" in message
    assert "does not take torch.bfloat16" in message


def test_unknown_backend_names_are_value_errors_listing_the_registered_ones(monkeypatch):
    with pytest.raises(
        ValueError, match=r"unknown backend 'nope'; registered backends: \['cuda', .*'reference', 'testplug'"
    ):
        liger_core.call("rms_norm", *rms_inputs(), impl="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with liger_core.use_backend(["testplug", "nope"]):
            pass
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        liger_core.call("rms_norm", *rms_inputs())


def test_unknown_name_in_the_preference_list_is_an_error(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testplug,nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        liger_core.call("rms_norm", *rms_inputs())


def test_operator_variable_naming_no_operator_is_an_error(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NROM", "reference")
    with pytest.raises(
        EnvironmentSettingError, match="LIGER_KERNEL_BACKEND_RMS_NROM names no operator.*LIGER_KERNEL_BACKEND_RMS_NORM"
    ):
        liger_core.call("rms_norm", *rms_inputs())


def test_upstream_implementation_names_are_mapped(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_IMPL", "torch")
    assert liger_core.select_backend("rms_norm", *rms_inputs()) == "reference"
    monkeypatch.setenv("LIGER_KERNEL_IMPL_RMS_NORM", "nvidia-triton")
    assert liger_core.select_backend("rms_norm", *rms_inputs()) == "triton"  # served through the interpreter
    assert liger_core.select_backend("rms_norm", *rms_inputs(), impl="pytorch") == "triton"  # env is stronger
    monkeypatch.setenv("LIGER_KERNEL_IMPL", "cutlass")
    with pytest.raises(EnvironmentSettingError, match=r"LIGER_KERNEL_IMPL='cutlass'.*allowed: \['native'"):
        liger_core.call("cross_entropy", torch.randn(4, 9), torch.tensor([1, 2, 3, 4]), None)


def test_impl_accepts_upstream_aliases():
    assert liger_core.select_backend("rms_norm", *rms_inputs(), impl="torch") == "reference"


def test_forcing_a_backend_that_failed_to_load_raises_with_its_error(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "broken")
    with pytest.raises(
        BackendUnavailableError,
        match="broken: it failed to load: RuntimeError: liger_broken_plugin is broken on purpose",
    ):
        liger_core.call("rms_norm", *rms_inputs())


def test_bad_environment_values_say_what_is_allowed(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "maybe")
    with pytest.raises(EnvironmentSettingError, match="LIGER_KERNEL_AUTOTUNE='maybe' is not allowed: use 1"):
        liger_core.call("rms_norm", *rms_inputs())
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "0")
    monkeypatch.setenv("LIGER_KERNEL_BACKEND", "testplug,,reference")
    with pytest.raises(EnvironmentSettingError, match="expected backend names separated by commas"):
        liger_core.call("rms_norm", *rms_inputs())


def test_selection_is_memoised_and_follows_forcing_changes(monkeypatch):
    calls = []
    original = dispatch._automatic
    monkeypatch.setattr(dispatch, "_automatic", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, w = rms_inputs()
    for _ in range(3):
        liger_core.call("rms_norm", x, w)
    assert len(calls) == 1
    liger_core.call("rms_norm", torch.randn(100, 19), w)  # another shape bucket: selected again
    assert len(calls) == 2
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_RMS_NORM", "testplug")
    assert liger_core.select_backend("rms_norm", x, w) == "testplug"
    monkeypatch.delenv("LIGER_KERNEL_BACKEND_RMS_NORM")
    assert liger_core.select_backend("rms_norm", x, w) == "reference"
    assert len(calls) == 2


def test_validation_runs_before_selection_and_names_the_argument():
    x, w = rms_inputs()
    with pytest.raises(ValueError, match=r"rms_norm: 'weight' must have shape \(19,\).*got \(18,\)"):
        liger_core.call("rms_norm", x, w[:18], impl="testplug")
    with pytest.raises(TypeError, match="unknown arguments \\['epsilon'\\]"):
        liger_core.call("rms_norm", x, w, epsilon=1e-5)
    with pytest.raises(ValueError, match="'casting_mode' must be one of \\['llama', 'gemma', 'none'\\], got 'mistral'"):
        liger_core.call("rms_norm", x, w, casting_mode="mistral")
    with pytest.raises(TypeError, match="'eps' must be float, got str"):
        liger_core.call("rms_norm", x, w, eps="1e-6")
    with pytest.raises(TypeError, match="'x' must be a tensor, got list"):
        liger_core.call("rms_norm", [1.0], w)
    with pytest.raises(TypeError, match="'target' must be an int64 or int32 tensor"):
        liger_core.call("cross_entropy", torch.randn(4, 9), torch.ones(4), None)
    with pytest.raises(ValueError, match="unknown operator 'rmsnorm'"):
        liger_core.call("rmsnorm", x, w)


def test_data_checks_run_only_when_asked(monkeypatch):
    logits, target = torch.randn(4, 9), torch.tensor([1, 2, 30, -100])
    loss, *_ = liger_core.call("cross_entropy", logits, target, None)
    assert torch.isnan(loss)  # out of range without checks: NaN, never an out-of-bounds read
    monkeypatch.setenv("LIGER_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match=r"outside \[0, 9\).*\[30\]"):
        liger_core.call("cross_entropy", logits, target, None)
