"""Where liger-kernel 0.8 keeps the ternary-weight GEMM; the same functions as
``liger_kernel.transformers.experimental``."""

from liger_kernel.transformers.experimental.mm_int8int2 import matmul, pack_weights, unpack_weights

__all__ = ["matmul", "pack_weights", "unpack_weights"]
