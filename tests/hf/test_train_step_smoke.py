"""benchmarks/train_step.py on the CPU at a tiny size: the unpatched and our variants (reference backend) train the
same weights on the same data and agree on the losses; the report has every field; a failing variant is recorded,
not raised; the PyPI liger-kernel stays out of every process but its own."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from tiny_hf import OpRecorder

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
TINY = (
    "--device cpu --dtype float32 --layers 1 --hidden 64 --heads 4 --kv-heads 2 --vocab 512 --seq 32 --batch 2 "
    "--warmup 1 --steps 1 --compile off"
)


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(train_step, variant: str, *extra: str) -> dict:
    options = train_step.parse([*TINY.split(), *extra])
    options.update(variant=variant, compiled=False)
    return train_step.run_variant(options)


def test_unpatched_and_ours_agree(train_step, tmp_path, monkeypatch):
    unpatched = run(train_step, "unpatched")
    recorder = OpRecorder(monkeypatch)
    ours = run(train_step, "ours")  # class-level patch before building (tests/hf/conftest.py undoes it)
    instance = run(train_step, "ours", "--patch", "instance")
    for result in (unpatched, ours, instance):
        assert "error" not in result, result.get("traceback")
        assert len(result["losses"]) == 2 and result["finite"]
        assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
        assert result["peak_memory_gb"] is None  # CPU: no CUDA memory statistics
    assert {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"} <= set(recorder.ops)
    assert ours["liger_kernel_file"].endswith(os.path.join("liger_kernel", "__init__.py"))
    # the same weights and data: the same losses (fp32), before and after an AdamW step
    assert ours["losses"] == pytest.approx(unpatched["losses"], rel=1e-5)
    assert instance["losses"] == pytest.approx(unpatched["losses"], rel=1e-5)
    assert unpatched["first_loss"] == pytest.approx(6.2383, abs=0.05)  # about ln(512): random tokens

    options = train_step.parse([*TINY.split(), "--variants", "unpatched,ours,liger"])
    skipped = train_step.run_child(options, "liger", False)  # no --peer: recorded as skipped, no process started
    assert skipped["error"].startswith("skipped")
    summary = train_step.summarize(options, [unpatched, ours, skipped])
    json_path, md_path = train_step.write_report(summary, str(tmp_path / "report.json"))
    report = json.loads(Path(json_path).read_text())
    for key in ("date", "gpu", "device", "torch", "triton", "transformers", "config", "runs"):
        assert key in report, key
    assert report["config"]["layers"] == 1 and report["config"]["intermediate"] == 256
    assert [r["variant"] for r in report["runs"]] == ["unpatched", "ours", "liger"]
    for key in ("tokens_per_s", "first_loss", "last_loss", "peak_memory_gb", "first_loss_delta"):
        assert key in report["runs"][1], key
    assert abs(report["runs"][1]["first_loss_delta"]) < 1e-4
    table = Path(md_path).read_text()
    assert "| transformers, unpatched | " in table and "| liger-kernel (PyPI) | fails: skipped" in table


def test_a_failing_variant_is_recorded(train_step):
    result = run(train_step, "unpatched", "--heads", "5")  # 64 is not a multiple of 5 heads
    assert "error" in result and "traceback" in result
    assert "tokens_per_s" not in result


def test_the_peer_package_reaches_only_its_own_process(train_step, tmp_path):
    peer = str(tmp_path / "peer")
    env = {"PYTHONPATH": os.pathsep.join(["/somewhere", peer])}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", env)
        assert train_step.child_environment("ours", peer)["PYTHONPATH"] == "/somewhere"
        assert train_step.child_environment("liger", peer)["PYTHONPATH"].split(os.pathsep) == [peer, "/somewhere"]
    options = train_step.parse([*TINY.split(), "--peer", peer])
    command = train_step.child_command(dict(options, out_stem="x"), "liger", True, "out.json")
    assert command[command.index("--peer") + 1] == peer and command[command.index("--compile") + 1] == "on"
    assert "--peer" not in train_step.child_command(dict(options, out_stem="x"), "ours", False, "out.json")
    with pytest.raises(RuntimeError, match="not the package under --peer"):
        train_step._check_package("liger", peer)  # this process's liger_kernel is ours
