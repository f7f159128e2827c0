"""fold-norm: a LayerNorm's (or RMSNorm's) affine folded into the linear layer that reads it (lossless).

A pre-norm transformer block computes ``Linear(LN(x))`` with ``LN(x) = n(x) * w + b``
(``n`` the normalisation, ``w``, ``b`` per feature of the last dim). That is
``n(x) @ (W diag(w))^T + (W b + c)``: the same linear layer with ``W' = W diag(w)``
(per input feature) and ``c' = c + W b``, reading the normalisation without its
affine. Folding removes two elementwise passes over the block's input. Where the
norm runs over a pruned residual stream it is graphprune's own full-width norm
(``modules.layer_norm_full``), whose affine is not fused into a kernel, so the
passes are real memory traffic: what keeps a pruned ViT or ConvNeXt below the
speed-up its FLOPs promise (issue 12).

Folded only where nothing else can see the difference. The norm is one of
two spellings:

* a ``call_module`` ``nn.LayerNorm``/``nn.RMSNorm`` (or a subclass) over one dim,
  called once (eval mode or not: it has no state);
* a functional norm (``F.layer_norm``, ``F.rms_norm``, graphprune's full-width
  ones, the aten ops) over one dim whose weight and bias are parameters read by
  this node alone, held once, by a submodule the graph does not call (timm's
  ``LayerNorm``, which fx traces through): the call gets ``None`` for them and
  the submodule loses them. Deploy output is a graph (it never runs that
  submodule's forward), so nothing else reads them.

Every node that reads the norm's output is a ``call_module`` of a reader in
``READERS`` called once, whose weight is its own (not tied to an embedding),
that takes the norm's output as every tensor input it reads (self-attention
reads it as query, key and value); separate q, k and v projections each get
the affine. The folded norm and readers are new modules with new parameters;
the pass never writes into a module it was given.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from graphprune.modules import PrunedSelfAttention, layer_norm_full, rms_norm_full
from graphprune.pass_manager import PassResult, register_pass
from .fold_bn import attr_reads, call_counts, held, shape_only, with_params

NORMS = (nn.LayerNorm, nn.RMSNorm)


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None):
    """(W diag(w), c + W b) for a weight (out, in) reading features scaled by ``w`` and shifted by ``b``."""
    with torch.no_grad():
        new_w = weight * w.to(weight.dtype)                                    # (out, in)
        new_b = bias
        if b is not None:
            shift = weight.double() @ b.double()                               # (out,)
            new_b = (shift if bias is None else bias.double() + shift).to(weight.dtype)
    grad = weight.requires_grad
    return (nn.Parameter(new_w.contiguous(), grad),
            None if new_b is None else nn.Parameter(new_b.contiguous(), grad))


def _linear(mod: nn.Linear, w, b) -> nn.Module:
    weight, bias = _fold(mod.weight, mod.bias, w, b)
    return with_params(mod, weight=weight, bias=bias)


def _self_attention(mod: nn.Module, w, b) -> nn.Module | None:
    """Query, key and value all read the norm: its affine goes into every row of the input projection."""
    if mod.in_proj_weight is None:  # nn.MultiheadAttention with separate q/k/v widths
        return None
    weight, bias = _fold(mod.in_proj_weight, mod.in_proj_bias, w, b)
    return with_params(mod, in_proj_weight=weight, in_proj_bias=bias)


# reader type -> (how many leading tensor args it reads the norm through, the folded copy)
READERS: dict[type, tuple[int, Callable]] = {
    nn.Linear: (1, _linear),
    PrunedSelfAttention: (3, _self_attention),
    nn.MultiheadAttention: (3, _self_attention),
}


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    weight = getattr(norm, "weight", None)
    if weight is None or len(norm.normalized_shape) != 1:
        return None
    return weight, getattr(norm, "bias", None)


def _reads_only(node: Node, reader: Node, n_inputs: int) -> bool:
    """``reader`` reads ``node`` as each of its first ``n_inputs`` positional inputs that are given, and
    nowhere else (a cross-attention, whose key is another tensor, is not folded)."""
    inputs = [a for a in reader.args[:n_inputs] if a is not None]
    rest = list(reader.args[n_inputs:]) + list(reader.kwargs.values())
    if any(k in reader.kwargs for k in ("input", "query", "key", "value")):
        return False
    return bool(inputs) and all(a is node for a in inputs) and not any(a is node for a in rest)


# functional norm -> the names of its positional arguments (weight and bias are the affine)
FUNCTIONAL: dict = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.ops.aten.layer_norm.default: ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    layer_norm_full: ("input", "normalized_shape", "weight", "bias", "eps", "full"),
    F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    rms_norm_full: ("input", "normalized_shape", "weight", "eps", "full"),
}
if hasattr(torch.ops.aten, "rms_norm"):
    FUNCTIONAL[torch.ops.aten.rms_norm.default] = FUNCTIONAL[F.rms_norm]


@register_pass("fold-norm", computes_weights=True)
def fold_norm(gm: GraphModule) -> PassResult:
    calls = call_counts(gm)
    reads = attr_reads(gm)
    changed = False
    for node in list(gm.graph.nodes):
        site = _module_norm(gm, node, calls) or _functional_norm(gm, node, calls, reads)
        if site is None:
            continue
        (w, b), drop = site
        folded = _readers(gm, node, calls, w, b)
        if folded is None:
            continue
        for target, mod in folded.items():
            gm.add_submodule(target, mod)
        drop()
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def _module_norm(gm: GraphModule, node: Node, calls: dict):
    """((w, b), drop) for a ``call_module`` norm called once; drop swaps in a copy without affine."""
    if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
        return None
    norm = gm.get_submodule(node.target)
    affine = _affine(norm) if isinstance(norm, NORMS) else None
    if affine is None:
        return None
    return affine, lambda: gm.add_submodule(node.target, _plain(norm))


def _functional_norm(gm: GraphModule, node: Node, calls: dict, reads: dict):
    """((w, b), drop) for a functional norm over one dim whose weight and bias are parameters of a
    submodule the graph reads nowhere else; drop passes ``None`` for them and removes them from
    that module (the deploy form is a graph, which never runs the module's own forward)."""
    names = FUNCTIONAL.get(node.target) if node.op == "call_function" else None
    if names is None:
        return None
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    shape, weight, bias = bound.get("normalized_shape"), bound.get("weight"), bound.get("bias")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(weight, Node):
        return None
    attrs = [a for a in (weight, bias) if a is not None]
    if not all(isinstance(a, Node) and a.op == "get_attr" and len(a.users) == 1 for a in attrs):
        return None
    path = weight.target.rpartition(".")[0]
    if not path or calls.get(path, 0):
        return None  # the graph also runs that module, or the affine is held by the top module
    owner = gm.get_submodule(path)
    if bias is not None and bias.target.rpartition(".")[0] != path:
        return None
    w, b = (owner._parameters.get(a.target.rpartition(".")[2]) if a is not None else None for a in (weight, bias))
    if w is None or (bias is not None and b is None) or w.dim() != 1:
        return None
    if any(reads.get(id(t)) != 1 or held(gm, t) != 1 for t in (w, b) if t is not None):
        return None

    def drop():
        node.args = tuple(None if a is weight or a is bias else a for a in node.args)
        node.kwargs = {k: (None if v is weight or v is bias else v) for k, v in node.kwargs.items()}
        for a in attrs:
            gm.graph.erase_node(a)
        gone = {a.target.rpartition(".")[2]: None for a in attrs}
        gm.add_submodule(path, with_params(owner, **gone))  # the graph reads the module's other tensors still

    return (w, b), drop


def _readers(gm: GraphModule, node: Node, calls: dict, w: torch.Tensor, b: torch.Tensor | None) -> dict | None:
    """{reader target: the reader with the affine folded in} when every node that reads ``node``
    can take it (separate q, k and v projections each do), else None."""
    readers = {}
    for reader in node.users:
        if shape_only(reader):
            continue
        if reader.op != "call_module" or calls[reader.target] != 1:
            return None
        mod = gm.get_submodule(reader.target)
        rule = READERS.get(type(mod))
        if rule is None or not _reads_only(node, reader, rule[0]):
            return None
        if w.numel() != _in_features(mod) or _tied(gm, mod):
            return None
        readers[reader.target] = rule[1](mod, w, b)
        if readers[reader.target] is None:
            return None
    return readers or None


def _plain(norm: nn.Module) -> nn.Module:
    """A copy of ``norm`` without its affine (``norm`` is not touched)."""
    plain = with_params(norm, weight=None, **({"bias": None} if "bias" in norm._parameters else {}))
    plain.elementwise_affine = False
    return plain


def _tied(gm: GraphModule, mod: nn.Module) -> bool:
    """Whether a weight of the reader is also held elsewhere (a head tied to its embedding): folding
    gives the reader a weight of its own, which would untie it and add a copy."""
    return held(gm, mod.weight if isinstance(mod, nn.Linear) else mod.in_proj_weight) > 1


def _in_features(mod: nn.Module) -> int:
    weight = mod.weight if isinstance(mod, nn.Linear) else mod.in_proj_weight
    return -1 if weight is None else weight.shape[1]
