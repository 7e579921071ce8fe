"""The alignment losses of liger-kernel 0.8's ``liger_kernel.chunked_loss``, served by the liger_core dispatcher."""

from .cpo_loss import LigerFusedLinearCPOLoss
from .dpo_loss import LigerFusedLinearDPOLoss
from .functional import (
    liger_fused_linear_cpo,
    liger_fused_linear_dpo,
    liger_fused_linear_orpo,
    liger_fused_linear_simpo,
)
from .orpo_loss import LigerFusedLinearORPOLoss
from .simpo_loss import LigerFusedLinearSimPOLoss
from .unsupported import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss, LigerFusedLinearKTOLoss

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearJSDLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_cpo",
    "liger_fused_linear_dpo",
    "liger_fused_linear_orpo",
    "liger_fused_linear_simpo",
]
