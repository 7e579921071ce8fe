"""liger-kernel 0.8's ``liger_kernel.transformers.experimental``: the embedding lookup and the ternary-weight GEMM."""

from .embedding import LigerEmbedding
from .mm_int8int2 import matmul, pack_weights, unpack_weights

__all__ = ["LigerEmbedding", "matmul", "pack_weights", "unpack_weights"]
