"""fold-scale: a constant per-channel scale folded into the linear or conv that feeds it (lossless).

ConvNeXt's layer scale (``gamma * block(x)``) and timm's ``LayerScale`` multiply a layer's
output features by a learned vector. In a deploy form that vector is a constant, and
``g * (W x + b)`` is the same layer with ``W' = g W`` (per output feature) and
``b' = g b``. Folding removes one elementwise pass over the block's output: memory
traffic and no FLOPs, which is what keeps a pruned ConvNeXt's speed-up below its FLOPs
reduction (issue 12).

Folded only where nothing else can see the difference: a ``mul`` of two operands, one
a parameter or buffer (``get_attr``, or a reshape of one to literal sizes, as timm's
ConvNeXt writes ``gamma.reshape(1, -1, 1, 1)``) with at most one dim wider than 1, the other
reached from a ``call_module`` linear or conv (not transposed, called once, read by
nothing else) through permutes and eval-mode dropouts that each have that one reader;
the scale's wide dim, followed back through the permutes, must be the layer's output
features (a linear's last dim, a conv's dim 1). The folded layer is a new module with
new parameters; the pass never writes into a module it was given.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from graphprune.meta_keys import VAL
from graphprune.pass_manager import PassResult, register_pass
from .fold_bn import call_counts, held, with_params

_MULS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_PERMUTES = {torch.permute, torch.ops.aten.permute.default}
_PASS_THROUGH = (nn.Dropout, nn.Identity)  # identities in eval mode
_FEATURES = {nn.Linear: lambda nd: nd - 1, nn.Conv1d: lambda nd: 1, nn.Conv2d: lambda nd: 1, nn.Conv3d: lambda nd: 1}


def _val(node):
    v = node.meta.get(VAL) if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_mul(n: Node) -> bool:
    return (n.op == "call_function" and n.target in _MULS) or (n.op == "call_method" and n.target == "mul")


def _perm(n: Node) -> list | None:
    """The dims of a permute node, else None."""
    if n.op == "call_function" and n.target in _PERMUTES:
        return list(n.args[1])
    if n.op == "call_method" and n.target == "permute":
        rest = n.args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return None


def _scale_dim(gm: GraphModule, g: Node, x: Node) -> tuple[torch.Tensor, int] | None:
    """(scale vector, the dim of x it runs along) where ``g`` is a constant with one wide dim
    (as wide as the layer's output features: ``fold_scale`` checks that on the layer)."""
    t = _constant(gm, g)
    xv = _val(x)
    if not isinstance(t, torch.Tensor) or xv is None or not t.is_floating_point() or t.dim() > xv.dim():
        return None
    wide = [j for j, s in enumerate(t.shape) if s != 1]
    if len(wide) > 1:
        return None
    if not wide:
        return None  # a scalar scale: fine to fold, but nothing per channel to gain over the mul
    # shapes on the nodes may predate shrink-params: ranks only; the width is checked on the layer
    return t.reshape(-1), xv.dim() - t.dim() + wide[0]


_RESHAPES = {"reshape", "view"}


def _constant(gm: GraphModule, g: Node) -> torch.Tensor | None:
    """The tensor ``g`` reads: a ``get_attr``, or a reshape of one to literal sizes read only
    there (timm's ConvNeXt multiplies by ``self.gamma.reshape(1, -1, 1, 1)``)."""
    if g.op == "call_method" and g.target in _RESHAPES and len(g.args) >= 2 and not g.kwargs:
        sizes = g.args[1] if len(g.args) == 2 and isinstance(g.args[1], (list, tuple)) else g.args[1:]
        src = g.args[0]
        if not (isinstance(src, Node) and src.op == "get_attr" and len(src.users) == 1) or \
                not all(type(d) is int for d in sizes):
            return None
        t = _attr(gm, src.target)
        try:
            return t.reshape(sizes) if isinstance(t, torch.Tensor) else None
        except RuntimeError:
            return None
    return _attr(gm, g.target) if g.op == "get_attr" else None


def _attr(gm: GraphModule, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _source(gm: GraphModule, x: Node, d: int, calls: dict):
    """(layer node, layer module) whose output features are dim ``d`` of ``x``, or None."""
    node = x
    while True:
        if len(node.users) != 1:
            return None
        perm = _perm(node)
        if perm is not None:
            d = perm[d]
            node = node.args[0]
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _PASS_THROUGH) and not (isinstance(mod, nn.Dropout) and mod.training):
                node = node.args[0]
                continue
            feat = _FEATURES.get(type(mod))
            nd = _val(node).dim() if _val(node) is not None else None
            if feat is None or nd is None or calls[node.target] != 1 or d != feat(nd):
                return None
            return node, mod
        return None


def _scaled(layer: nn.Module, g: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        g = g.to(layer.weight.dtype)
        w = layer.weight * g.reshape(-1, *[1] * (layer.weight.dim() - 1))      # (C_out, ...)
        b = None if layer.bias is None else layer.bias * g                      # (C_out,)
    params = {"weight": nn.Parameter(w.contiguous(), layer.weight.requires_grad)}
    if b is not None:
        params["bias"] = nn.Parameter(b.contiguous(), layer.bias.requires_grad)
    return with_params(layer, **params)


@register_pass("fold-scale", computes_weights=True)
def fold_scale(gm: GraphModule) -> PassResult:
    calls = call_counts(gm)
    changed = False
    for mul in list(gm.graph.nodes):
        if not _is_mul(mul) or len(mul.args) != 2 or mul.kwargs:
            continue
        for g, x in (mul.args, mul.args[::-1]):
            if not (isinstance(g, Node) and isinstance(x, Node)):
                continue
            found = _scale_dim(gm, g, x)  # its other dims are 1: it never widens x
            if found is None:
                continue
            src = _source(gm, x, found[1], calls)
            if src is None:
                continue
            node, layer = src
            if layer.weight.shape[0] != found[0].numel():
                continue
            gm.add_submodule(node.target, _scaled(layer, found[0]))
            mul.replace_all_uses_with(x)
            gm.graph.erase_node(mul)
            _drop_if_unread(gm, g)
            changed = True
            break
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def _drop_if_unread(gm: GraphModule, g: Node) -> None:
    """The folded scale leaves the graph and the module tree where nothing else reads it: left
    as a parameter, it was counted, saved, and took a pruned CaiT at target_params=0.5 under
    the deploy pipeline to 0.5012 (its gamma_1/gamma_2, 2,304 parameters, even at ratio 0)."""
    if g.op == "call_method" and g.target in _RESHAPES and not g.users:
        src = g.args[0]
        gm.graph.erase_node(g)
        g = src
    if g.op != "get_attr" or g.users:
        return
    target = g.target
    gm.graph.erase_node(g)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    tensor = getattr(mod, attr, None)
    if held(gm, tensor) > 1:
        return  # tied under another name something may read
    mod._parameters.pop(attr, None)
    mod._buffers.pop(attr, None)
