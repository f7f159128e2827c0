"""Kernels for the weights structured pruning leaves behind.

``BlockSparseWeight`` stores a pruned (N, K) weight as blocks, ``block_sparse_linear``
multiplies by it visiting only the stored blocks (Triton, tensor cores), and
``BlockSparseLinear`` / ``BlockSparseConv1x1`` are the modules the
``sparsify-blocks`` pass puts in place of ``nn.Linear`` and 1x1 ``nn.Conv2d``.
"""
from .bsr_linear import SMALL_M, block_sparse_linear, block_sparse_linear_reference
from .layout import BLOCK_SIZES, BlockSparseWeight
from .modules import BlockSparseConv1x1, BlockSparseLinear

__all__ = [
    "BLOCK_SIZES",
    "SMALL_M",
    "BlockSparseConv1x1",
    "BlockSparseLinear",
    "BlockSparseWeight",
    "block_sparse_linear",
    "block_sparse_linear_reference",
]
