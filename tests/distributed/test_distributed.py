"""torch.distributed on the CPU: 2 gloo processes (see dist_workers.py) train a tiny Llama patched with our
kernels under DDP and FSDP2 and must match a single-process run on the whole batch; the fused-linear losses take
DTensor weights. The same on 2 GPUs with NCCL under ``-m gpu`` (NCCL_NVLS_ENABLE=0: NVLink multicast off).

Each scenario starts its processes once per backend (module-scoped fixtures); the tests assert on the results.
The Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it; the processes inherit it), forced
with LIGER_KERNEL_BACKEND=triton.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from liger_kernel.transformers._distributed import call_through, gather_dtensors

pytest.importorskip("transformers")

from dist_workers import STEPS, child_environment, run_world  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
TIMEOUT = 120  # seconds: a hung process group fails the test instead of hanging CI
FORCING = {"reference": {}, "triton": {"LIGER_KERNEL_BACKEND": "triton"}}


def _triton_runs_on_the_cpu() -> bool:
    """The gloo runs keep every tensor on the CPU: Triton serves them only through its interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module", params=["reference", "triton"])
def trained(request, tmp_path_factory):
    backend = request.param
    if backend == "triton" and not _triton_runs_on_the_cpu():
        pytest.skip("triton is not installed, or TRITON_INTERPRET is not 1 (set on machines without a GPU)")
    directory = tmp_path_factory.mktemp(f"train-{backend}")
    environment = child_environment(LIGER_KERNEL_CACHE_DIR=str(directory / "cache"), **FORCING[backend])
    return backend, run_world("train", WORLD, directory, environment, timeout=TIMEOUT)


def _close(got: dict, want: dict, what: str, rtol=1e-4, atol=1e-5) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


RUNS = ["ddp", "fsdp2", "fsdp2_lm_head", "fsdp2_accelerate"]


@pytest.mark.parametrize("run", RUNS)
def test_distributed_training_matches_one_process(trained, run):
    backend, results = trained
    single, unpatched = results[0]["single"], results[1]["single"]
    # our single-process run is the unpatched model's (the patched kernels are right) ...
    torch.testing.assert_close(single["losses"], unpatched["losses"], rtol=1e-4, atol=1e-5)
    _close(single["grads"], unpatched["grads"], "single-process gradient")
    assert single["losses"][0] != single["losses"][-1]  # it trained
    for rank, result in enumerate(results):
        # ... and every rank of the distributed run matches it: losses at every step, gradients, final weights
        distributed = result[run]
        assert len(distributed["losses"]) == STEPS
        torch.testing.assert_close(distributed["losses"], single["losses"], rtol=1e-4, atol=1e-5)
        _close(distributed["grads"], single["grads"], f"rank {rank} {run} gradient")
        _close(distributed["params"], single["params"], f"rank {rank} {run} weight")
        assert result["backends"] == [backend], result["backends"]


def test_processes_run_under_the_tests_environment(trained):
    backend, results = trained
    want = {"LIGER_KERNEL_CACHE_DIR": results[0]["environment"]["LIGER_KERNEL_CACHE_DIR"], **FORCING[backend]}
    if os.environ.get("TRITON_INTERPRET") is not None:
        want["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    assert all(result["environment"] == want for result in results)


def test_a_hung_process_group_fails_instead_of_hanging(tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 8 s"):
        run_world("hang", WORLD, tmp_path, child_environment(), timeout=8)
    assert time.monotonic() - started < 30


def test_lm_head_sharded_on_its_own_is_a_dtensor_outside_its_call(trained):
    # the case the patched forward must handle: it never calls lm_head, yet gets the gathered weight
    _, results = trained
    assert all(result["lm_head_weight_outside"] == "DTensor" for result in results)


@pytest.fixture(scope="module")
def dtensor_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dtensor")
    environment = child_environment(LIGER_KERNEL_CACHE_DIR=str(directory / "cache"))
    return run_world("dtensor", WORLD, directory, environment, timeout=TIMEOUT)


CALLS = ["ce_module", "ce_functional", "jsd_module", "jsd_functional", "cpo_module"]
PLACEMENTS = ["S(0)", "R"]


def _check_dtensor_case(result: dict, call: str, placement: str, rtol: float, atol: float) -> None:
    """One rank's result of one fused-linear call with a DTensor weight against plain PyTorch on full tensors."""
    case = result[(call, placement)]
    got, (loss, weight_grad, x_grad) = case["got"], case["want"]
    what = f"{call} {placement}"
    torch.testing.assert_close(got["loss"], loss, rtol=rtol, atol=atol, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(got["x_grad"], x_grad, rtol=rtol, atol=atol, msg=lambda m: f"{what} x grad: {m}")
    # the weight's gradient: a DTensor with the weight's placement, the ranks' gradients averaged
    torch.testing.assert_close(
        got["weight_grad"], weight_grad, rtol=rtol, atol=atol, msg=lambda m: f"{what} weight grad: {m}"
    )
    assert got["grad_placements"] == (placement,), (what, got["grad_placements"])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("call", CALLS)
def test_fused_linear_losses_take_dtensor_weights(dtensor_results, call, placement):
    for result in dtensor_results:
        _check_dtensor_case(result, call, placement, rtol=1e-5, atol=1e-6)
        assert result["backends"] == ["reference"]


# -- the helpers, in this process ----------------------------------------------------------------------------------


def test_gather_dtensors_leaves_plain_tensors_alone():
    a, b = torch.randn(3), torch.randn(2)
    assert all(x is y for x, y in zip(gather_dtensors(a, None, b, 3), (a, None, b, 3)))


class _GatheringWrapper:
    """What FSDP2 / ZeRO-3 do to a module, in miniature: its weight is a placeholder except during its call, when
    a pre-forward hook puts the real one in place and a forward hook takes it away."""

    def __init__(self, module: nn.Linear):
        self.real = module.weight
        self.placeholder = nn.Parameter(torch.empty(0))
        module.weight = self.placeholder
        module.register_forward_pre_hook(lambda m, args: setattr(m, "weight", self.real))
        module.register_forward_hook(lambda m, args, out: setattr(m, "weight", self.placeholder))


def test_call_through_runs_the_function_inside_the_module_call():
    torch.manual_seed(0)
    head = nn.Linear(6, 11, bias=False)
    real = head.weight
    _GatheringWrapper(head)
    hidden, target = torch.randn(5, 6, requires_grad=True), torch.randint(0, 11, (5,))
    seen = []

    def loss_of(hidden, target):
        seen.append(head.weight)
        return nn.functional.cross_entropy(hidden @ head.weight.T, target)

    loss = call_through(head, loss_of, hidden, target)
    assert seen == [real] and head.weight.numel() == 0  # the gathered weight inside; the placeholder after
    assert "forward" not in head.__dict__  # the module's own forward is back
    loss.backward()
    assert real.grad is not None
    torch.testing.assert_close(head(hidden), hidden @ real.T)  # still an ordinary Linear


def test_call_through_without_hooks_is_a_plain_call():
    head = nn.Linear(4, 3)
    assert call_through(head, lambda x: x * 2, torch.ones(2)).tolist() == [2.0, 2.0]
    assert "forward" not in head.__dict__


def test_patched_forward_reads_the_lm_head_weight_inside_its_call(monkeypatch):
    """The patched causal-LM forward under a wrapper that gathers lm_head's weight only in its hooks: the loss and
    the gradients are those of the unwrapped model (before the fix it got the placeholder: a shape error)."""
    from dist_workers import patched_llama, tiny_llama
    from transformers.models.llama import modeling_llama

    # rope=True patches the modeling module's function: put it back after this test
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    plain, wrapped = patched_llama("cpu"), patched_llama("cpu")
    real = wrapped.lm_head.weight
    _GatheringWrapper(wrapped.lm_head)
    want = plain(input_ids=input_ids, labels=input_ids).loss
    got = wrapped(input_ids=input_ids, labels=input_ids).loss
    assert got.grad_fn is not None and wrapped.lm_head.weight.numel() == 0
    torch.testing.assert_close(got, want)
    want.backward(), got.backward()
    torch.testing.assert_close(real.grad, plain.lm_head.weight.grad)
    unpatched = tiny_llama("cpu")
    torch.testing.assert_close(unpatched(input_ids=input_ids, labels=input_ids).loss, want, rtol=1e-5, atol=1e-6)


# -- 2 GPUs, NCCL --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("scenario", ["train", "dtensor"])
def test_nccl_two_gpus(scenario, tmp_path):
    # the Triton kernels forced, so that the GPU kernels (not the reference) are what the ranks run
    environment = child_environment(
        LIGER_KERNEL_CACHE_DIR=str(tmp_path / "cache"), LIGER_KERNEL_BACKEND="triton", NCCL_NVLS_ENABLE="0"
    )
    results = run_world(scenario, WORLD, tmp_path, environment, backend="nccl", timeout=300)
    for result in results:
        assert result["backends"] == ["triton"], result["backends"]
    if scenario == "dtensor":
        for result in results:
            for call in CALLS:
                for placement in PLACEMENTS:
                    _check_dtensor_case(result, call, placement, rtol=1e-4, atol=1e-5)
        return
    single = results[0]["single"]
    torch.testing.assert_close(single["losses"], results[1]["single"]["losses"], rtol=1e-3, atol=1e-4)
    for result in results:
        for run in RUNS:
            torch.testing.assert_close(result[run]["losses"], single["losses"], rtol=1e-3, atol=1e-4)
            _close(result[run]["grads"], single["grads"], run, rtol=1e-3, atol=1e-4)
