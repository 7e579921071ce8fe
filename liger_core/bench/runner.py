"""Run the benchmark cases for every competitor, each in its own process, and merge the results.

Competitors (``--impls``): ``ours`` (automatic selection, autotuning included), ``ours:<backend>`` (one of our
backends forced for the measured operator), ``eager``, ``compile`` and ``liger`` (the PyPI liger-kernel, from the
folder given by ``--peer``, put first on its process's path: both packages are called ``liger_kernel``).

Per case and competitor: the median forward+backward time of ``triton.testing.do_bench`` (on the CPU, used only to
test this machinery, a median of a few wall-clock runs), the peak extra memory — ``torch.cuda.max_memory_allocated()``
during one step minus what was allocated just before it, gradients included — and the wall time of the very first
step (Triton and Inductor compilation, and our autotuning, happen there). The best median of the rounds is kept.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from . import cases as case_module

OURS_PREFIX = "ours"
DEFAULT_IMPLS = ("ours", "eager", "compile", "liger")


def _kind(impl: str) -> str:
    if impl == OURS_PREFIX or impl.startswith(OURS_PREFIX + ":") or impl == "liger":
        return "api"
    if impl in ("eager", "compile"):
        return impl
    raise ValueError(f"unknown competitor {impl!r}: expected ours, ours:<backend>, eager, compile or liger")


def _suite(name: str) -> list[case_module.Case]:
    if name == "gpu":
        return case_module.gpu_cases()
    if name == "smoke":
        return case_module.smoke_cases()
    raise ValueError(f"unknown suite {name!r}: expected 'gpu' or 'smoke'")


# ---------------------------------------------------------------------------------------------------------------
# In the child process: one competitor, many cases.


def _step_function(prepared: case_module.Prepared):
    def step():
        output = prepared.forward()
        if prepared.backward:
            outputs = output if isinstance(output, tuple) else (output,)
            if prepared.grads is None:
                outputs[0].backward()
            else:
                torch.autograd.backward(list(outputs[: len(prepared.grads)]), list(prepared.grads))
        for leaf in prepared.leaves:
            leaf.grad = None

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(step, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=100, rep=400, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_case(case: case_module.Case, impl: str, device: torch.device) -> dict:
    row = {"case": case.name, "op": case.op, "group": case.group, "impl": impl, "axis": case.axis}
    if impl.startswith(OURS_PREFIX + ":"):
        from liger_core.registry import get_registry

        backend = get_registry().backends.get(impl.split(":", 1)[1])
        if backend is not None and case.op not in backend.spec.kernels:
            row["skipped"] = f"backend {backend.spec.name!r} has no kernel for {case.op}"
            return row
    try:
        step = _step_function(case.build(_kind(impl), device))
        from liger_core import autotune, dispatch

        tuned_before = autotune.tuning_seconds
        selections_before = set(dispatch._memo)
        decisions_before = {repr(sorted(d.items())) for d in autotune.cached_decisions(device)}
        start = time.perf_counter()
        step()
        _synchronize(device)
        row["first_call_ms"] = (time.perf_counter() - start) * 1e3
        # Our autotuner's one-off cost (timing the candidate backends), part of the first call, reported apart.
        row["tuning_ms"] = (autotune.tuning_seconds - tuned_before) * 1e3
        # Which backend served the case, and the autotuner's own timings of the candidates when it chose here.
        served = {backend for key, backend in dispatch._memo.items() if key not in selections_before}
        if served:
            row["served_by"] = sorted(served)
        tuned = [
            {"winner": d["winner"], "times_ms": d["times_ms"]}
            for d in autotune.cached_decisions(device)
            if repr(sorted(d.items())) not in decisions_before
        ]
        if tuned:
            row["autotune"] = tuned
        step()
        _synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            _synchronize(device)
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["ms"] = _median_ms(step, device)
    except Exception as error:  # a competitor's limit (a shape it refuses, out of memory): recorded, not fatal
        row["error"] = f"{type(error).__name__}: {error}"[:400]
        row["traceback"] = traceback.format_exc()[-1500:]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def copy_bandwidth_gbs(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), measured in this process."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    source = torch.empty(1 << 29, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), warmup=50, rep=200, return_mode="median")
    return 2 * source.numel() / ms / 1e6


def _force_backend(impl: str, ops: set[str]) -> None:
    if impl.startswith(OURS_PREFIX + ":"):
        backend = impl.split(":", 1)[1]
        for op in ops:
            os.environ[f"LIGER_KERNEL_BACKEND_{op.upper()}"] = backend


def run_child(impl: str, suite: str, names: list[str], device_name: str, out: str) -> None:
    device = torch.device(device_name)
    table = case_module.by_name(_suite(suite))
    selected = [table[name] for name in names]
    _force_backend(impl, {case.op for case in selected})
    import liger_kernel

    where = os.path.dirname(liger_kernel.__file__)
    is_ours = os.path.exists(os.path.join(os.path.dirname(where), "liger_core"))
    if _kind(impl) == "api" and is_ours != (impl != "liger"):
        raise RuntimeError(f"{impl}: imported liger_kernel from {where}, which is the wrong package")
    result = {
        "impl": impl,
        "liger_kernel_path": where,
        "liger_kernel_version": getattr(liger_kernel, "__version__", None) or _distribution_version(impl),
        "copy_gbs": copy_bandwidth_gbs(device),
        "rows": [],
    }
    for case in selected:
        print(f"[{impl}] {case.name}", file=sys.stderr, flush=True)
        result["rows"].append(measure_case(case, impl, device))
        with open(out, "w") as handle:  # after every case: what was measured survives a later crash or timeout
            json.dump(result, handle)


def _distribution_version(impl: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version("liger-kernel" if impl == "liger" else "liger-core")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# In the parent process.


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    for module in ("triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    from liger_core import __version__

    info["liger_core"] = __version__
    return info


def run(
    impls: list[str],
    suite: str = "gpu",
    groups: list[str] | None = None,
    ops: list[str] | None = None,
    rounds: int = 1,
    peer: str | None = None,
    device: str = "cuda",
    out: str | None = None,
    child_timeout: float = 1800.0,
) -> dict:
    """Measure every selected case for every competitor; returns (and writes to ``out``) the merged results."""
    for impl in impls:
        _kind(impl)
    selected = [
        case
        for case in _suite(suite)
        if (not groups or case.group in groups) and (not ops or case.op in ops or case.name in ops)
    ]
    if not selected:
        raise ValueError(f"no benchmark case matches groups={groups} ops={ops}")
    names = [case.name for case in selected]
    runs, failures = [], {}
    for round_index in range(rounds):
        order = impls[round_index % len(impls) :] + impls[: round_index % len(impls)]  # alternate who goes first
        for impl in order:
            if impl == "liger" and not peer:
                failures[impl] = "not measured: give --peer FOLDER holding the PyPI liger-kernel"
                continue
            # No selection overrides leak into a competitor; the cache directory (autotune, CUDA builds) is kept.
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith("LIGER_KERNEL_") or k == "LIGER_KERNEL_CACHE_DIR"
            }
            if impl == "liger":
                env["PYTHONPATH"] = os.path.abspath(peer) + os.pathsep + env.get("PYTHONPATH", "")
            child_out = os.path.abspath(f"{out or 'bench'}.{impl.replace(':', '-')}.{round_index}.part.json")
            command = [sys.executable, "-m", "liger_core.bench.runner", "--child", child_out, "--impl", impl]
            command += ["--suite", suite, "--device", device, "--names", json.dumps(names)]
            print(f"round {round_index + 1}/{rounds}: {impl}", flush=True)
            try:
                # From a neutral folder: `python -m` puts the working directory first on sys.path, and a checkout's
                # liger_kernel there would shadow the peer's.
                done = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=child_timeout, cwd=tempfile.gettempdir()
                )
                returncode, stderr = done.returncode, done.stderr
            except subprocess.TimeoutExpired as error:
                # the captured output of a killed child comes back as bytes even with text=True
                partial = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
                returncode, stderr = -1, f"timed out after {child_timeout} s\n{partial or ''}"
            if returncode != 0:
                failures[impl] = (stderr or "")[-3000:]
                print(f"{impl} failed:\n{failures[impl]}", file=sys.stderr, flush=True)
            if not os.path.exists(child_out):
                continue
            with open(child_out) as handle:  # a failed child's file holds the cases it finished
                runs.append(json.load(handle))
            os.remove(child_out)
            _write(runs, selected, impls, rounds, device, failures, out)  # kept if a later child hangs
    return _write(runs, selected, impls, rounds, device, failures, out)


def _write(runs, selected, impls, rounds, device: str, failures: dict, out: str | None) -> dict:
    summary = merge(runs, selected, impls, rounds, environment(torch.device(device)))
    summary["failures"] = dict(failures)
    if out:
        with open(out, "w") as handle:
            json.dump(summary, handle, indent=1)
        with open(os.path.splitext(out)[0] + ".md", "w") as handle:
            handle.write(markdown(summary) + "\n")
    return summary


def merge(runs: list[dict], selected: list[case_module.Case], impls: list[str], rounds: int, env: dict) -> dict:
    best: dict[tuple[str, str], dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["case"], row["impl"])
            kept = best.get(key)
            if kept is None or ("ms" not in kept and "ms" in row):
                best[key] = row
            elif "ms" in row and row["ms"] < kept["ms"]:
                # What only the first round sees (the first call, the selection made in it) stays with the row.
                firsts = {k: kept[k] for k in ("first_call_ms", "served_by", "autotune") if k in kept}
                best[key] = {**row, **firsts}
    copy = [run["copy_gbs"] for run in runs if run.get("copy_gbs")]
    return {
        **env,
        "rounds": rounds,
        "impls": impls,
        "copy_gbs": max(copy) if copy else None,
        "liger_kernel": sorted(
            {f"{run['impl']}: {run['liger_kernel_version']} ({run['liger_kernel_path']})" for run in runs}
        ),  # fmt: skip
        "cases": [
            {"name": c.name, "op": c.op, "group": c.group, "ideal_bytes": c.ideal_bytes, "flops": c.flops}
            for c in selected
        ],
        "rows": [best[key] for key in sorted(best, key=lambda k: ([c.name for c in selected].index(k[0]), k[1]))],
    }


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if "skipped" in row:
        return "n/a"
    if "error" in row:
        return "fails"
    memory = f", {row['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in row else ""
    served = f" [{'/'.join(row['served_by'])}]" if row["impl"] == OURS_PREFIX and row.get("served_by") else ""
    return f"{row['ms']:.3f}{memory}{served}"


def markdown(summary: dict) -> str:
    impls = summary["impls"]
    ours = [impl for impl in impls if impl.split(":")[0] == OURS_PREFIX]
    others = [impl for impl in impls if impl not in ours]
    headline = ours[0] if ours else None
    lines = [
        f"Forward+backward median ms (peak extra memory), {summary['device']}, {summary['date']}; torch "
        f"{summary['torch']}, triton {summary.get('triton')}, liger-core {summary['liger_core']}; "
        + (f"device copy {summary['copy_gbs']:.0f} GB/s; " if summary.get("copy_gbs") else "")
        + f"best of {summary['rounds']} round(s), each competitor in its own process.",
        "",
        "| case | " + " | ".join(impls) + (f" | {headline} vs best other | {headline} rate |" if headline else " |"),
        "|---" * (len(impls) + 1 + (2 if headline else 0)) + "|",
    ]
    rows = {(row["case"], row["impl"]): row for row in summary["rows"]}
    for case in summary["cases"]:
        cells = [_cell(rows.get((case["name"], impl))) for impl in impls]
        line = f"| {case['name']} | " + " | ".join(cells) + " |"
        if headline:
            mine = rows.get((case["name"], headline))
            times = [rows[(case["name"], i)]["ms"] for i in others if "ms" in rows.get((case["name"], i), {})]
            ratio, rate = "—", "—"
            if mine and "ms" in mine:
                if times:
                    ratio = f"{min(times) / mine['ms']:.2f}×"
                rate = case_module.bandwidth_note(_case_stub(case), mine["ms"])
                if case["ideal_bytes"] and summary.get("copy_gbs"):
                    rate += f" ({case['ideal_bytes'] / mine['ms'] / 1e6 / summary['copy_gbs']:.0%} of copy)"
            line += f" {ratio} | {rate} |"
        lines.append(line)
    lines.append("")
    if headline and others:
        lines.append(f"Ratio > 1: {headline} is faster than the fastest of {', '.join(others)} on that case.")
    firsts = [
        f"{row['impl']} {row['first_call_ms'] / 1e3:.1f} s"
        for row in summary["rows"]
        if row["case"] == summary["cases"][0]["name"] and "first_call_ms" in row
    ]
    if firsts:
        lines.append(f"First call of the first case (compilation, autotuning): {', '.join(firsts)}.")
    tuning = [row for row in summary["rows"] if row.get("tuning_ms")]
    if tuning:
        total = sum(row["tuning_ms"] for row in tuning) / 1e3
        slowest = max(tuning, key=lambda row: row["tuning_ms"])
        lines.append(
            f"Autotuning (one-off, inside the first calls, not in the medians): {total:.1f} s over {len(tuning)} "
            f"cases; the longest {slowest['tuning_ms'] / 1e3:.2f} s ({slowest['impl']}, {slowest['case']})."
        )
    for impl, error in summary.get("failures", {}).items():
        lines.append(f"{impl} did not run: {error.strip().splitlines()[-1] if error.strip() else 'no output'}")
    return "\n".join(lines)


def _case_stub(case: dict) -> case_module.Case:
    return case_module.Case(case["name"], case["op"], case["group"], build=None, ideal_bytes=case["ideal_bytes"],
                            flops=case["flops"])  # fmt: skip


def plot(summary_path: str) -> list[str]:
    """PNG plots of time against the swept dimension (hidden size, tokens), one per operator; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(summary_path) as handle:
        summary = json.load(handle)
    series: dict[tuple[str, str], dict[str, list]] = {}
    for row in summary["rows"]:
        if row.get("axis") and "ms" in row:
            lines = series.setdefault((row["op"], row["axis"][0]), {})
            lines.setdefault(row["impl"], []).append((row["axis"][1], row["ms"]))
    written = []
    for (op, axis), lines in series.items():
        if max(len(points) for points in lines.values()) < 3:
            continue
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for impl, points in sorted(lines.items()):
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(axis)
        axes.set_ylabel("forward+backward ms (median)")
        axes.set_title(f"{op}, bf16, {summary['device']}, {summary['date']}")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        path = f"{os.path.splitext(summary_path)[0]}-{op}-{axis}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _child_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--names", required=True)
    args = parser.parse_args(argv)
    run_child(args.impl, args.suite, json.loads(args.names), args.device, args.child)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
