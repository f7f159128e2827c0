"""BlockSparseLinear and BlockSparseConv1x1 against the dense layers with masked weights."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import GraphpruneError
from graphprune.kernels import BlockSparseConv1x1, BlockSparseLinear, BlockSparseWeight


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_from_linear_matches_masked_linear(bias, m, device):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=bias)
    sparse = BlockSparseLinear.from_linear(linear, block_size=32, density=0.4).to(device)
    assert isinstance(sparse.weight, BlockSparseWeight)
    assert sparse.weight.block_size == (32, 32) and sparse.weight.shape == (96, 128)
    assert sparse.weight.nnz == round(0.4 * 12)
    assert (sparse.bias is None) == (not bias)
    mask = sparse.weight.block_mask().cpu().repeat_interleave(32, 0).repeat_interleave(32, 1)
    x = torch.randn(m, 128)
    expected = F.linear(x.double(), linear.weight.double() * mask, None if linear.bias is None else linear.bias.double())
    with torch.no_grad():
        y = sparse(x.to(device))
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_weight_follows_dtype_changes(device):
    sparse = BlockSparseLinear.from_linear(nn.Linear(64, 64), block_size=16, density=0.5).to(device)
    before = sparse.weight
    assert sparse.weight is before, "the weight view is cached while the tensors are unchanged"
    sparse.half()
    assert sparse.weight.dtype == torch.float16 and sparse.weight is not before
    x = torch.randn(3, 64, device=device, dtype=torch.float16)
    torch.testing.assert_close(sparse(x).float(), F.linear(x.float(), sparse.weight.to_dense().float(), sparse.bias.float()),
                               rtol=2e-3, atol=2e-3)


def test_state_dict_copy_and_pickle():
    sparse = BlockSparseLinear.from_linear(nn.Linear(64, 32), block_size=16, density=0.5)
    sparse(torch.randn(2, 64))  # fills the weight's caches
    assert set(sparse.state_dict()) == {"values", "row_ptr", "col_idx", "row_order", "bias"}
    clone = copy.deepcopy(sparse)
    unpickled = pickle.loads(pickle.dumps(sparse))
    x = torch.randn(5, 64)
    for other in (clone, unpickled):
        assert other._weight_cache is None
        torch.testing.assert_close(other(x), sparse(x))
    target = BlockSparseLinear.from_linear(nn.Linear(64, 32), block_size=16, density=0.5)
    target.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(target(x), sparse(x))
    assert "density=0.500" in repr(sparse)


@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_matches_masked_conv(bias, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, kernel_size=1, bias=bias)
    sparse = BlockSparseConv1x1.from_conv(conv, block_size=16, density=0.3).to(device)
    mask = sparse.linear.weight.block_mask().cpu().repeat_interleave(16, 0).repeat_interleave(16, 1)
    x = torch.randn(2, 64, 3, 5)
    expected = F.conv2d(x.double(), (conv.weight.flatten(1).double() * mask)[:, :, None, None],
                        None if conv.bias is None else conv.bias.double())
    with torch.no_grad():
        y = sparse(x.to(device))
    assert y.shape == (2, 32, 3, 5)
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 1, stride=2), nn.Conv2d(32, 32, 1, padding=1), nn.Conv2d(32, 32, 1, groups=2)],
    ids=["3x3", "stride", "padding", "groups"],
)
def test_conv_that_is_not_a_linear_is_refused(conv):
    with pytest.raises(GraphpruneError):
        BlockSparseConv1x1.from_conv(conv, block_size=16)


def test_from_linear_refuses_other_modules():
    with pytest.raises(GraphpruneError):
        BlockSparseLinear.from_linear(nn.Conv2d(16, 16, 1))
