"""fold-bn: an eval-mode BatchNorm folded into the conv or linear that feeds it (lossless).

In eval mode a BatchNorm is a per-channel affine map,
``y = s * (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``; applied to
``z = W x + b`` it is the same layer with ``W' = s * W`` (per output channel)
and ``b' = s * (b - mean) + beta``. Folding removes a pass over the
activations that costs memory bandwidth and no FLOPs, which is where pruned
mobile nets lose most of their speed-up (issue 12).

Folded only where nothing else can see the difference: the BatchNorm is a
``call_module`` in eval mode with running statistics, its only input is a
``call_module`` conv (1-3d, not transposed) or linear whose output nothing
else reads, neither module is called anywhere else in the graph, and a
linear's output is ``(N, C)`` (a BatchNorm1d over ``(N, C, L)`` normalises
dim 1, not a linear's features). Anything else is left as it is.

The folded layer is a new module with new parameters: the pass never writes
into a module it was given, so it is safe on a graph that still shares
modules with the user's model. The result is a deploy form: the BatchNorm
parameters are gone, so it fine-tunes differently; ``compile``'s default
pipeline does not fold, ``pipeline="deploy"`` does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from graphprune.meta_keys import VAL
from graphprune.trace import fresh_attrs
from graphprune.pass_manager import PassResult, register_pass

# producer type -> the BatchNorm types that normalise its output channels
FOLDS_INTO = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
    nn.Linear: (nn.BatchNorm1d,),
}


def _module(gm: GraphModule, node) -> nn.Module | None:
    return gm.get_submodule(node.target) if isinstance(node, Node) and node.op == "call_module" else None


def _ndim(node: Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get(VAL, node.meta.get("val"))
    return val.dim() if isinstance(val, torch.Tensor) else None  # unknown: the linear is left unfolded


def _foldable(gm: GraphModule, bn_node: Node, calls: dict) -> tuple[Node, nn.Module, nn.Module] | None:
    bn = _module(gm, bn_node)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    if len(bn_node.args) != 1 or bn_node.kwargs or calls[bn_node.target] != 1:
        return None
    src = bn_node.args[0]
    layer = _module(gm, src)
    kinds = FOLDS_INTO.get(type(layer))
    if kinds is None or type(bn) not in kinds or len(src.users) != 1 or calls[src.target] != 1:
        return None
    if isinstance(layer, nn.Linear) and _ndim(src) != 2:
        return None
    if layer.weight.shape[0] != bn.num_features:
        return None
    return src, layer, bn


def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        scale = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        s = scale / torch.sqrt(bn.running_var + bn.eps)                         # (C,)
        w = layer.weight * s.reshape(-1, *[1] * (layer.weight.dim() - 1))       # (C, ...)
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b - bn.running_mean) * s + shift                                    # (C,)
    grad = layer.weight.requires_grad
    return with_params(layer, weight=nn.Parameter(w.to(layer.weight.dtype).contiguous(), grad),
                       bias=nn.Parameter(b.to(layer.weight.dtype).contiguous(), grad))


def with_params(layer: nn.Module, **params: nn.Parameter) -> nn.Module:
    """A new module like ``layer`` (its attributes, hook dicts of its own) holding ``params``
    in place of those names; its other parameters are shared. ``layer`` is not touched."""
    new = type(layer).__new__(type(layer))
    new.__dict__ = fresh_attrs(layer.__dict__)
    new._parameters = dict(layer._parameters)
    for name, p in params.items():
        setattr(new, name, p)
    return new


def call_counts(gm: GraphModule) -> dict:
    """How many times each submodule is called in the graph (a module called twice cannot
    be rewritten for one of its calls)."""
    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


@register_pass("fold-bn")
def fold_bn(gm: GraphModule) -> PassResult:
    calls = call_counts(gm)
    changed = False
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module":
            continue
        found = _foldable(gm, bn_node, calls)
        if found is None:
            continue
        src, layer, bn = found
        gm.add_submodule(src.target, _folded(layer, bn))
        bn_node.replace_all_uses_with(src)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(bn_node.target)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
