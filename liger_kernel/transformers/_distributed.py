"""What the fused-linear losses need under torch.distributed (see docs/distributed.md).

- `gather_dtensors`: the losses compute on plain tensors. A ``DTensor`` operand (an FSDP2 parameter read outside
  the forward that gathers it, a tensor-parallel lm_head, a replicated weight) is replaced by its full value: an
  all-gather when it is sharded, nothing when it is replicated. Its gradient goes back as a DTensor with the
  operand's own placements, the ranks' contributions AVERAGED (``Partial("avg")``): what data-parallel training
  (DDP, FSDP) does with every other gradient, and exact when every rank computes the same loss (replicated
  activations), where the contributions are equal.
- `call_through`: a wrapper that gathers a module's parameters in forward hooks (FSDP2's ``fully_shard`` on the lm
  head itself, DeepSpeed ZeRO-3 on every module) hands out the gathered weight only while the module is being
  called; outside, ``module.weight`` is a shard (a DTensor) or an empty placeholder (ZeRO-3). So the patched
  causal-LM forward runs its fused loss AS the lm head's forward, through ``module.__call__``: the wrapper's hooks
  gather the weight before it, free it after, and reduce its gradient in backward as they would for
  ``lm_head(hidden)``.
"""

from __future__ import annotations

import sys

from torch import nn


def _dtensor_class():
    """``DTensor``, or None when ``torch.distributed.tensor`` was never imported (then no DTensor can exist, and
    the check costs one dict lookup)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def gather_dtensors(*tensors):
    """`tensors` with every DTensor replaced by its full value as a plain tensor (see the module docstring);
    other values are returned as they are. DTensors on different device meshes are a ValueError."""
    dtensor = _dtensor_class()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return tensors
    meshes = {t.device_mesh for t in tensors if isinstance(t, dtensor)}
    if len(meshes) > 1:
        raise ValueError(
            f"liger_kernel: the DTensor operands of one loss must share one device mesh, got {len(meshes)} meshes"
        )
    from torch.distributed.tensor import Partial, Replicate

    def full(t):
        if not isinstance(t, dtensor):
            return t
        mesh = t.device_mesh
        replicated = t.redistribute(mesh, [Replicate()] * mesh.ndim)
        return replicated.to_local(grad_placements=[Partial("avg")] * mesh.ndim)

    return tuple(full(t) for t in tensors)


def _gathers_in_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks (FSDP2, DeepSpeed ZeRO-3 and other wrappers gather parameters there)."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def call_through(module: nn.Module, function, *args):
    """``function(*args)`` run as `module`'s forward, through ``module.__call__`` and so through its hooks, when it
    has any; a plain call otherwise (no hooks: nothing to gather, and nothing changes for torch.compile). Tensors
    that need a gradient must be among `args`: the hooks of FSDP2 watch the call's inputs to know when the
    module's backward is done. `function` must read the module's parameters inside, not before."""
    if not _gathers_in_hooks(module):
        return function(*args)
    own = module.__dict__.get("forward")
    module.forward = function  # an instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
