"""Every Triton kernel's forward and backward run on fake tensors, as torch.compile's tracing runs them.

Under torch.compile a launcher runs as a custom op whose fake implementation is the launcher itself, on
FakeTensors, outside the traced frame (where ``torch.compiler.is_compiling()`` is False). A launcher that then
launched a kernel would fail on the fake tensors' data pointers (found on the GPU); one that read a value back to
the host would fail too. With real ``triton.jit`` functions (no interpreter), in a subprocess, fake tensors need no
GPU. The outputs'
shapes and dtypes must be those of the reference backend's outputs on the same inputs.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from liger_core.registry import get_registry

registry = get_registry()
results = {}
for op in registry.operator_names():
    if "triton" not in registry.implementations(op):
        continue
    spec = registry.operator(op)
    dtype = torch.bfloat16 if torch.bfloat16 in spec.dtypes else spec.dtypes[0]
    real, attrs = spec.make_inputs("cpu", dtype, "tiny", 0)
    attrs = spec.bind(real, attrs)[1]
    needs_grad = bool(spec.differentiable_inputs)
    differentiable = [
        isinstance(t, torch.Tensor) and i in spec.differentiable_inputs for i, t in enumerate(real)
    ]
    real = tuple(t.requires_grad_(True) if d else t for t, d in zip(real, differentiable))
    expected, _ = registry.kernel(op, "reference").forward(real, attrs, False)
    try:
        # As in the autograd bridge: the kernel's forward and backward run without autograd recording.
        with FakeTensorMode(allow_non_fake_inputs=False) as mode, torch.no_grad():
            inputs = tuple(
                mode.from_tensor(t).requires_grad_(d) if isinstance(t, torch.Tensor) else t
                for t, d in zip(real, differentiable)
            )
            kernel = registry.kernel(op, "triton")
            outputs, saved = kernel.forward(inputs, attrs, needs_grad)
            got = [None if o is None else [list(o.shape), str(o.dtype), type(o).__name__] for o in outputs]
            if needs_grad:
                grads = tuple(
                    torch.ones_like(o) if o is not None and out_spec.differentiable else None
                    for o, out_spec in zip(outputs, spec.outputs)
                )
                input_grads = kernel.backward(saved, grads)
                got.append([None if g is None else list(g.shape) for g in input_grads])
        want = [None if o is None else [list(o.shape), str(o.dtype), "FakeTensor"] for o in expected]
        if needs_grad:
            want.append([list(real[i].shape) if real[i] is not None and real[i].requires_grad else None
                         for i in spec.differentiable_inputs])
        results[op] = {"got": got, "want": want}
    except Exception as error:
        results[op] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def fake_runs():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_triton_operator_is_covered(fake_runs):
    assert len(fake_runs) == 16, sorted(fake_runs)


@pytest.mark.parametrize(
    "op",
    [
        "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "embedding", "cross_entropy",
        "fused_linear_cross_entropy", "kl_div", "jsd", "fused_linear_jsd", "int2_matmul",
        "fused_linear_dpo", "fused_linear_orpo", "fused_linear_cpo", "fused_linear_simpo",
    ],
)  # fmt: skip
def test_triton_kernel_runs_on_fake_tensors(fake_runs, op):
    run = fake_runs[op]
    assert "error" not in run, run.get("error")
    assert run["got"] == run["want"]
