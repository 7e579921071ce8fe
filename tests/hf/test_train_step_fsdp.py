"""benchmarks/train_step.py --world 2 on the CPU at a tiny size: each variant's child spawns 2 gloo processes that
train under FSDP2, each rank on its own batch. The whole script runs as a command (the ranks are spawned from its
``__main__``): no variant fails, the throughput counts both ranks, and rank 0's first loss is the single-process one
(the unpatched and our variants agree on it, and it equals the unsharded model's loss on the same batch)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
TINY = (
    "--world 2 --device cpu --dtype float32 --layers 1 --hidden 64 --heads 4 --kv-heads 2 --vocab 512 --seq 16 "
    "--batch 2 --warmup 1 --steps 2 --compile off --variants unpatched,ours --child-timeout 120"
)


def test_fsdp2_on_two_processes(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY.split(), "--out", str(out)], capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["world"] == 2
    runs = {run["variant"]: run for run in report["runs"]}
    assert list(runs) == ["unpatched", "ours"]
    for run in runs.values():
        assert "error" not in run, (run.get("error"), run.get("traceback"), run.get("stderr"))
        assert run["world"] == 2 and run["tokens_per_s"] > 0
        assert len(run["losses"]) == 3 and run["finite"] and all(math.isfinite(v) for v in run["losses"])
        assert run["peak_memory_gb"] is None and run["per_rank_peak_memory_gb"] == [None, None]  # CPU
        first = run["per_rank_first_loss"]
        assert len(first) == 2 and first[0] == run["first_loss"]
        assert first[0] != pytest.approx(first[1], rel=1e-4)  # the ranks train on different batches
        assert abs(run["single_process_first_loss_delta"]) < 1e-4  # rank 0's batch, the model unsharded
    assert runs["ours"]["first_loss"] == pytest.approx(runs["unpatched"]["first_loss"], rel=1e-4)
    assert abs(runs["ours"]["first_loss_delta"]) < 1e-4
    table = out.with_suffix(".md").read_text()
    assert "FSDP2 on 2 processes (fully_shard per decoder layer, then the root), per-rank batch 2 × 16" in table
    assert "Δ first loss vs one process" in table


def test_only_a_world_above_one_reaches_the_child(tmp_path):
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    options = dict(train_step.parse(TINY.split()), out_stem="x")
    command = train_step.child_command(options, "ours", False, "out.json")
    assert command[command.index("--world") + 1] == "2" and command[command.index("--child-timeout") + 1] == "120"
    single = dict(train_step.parse(TINY.replace("--world 2", "--world 1").split()), out_stem="x")
    assert "--world" not in train_step.child_command(single, "ours", False, "out.json")
