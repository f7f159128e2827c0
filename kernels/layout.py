"""The block compressed sparse row (BSR) layout of a pruned weight.

A Linear weight W of shape (N, K) is cut into a grid of (bn, bk) blocks:
N / bn block rows (each one owns bn output features) and K / bk block columns.
Only the blocks that survive pruning are stored, row by row:

    row_ptr   (N/bn + 1,)   int32  blocks of block row r are row_ptr[r] : row_ptr[r+1]
    col_idx   (nnz,)        int32  block column of each stored block
    values    (nnz, bn, bk)        the stored blocks, W[r*bn:(r+1)*bn, c*bk:(c+1)*bk]
    row_order (N/bn,)       int32  block rows by number of blocks, longest first

``row_order`` is not part of the textbook format. Pruning by block norm leaves
some block rows much fuller than others; the kernels launch the full rows
first so that the short ones fill the tail of the last wave instead of a long
row running alone at the end.
"""
from __future__ import annotations

import torch

from graphprune.errors import GraphpruneError

__all__ = ["BlockSparseWeight", "BLOCK_SIZES", "as_block_size"]

#: Block edges the kernels are written for: a tensor-core MMA needs at least
#: 16 along each dimension, and 128 is the largest tile that still leaves room
#: for software pipelining in shared memory.
BLOCK_SIZES = (16, 32, 64, 128)


def as_block_size(block_size) -> tuple[int, int]:
    """``64`` or ``(64, 64)`` -> ``(64, 64)``, checked against :data:`BLOCK_SIZES`."""
    pair = (block_size, block_size) if isinstance(block_size, int) else block_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(type(s) is int for s in pair):
        raise GraphpruneError(f"block size {block_size!r} is not an int or a pair of ints; use one of {BLOCK_SIZES} "
                              "(or a pair of them, (16,32) written as block_size=(16,32) in a pipeline string)")
    bn, bk = pair
    if bn not in BLOCK_SIZES or bk not in BLOCK_SIZES:
        raise GraphpruneError(
            f"block size {block_size!r} is not supported; use one of {BLOCK_SIZES} (or a pair of them) for each side"
        )
    return int(bn), int(bk)


class BlockSparseWeight:
    """An (N, K) weight stored as BSR blocks of size ``block_size = (bn, bk)``.

    Build one with :meth:`from_dense` (keep the nonzero blocks, or a given block
    mask) or :meth:`from_dense_by_norm` (keep the largest blocks at a target
    density). The kernels read ``values``, ``row_ptr``, ``col_idx`` and
    ``row_order`` directly; everything else here is for people and tests.
    """

    def __init__(self, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape, row_order: torch.Tensor | None = None):
        n, k = (int(s) for s in shape)
        if values.dim() != 3:
            raise GraphpruneError(f"BSR values must be (nnz, bn, bk), got shape {tuple(values.shape)}")
        bn, bk = as_block_size((values.shape[1], values.shape[2]))
        if n % bn or k % bk:
            raise GraphpruneError(f"weight shape {(n, k)} is not a multiple of the block size {(bn, bk)}")
        if row_ptr.shape != (n // bn + 1,) or col_idx.shape != (values.shape[0],):
            raise GraphpruneError(
                f"inconsistent BSR arrays: row_ptr {tuple(row_ptr.shape)} (want {(n // bn + 1,)}), "
                f"col_idx {tuple(col_idx.shape)} (want {(values.shape[0],)})"
            )
        self.values = values
        self.row_ptr = row_ptr.to(torch.int32)
        self.col_idx = col_idx.to(torch.int32)
        if row_order is None:
            counts = self.row_ptr[1:] - self.row_ptr[:-1]
            row_order = torch.argsort(counts, descending=True, stable=True)
        self.row_order = row_order.to(torch.int32)
        self.shape = (n, k)
        self.block_size = (bn, bk)
        # Derived data the kernels reuse between calls (dense copy for the
        # fallback, split-K work lists, ticket counters), keyed by what it
        # depends on. Valid as long as the arrays above are not written to.
        self._cache: dict = {}

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_dense(cls, w: torch.Tensor, block_size=(64, 64), *, block_mask: torch.Tensor | None = None) -> "BlockSparseWeight":
        """Store the blocks of ``w`` that hold a nonzero, or exactly those where
        ``block_mask`` (shape (N/bn, K/bk), bool) is true."""
        if w.dim() != 2:
            raise GraphpruneError(f"from_dense expects a 2-D (N, K) weight, got shape {tuple(w.shape)}")
        bn, bk = as_block_size(block_size)
        n, k = _check_divisible(w, bn, bk)
        blocks = w.detach().reshape(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3)  # (R, C, bn, bk)
        if block_mask is None:
            block_mask = blocks.ne(0).flatten(2).any(-1)  # (R, C)
        elif block_mask.shape != blocks.shape[:2]:
            raise GraphpruneError(f"block_mask has shape {tuple(block_mask.shape)}, want {tuple(blocks.shape[:2])}")
        block_mask = block_mask.to(device=w.device, dtype=torch.bool)
        rows, cols = block_mask.nonzero(as_tuple=True)  # row-major order, as BSR wants
        values = blocks[rows, cols].contiguous()  # (nnz, bn, bk)
        row_ptr = torch.zeros(n // bn + 1, dtype=torch.int32, device=w.device)
        row_ptr[1:] = torch.cumsum(block_mask.sum(1), 0)
        return cls(values, row_ptr, cols, (n, k))

    @classmethod
    def from_dense_by_norm(cls, w: torch.Tensor, block_size=(64, 64), density: float = 0.25) -> "BlockSparseWeight":
        """Keep the ``round(density * number_of_blocks)`` blocks of ``w`` with the
        largest Frobenius norm, chosen over the whole matrix (so block rows end up
        uneven, which the kernels balance)."""
        if not 0.0 <= float(density) <= 1.0:
            raise GraphpruneError(f"density must be in [0, 1], got {density}")
        bn, bk = as_block_size(block_size)
        n, k = _check_divisible(w, bn, bk)
        norms = w.detach().float().reshape(n // bn, bn, k // bk, bk).pow(2).sum((1, 3))  # (R, C)
        keep = round(float(density) * norms.numel())
        order = torch.argsort(norms.flatten(), descending=True, stable=True)
        mask = torch.zeros(norms.numel(), dtype=torch.bool, device=w.device)
        mask[order[:keep]] = True
        return cls.from_dense(w, (bn, bk), block_mask=mask.view_as(norms))

    # -- views ------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Number of stored blocks."""
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of blocks stored (1 - block sparsity)."""
        bn, bk = self.block_size
        return self.nnz / ((self.shape[0] // bn) * (self.shape[1] // bk))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def block_rows(self) -> torch.Tensor:
        """Block row of every stored block, (nnz,) int64."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def block_mask(self) -> torch.Tensor:
        """(N/bn, K/bk) bool: which blocks are stored."""
        bn, bk = self.block_size
        mask = torch.zeros(self.shape[0] // bn, self.shape[1] // bk, dtype=torch.bool, device=self.device)
        mask[self.block_rows(), self.col_idx.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """The (N, K) weight with zeros where no block is stored."""
        (n, k), (bn, bk) = self.shape, self.block_size
        dense = self.values.new_zeros(n // bn, k // bk, bn, bk)
        dense[self.block_rows(), self.col_idx.long()] = self.values
        return dense.permute(0, 2, 1, 3).reshape(n, k)

    def dense(self) -> torch.Tensor:
        """:meth:`to_dense`, kept after the first call (the dense fallback runs
        it on every call; this costs the memory of a dense weight, once)."""
        if "dense" not in self._cache:
            self._cache["dense"] = self.to_dense()
        return self._cache["dense"]

    def to(self, device=None, dtype=None) -> "BlockSparseWeight":
        """A copy on ``device`` with values of ``dtype`` (index arrays stay int32)."""
        return BlockSparseWeight(
            self.values.to(device=device, dtype=dtype),
            self.row_ptr.to(device=device),
            self.col_idx.to(device=device),
            self.shape,
            self.row_order.to(device=device),
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseWeight(shape={self.shape}, block_size={self.block_size}, "
            f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})"
        )


def _check_divisible(w: torch.Tensor, bn: int, bk: int) -> tuple[int, int]:
    n, k = w.shape
    if n % bn or k % bk:
        raise GraphpruneError(f"weight shape {(n, k)} is not divisible by the block size {(bn, bk)}; pick a block size that divides both")
    return n, k
