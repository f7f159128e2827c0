"""Modules that stand in for nn.Linear and 1x1 nn.Conv2d with block-sparse weights.

They are inference modules: the block values are parameters (so they move with
``.to()``, count in ``parameters()`` and load from state dicts) but do not
require grad, because the Triton kernel has no backward.
"""
from __future__ import annotations

import torch
from torch import nn

from graphprune.errors import GraphpruneError

from .bsr_linear import block_sparse_linear
from .layout import BlockSparseWeight

__all__ = ["BlockSparseLinear", "BlockSparseConv1x1", "conv1x1_problem"]


class BlockSparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with W stored as a :class:`BlockSparseWeight`.

    ``.weight`` is the BlockSparseWeight and ``.bias`` the dense bias (or None),
    as on nn.Linear. The BSR arrays are registered as a parameter (``values``)
    and buffers (``row_ptr``, ``col_idx``, ``row_order``) so the usual module
    machinery handles them.
    """

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size
        self.values = nn.Parameter(weight.values.detach(), requires_grad=False)
        self.register_buffer("row_ptr", weight.row_ptr)
        self.register_buffer("col_idx", weight.col_idx)
        self.register_buffer("row_order", weight.row_order)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._weight_cache: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size=64, density: float = 0.25) -> "BlockSparseLinear":
        """Keep the ``density`` fraction of (block_size) blocks of ``linear.weight``
        with the largest norms; the rest are dropped."""
        if not isinstance(linear, nn.Linear):
            raise GraphpruneError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = BlockSparseWeight.from_dense_by_norm(linear.weight, block_size, density)
        return cls(weight, linear.bias)

    @property
    def weight(self) -> BlockSparseWeight:
        """The BlockSparseWeight over this module's current tensors.

        Rebuilt only when ``.to()``, ``.half()`` or an in-place write replaced
        or changed them, so the kernel's per-weight caches survive between calls."""
        tensors = (self.values, self.row_ptr, self.col_idx, self.row_order)
        key = tuple((t.data_ptr(), t.dtype, t.device, _version(t)) for t in tensors)
        if self._weight_cache is None or self._weight_cache[0] != key:
            weight = BlockSparseWeight(self.values, self.row_ptr, self.col_idx, (self.out_features, self.in_features), self.row_order)
            self._weight_cache = (key, weight)
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        nnz = self.values.shape[0]
        blocks = (self.out_features // self.block_size[0]) * (self.in_features // self.block_size[1])
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"density={nnz / blocks:.3f}, bias={self.bias is not None}"
        )

    def __getstate__(self):
        # Pickles and deep copies leave the derived caches (dense copy, work lists) behind.
        state = self.__dict__.copy()
        state["_weight_cache"] = None
        return state


def _version(t: torch.Tensor) -> int:
    """``t._version``; a tensor made under ``torch.inference_mode()`` keeps none (and cannot be
    written in place outside it), so reading it raised."""
    return -1 if t.is_inference() else t._version


def conv1x1_problem(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run as a Linear over channels, or None if it can:
    it must be a plain nn.Conv2d, 1x1, stride 1, unpadded and ungrouped."""
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward"
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel size {tuple(conv.kernel_size)} is not 1x1"
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)} is not 1"
    if conv.padding not in ("valid", "same") and tuple(conv.padding) != (0, 0):
        return f"padding {tuple(conv.padding)} is not 0"
    if conv.groups != 1:
        return f"groups={conv.groups} (only ungrouped convs are a single Linear)"
    return None


class BlockSparseConv1x1(nn.Module):
    """A 1x1 convolution computed as a block-sparse Linear over channels.

    A 1x1, stride-1 conv multiplies every pixel's channel vector by the same
    (C_out, C_in) matrix, so NCHW -> NHWC turns it into a Linear with B*H*W
    tokens, which is the shape the kernel is fast on. The output is the NHWC
    result viewed back as NCHW (channels-last in memory).
    """

    def __init__(self, linear: BlockSparseLinear):
        super().__init__()
        self.linear = linear

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block_size=64, density: float = 0.25) -> "BlockSparseConv1x1":
        if not isinstance(conv, nn.Conv2d) or (problem := conv1x1_problem(conv)) is not None:
            reason = "it is not an nn.Conv2d" if not isinstance(conv, nn.Conv2d) else problem
            raise GraphpruneError(f"cannot turn this conv into a block-sparse Linear: {reason}")
        weight = BlockSparseWeight.from_dense_by_norm(conv.weight.flatten(1), block_size, density)  # (C_out, C_in)
        return cls(BlockSparseLinear(weight, conv.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (C, H, W), unbatched, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last in memory
        # laid out as nn.Conv2d lays it out: code after it may .view() it (a contiguous input stays contiguous)
        return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()
