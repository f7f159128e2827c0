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

Folded only where nothing else can see the difference: the norm is a
``call_module`` ``nn.LayerNorm``/``nn.RMSNorm`` (or a subclass) over one dim,
called once, in eval mode or not (it has no state), whose output is read by one
node, a ``call_module`` of a reader in ``READERS`` called once, whose weight is its
own (not tied to an embedding), that takes the norm's output as every tensor input it reads (self-attention reads it as query,
key and value). The folded norm and reader are new modules with new
parameters; the pass never writes into a module it was given.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from graphprune.modules import PrunedSelfAttention
from graphprune.pass_manager import PassResult, register_pass
from .fold_bn import call_counts, with_params

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


@register_pass("fold-norm")
def fold_norm(gm: GraphModule) -> PassResult:
    calls = call_counts(gm)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        norm = gm.get_submodule(node.target)
        if not isinstance(norm, NORMS) or len(node.args) != 1 or node.kwargs:
            continue
        affine = _affine(norm)
        reader = next(iter(node.users))
        if affine is None or reader.op != "call_module" or calls[reader.target] != 1:
            continue
        mod = gm.get_submodule(reader.target)
        rule = READERS.get(type(mod))
        if rule is None or not _reads_only(node, reader, rule[0]):
            continue
        w, b = affine
        if w.numel() != _in_features(mod) or _tied(gm, mod):
            continue
        folded = rule[1](mod, w, b)
        if folded is None:
            continue
        gm.add_submodule(reader.target, folded)
        plain = with_params(norm, weight=None, **({"bias": None} if "bias" in norm._parameters else {}))
        plain.elementwise_affine = False
        gm.add_submodule(node.target, plain)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def _tied(gm: GraphModule, mod: nn.Module) -> bool:
    """Whether a weight of the reader is also held elsewhere (a head tied to its embedding): folding
    gives the reader a weight of its own, which would untie it and add a copy."""
    weight = mod.weight if isinstance(mod, nn.Linear) else mod.in_proj_weight
    return sum(t is weight for _, t in gm.named_parameters(remove_duplicate=False)) > 1


def _in_features(mod: nn.Module) -> int:
    weight = mod.weight if isinstance(mod, nn.Linear) else mod.in_proj_weight
    return -1 if weight is None else weight.shape[1]
