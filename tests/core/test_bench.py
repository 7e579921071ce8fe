"""The benchmark machinery (liger_core.bench) on the CPU: every case builds and runs for every kind of competitor
through our public API and the plain-PyTorch formulas, and a full run writes JSON and markdown. The GPU numbers
themselves are benchmarks (benchmarks/results/), never asserted here."""

import json

import pytest
import torch

from liger_core.bench import cases, runner


@pytest.mark.parametrize("case", cases.smoke_cases(), ids=lambda case: case.name)
def test_every_case_runs_through_our_api_and_agrees_with_the_eager_formula(case):
    device = torch.device("cpu")
    ours = runner.measure_case(case, "ours:reference", device)
    assert "error" not in ours, ours.get("traceback")
    assert ours["ms"] > 0
    # The forward values of the API path and of the eager formula agree: the cases measure the same computation.
    api, eager = case.build("api", device), case.build("eager", device)
    with torch.no_grad():
        got, expected = api.forward(), eager.forward()
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected):
        if e.is_floating_point():
            torch.testing.assert_close(g.float(), e.float(), atol=2e-2, rtol=2e-2)
        else:
            torch.testing.assert_close(g, e)


def test_run_writes_json_and_markdown_and_records_failures(tmp_path):
    out = tmp_path / "result.json"
    summary = runner.run(
        ["ours:reference", "eager", "ours:no-such-backend", "ours:testplug", "liger"],
        suite="smoke",
        ops=["rms_norm", "swiglu"],
        device="cpu",
        out=str(out),
    )
    written = json.loads(out.read_text())
    assert written["rows"] == summary["rows"]
    by_key = {(row["case"], row["impl"]): row for row in written["rows"]}
    assert set(row["op"] for row in written["rows"]) == {"rms_norm", "swiglu"}
    for name in ("rms_norm 5x33", "swiglu 5x17"):
        assert by_key[(name, "ours:reference")]["ms"] > 0
        assert by_key[(name, "eager")]["ms"] > 0
        assert "no-such-backend" in by_key[(name, "ours:no-such-backend")]["error"]
    # a backend without a kernel for the operator is "n/a", not a failure
    assert by_key[("swiglu 5x17", "ours:testplug")]["skipped"] == "backend 'testplug' has no kernel for swiglu"
    assert "--peer" in written["failures"]["liger"]
    table = (tmp_path / "result.md").read_text()
    assert "| rms_norm 5x33 |" in table and "fails" in table and "n/a" in table


def test_bad_competitor_and_empty_selection_are_refused():
    with pytest.raises(ValueError, match="unknown competitor 'fast'"):
        runner.run(["fast"], suite="smoke", device="cpu")
    with pytest.raises(ValueError, match="no benchmark case matches"):
        runner.run(["eager"], suite="smoke", ops=["no_such_op"], device="cpu")


def test_plot_draws_the_swept_cases(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install liger-core[bench])")
    rows = [
        {"case": f"rms_norm 8x{h}", "op": "rms_norm", "impl": impl, "axis": ["hidden", h], "ms": h / 1000 * speed}
        for h in (64, 128, 256)
        for impl, speed in (("ours", 1.0), ("eager", 2.0))
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": rows, "device": "cpu", "date": "today"}))
    written = runner.plot(str(path))
    assert len(written) == 1 and written[0].endswith("-rms_norm-hidden.png")
    assert open(written[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_autotuning_time_is_reported_apart_from_the_medians(tmp_path, monkeypatch):
    # On the CPU, LIGER_KERNEL_AUTOTUNE=1 makes automatic selection time the test plugin's two fp32 rms_norm kernels.
    monkeypatch.setenv("LIGER_KERNEL_AUTOTUNE", "1")
    monkeypatch.setattr(cases, "BF16", torch.float32)
    monkeypatch.setenv("LIGER_KERNEL_CACHE_DIR", str(tmp_path / "cache"))
    row = runner.measure_case(cases.rms_norm(5, 33, "small"), "ours", torch.device("cpu"))
    assert "error" not in row, row.get("traceback")
    assert 0 < row["tuning_ms"] < row["first_call_ms"]
    # The row says which backend served it and what the autotuner measured for each candidate.
    (decision,) = row["autotune"]
    assert row["served_by"] == [decision["winner"]]
    assert len(decision["times_ms"]) >= 2 and all(t > 0 for t in decision["times_ms"].values())
    again = runner.measure_case(cases.rms_norm(5, 33, "small"), "ours", torch.device("cpu"))
    assert again["tuning_ms"] == 0  # the decision is remembered
    assert "autotune" not in again
    summary = {"impls": ["ours"], "cases": [{"name": row["case"], "op": "rms_norm", "group": "small",
               "ideal_bytes": 1, "flops": 0}], "rows": [row], "device": "cpu", "date": "today", "torch": "x",
               "liger_core": "y", "rounds": 1}  # fmt: skip
    table = runner.markdown(summary)
    assert "Autotuning (one-off" in table and f"[{decision['winner']}]" in table
