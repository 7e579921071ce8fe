"""What the processes of tests/distributed run, and how the test starts them.

`run_world` spawns `world` processes (torch.multiprocessing, start method "spawn") that meet through a file store
(no port to race for), each running `worker`: it sets the environment it was handed (the test's own, with every
LIGER_KERNEL_* variable removed and the test's forcing added), joins the process group (gloo on the CPU, NCCL on
GPUs), runs one scenario and saves what it returns to ``rank<r>.pt``. The test reads those files and asserts.
`run_world` gives up after `timeout` seconds and kills the processes, so a hung collective fails the test.

Scenarios:

- "train": a tiny Llama (random weights), patched in place with our kernels, trains STEPS SGD steps under DDP,
  under FSDP2 (``fully_shard`` on each decoder layer, then the root) and under FSDP2 with the lm head sharded on
  its own (its weight is then a DTensor shard outside its own call: the ZeRO-3 / FSDP pitfall), and under FSDP2
  laid out as Accelerate does (the final norm and the lm head one group). Each rank trains
  on its own rows of one global batch. For comparison rank 0 trains the same patched model in one process on the
  whole batch and rank 1 the unpatched Hugging Face model: the single-process runs the distributed ones must match.
- "dtensor": the fused-linear losses called directly with DTensor weights (sharded and replicated), each rank on
  its own tokens, with the expected loss and gradients computed in plain PyTorch on full tensors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
ROWS_PER_RANK = 2
SEQ = 8
VOCAB = 128
LR = 0.5


# -- starting the processes ----------------------------------------------------------------------------------------


def child_environment(**forcing: str) -> dict[str, str]:
    """The environment of the test for its processes: LIGER_KERNEL_* removed (as tests/conftest.py does for the
    test itself), then `forcing` added."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIGER_KERNEL_")}
    environment.update(forcing)
    return environment


def run_world(scenario: str, world: int, directory: Path, environment: dict, backend: str = "gloo", timeout=120):
    """Run `scenario` on `world` processes; returns the per-rank results, or raises (after `timeout` seconds: a
    TimeoutError, the processes killed)."""
    directory.mkdir(parents=True, exist_ok=True)
    store = directory / "rendezvous"
    context = mp.start_processes(
        worker,
        args=(world, str(store), backend, scenario, environment, str(directory)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} processes of scenario {scenario!r} did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def worker(rank: int, world: int, store: str, backend: str, scenario: str, environment: dict, directory: str):
    for variable in [v for v in os.environ if v.startswith("LIGER_KERNEL_")]:
        del os.environ[variable]
    os.environ.update(environment)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = SCENARIOS[scenario](rank, world, device)
        torch.save(result, Path(directory) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- the model and the data ----------------------------------------------------------------------------------------


def tiny_llama(device):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)  # the same weights in every process
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.to(device)


def patched_llama(device):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    model = tiny_llama(device)
    apply_liger_kernel_to_llama(model=model)
    return model


def global_batch(world: int, device):
    """(input_ids, labels) of world * ROWS_PER_RANK rows. Each rank's first row has a prompt that is not trained
    on, so every rank has the same number of counted tokens: the mean of the ranks' mean losses is then the mean
    over the whole batch, and DDP's averaged gradient its gradient."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (world * ROWS_PER_RANK, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (world * ROWS_PER_RANK, SEQ), generator=generator)
    labels[::ROWS_PER_RANK, :3] = -100
    return input_ids.to(device), labels.to(device)


def rank_rows(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of a tensor or of a DTensor's full value."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def _name(name: str) -> str:
    return name.removeprefix("module.")  # DDP's prefix


def train(model, input_ids, labels, distributed: bool) -> dict:
    """STEPS of SGD; the losses (averaged over the ranks when distributed), the first step's gradients and the
    final parameters, as full CPU tensors by parameter name."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    losses, first_grads = [], None
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        if first_grads is None:
            first_grads = {_name(n): _full(p.grad) for n, p in model.named_parameters()}
        optimizer.step()
        value = loss.detach().clone()
        if distributed:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(value.item())
    params = {_name(n): _full(p) for n, p in model.named_parameters()}
    return {"losses": losses, "grads": first_grads, "params": params}


def _record_backends(result: dict) -> dict:
    """The backends that served this process's calls, and the environment it ran under."""
    from liger_core import dispatch

    result["backends"] = sorted(set(dispatch._memo.values()))
    result["environment"] = {
        k: v for k, v in os.environ.items() if k.startswith("LIGER_KERNEL_") or k == "TRITON_INTERPRET"
    }
    return result


def scenario_hang(rank: int, world: int, device) -> dict:
    """A rank that never joins the collective: `run_world` must give up."""
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(600)
    return {}


# -- scenarios -----------------------------------------------------------------------------------------------------


def scenario_train(rank: int, world: int, device) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    input_ids, labels = global_batch(world, device)
    mine = rank_rows(input_ids, rank), rank_rows(labels, rank)
    result = {}

    ddp = DistributedDataParallel(patched_llama(device), device_ids=[rank] if device.type == "cuda" else None)
    result["ddp"] = train(ddp, *mine, distributed=True)

    model = patched_llama(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result["fsdp2"] = train(model, *mine, distributed=True)

    model = patched_llama(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)  # its own group: gathered only while lm_head itself is called
    fully_shard(model)
    result["lm_head_weight_outside"] = type(model.lm_head.weight).__name__
    result["fsdp2_lm_head"] = train(model, *mine, distributed=True)

    # Accelerate's FSDP2 layout (accelerate 1.15, fsdp2_prepare_model): the embedding on its own, each decoder
    # layer, the tail [final norm, lm head] as one group that stays gathered after forward, then the root
    model = patched_llama(device)
    fully_shard(model.model.embed_tokens)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    result["fsdp2_accelerate"] = train(model, *mine, distributed=True)
    _record_backends(result)

    # the single-process runs on the whole batch: rank 0 ours, rank 1 the unpatched model
    single = patched_llama(device) if rank == 0 else tiny_llama(device)
    result["single"] = train(single, input_ids, labels, distributed=False)
    return result


def _plain_cross_entropy(x, weight, target):
    return torch.nn.functional.cross_entropy(x @ weight.T, target, ignore_index=-100)


def _plain_jsd(student_x, student_w, teacher_x, teacher_w, beta=0.5):
    log_q = torch.log_softmax(student_x @ student_w.T, dim=-1)
    log_p = torch.log_softmax(teacher_x @ teacher_w.T, dim=-1)
    log_m = torch.logsumexp(
        torch.stack([log_p + torch.log(torch.tensor(beta)), log_q + torch.log1p(-torch.tensor(beta))]), 0
    )
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (beta * kl_p + (1 - beta) * kl_q).mean()


def scenario_dtensor(rank: int, world: int, device) -> dict:
    """Fused-linear CE and JSD with DTensor weights. Every rank draws every rank's tokens (the same seed) and uses
    its own; the expected gradient of a weight is the mean over the ranks of the gradients of their losses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from liger_kernel.chunked_loss import LigerFusedLinearCPOLoss
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_fused_linear_jsd

    mesh = init_device_mesh(device.type, (world,))
    generator = torch.Generator().manual_seed(2)
    vocab, hidden, tokens = 37, 12, 9  # odd sizes; 37 rows do not split evenly over 2 ranks
    weight = torch.randn(vocab, hidden, generator=generator).to(device)
    teacher_weight = torch.randn(vocab, hidden + 4, generator=generator).to(device)
    xs = [torch.randn(tokens, hidden, generator=generator).to(device) for _ in range(world)]
    teacher_xs = [torch.randn(tokens, hidden + 4, generator=generator).to(device) for _ in range(world)]
    targets = [torch.randint(0, vocab, (tokens,), generator=generator).to(device) for _ in range(world)]
    for target in targets:
        target[:2] = -100

    def expected(loss_of):
        """(this rank's loss, mean over ranks of d loss_r / d weight, d loss / d x of this rank)."""
        w = weight.detach().clone().requires_grad_()
        grads = []
        for r in range(world):
            x = xs[r].detach().clone().requires_grad_()
            loss = loss_of(r, x, w)
            grads.append(torch.autograd.grad(loss, (x, w)))
            if r == rank:
                mine = loss.detach(), grads[-1][0]
        return mine[0].cpu(), (sum(g[1] for g in grads) / world).cpu(), mine[1].cpu()

    def actual(run, placement):
        w = distribute_tensor(weight.detach().clone(), mesh, [placement]).requires_grad_()
        x = xs[rank].detach().clone().requires_grad_()
        loss = run(x, w)
        loss.backward()
        return {
            "loss": loss.detach().cpu(),
            "weight_grad": _full(w.grad),
            "grad_placements": tuple(str(p) for p in w.grad.placements),
            "x_grad": x.grad.detach().cpu(),
        }

    def cpo(x, w, target):
        # 2 sequences of 4 tokens (chosen, rejected); truth: the same loss with a plain weight
        return LigerFusedLinearCPOLoss()(w, x[:8].reshape(2, 4, hidden), target[:8].reshape(2, 4))[0]

    teacher_replicated = distribute_tensor(teacher_weight, mesh, [Replicate()])
    runs = {
        "ce_module": (
            lambda x, w: LigerFusedLinearCrossEntropyLoss()(w, x, targets[rank]),
            lambda r, x, w: _plain_cross_entropy(x, w, targets[r]),
        ),
        "ce_functional": (
            lambda x, w: liger_fused_linear_cross_entropy(x, w, targets[rank]),
            lambda r, x, w: _plain_cross_entropy(x, w, targets[r]),
        ),
        "jsd_module": (
            lambda x, w: LigerFusedLinearJSD()(x, w, teacher_xs[rank], teacher_replicated),
            lambda r, x, w: _plain_jsd(x, w, teacher_xs[r], teacher_weight),
        ),
        "cpo_module": (
            lambda x, w: cpo(x, w, targets[rank]),
            lambda r, x, w: cpo(x, w, targets[r]),
        ),
        "jsd_functional": (
            lambda x, w: liger_fused_linear_jsd(x, w, teacher_xs[rank], teacher_replicated, jsd_beta=0.5),
            lambda r, x, w: _plain_jsd(x, w, teacher_xs[r], teacher_weight),
        ),
    }
    result = {}
    for name, (run, reference) in runs.items():
        want = expected(reference)
        for placement in (Shard(0), Replicate()):
            result[(name, str(placement))] = {"got": actual(run, placement), "want": want}
    return _record_backends(result)


SCENARIOS = {"train": scenario_train, "dtensor": scenario_dtensor, "hang": scenario_hang}
