"""The ``liger-kernel`` command.

``liger-kernel info [--json] [--autotune]``: which backend serves which operator on this machine and why not,
what the default selection picks, plugins that failed to load, and the environment overrides in force.

``liger-kernel bench [--impls ...] [--groups ...] [--ops ...] [--peer FOLDER] [--out FILE.json]``: on a GPU, time
forward+backward and measure peak extra memory of every operator for ours against PyTorch eager, torch.compile and
liger-kernel (`liger_core.bench`); ``--plot FILE.json`` draws PNG plots of a recorded result (needs matplotlib).

``liger-kernel demo [--steps N] [--device DEVICE]``: train a small Llama-style decoder with plain PyTorch layers and
with the Liger modules, print both loss curves, and exit non-zero when they disagree (`liger_core.demo`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _sample_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gather_info() -> dict:
    """Everything `info` prints, as plain data."""
    from . import __version__, dispatch, env
    from .registry import get_registry

    registry = get_registry()
    device = _sample_device()
    operators = {}
    for op in registry.operator_names():
        spec = registry.operator(op)
        dtype = spec.dtypes[0]
        inputs, attrs = spec.make_inputs(device, dtype, "tiny", 0)
        inputs, attrs = spec.bind(inputs, attrs)
        cells = {}
        for name, backend in sorted(registry.backends.items()):
            if op not in backend.spec.kernels:
                cells[name] = {"serves": False, "reasons": ["no kernel for this operator"]}
                continue
            reasons = dispatch._reasons(spec, name, inputs, attrs, forced=False)
            forced_reasons = dispatch._reasons(spec, name, inputs, attrs, forced=True) if reasons else []
            cells[name] = {
                "serves": not reasons,
                "serves_when_forced": bool(reasons) and not forced_reasons,
                "reasons": reasons,
            }
        try:
            selected = dispatch._select(spec, inputs, attrs, None, tracing=False)
        except Exception as error:  # an override that cannot serve: show why instead of failing the whole report
            selected = f"error: {type(error).__name__}: {error}"
        required, source, preferred, _ = dispatch._forcing(op, None)
        preferred_here = [
            name for name in preferred if name in registry.backends and op in registry.backends[name].spec.kernels
        ]
        operators[op] = {
            "backends": cells,
            "selected": selected,
            "sample": f"{device.type} {dtype}",
            "forced_by": source if required else (env.BACKEND if preferred_here else None),
            "preference_ignored": bool(preferred) and not preferred_here,
        }
    return {
        "version": __version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no CUDA GPU visible)",
        "backends": {
            name: {
                "distribution": backend.distribution,
                "version": backend.spec.version,
                "priority": backend.spec.priority,
                "available": not backend.unavailable_reasons(),
                "reasons": backend.unavailable_reasons(),
            }
            for name, backend in sorted(registry.backends.items())
        },
        "operators": operators,
        "failures": dict(registry.failures),
        "environment": env.overrides(),
    }


def _print_info(info: dict) -> None:
    print(f"liger-kernel {info['version']} (torch {info['torch']}) on {info['device']}\n")
    print("Backends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        print(f"  {name:<12} priority {b['priority']:<4} {b['distribution']} {b['version']}  {state}")
    backends = list(info["backends"])
    width = max([len("operator")] + [len(op) for op in info["operators"]]) + 2
    print("\nOperators (sample call: " + next(iter(info["operators"].values()))["sample"] + "):")
    print("  " + "operator".ljust(width) + "".join(name.ljust(14) for name in backends) + "selected")
    notes = []
    for op, row in info["operators"].items():
        cells = []
        for name in backends:
            cell = row["backends"][name]
            if cell["serves"]:
                cells.append("serves")
            elif cell.get("serves_when_forced"):
                cells.append("if forced")
            elif cell["reasons"] == ["no kernel for this operator"]:
                cells.append("-")
            else:
                cells.append("no*")
                notes.append(f"{op} / {name}: " + "; ".join(cell["reasons"]))
        selected = row["selected"] + (f" (forced by {row['forced_by']})" if row["forced_by"] else "")
        if row["preference_ignored"]:
            selected += " (automatic: no backend of the preference list implements it)"
        print("  " + op.ljust(width) + "".join(c.ljust(14) for c in cells) + selected)
    if notes:
        print("\n  no* - why not:")
        for note in dict.fromkeys(notes):
            print("    " + note)
    if info["failures"]:
        print("\nPlugins or kernels that failed to load:")
        for where, error in info["failures"].items():
            print(f"  {where}: {error}")
    print("\nEnvironment overrides: " + (", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "none"))


def _print_autotune(as_json: bool) -> None:
    from . import autotune

    device = _sample_device()
    decisions = autotune.cached_decisions(device)
    if as_json:
        print(json.dumps({"file": str(autotune.cache_file(device)), "decisions": decisions}, indent=1))
        return
    print(f"Autotune cache: {autotune.cache_file(device)}")
    if not decisions:
        print("  no decisions yet")
    for record in decisions:
        times = ", ".join(f"{k} {v:.4g} ms" for k, v in sorted(record["times_ms"].items()))
        print(f"  {record['op']} on {record['device']} {record['key']}: {record['winner']} ({times})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liger-kernel", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="backends, operators and selection on this machine")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.add_argument("--autotune", action="store_true", help="list the cached autotune decisions")
    demo = commands.add_parser("demo", help="train a small model with and without the Liger modules and compare")
    demo.add_argument("--steps", type=int, default=40, help="training steps of each run (default 40)")
    demo.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', ...")
    demo.add_argument(
        "--model",
        choices=("auto", "transformers", "torch"),
        default="auto",
        help="transformers' LlamaForCausalLM or a plain PyTorch decoder (auto: transformers when installed)",
    )
    bench = commands.add_parser("bench", help="benchmark every operator against eager, torch.compile, liger-kernel")
    bench.add_argument("--impls", default=None, help="comma-separated competitors: ours, ours:<backend>, eager, "
                       "compile, liger (default: ours,eager,compile,liger)")  # fmt: skip
    bench.add_argument("--groups", default=None, help="comma-separated case groups: target, small, sweep (default all)")
    bench.add_argument("--ops", default=None, help="comma-separated operators or case names (default all)")
    bench.add_argument("--rounds", type=int, default=1, help="rounds over the competitors; the best median is kept")
    bench.add_argument("--peer", default=None, help="folder holding the PyPI liger-kernel (for the 'liger' competitor)")
    bench.add_argument("--out", default=None, help="JSON file to write (a .md table is written beside it)")
    bench.add_argument("--suite", choices=("gpu", "smoke"), default="gpu", help="smoke: tiny shapes, any device")
    bench.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --suite smoke)")
    bench.add_argument("--plot", default=None, metavar="FILE.json", help="only draw PNG plots of a recorded result")
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _bench(parser, args)

    if args.command == "demo":
        from . import demo as demo_module

        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        return demo_module.run(steps=args.steps, device=args.device, model=args.model)

    if args.command == "info":
        if args.autotune:
            _print_autotune(args.json)
        elif args.json:
            print(json.dumps(gather_info(), indent=1, default=str))
        else:
            _print_info(gather_info())
    return 0


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import bench

    if args.plot:
        for path in bench.plot(args.plot):
            print(path)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("bench: no CUDA GPU is visible (use --suite smoke --device cpu to try the machinery)")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()] if text else None  # noqa: E731
    try:
        summary = bench.run(
            split(args.impls) or list(bench.DEFAULT_IMPLS),
            suite=args.suite,
            groups=split(args.groups),
            ops=split(args.ops),
            rounds=args.rounds,
            peer=args.peer,
            device=args.device,
            out=args.out,
        )
    except ValueError as error:
        parser.error(str(error))
    print(bench.markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
