"""Kernels as custom ops opaque to torch.compile, for any backend.

A backend's launcher (a function that allocates its outputs, launches its kernels and returns the outputs, never
writing its inputs) becomes a ``torch.library.custom_op`` that Dynamo and Inductor treat as one call: the compiled
graph runs the launcher with real tensors, exactly as eager mode does. The launcher is also its own fake
implementation: on FakeTensors it must allocate its outputs as usual and skip its launches (as
``liger_backends.triton.rms_norm._launch`` does), or be plain PyTorch, which runs on fake tensors as it is.

In the fake run the sizes may be symbolic (after Dynamo sees a second size, or under ``dynamic=True``). The outputs'
sizes and strides follow the inputs' symbolically, but the launch arithmetic (tiles, grids, chunk loops over
tokens) would turn every size into a guard, and Dynamo would recompile at each new number of tokens. So the fake run
evaluates that arithmetic on the sizes at hand without recording guards. That is sound only because it decides
nothing about the outputs' metadata: keep it so in a launcher (outputs shaped from the inputs' shapes and the
call's flags, never from a tile or chunk count).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch._guards import detect_fake_mode


def opaque_op(qualified_name: str, launcher):
    """`launcher` as the custom op `qualified_name` ("namespace::name"), its schema inferred from the launcher's type
    annotations; see the module's docstring for what the launcher must do."""
    op = torch.library.custom_op(qualified_name, launcher, mutates_args=())

    @functools.wraps(launcher)
    def fake(*args, **kwargs):
        shape_env = getattr(detect_fake_mode(args), "shape_env", None)
        with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
            return launcher(*args, **kwargs)

    op.register_fake(fake)
    return op
