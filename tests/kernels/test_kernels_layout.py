"""BlockSparseWeight: the BSR layout, block selection by norm, and input checks."""
import pytest
import torch

from graphprune.errors import GraphpruneError
from graphprune.kernels import BlockSparseWeight


def _blockwise(mask, bn, bk):
    """(R, C) block mask -> (R*bn, C*bk) element mask."""
    return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)


@pytest.mark.parametrize("block_size", [(16, 16), (32, 32), (64, 64), (128, 128), (16, 64), (128, 32)])
def test_from_dense_round_trip(block_size):
    bn, bk = block_size
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 4, generator=g) < 0.5
    w = torch.randn(3 * bn, 4 * bk, generator=g) * _blockwise(mask, bn, bk)
    weight = BlockSparseWeight.from_dense(w, block_size)
    assert weight.shape == (3 * bn, 4 * bk)
    assert weight.block_size == (bn, bk)
    assert weight.nnz == int(mask.sum())
    assert weight.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(weight.block_mask(), mask)
    assert torch.equal(weight.to_dense(), w)
    assert weight.values.shape == (weight.nnz, bn, bk)


def test_row_order_puts_full_rows_first():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weight = BlockSparseWeight.from_dense(torch.ones(64, 64), 16, block_mask=mask)
    assert weight.row_ptr.tolist() == [0, 1, 5, 5, 7]
    assert weight.row_order.tolist() == [1, 3, 0, 2]


def test_explicit_mask_keeps_zero_blocks():
    mask = torch.tensor([[True, False], [False, True]])
    weight = BlockSparseWeight.from_dense(torch.zeros(32, 32), 16, block_mask=mask)
    assert weight.nnz == 2 and torch.equal(weight.block_mask(), mask)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_from_dense_by_norm_keeps_the_largest_blocks(density):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * torch.rand(4, 8, generator=g).repeat_interleave(16, 0).repeat_interleave(16, 1)
    weight = BlockSparseWeight.from_dense_by_norm(w, 16, density)
    assert weight.nnz == round(density * 32)
    norms = w.reshape(4, 16, 8, 16).pow(2).sum((1, 3))
    kept = weight.block_mask()
    if 0 < weight.nnz < 32:
        assert norms[kept].min() >= norms[~kept].max()
    assert torch.equal(weight.to_dense(), w * _blockwise(kept, 16, 16))


def test_to_changes_dtype_and_keeps_layout():
    weight = BlockSparseWeight.from_dense_by_norm(torch.randn(32, 64), 16, 0.5)
    half = weight.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.row_ptr.dtype == torch.int32
    assert torch.equal(half.block_mask(), weight.block_mask())
    assert torch.equal(half.to_dense(), weight.to_dense().half())


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockSparseWeight.from_dense(torch.ones(64, 64), 8),
        lambda: BlockSparseWeight.from_dense(torch.ones(64, 64), (16, 48)),
        lambda: BlockSparseWeight.from_dense(torch.ones(64, 40), 16),
        lambda: BlockSparseWeight.from_dense(torch.ones(64), 16),
        lambda: BlockSparseWeight.from_dense(torch.ones(32, 32), 16, block_mask=torch.ones(3, 2, dtype=torch.bool)),
        lambda: BlockSparseWeight.from_dense_by_norm(torch.ones(32, 32), 16, 1.5),
        lambda: BlockSparseWeight.from_dense_by_norm(torch.ones(32, 24), 16, 0.5),
    ],
    ids=["block-8", "block-48", "shape-not-divisible", "1-d", "mask-shape", "density>1", "norm-shape"],
)
def test_bad_input_raises_graphprune_error(make):
    with pytest.raises(GraphpruneError):
        make()
