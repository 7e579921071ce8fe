"""`liger-kernel info` tells the truth about this machine."""

import json
import os
import subprocess
import sys


def run_info(*args, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGER_KERNEL_") and k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "liger_core.cli", "info", *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_json_on_a_cpu_machine():
    info = json.loads(run_info("--json"))
    assert info["backends"]["reference"]["available"]
    triton = info["backends"]["triton"]
    assert not triton["available"] and "no CUDA GPU is visible" in triton["reasons"][0]
    assert not info["backends"]["cuda"]["available"]
    assert info["operators"]["rms_norm"]["selected"] == "reference"
    assert "is built without CUDA" in info["operators"]["rms_norm"]["backends"]["cuda"]["reasons"][0]
    assert info["operators"]["kl_div"]["backends"]["cuda"]["reasons"] == ["no kernel for this operator"]
    assert {"rms_norm", "cross_entropy", "scale"} <= set(info["operators"])
    assert "broken (liger-broken-plugin)" in info["failures"]


def test_info_shows_triton_serving_under_the_interpreter_when_forced():
    info = json.loads(run_info("--json", TRITON_INTERPRET="1"))
    cell = info["operators"]["rms_norm"]["backends"]["triton"]
    assert info["backends"]["triton"]["available"]
    assert not cell["serves"] and cell["serves_when_forced"]
    forced = json.loads(run_info("--json", TRITON_INTERPRET="1", LIGER_KERNEL_BACKEND_RMS_NORM="triton"))
    assert forced["operators"]["rms_norm"]["selected"] == "triton"
    assert forced["operators"]["rms_norm"]["forced_by"] == "LIGER_KERNEL_BACKEND_RMS_NORM"
    assert forced["environment"]["LIGER_KERNEL_BACKEND_RMS_NORM"] == "triton"


def test_info_table_lists_operators_failures_and_overrides():
    text = run_info(LIGER_KERNEL_BACKEND="testplug")
    assert "rms_norm" in text and "cross_entropy" in text
    assert "rms_norm       -             serves" in text or "rms_norm" in text.split("Operators")[1]
    assert "broken (liger-broken-plugin): RuntimeError" in text
    assert "Environment overrides: LIGER_KERNEL_BACKEND=testplug" in text
    assert "automatic: no backend of the preference list implements it" in text  # cross_entropy


def test_info_autotune_lists_decisions(tmp_path):
    env = {"LIGER_KERNEL_CACHE_DIR": str(tmp_path), "LIGER_KERNEL_AUTOTUNE": "1"}
    code = "import torch, liger_core; liger_core.call('rms_norm', torch.randn(4, 8), torch.randn(8))"
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, env={**os.environ, **env})
    listing = json.loads(run_info("--autotune", "--json", **env))
    (decision,) = listing["decisions"]
    assert decision["op"] == "rms_norm" and decision["winner"] == "testplug"
    assert "testplug" in run_info("--autotune", **env)
