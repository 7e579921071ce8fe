"""Names of liger-kernel's later chunked losses that this package does not implement.

TRL imports ``LigerFusedLinearGRPOLoss`` and ``LigerFusedLinearKTOLoss`` at the top of its GRPO and KTO trainer
modules whenever a ``liger_kernel`` is installed, and ``LigerFusedLinearJSDLoss`` for GKD: without these names,
installing this package would break importing those trainers even for users who never enable Liger. So the names
exist, and building one raises a NotImplementedError that says what is missing and what is available.
"""

from __future__ import annotations

SUPPORTED = (
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
)


class _NotImplementedLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            f"liger_kernel.chunked_loss.{type(self).__name__} is not implemented by this liger-kernel (liger-core); "
            f"the chunked losses available are {', '.join(SUPPORTED)}. Run without use_liger_kernel for this loss."
        )


class LigerFusedLinearGRPOLoss(_NotImplementedLoss):
    """Not implemented: building it raises NotImplementedError."""


class LigerFusedLinearKTOLoss(_NotImplementedLoss):
    """Not implemented: building it raises NotImplementedError."""


class LigerFusedLinearJSDLoss(_NotImplementedLoss):
    """Not implemented (the distillation loss is `liger_kernel.transformers.LigerFusedLinearJSD`): building it raises
    NotImplementedError."""
