"""drop-identity: calls of ``nn.Identity`` and of eval-mode dropouts removed from the graph (lossless in eval).

timm puts an ``nn.Identity`` or a ``Dropout(p=0)`` between most layers and their
activations (``BatchNormAct2d``'s ``drop``, a block's ``drop_path`` at rate 0).
Each is a Python call per forward in a graph, and it sits between a conv and
its activation, where ``onednn-fuse`` looks for the pair to fuse and
``fold-scale`` for the layer before a scale: a deploy graph of a pruned timm
EfficientNet fused no activation at all.

Removed: ``call_module`` nodes whose module is exactly ``nn.Identity``, or
exactly one of torch's dropout classes in eval mode, called with one tensor
argument and no keywords, without hooks; readers take the argument instead. A subclass (it
may compute something) and a dropout in train mode stay. The deploy pipeline
is an inference form: the graph switched to ``train()`` afterwards has no
dropout there. Modules the graph no longer calls are left to ``dce``.
"""
from __future__ import annotations

import torch.nn as nn
from torch.fx import GraphModule, Node

from graphprune.canon import computes_unseen
from graphprune.pass_manager import PassResult, register_pass

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _identity(gm: GraphModule, node: Node) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
        return False
    mod = gm.get_submodule(node.target)
    if computes_unseen(mod):  # a hook on it runs there
        return False
    return type(mod) is nn.Identity or (type(mod) in DROPOUTS and not mod.training)


@register_pass("drop-identity")
def drop_identity(gm: GraphModule) -> PassResult:
    changed = False
    for node in list(gm.graph.nodes):
        if _identity(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
