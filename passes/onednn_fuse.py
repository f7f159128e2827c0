"""onednn-fuse: 2-d convolutions and linears run as oneDNN kernels with the activation after them fused in.

On CPU, an activation after a convolution is a separate pass over its output:
memory traffic that shrinks with the channels pruned, but not with the FLOPs,
which fall as the product of input and output widths (a pruned
EfficientNet-B0 spent 20% of its time in SiLU, bench/deploy_speed.py). oneDNN
applies the activation as the convolution's post-op while the output is still
in registers. Linear layers gain more: oneDNN's matmul ran the ViT MLP's
shapes 2x faster than ``F.linear`` on the 2-core CPU.

Each ``call_module`` ``nn.Conv2d`` (zero padding given as numbers) or
``nn.Linear``, called once, becomes ``modules.OneDNNConv2d`` / ``OneDNNLinear``
with the same parameters under the same names; where its output's only reader
is an activation in ``ACTIVATIONS``, that activation becomes the post-op and
its node goes. The new modules take the oneDNN kernel only for fp32 inference
on CPU and otherwise run the layer and activation as before, so the model
still moves to a GPU, trains, or runs in half precision.

Whether a model gains is a property of the model and the device, so
``compile(pipeline="deploy")`` times the unpruned model with and without this
pass and adds it only where it is faster (``api.fastest_layout``).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from graphprune.canon import computes_unseen
from graphprune.modules import OneDNNConv2d, OneDNNLinear
from graphprune.pass_manager import PassResult, register_pass
from graphprune.attrs import fresh_attrs

from .fold_bn import call_counts, shape_only

LAYERS = {nn.Conv2d: OneDNNConv2d, nn.Linear: OneDNNLinear}

# activation module type -> its post-op (attr, scalars, algorithm), or None where this instance has none
MODULE_ACTIVATIONS = {
    nn.ReLU: lambda m: ("relu", (), ""),
    nn.SiLU: lambda m: ("swish", (), ""),
    nn.Sigmoid: lambda m: ("sigmoid", (), ""),
    nn.Tanh: lambda m: ("tanh", (), ""),
    nn.Hardswish: lambda m: ("hardswish", (), ""),
    nn.ReLU6: lambda m: ("hardtanh", (0.0, 6.0), ""),
    nn.Hardtanh: lambda m: ("hardtanh", (float(m.min_val), float(m.max_val)), ""),
    nn.GELU: lambda m: ("gelu", (), m.approximate),
}
FUNCTION_ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "swish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish", F.relu6: None, F.gelu: "gelu",
}
METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_KWARGS_OK = {"inplace"}  # an in-place activation of a fresh output is the same value


def _activation(gm: GraphModule, node: Node, src: Node) -> tuple | None:
    """The post-op that ``node`` applies to ``src`` (its only tensor input), or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        rule = None if computes_unseen(mod) else MODULE_ACTIVATIONS.get(type(mod))  # a hook on it runs there
        return rule(mod) if rule and node.args == (src,) and not node.kwargs else None
    if node.op == "call_method" and node.args == (src,) and not node.kwargs:
        attr = METHOD_ACTIVATIONS.get(node.target)
        return (attr, (), "") if attr else None
    if node.op != "call_function" or node.target not in FUNCTION_ACTIVATIONS or not node.args or node.args[0] is not src:
        return None
    if node.target is F.relu6:
        return ("hardtanh", (0.0, 6.0), "") if len(node.args) == 1 and set(node.kwargs) <= _KWARGS_OK else None
    if node.target is F.gelu:
        approximate = node.kwargs.get("approximate", "none")
        ok = len(node.args) == 1 and set(node.kwargs) <= {"approximate"} and approximate in ("none", "tanh")
        return ("gelu", (), approximate) if ok else None
    ok = len(node.args) == 1 or (len(node.args) == 2 and isinstance(node.args[1], bool))  # F.relu(x, inplace)
    return (FUNCTION_ACTIVATIONS[node.target], (), "") if ok and set(node.kwargs) <= _KWARGS_OK else None


def _convertible(mod: nn.Module) -> bool:
    if type(mod) is nn.Conv2d:
        return mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
    return type(mod) is nn.Linear


def _fused(mod: nn.Module, post_op: tuple) -> nn.Module:
    new = LAYERS[type(mod)].__new__(LAYERS[type(mod)])
    new.__dict__ = fresh_attrs(mod.__dict__)
    new._parameters = dict(mod._parameters)  # the same tensors: nothing is computed differently but the kernel
    new.post_op = post_op
    return new


@register_pass("onednn-fuse", computes_weights=True)
def onednn_fuse(gm: GraphModule, convs: bool = True) -> PassResult:
    """``convs=False`` converts linears only (where fused convolutions time slower)."""
    calls = call_counts(gm)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        mod = gm.get_submodule(node.target)
        if not _convertible(mod) or (not convs and type(mod) is nn.Conv2d):
            continue
        post_op, act = ("none", (), ""), None
        readers = [u for u in node.users if not shape_only(u)]  # timm asserts on x.ndim before its activation
        if len(readers) == 1:
            user = readers[0]
            found = _activation(gm, user, node)
            if found is not None:
                post_op, act = found, user
        gm.add_submodule(node.target, _fused(mod, post_op))
        if act is not None:
            act.replace_all_uses_with(node)
            gm.graph.erase_node(act)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
