"""fold-bn: an eval-mode BatchNorm folded into the conv or linear that feeds it (lossless).

In eval mode a BatchNorm is a per-channel affine map,
``y = s * (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``; applied to
``z = W x + b`` it is the same layer with ``W' = s * W`` (per output channel)
and ``b' = s * (b - mean) + beta``. Folding removes a pass over the
activations that costs memory bandwidth and no FLOPs, which is where pruned
mobile nets lose most of their speed-up (issue 12).

Folded only where nothing else can see the difference: the BatchNorm is a
``call_module`` in eval mode with running statistics, or an ``F.batch_norm``
call with ``training=False`` whose statistics and affine are tensors of a
submodule the graph does not call and reads nowhere else (timm's
``BatchNormAct2d``, which fx traces through; that submodule loses them: the
deploy form is a graph and never runs its forward); its only input is a
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

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from graphprune.errors import GraphpruneError
from graphprune.meta_keys import VAL
from graphprune.attrs import fresh_attrs
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
    if kinds is None or type(bn) not in kinds or not _sole_reader(src, bn_node) or calls[src.target] != 1:
        return None
    if isinstance(layer, nn.Linear) and _ndim(src) != 2:
        return None
    if layer.weight.shape[0] != bn.num_features:
        return None
    return src, layer, _stats(bn)


def _folded(layer: nn.Module, mean, var, weight, bias, eps: float) -> nn.Module:
    with torch.no_grad():
        scale = weight if weight is not None else torch.ones_like(var)
        shift = bias if bias is not None else torch.zeros_like(mean)
        s = scale / torch.sqrt(var + eps)                                        # (C,)
        w = layer.weight * s.reshape(-1, *[1] * (layer.weight.dim() - 1))       # (C, ...)
        b = layer.bias if layer.bias is not None else torch.zeros_like(mean)
        b = (b - mean) * s + shift                                               # (C,)
    grad = layer.weight.requires_grad
    return with_params(layer, weight=nn.Parameter(w.to(layer.weight.dtype).contiguous(), grad),
                       bias=nn.Parameter(b.to(layer.weight.dtype).contiguous(), grad))


def _stats(bn: nn.Module) -> tuple:
    return bn.running_mean, bn.running_var, bn.weight if bn.affine else None, bn.bias if bn.affine else None, bn.eps


# F.batch_norm's arguments, in order
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_STATS = ("running_mean", "running_var", "weight", "bias")


def _functional(gm: GraphModule, node: Node, calls: dict, reads: dict):
    """(src, layer, (mean, var, weight, bias, eps), owner path, get_attr nodes) for an eval-mode
    ``F.batch_norm`` over the output of a layer in ``FOLDS_INTO``, its tensors those of one submodule
    that the graph reads only here; else None."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    bound = {**dict(zip(_BN_ARGS, node.args)), **node.kwargs}
    if bound.get("training", False) is not False or not isinstance(bound.get("eps", 1e-5), float):
        return None
    attrs = {k: bound.get(k) for k in _STATS}
    if any(a is not None and not (isinstance(a, Node) and a.op == "get_attr" and len(a.users) == 1)
           for a in attrs.values()) or attrs["running_mean"] is None or attrs["running_var"] is None:
        return None
    paths = {a.target.rpartition(".")[0] for a in attrs.values() if a is not None}
    path = paths.pop()
    if paths or not path or calls.get(path, 0):
        return None  # tensors of several modules, of the top module, or of a module the graph also calls
    owner = gm.get_submodule(path)
    tensors = {k: getattr(owner, a.target.rpartition(".")[2], None) if a is not None else None for k, a in attrs.items()}
    if any(isinstance(a, Node) and (not isinstance(tensors[k], torch.Tensor) or reads.get(id(tensors[k])) != 1
                                    or held(gm, tensors[k]) > 1) for k, a in attrs.items()):
        return None
    src = bound["input"]
    layer = _module(gm, src)
    if type(layer) not in FOLDS_INTO or not _sole_reader(src, node) or calls[src.target] != 1:
        return None
    if (isinstance(layer, nn.Linear) and _ndim(src) != 2) or layer.weight.shape[0] != tensors["running_mean"].numel():
        return None
    stats = (tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"], bound.get("eps", 1e-5))
    return src, layer, stats, path, [a for a in attrs.values() if a is not None]


def with_params(layer: nn.Module, **params: nn.Parameter) -> nn.Module:
    """A new module like ``layer`` (its attributes, hook dicts of its own) holding ``params``
    in place of those names; its other parameters are shared. ``layer`` is not touched."""
    new = type(layer).__new__(type(layer))
    new.__dict__ = fresh_attrs(layer.__dict__)
    new._parameters = dict(layer._parameters)
    for name, p in params.items():
        setattr(new, name, p)
    return new


def attr_reads(gm: GraphModule) -> dict:
    """id(tensor) -> how many ``get_attr`` nodes read it."""
    reads: dict = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, name = n.target.rpartition(".")
            t = getattr(gm.get_submodule(owner) if owner else gm, name, None)
            reads[id(t)] = reads.get(id(t), 0) + 1
    return reads


def held(gm: GraphModule, t: torch.Tensor) -> int:
    """Under how many names the graph module holds ``t`` (more than one: tied)."""
    return sum(x is t for _, x in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def shape_only(n: Node) -> bool:
    """A read of a tensor's shape, not its values (timm reads ``x.shape`` before its qkv projection
    and asserts ``x.ndim`` in its BatchNormAct2d)."""
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in ("shape", "ndim", "dtype", "device")
    return n.op == "call_method" and n.target in ("size", "dim")


def _sole_reader(src: Node, node: Node) -> bool:
    """``node`` is the only node that reads ``src``'s values."""
    return all(u is node or shape_only(u) for u in src.users)


def call_counts(gm: GraphModule) -> dict:
    """How many times each submodule is called in the graph (a module called twice cannot
    be rewritten for one of its calls). Every pass rewrites only modules called once; a
    module with hooks or a computed weight (``canon.computes_unseen``) counts as called
    without end, so none rewrites it: folding a hooked BatchNorm dropped its hook (0.09 to 0.64
    off), and a conv whose old-style weight_norm hook writes ``weight`` failed once folded
    (survey 39 f06-f08)."""
    from graphprune.canon import computes_unseen

    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sealed = computes_unseen(gm.get_submodule(n.target))
            calls[n.target] = math.inf if sealed else calls.get(n.target, 0) + 1
    return calls


@register_pass("fold-bn", computes_weights=True)
def fold_bn(gm: GraphModule) -> PassResult:
    calls = call_counts(gm)
    reads = attr_reads(gm)
    changed = False
    for bn_node in list(gm.graph.nodes):
        if bn_node.op == "call_module":
            found = _foldable(gm, bn_node, calls)
            if found is None:
                continue
            src, layer, stats = found
            gm.add_submodule(src.target, _folded(layer, *stats))
            bn_node.replace_all_uses_with(src)
            gm.graph.erase_node(bn_node)
            gm.delete_submodule(bn_node.target)
            stand_in(gm, bn_node.target, training=False)
            changed = True
        elif (found := _functional(gm, bn_node, calls, reads)) is not None:
            src, layer, stats, path, attrs = found
            gm.add_submodule(src.target, _folded(layer, *stats))
            bn_node.replace_all_uses_with(src)
            gm.graph.erase_node(bn_node)
            for a in attrs:
                gm.graph.erase_node(a)
            owner = gm.get_submodule(path)  # keeps what else it holds (timm's activation)
            gm.add_submodule(path, with_params(owner, **{a.target.rpartition(".")[2]: None for a in attrs}))
            stand_in(gm, f"{path}.folded_batchnorm", training=False)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


class FoldedBatchNorm(nn.Module):
    """Stands where fold-bn removed a BatchNorm, at its name and in its mode, which ``.train()`` and
    ``.eval()`` move as they would have moved the BatchNorm's (a frozen one in a model in training
    mode stays in eval mode). Never called: the graph hands it to ``refuse_training``."""

    def __init__(self, path: str = ""):
        super().__init__()
        self.path = path  # the BatchNorm's name, for the message


@torch.fx.node.has_side_effect  # nothing reads it: no dead-code pass may drop it
def refuse_training(*stand_ins: FoldedBatchNorm) -> None:
    """Refuses a run where a folded BatchNorm is in training mode: it would have normalised by batch
    statistics then, and the folded layer still uses the running ones. A deploy result put in training
    mode computed 0.68 off the default pipeline's, without a word (survey 59 F1)."""
    if any(m.training for m in stand_ins):
        raise GraphpruneError(
            "this model was compiled with pipeline='deploy', which folded its BatchNorms into the layers before "
            "them: in training mode they would normalise by batch statistics, which the folded layers cannot. "
            "Call .eval() to run it; to fine-tune, fine-tune a result of the default pipeline, which keeps its "
            "BatchNorms, and compile that with pipeline='deploy' after. (A graph runs no train() of your classes: a "
            "BatchNorm your train() keeps frozen is frozen again by .eval() on its stand-in, "
            f"{', '.join(repr(m.path) for m in stand_ins if m.training)[:200]}.)")


def stand_in(gm: GraphModule, path: str, training: bool) -> None:
    """A ``FoldedBatchNorm`` at ``path`` in mode ``training``, given by name (a ``get_attr``, which copies and
    loads keep) to the graph's one ``refuse_training`` call."""
    gm.add_submodule(path, FoldedBatchNorm(path).train(training))
    check = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is refuse_training), None)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        read = gm.graph.get_attr(path)
        if check is None:
            gm.graph.call_function(refuse_training, (read,))
        else:
            check.args = (*check.args, read)
