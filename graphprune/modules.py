"""Modules that stand in for ``torch.nn`` modules that cannot express a pruned shape."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class PrunedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed in-projection, batched inputs) with fewer heads.

    ``nn.MultiheadAttention`` ties the attention width (heads x head_dim) to
    the embedding width; after pruning they differ, so this module keeps them
    apart. It accepts the same call (self-attention, or a key and value of
    their own: a cross-attention), batch first or second as the original took
    it, and returns ``(output, weights)``.
    """

    # read by nn.TransformerEncoderLayer's fast-path checks: False takes its plain path, which calls this module
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, in_proj_weight, in_proj_bias, out_proj: nn.Linear, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.in_proj_weight = in_proj_weight  # (3 * heads * head_dim, E)
        self.in_proj_bias = in_proj_bias
        self.out_proj = out_proj  # (E, heads * head_dim)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        key = query if key is None else key
        value = key if value is None else value
        q, k, v = self._project(query, key, value)  # (B, T, h*d), (B, S, h*d) x 2
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))  # (B, h, T or S, d)
        mask = _merge_masks(attn_mask, key_padding_mask, B, h, T, S, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            att = (q @ k.transpose(-2, -1)) * d ** -0.5  # (B, h, T, S)
            if mask is not None:
                att = att + mask
            elif is_causal:
                att = att.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            att = F.dropout(att.softmax(-1), p, self.training)
            y = att @ v
            weights = att.mean(1) if average_attn_weights else att
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None)
            weights = None
        y = y.transpose(1, 2).reshape(B, T, h * d)  # (B, T, h*d)
        y = self.out_proj(y)  # (B, T, E)
        return (y if self.batch_first else y.transpose(0, 1)), weights

    def _project(self, query, key, value):
        """q, k, v batch first, each through its third of the packed projection (one product where
        the inputs are one tensor, as nn.MultiheadAttention does)."""
        w, b = self.in_proj_weight, self.in_proj_bias
        n = w.shape[0] // 3
        if query is key and key is value:
            out = F.linear(query, w, b).chunk(3, dim=-1)
        elif key is value:
            out = (F.linear(query, w[:n], b[:n]), *F.linear(key, w[n:], b[n:]).chunk(2, dim=-1))
        else:
            out = tuple(F.linear(t, w[i * n:(i + 1) * n], b[i * n:(i + 1) * n]) for i, t in enumerate((query, key, value)))
        return out if self.batch_first else tuple(t.transpose(0, 1) for t in out)


def _merge_masks(attn_mask, key_padding_mask, B, h, T, S, dtype):
    """Both masks as one additive float mask broadcastable to (B, h, T, S)."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (B, 1, 1, S))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        if shape is not None:
            m = m.view(shape)
        elif m.dim() == 3:
            m = m.view(B, h, T, S)
        mask = m if mask is None else mask + m
    return mask


def layer_norm_full(x, normalized_shape, weight, bias, eps: float, full: int):
    """``F.layer_norm`` whose statistics count ``full`` entries: the ``n`` kept ones
    plus ``full - n`` removed ones that held zero. Mean and variance are those
    of the unpruned input, so a LayerNorm over a pruned residual stream stays
    exact (the twin's removed channels are zero there, see ``zeros.py``)."""
    y = _normalize_full(x, tuple(range(-len(normalized_shape), 0)), full, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def batch_norm_full(x, weight, bias, eps: float, full: int):
    """``F.batch_norm`` with batch statistics and no running buffers (timm's weight
    standardization: ``F.batch_norm(w.reshape(1, out, -1), None, None, training=True)``)
    whose statistics count ``full`` entries per channel and sample: the kept ones
    plus removed ones that held zero, so a standardized weight whose input channels
    were pruned keeps the mean and variance of its original row."""
    y = _normalize_full(x, (0, *range(2, x.dim())), full * x.shape[0], eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, on dim 1
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalize_full(x, dims: tuple, full: int, eps: float):
    """``(x - mean) / sqrt(var + eps)`` over ``dims``, as if ``full`` entries were
    there: the kept ones of ``x`` and removed ones that were zero."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / full  # (..., 1, 1)
    centred = x - mean
    var = (centred.pow(2).sum(dims, keepdim=True) + (full - n) * mean.pow(2)) / full  # the removed zeros sit at -mean
    return centred * torch.rsqrt(var + eps)


def rms_norm_full(x, normalized_shape, weight, eps, full: int):
    """``F.rms_norm`` with the mean square over ``full`` entries (removed ones were zero)."""
    dims = tuple(range(-len(normalized_shape), 0))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).sum(dims, keepdim=True) / full + eps)
    return y * weight if weight is not None else y


class FullWidthLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over a pruned dim, statistics over the original width (``full``)."""

    full: int

    def forward(self, x):
        return layer_norm_full(x, self.normalized_shape, self.weight, self.bias, self.eps, self.full)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full={self.full}"


class FullWidthRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over a pruned dim, mean square over the original width (``full``)."""

    full: int

    def forward(self, x):
        return rms_norm_full(x, self.normalized_shape, self.weight, self.eps, self.full)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full={self.full}"


class _FullWidthCalls(TorchFunctionMode):
    """While a user's norm module runs its own forward: the ``F.layer_norm`` /
    ``F.rms_norm`` calls over the module's (pruned) ``normalized_shape`` count
    ``full`` entries, as ``FullWidthLayerNorm`` does. Other calls pass through."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        full = _FULL_CALLS.get(func)
        if full is not None:
            a = inspect.signature(func).bind(*args, **kwargs)
            a.apply_defaults()
            if tuple(a.arguments["normalized_shape"]) == tuple(self.norm.normalized_shape):
                return full(self.norm.full, **a.arguments)
        return func(*args, **kwargs)


_FULL_CALLS = {
    F.layer_norm: lambda full, input, normalized_shape, weight, bias, eps: layer_norm_full(input, normalized_shape, weight, bias, eps, full),
    F.rms_norm: lambda full, input, normalized_shape, weight, eps: rms_norm_full(input, normalized_shape, weight, eps, full),
}


class FullWidthForward:
    """Mixin for a user's own LayerNorm / RMSNorm subclass over a pruned dim
    (torchvision's ``LayerNorm2d`` permutes around ``F.layer_norm``): the user's
    forward runs unchanged, with its norm calls counting ``full`` entries."""

    full: int

    def forward(self, *args, **kwargs):
        with _FullWidthCalls(self):
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickled (``torch.save(small)``, ``copy.deepcopy``) as the user's class it extends: the class
        ``full_width`` made is no attribute of this module, so pickle could not find it by name."""
        return _full_width_instance, (type(self).__bases__[1],), self.__dict__.copy()


def _full_width_instance(cls: type):
    return object.__new__(full_width(cls))


_FULL_WIDTH_CLASSES: dict[type, type] = {nn.LayerNorm: FullWidthLayerNorm, nn.RMSNorm: FullWidthRMSNorm}


def full_width(cls: type) -> type:
    """The class a norm module of class ``cls`` takes when its dim shrank: still
    an instance of ``cls``, with statistics over the original width."""
    if issubclass(cls, (FullWidthForward, FullWidthLayerNorm, FullWidthRMSNorm)):
        return cls
    if cls not in _FULL_WIDTH_CLASSES:
        _FULL_WIDTH_CLASSES[cls] = type(cls.__name__, (FullWidthForward, cls), {"__module__": __name__, "__doc__": cls.__doc__})
    return _FULL_WIDTH_CLASSES[cls]


# oneDNN post-op name -> the same activation in plain torch (the fallback path), given (y, *scalars)
POST_OPS = {
    "none": lambda y: y,
    "relu": F.relu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardswish": F.hardswish,
    "hardtanh": lambda y, lo, hi: F.hardtanh(y, lo, hi),
    "gelu": None,  # its algorithm ("none" or "tanh") is F.gelu's ``approximate``
}


def _post_op(y, attr: str, scalars, algorithm):
    if attr == "gelu":
        return F.gelu(y, approximate=algorithm)
    return POST_OPS[attr](y, *scalars)


def _onednn_ready(x, weight: torch.Tensor) -> bool:
    """oneDNN's fused CPU kernels serve fp32 inference on CPU, run eagerly; anything else (CUDA,
    half precision, a forward that records gradients, a trace or an export) takes the plain path,
    which computes the same with the ops every tool knows."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing())  # torch.jit.trace cannot record the kernels' optional scalars (survey 37 F02)


class OneDNNConv2d(nn.Conv2d):
    """``act(nn.Conv2d(x))`` as one oneDNN convolution with the activation as its post-op
    (``post_op = (attr, scalars, algorithm)``), where ``_onednn_ready``; otherwise the conv and
    the activation as before. Same parameters, same names."""

    post_op: tuple = ("none", (), "")

    def forward(self, x):
        if _onednn_ready(x, self.weight) and x.dim() == 4:
            attr, scalars, algorithm = self.post_op
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                                           list(self.dilation), self.groups, attr, list(scalars), algorithm)
        return _post_op(super().forward(x), *self.post_op)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, post_op={self.post_op[0]}"


class OneDNNLinear(nn.Linear):
    """``act(nn.Linear(x))`` through oneDNN's matmul with the activation as its post-op; see
    ``OneDNNConv2d``. On the 2-core CPU the matmul alone ran 2x faster than ``F.linear``'s
    (bench/deploy_speed.py's ViT MLP shapes)."""

    post_op: tuple = ("none", (), "")

    def forward(self, x):
        if _onednn_ready(x, self.weight) and x.dim() >= 2:
            attr, scalars, algorithm = self.post_op
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, list(scalars), algorithm)
        return _post_op(super().forward(x), *self.post_op)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, post_op={self.post_op[0]}"
