"""A full training step (forward, backward, fused AdamW) of a Llama-style model built from a config (nothing is
downloaded): transformers unpatched, patched by ours, and patched by the PyPI liger-kernel, each eager and under
torch.compile, every variant in its own process (clean memory statistics, no patch leaking into another variant).

    python benchmarks/train_step.py --peer /tmp/peer                   # every variant, eager and compiled (GPU)
    python benchmarks/train_step.py --variants unpatched,ours --compile off --batch 8
    python benchmarks/train_step.py --device cpu --dtype float32 --layers 1 --hidden 64 --heads 4 --kv-heads 2 \\
        --vocab 512 --seq 32 --batch 2 --warmup 1 --steps 2 --compile off --variants unpatched,ours   # smoke test
    python benchmarks/train_step.py --world 2 --peer /tmp/peer --compile off   # FSDP2, data parallel on 2 GPUs

The model (defaults): 8 layers, hidden 2048, intermediate 8192, 16 heads, 4 KV heads, vocabulary 128256, tied
embeddings, sdpa attention, bf16 weights; batch B x 2048 random tokens that are also the labels (the same batch at
every step, so the loss falls); torch.optim.AdamW(fused=True). Every variant gets the same weights (each parameter is
re-initialised from a seed derived from its name) and the same data, so the first losses must agree.

Measured: the first warmup step (it includes compilation), then `--steps` timed steps between
torch.cuda.synchronize() calls: tokens/s = batch x seq x steps / seconds; peak memory is
torch.cuda.max_memory_allocated() over the timed steps after reset_peak_memory_stats() (weights, optimizer state,
activations, gradients: the whole process). The losses are kept as tensors and read after the timing.

liger-kernel is also called `liger_kernel`: its variant runs only with --peer PATH (a folder holding it, e.g.
`pip install --target /tmp/peer liger-kernel==0.8.5`), in a process whose sys.path starts with PATH; the parent never
imports any liger_kernel, and the `ours` process refuses to run with the peer's package. A variant that fails
(out of memory, an exception, a crash, a timeout) is recorded with its error in the JSON and the table.

--world N (N > 1): each variant's process spawns N processes (NCCL on cuda:0..N-1, NCCL_NVLS_ENABLE=0; gloo on the
CPU) that meet through a file and train data-parallel under FSDP2 (fully_shard on each decoder layer, then the
root), rank r on its own batch (seed + r). tokens/s counts all ranks' tokens over rank 0's time between barriers;
peak memory is the largest rank's; the losses are rank 0's, whose first loss must equal the unsharded model's on
the same batch (a column of the table). The spawning process gives up after --child-timeout and kills the ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

VARIANTS = ["unpatched", "ours", "liger"]
LABELS = {"unpatched": "transformers, unpatched", "ours": "ours (liger-core)", "liger": "liger-kernel (PyPI)"}


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# One variant (what each child process runs; also called in-process by the CPU smoke test)


def model_config(options: dict):
    from transformers import LlamaConfig

    hidden = options["hidden"]
    config = LlamaConfig(
        vocab_size=options["vocab"],
        hidden_size=hidden,
        intermediate_size=options["intermediate"] or 4 * hidden,
        num_hidden_layers=options["layers"],
        num_attention_heads=options["heads"],
        num_key_value_heads=options["kv_heads"],
        max_position_embeddings=max(options["seq"], 2048),
        tie_word_embeddings=options["tied"],
        hidden_act="silu",
        rms_norm_eps=1e-5,
        use_cache=False,
        pad_token_id=None,
    )
    config._attn_implementation = options["attention"]
    return config


def reinitialise(model, seed: int) -> None:
    """The same weights whatever modules the patch put in: each parameter drawn from a generator seeded by its
    index among the sorted parameter names (patches keep the names), norms at one."""
    import torch

    with torch.no_grad():
        for index, (_, parameter) in enumerate(sorted(model.named_parameters())):
            if parameter.dim() == 1:
                parameter.fill_(1.0)
                continue
            generator = torch.Generator(device=parameter.device).manual_seed(seed * 100003 + index)
            parameter.normal_(0.0, 0.02, generator=generator)


def batch(options: dict, device):
    import torch

    generator = torch.Generator().manual_seed(options["seed"])
    input_ids = torch.randint(0, options["vocab"], (options["batch"], options["seq"]), generator=generator)
    input_ids = input_ids.to(device)
    return input_ids, input_ids.clone()


def _patcher(variant: str):
    if variant == "unpatched":
        return None
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    return apply_liger_kernel_to_llama


def _check_package(variant: str, peer: str | None) -> str | None:
    """Which liger_kernel this process imports (the file), after checking that it is the intended one."""
    if variant == "unpatched":
        return None
    import liger_kernel

    where = os.path.realpath(liger_kernel.__file__)
    if variant == "liger":
        if not peer or not where.startswith(os.path.realpath(peer) + os.sep):
            raise RuntimeError(f"the liger variant imported {where}, not the package under --peer {peer}")
    else:
        import liger_core

        ours = os.path.dirname(os.path.dirname(os.path.realpath(liger_core.__file__)))
        if os.path.dirname(os.path.dirname(where)) != ours:
            raise RuntimeError(f"the ours variant imported {where}, not the liger_kernel next to liger_core ({ours})")
    return where


def versions() -> dict:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _header(options: dict, device) -> dict:
    """What every result starts with: which variant, where, with which software."""
    import torch

    return {
        "variant": options["variant"],
        "compile": options["compiled"],
        "device": options["device"],
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        **versions(),
        "liger_kernel_overrides": {k: v for k, v in os.environ.items() if k.startswith("LIGER_KERNEL_")},
    }


def build_model(options: dict, device, result: dict):
    """The variant's model on `device`, patched as --patch says, with the weights every variant shares. Records
    which liger_kernel was imported and the parameter count in `result`."""
    import torch

    variant = options["variant"]
    result["liger_kernel_file"] = _check_package(variant, options.get("peer"))
    apply = _patcher(variant)
    dtype = getattr(torch, options["dtype"])
    torch.manual_seed(options["seed"])
    from transformers import AutoModelForCausalLM

    if apply is not None and options["patch"] == "class":
        apply()  # the documented way: patch transformers' Llama classes, then build
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(options), dtype=dtype)
    if apply is not None and options["patch"] == "instance":
        apply(model=model)
    reinitialise(model, options["seed"])
    model.train()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return model


def make_optimizer(model, options: dict, cuda: bool, result: dict):
    """Fused AdamW; on a device or dtype without the fused implementation (the CPU at times) the plain one, said so
    in `result`."""
    import torch

    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=options["lr"], fused=True)
        result["optimizer"] = "AdamW(fused=True)"
    except (RuntimeError, TypeError) as error:  # a device or dtype without the fused implementation
        if cuda:
            raise
        optimizer = torch.optim.AdamW(model.parameters(), lr=options["lr"])
        result["optimizer"] = f"AdamW (fused unavailable here: {error})"[:200]
    return optimizer


def record_build(result: dict, started: float, device) -> None:
    """The seconds spent building since `started`, and on a GPU the memory the model and optimizer hold."""
    import torch

    result["build_s"] = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["static_memory_gb"] = torch.cuda.memory_allocated(device) / 1e9


def training_step(step_model, optimizer, input_ids, labels, losses: list):
    """One step: forward, backward, optimizer step, gradients dropped; the loss kept as a tensor in `losses` (read
    after the timing, so that reading it does not synchronise)."""

    def step():
        loss = step_model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step


def synchronizer(cuda: bool, device, barrier: bool = False):
    """The wait that brackets timed steps: the device's queue when on a GPU, then every rank when `barrier`."""

    import torch
    import torch.distributed as dist

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)
        if barrier:
            dist.barrier()

    return synchronize


def warm_up(step, synchronize, options: dict, result: dict, losses: list, name: str | None) -> None:
    """The untimed steps; the first one's time is recorded (it includes compilation). Logged when `name` is set."""
    for index in range(options["warmup"]):
        begin = time.perf_counter()
        step()
        synchronize()
        seconds = time.perf_counter() - begin
        if index == 0:
            result["first_step_s"] = seconds
        if name is not None:
            log(f"  {name}: warmup step {index + 1}/{options['warmup']} {seconds:.2f} s, loss {losses[-1].item():.4f}")


def time_steps(step, synchronize, steps: int) -> float:
    """Seconds for `steps` steps, between two synchronize() calls."""
    synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return time.perf_counter() - begin


def measurements(options: dict, seconds: float, losses: list, tokens: int, peak_memory_gb: float | None) -> dict:
    """The timed steps' figures; the losses (tensors until now, so that reading them did not sync) as numbers."""
    values = [loss.item() for loss in losses]
    return {
        "timed_s": seconds,
        "step_ms": 1000 * seconds / max(options["steps"], 1),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "peak_memory_gb": peak_memory_gb,
        "first_loss": values[0] if values else None,
        "last_loss": values[-1] if values else None,
        "losses": values,
        "finite": all(v == v and abs(v) != float("inf") for v in values),
    }


def run_variant(options: dict) -> dict:
    """Build, patch, train: one variant, in this process. Returns the measurements (an ``error`` entry when it
    failed). ``options``: the command-line options as a dict, plus ``variant`` and ``compiled``."""
    import torch

    variant, compiled = options["variant"], options["compiled"]
    device = torch.device(options["device"])
    cuda = device.type == "cuda"
    result = _header(options, device)
    name = f"{variant}{' compiled' if compiled else ''}"
    try:
        started = time.perf_counter()
        model = build_model(options, device, result)
        optimizer = make_optimizer(model, options, cuda, result)
        step_model = torch.compile(model) if compiled else model
        input_ids, labels = batch(options, device)
        record_build(result, started, device)

        losses = []
        step = training_step(step_model, optimizer, input_ids, labels, losses)
        synchronize = synchronizer(cuda, device)
        warm_up(step, synchronize, options, result, losses, name)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(step, synchronize, options["steps"])
        tokens = options["batch"] * options["seq"] * options["steps"]
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
        result.update(measurements(options, seconds, losses, tokens, peak))
        if options.get("profile") and cuda:
            result["profile"] = profile_steps(step, synchronize, options["profile"])
    except Exception as error:  # recorded, not raised: the other variants still run
        result["error"] = f"{type(error).__name__}: {error}"[:1000]
        result["traceback"] = traceback.format_exc()[-4000:]
        log(f"  {name}: failed: {result['error'][:300]}")
    return result


def profile_steps(step, synchronize, steps: int, rows: int = 25) -> dict:
    """Where a step's GPU time goes: `steps` more steps under torch.profiler, after the timed ones. Returns the GPU
    kernels' total busy time per step and the `rows` kernels (or copies) with the most time per step. Busy time well
    under the step time means the GPU waits for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        seconds = time.perf_counter() - begin
    kernels = [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA]

    def device_us(event) -> float:  # the attribute was renamed in torch 2.4 (cuda -> device)
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    kernels.sort(key=device_us, reverse=True)
    busy_ms = sum(device_us(e) for e in kernels) / 1000 / steps
    top = [
        {"kernel": e.key[:160], "calls_per_step": e.count / steps, "ms_per_step": device_us(e) / 1000 / steps}
        for e in kernels[:rows]
    ]
    return {"steps": steps, "step_ms": 1000 * seconds / steps, "gpu_busy_ms": busy_ms, "top": top}


# ----------------------------------------------------------------------------------------------------------------
# One variant under FSDP2 on --world processes (the variant's child spawns them; rank r writes rank<r>.json)


def _unsharded_loss(model, input_ids, labels) -> float:
    """The loss of the whole model in one process, before sharding: FSDP2's first loss on the same batch (the same
    weights, gathered) must equal it."""
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids, labels=labels).loss.item()


def train_rank(options: dict, rank: int, device) -> dict:
    """One rank's run: the model built as in one process, `fully_shard` on each decoder layer then on the root,
    compiled as a whole if asked; trained on the rank's own batch (seed + rank). The timed steps run between
    barriers, so rank 0's time is the step time of the whole group."""
    import torch
    from torch.distributed.fsdp import fully_shard

    cuda = device.type == "cuda"
    result = _header(options, device) if rank == 0 else {}
    started = time.perf_counter()
    model = build_model(options, device, result)
    input_ids, labels = batch(dict(options, seed=options["seed"] + rank), device)
    if rank == 0:
        result["single_process_first_loss"] = _unsharded_loss(model, input_ids, labels)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = make_optimizer(model, options, cuda, result)
    step_model = torch.compile(model) if options["compiled"] else model
    record_build(result, started, device)

    losses = []
    step = training_step(step_model, optimizer, input_ids, labels, losses)
    synchronize = synchronizer(cuda, device, barrier=True)
    name = f"{options['variant']}{' compiled' if options['compiled'] else ''} rank 0" if rank == 0 else None
    warm_up(step, synchronize, options, result, losses, name)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, synchronize, options["steps"])
    tokens = options["world"] * options["batch"] * options["seq"] * options["steps"]  # every rank's tokens
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    result.update(measurements(options, seconds, losses, tokens, peak))
    return result


def run_rank(rank: int, options: dict, directory: str) -> None:
    """A spawned process: join the group (NCCL on cuda:<rank>, gloo on the CPU, through a file in `directory`),
    train, write rank<rank>.json. A failure is written there too, then raised, so that the spawning process stops
    the other ranks instead of waiting on them."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    import torch
    import torch.distributed as dist

    world = options["world"]
    cuda = torch.device(options["device"]).type == "cuda"
    if cuda:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    path = os.path.join(directory, f"rank{rank}.json")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{os.path.join(directory, 'rendezvous')}",
        rank=rank,
        world_size=world,
        device_id=device if cuda else None,
    )
    try:
        result = train_rank(options, rank, device)
        with open(path, "w") as handle:
            json.dump(result, handle)
        dist.barrier()
    except Exception as error:
        with open(path, "w") as handle:
            json.dump({"error": f"{type(error).__name__}: {error}"[:1000], "traceback": traceback.format_exc()}, handle)
        raise
    finally:
        dist.destroy_process_group()


def _rank_results(directory: str, world: int) -> list[dict | None]:
    results = []
    for rank in range(world):
        path = os.path.join(directory, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as handle:
                results.append(json.load(handle))
        else:
            results.append(None)
    return results


def spawn_ranks(options: dict, directory: str) -> None:
    """Start the `world` processes and wait for them; after --child-timeout seconds give up (a TimeoutError).
    Whatever happens, no process is left running."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        run_rank, args=(options, directory), nprocs=options["world"], join=False, start_method="spawn"
    )
    deadline = time.monotonic() + options["child_timeout"]
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {options['world']} ranks did not finish in {options['child_timeout']} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def merge_ranks(ranks: list[dict]) -> dict:
    """One result from the ranks': rank 0's time (global tokens/s) and losses, the peak memory of the fullest rank,
    every rank's peak and first loss, and how far rank 0's first loss is from the unsharded one."""
    result = dict(ranks[0])
    peaks = [r["peak_memory_gb"] for r in ranks]
    result.update(
        world=len(ranks),
        peak_memory_gb=None if None in peaks else max(peaks),
        per_rank_peak_memory_gb=peaks,
        per_rank_first_loss=[r["first_loss"] for r in ranks],
        finite=all(r["finite"] for r in ranks),
    )
    if result.get("first_loss") is not None:
        result["single_process_first_loss_delta"] = result["first_loss"] - result["single_process_first_loss"]
    return result


def run_fsdp(options: dict) -> dict:
    """One variant as data-parallel training under FSDP2 on --world processes of this host (spawned here, each on
    its own GPU or, on the CPU, with gloo). Returns what run_variant returns, plus the per-rank figures; a failure
    or a hang of any rank becomes an ``error`` entry."""
    import torch

    world = options["world"]
    name = f"{options['variant']}{' compiled' if options['compiled'] else ''}"
    base = {"variant": options["variant"], "compile": options["compiled"], "device": options["device"], "world": world}
    if torch.device(options["device"]).type == "cuda" and torch.cuda.device_count() < world:
        return dict(base, error=f"--world {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    directory = tempfile.mkdtemp(prefix="train_step-fsdp-")
    try:
        spawn_ranks(options, directory)
        return merge_ranks(_rank_results(directory, world))
    except Exception as error:  # recorded, not raised: the other variants still run
        message, trace = f"{type(error).__name__}: {error}", traceback.format_exc()
        ranks = _rank_results(directory, world)
        if all(ranked is not None and "error" not in ranked for ranked in ranks):
            # Every rank had finished training and written its results: a process that dies after
            # that (seen once in CI on the CPU: SIGABRT, cause unknown) spoils no measurement. Kept as a warning.
            log(f"  {name}: a rank failed after the run: {message[:300]}")
            return dict(merge_ranks(ranks), warning=f"after the run: {message}"[:1000])
        for rank, ranked in enumerate(ranks):
            if ranked and "error" in ranked:  # the first rank that failed says why better than the spawner can
                message, trace = f"rank {rank}: {ranked['error']}", ranked["traceback"]
                break
        log(f"  {name}: failed: {message[:300]}")
        return dict(base, error=message[:1000], traceback=trace[-4000:])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The parent: one child process per variant, then the report


def child_command(options: dict, variant: str, compiled: bool, out: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--child", out, "--variants", variant]
    command += ["--compile", "on" if compiled else "off"]
    for key in ("device", "dtype", "batch", "seq", "layers", "hidden", "heads", "kv_heads", "vocab", "steps"):
        command += [f"--{key.replace('_', '-')}", str(options[key])]
    for key in ("warmup", "seed", "lr", "attention", "patch", "profile"):
        command += [f"--{key}", str(options[key])]
    if options["intermediate"]:
        command += ["--intermediate", str(options["intermediate"])]
    command.append("--tied" if options["tied"] else "--untied")
    if variant == "liger":
        command += ["--peer", options["peer"]]
    if options["world"] > 1:  # the child spawns the ranks and enforces the timeout on them itself
        command += ["--world", str(options["world"]), "--child-timeout", str(options["child_timeout"])]
    return command


def child_environment(variant: str, peer: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if peer:  # only the liger process sees the peer's package
        paths = [p for p in paths if os.path.realpath(p) != os.path.realpath(peer)]
        if variant == "liger":
            paths.insert(0, peer)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


# Under --world N the parent waits this much longer than the child waits for its ranks: the child gives up first
# and kills them (the parent killing the child would leave them running).
RANKS_GRACE_S = 60


def run_child(options: dict, variant: str, compiled: bool) -> dict:
    base = {"variant": variant, "compile": compiled}
    if variant == "liger" and not options["peer"]:
        return dict(base, error="skipped: no --peer PATH holding liger-kernel was given")
    out = f"{options['out_stem']}.{variant}.{'compiled' if compiled else 'eager'}.child.json"
    command = child_command(options, variant, compiled, out)
    env = child_environment(variant, options["peer"])
    timeout = options["child_timeout"] + (RANKS_GRACE_S if options["world"] > 1 else 0)
    try:
        done = subprocess.run(command, env=env, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        return dict(base, error=f"timeout after {timeout} s", stderr=(stderr or "")[-3000:])
    result = None
    if os.path.exists(out):
        with open(out) as handle:
            result = json.load(handle)
        os.remove(out)
    if result is None:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [""]
        return dict(base, error=f"process exited with {done.returncode}: {tail[0][:300]}", stderr=done.stderr[-3000:])
    if "error" in result and done.stderr:
        result["stderr"] = done.stderr[-3000:]
    return result


def summarize(options: dict, runs: list[dict]) -> dict:
    # the first losses are compared with transformers' own eager step (else the first variant that ran)
    ok = [r for r in runs if "error" not in r and r.get("first_loss") is not None]
    reference = next((r for r in ok if r["variant"] == "unpatched" and not r["compile"]), ok[0] if ok else None)
    for run in runs:
        if reference is not None and run.get("first_loss") is not None:
            run["first_loss_delta"] = run["first_loss"] - reference["first_loss"]
    measured = next((r for r in runs if "torch" in r), {})
    config = {key: options[key] for key in ("layers", "hidden", "heads", "kv_heads", "vocab", "batch", "seq")}
    config.update(
        intermediate=options["intermediate"] or 4 * options["hidden"],
        tied_embeddings=options["tied"],
        attention=options["attention"],
        dtype=options["dtype"],
        optimizer="torch.optim.AdamW(fused=True)",
        lr=options["lr"],
        warmup=options["warmup"],
        steps=options["steps"],
        patch=options["patch"],
        seed=options["seed"],
        world=options["world"],
    )
    return {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "device": options["device"],
        "gpu": measured.get("gpu"),
        "torch": measured.get("torch"),
        "triton": measured.get("triton"),
        "transformers": measured.get("transformers"),
        "python": platform.python_version(),
        "config": config,
        "loss_reference": None if reference is None else f"{reference['variant']}, compile {reference['compile']}",
        "runs": runs,
    }


def _cell(run: dict | None) -> str:
    if run is None:
        return "—"
    if "error" in run:
        return "fails: " + _short(run["error"])
    memory = f", {run['peak_memory_gb']:.1f} GB" if run.get("peak_memory_gb") is not None else ""
    return f"{run['tokens_per_s'] / 1000:.1f}k tok/s{memory}, loss {run['first_loss']:.2f} → {run['last_loss']:.2f}"


def _short(text: str, length: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= length else text[: length - 1] + "…"


def _layout(config: dict) -> tuple[str, str, str]:
    """The title's suffix, the batch clause and the peak-memory clause: one process, or FSDP2 on several."""
    world = config.get("world", 1)
    data = f"batch {config['batch']} × {config['seq']} tokens"
    if world == 1:
        return "", data, "over the timed steps"
    fsdp = f"FSDP2 on {world} processes"
    return (
        f", {fsdp}",
        f"{fsdp} (fully_shard per decoder layer, then the root), per-rank {data} (tokens/s: all ranks'; losses: "
        "rank 0's)",
        "over the timed steps, the largest of the ranks'",
    )


def markdown(summary: dict) -> str:
    config = summary["config"]
    runs = summary["runs"]
    world = config.get("world", 1)
    title, data, peak = _layout(config)
    lines = [
        f"# Full training step{title} — {summary['date']}, {summary['gpu']}",
        "",
        f"Llama-style model: {config['layers']} layers, hidden {config['hidden']}, intermediate "
        f"{config['intermediate']}, {config['heads']} heads, {config['kv_heads']} KV heads, vocabulary "
        f"{config['vocab']}, {'tied' if config['tied_embeddings'] else 'untied'} embeddings, {config['attention']} "
        f"attention, {config['dtype']} weights; {data}; forward, backward, "
        f"{config['optimizer']} (lr {config['lr']}); {config['warmup']} warmup and {config['steps']} timed steps; "
        f"patched at {config['patch']} level. torch {summary['torch']}, triton {summary['triton']}, transformers "
        f"{summary['transformers']}, Python {summary['python']}. Each variant in its own process "
        f"(`benchmarks/train_step.py`). Peak memory: `torch.cuda.max_memory_allocated()` {peak}.",
        "",
        "| model | eager | torch.compile |",
        "|---|---|---|",
    ]
    for variant in VARIANTS:
        cells = [next((r for r in runs if (r["variant"], r["compile"]) == (variant, c)), None) for c in (False, True)]
        if any(cells):
            lines.append(f"| {LABELS[variant]} | {_cell(cells[0])} | {_cell(cells[1])} |")
    single = " Δ first loss vs one process |" if world > 1 else ""  # rank 0's batch, the model unsharded
    lines += [
        "",
        "| variant | compile | tokens/s | step ms | peak GB | first loss | last loss | Δ first loss vs "
        f"{summary.get('loss_reference') or '—'} |{single} first step s (compiles) | error |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if world > 1 else ""),
    ]

    def number(value, form):
        return "—" if value is None else format(value, form)

    for run in runs:
        single = f" {number(run.get('single_process_first_loss_delta'), '+.4f')} |" if world > 1 else ""
        lines.append(
            f"| {run['variant']} | {'on' if run['compile'] else 'off'} | {number(run.get('tokens_per_s'), ',.0f')} "
            f"| {number(run.get('step_ms'), '.1f')} | {number(run.get('peak_memory_gb'), '.2f')} "
            f"| {number(run.get('first_loss'), '.4f')} | {number(run.get('last_loss'), '.4f')} "
            f"| {number(run.get('first_loss_delta'), '+.4f')} |{single} {number(run.get('first_step_s'), '.1f')} "
            f"| {_short(run.get('error') or run.get('warning', ''), 160)} |"
        )
    for run in runs:
        profile = run.get("profile")
        if not profile:
            continue
        lines += [
            "",
            f"### Where the GPU time of a step goes: {run['variant']}, compile {'on' if run['compile'] else 'off'}",
            "",
            f"torch.profiler over {profile['steps']} steps: {profile['step_ms']:.1f} ms a step (profiled), GPU kernels "
            f"busy {profile['gpu_busy_ms']:.1f} ms of it.",
            "",
            "| kernel | calls a step | ms a step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{_short(row['kernel'], 100)}` | {row['calls_per_step']:g} | {row['ms_per_step']:.2f} |"
            for row in profile["top"]
        ]
    return "\n".join(lines) + "\n"


def _slug(gpu: str | None, device: str) -> str:
    if not gpu or device == "cpu":
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", gpu.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_all(options: dict) -> dict:
    variants = options["variants"]
    modes = {"off": [False], "on": [True], "both": [False, True]}[options["compile"]]
    os.makedirs(os.path.dirname(os.path.abspath(options["out_stem"])), exist_ok=True)
    todo = [(variant, compiled) for variant in variants for compiled in modes]
    runs = []
    begin = time.perf_counter()
    for index, (variant, compiled) in enumerate(todo, 1):
        label = f"[{index}/{len(todo)}] {variant}{' compiled' if compiled else ''}"
        log(f"{label}: starting ({time.perf_counter() - begin:.0f} s elapsed)")
        started = time.perf_counter()
        run = run_child(options, variant, compiled)
        run["wall_s"] = time.perf_counter() - started
        runs.append(run)
        log(f"{label}: {_cell(run)} ({run['wall_s']:.0f} s)")
        if "stderr" in run and "error" in run:
            log("    " + "\n    ".join(run["stderr"].strip().splitlines()[-8:]))
    summary = summarize(options, runs)
    summary["total_s"] = time.perf_counter() - begin
    return summary


def write_report(summary: dict, out: str | None) -> tuple[str, str]:
    if out is None:
        world = summary["config"].get("world", 1)
        name = f"{summary['date']}-{_slug(summary['gpu'], summary['device'])}-train_step"
        name += f"-fsdp{world}" if world > 1 else ""
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".json")
    stem = out[: -len(".json")] if out.endswith(".json") else out
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as handle:
        json.dump(summary, handle, indent=1)
    text = markdown(summary)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    return stem + ".json", stem + ".md"


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + str(VARIANTS))
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--peer", help="a folder holding the PyPI liger-kernel (run with it first on sys.path)")
    parser.add_argument(
        "--out", help="JSON path (a .md is written next to it); default benchmarks/results/<date>-<gpu>-train_step.json"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=None, help="default 4 × hidden (8192)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tied", dest="tied", action="store_true", default=True, help="tied embeddings (default)")
    parser.add_argument("--untied", dest="tied", action="store_false")
    parser.add_argument("--attention", default="sdpa", help="transformers attention implementation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps; the first one compiles")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--patch",
        choices=["class", "instance"],
        default="class",
        help="class: apply_liger_kernel_to_llama() before building; instance: (model=...) after",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after the timed steps, profile this many more (GPU kernel table); ignored with --world above 1",
    )
    parser.add_argument(
        "--world",
        type=int,
        default=1,
        help="above 1: each variant trains data-parallel under FSDP2 on this many processes of this host (one GPU "
        "each; gloo with --device cpu), each rank on its own --batch rows; the default output name gets -fsdp<N>",
    )
    parser.add_argument("--child-timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant, write its JSON here
    args = parser.parse_args(argv)
    options = vars(args)
    options["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(options["variants"]) - set(VARIANTS))
    if unknown or not options["variants"]:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    if options["warmup"] < 1 or options["steps"] < 1:
        parser.error("--warmup and --steps must be at least 1")
    if options["world"] < 1:
        parser.error("--world must be at least 1")
    if options["peer"]:
        options["peer"] = os.path.abspath(options["peer"])
    return options


def main(argv=None) -> None:
    options = parse(argv)
    if options["child"]:
        if options["variants"] == ["liger"] and options["peer"]:
            sys.path.insert(0, options["peer"])  # already first through PYTHONPATH; made sure of here
        options.update(variant=options["variants"][0], compiled=options["compile"] == "on")
        result = run_variant(options) if options["world"] == 1 else run_fsdp(options)
        with open(options["child"], "w") as handle:
            json.dump(result, handle)
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = options["out"] or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step")
    options["out_stem"] = f"{base[: -len('.json')] if base.endswith('.json') else base}.{stamp}.{os.getpid()}"
    summary = run_all(options)
    json_path, md_path = write_report(summary, options["out"])
    print()
    print(markdown(summary), flush=True)
    log(f"wrote {json_path} and {md_path} ({summary['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
