"""Modules that stand in for ``torch.nn`` modules that cannot express a pruned shape."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first self-attention) with fewer heads.

    ``nn.MultiheadAttention`` ties the attention width (heads x head_dim) to
    the embedding width; after pruning they differ, so this module keeps them
    apart. It accepts the same call and returns ``(output, weights)``.
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj_weight, in_proj_bias, out_proj: nn.Linear, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = True
        self.in_proj_weight = in_proj_weight  # (3 * heads * head_dim, E)
        self.in_proj_bias = in_proj_bias
        self.out_proj = out_proj  # (E, heads * head_dim)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        B, T, _ = query.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, h*d)
        q, k, v = (t.view(B, T, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        mask = _merge_masks(attn_mask, key_padding_mask, B, h, T, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            att = (q @ k.transpose(-2, -1)) * d ** -0.5  # (B, h, T, T)
            if mask is not None:
                att = att + mask
            elif is_causal:
                att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            att = F.dropout(att.softmax(-1), p, self.training)
            y = att @ v
            weights = att.mean(1) if average_attn_weights else att
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None)
            weights = None
        y = y.transpose(1, 2).reshape(B, T, h * d)  # (B, T, h*d)
        return self.out_proj(y), weights


def _merge_masks(attn_mask, key_padding_mask, B, h, T, dtype):
    """Both masks as one additive float mask broadcastable to (B, h, T, T)."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (B, 1, 1, T))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        if shape is not None:
            m = m.view(shape)
        elif m.dim() == 3:
            m = m.view(B, h, T, T)
        mask = m if mask is None else mask + m
    return mask
