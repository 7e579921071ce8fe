"""Autotuned selection: timing the candidates, remembering the winner in memory and on disk, and reusing it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import liger_core
from liger_core import autotune, dispatch
from liger_core.registry import get_registry


def inputs():
    return torch.randn(6, 23, requires_grad=True), torch.randn(23, requires_grad=True)


def test_autotune_picks_the_faster_kernel_and_writes_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    x, w = inputs()
    # Candidates on the CPU: testplug and testslow (reference does not take part, triton serves CPU only if forced).
    assert liger_core.select_backend("rms_norm", x, w) == "testplug"
    files = list((tmp_path / "liger-cache").glob("autotune-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    (record,) = data["decisions"].values()
    assert record["winner"] == "testplug" and record["candidates"] == ["testplug", "testslow"]
    assert record["times_ms"]["testslow"] > 5.0 > record["times_ms"]["testplug"]
    assert data["fingerprint"]["torch"] == torch.__version__
    assert autotune.tuning_seconds > 0


def test_autotune_is_off_by_default_on_the_cpu_and_when_disabled(monkeypatch):
    x, w = inputs()
    with liger_core.use_backend(["testslow"]):  # a scope is a requirement: no timing
        assert liger_core.select_backend("rms_norm", x, w) == "testslow"
    assert liger_core.select_backend("rms_norm", x, w) == "reference"
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "0")
    assert liger_core.select_backend("rms_norm", x, w) == "reference"
    assert autotune.tuning_seconds == 0


def test_a_new_process_reuses_the_file_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    x, w = inputs()
    assert liger_core.select_backend("rms_norm", x, w) == "testplug"
    # Doctor the file so that a reused decision is distinguishable from a fresh timing.
    (path,) = (tmp_path / "liger-cache").glob("autotune-*.json")
    data = json.loads(path.read_text())
    for record in data["decisions"].values():
        record["winner"] = "testslow"
    path.write_text(json.dumps(data))
    code = (
        "import torch, liger_core; from liger_core import autotune;"
        "print(liger_core.select_backend('rms_norm', torch.randn(6, 23), torch.randn(23)), autotune.tuning_seconds)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["testslow", "0.0"]


def test_nothing_is_timed_while_tracing_and_the_fallback_is_not_memoised(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    x, w = inputs()
    spec = get_registry().operator("rms_norm")
    bound = spec.bind((x, w), {})
    assert dispatch._select(spec, *bound, None, tracing=True) == "reference"  # priority: reference 100, plugins 200
    assert autotune.tuning_seconds == 0
    assert dispatch._select(spec, *bound, None, tracing=False) == "testplug"
    assert autotune.tuning_seconds > 0  # the eager call did tune: the tracing fallback was not reused


def test_a_cached_winner_is_used_while_tracing(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    x, w = inputs()
    spec = get_registry().operator("rms_norm")
    bound = spec.bind((x, w), {})
    key = autotune.decision_key("rms_norm", x.device, spec.key(*bound), ["testplug", "testslow"])
    autotune._decisions[key] = {"winner": "testslow"}
    autotune._loaded_files.add(autotune.cache_file(x.device))
    assert dispatch._select(spec, *bound, None, tracing=True) == "testslow"


def test_fingerprint_changes_with_versions(monkeypatch):
    device = torch.device("cpu")
    fields = autotune.fingerprint_fields(device)
    assert {"liger-core", "torch", "triton", "cuda", "device", "backend:testplug"} <= set(fields)
    before = autotune.cache_file(device)
    for field in ("torch", "triton", "liger-core", "backend:testplug"):
        changed = dict(fields, **{field: fields[field] + "-other"})
        assert autotune.fingerprint(changed) != autotune.fingerprint(fields)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert autotune.cache_file(device) != before


def test_unwritable_cache_directory_warns_and_keeps_the_decision(monkeypatch, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("LIGER_KERNEL_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    import pytest

    with pytest.warns(RuntimeWarning, match="could not write the autotune cache"):
        assert liger_core.select_backend("rms_norm", *inputs()) == "testplug"


def test_a_candidate_that_fails_while_timed_is_left_out_with_a_warning(monkeypatch):
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    real_time_kernel = autotune.time_kernel

    def time_kernel(spec, backend, *args):
        if backend == "testplug":
            raise RuntimeError("cannot run under these saved-tensor hooks")
        return real_time_kernel(spec, backend, *args)

    monkeypatch.setattr(autotune, "time_kernel", time_kernel)
    x, w = inputs()
    with pytest.warns(RuntimeWarning, match="backend 'testplug' failed and is left out"):
        assert liger_core.select_backend("rms_norm", x, w) == "testslow"
    (record,) = [r for r in autotune.cached_decisions() if r["op"] == "rms_norm"]
    assert "cannot run" in record["failed"]["testplug"] and record["winner"] == "testslow"
