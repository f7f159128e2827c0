"""channels-last: 2-d convolution weights stored NHWC, so the whole conv stack runs NHWC (lossless).

PyTorch runs a convolution in channels-last layout when its input *or its
weight* is channels-last, and every elementwise op, norm and pool after it keeps
the layout. On oneDNN (CPU) that removes the reorder into and out of the
library's blocked layout around every convolution, and depthwise convolutions
get its NHWC kernels: on 2 CPU threads, batch 8, MobileNetV2 ran 1.9x faster
and a MobileNetV2 pruned to half its channels 3.1x faster (bench/deploy_speed.py).
The saving is memory traffic, which does not shrink with FLOPs, so it is
what pruned mobile nets lack most (issue 12).

The values are the same; only strides change. Two places could see strides:

* the model's outputs: every 4-d tensor the graph returns is made contiguous
  again (``.contiguous()``), so callers get the layout they always got;
* ``view`` on an activation inside the model raises on a channels-last tensor.
  The pass cannot see that; ``compile`` runs the converted model on the
  example before choosing this pass (``api.fastest_layout``) and keeps the
  contiguous layout when it raises or is not faster.

Converted weights are new tensors (and call_module convs new modules); the pass
never writes into a module or tensor it was given.
"""
from __future__ import annotations

from operator import attrgetter

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from graphprune.attrs import fresh_attrs
from graphprune.pass_manager import PassResult, register_pass

from .fold_bn import _ndim

CL = torch.channels_last
# functional convolutions, by the position of their weight argument
CONV_FUNCTIONS = {torch.nn.functional.conv2d: 1, torch.conv2d: 1,
                  torch.ops.aten.conv2d.default: 1, torch.ops.aten.convolution.default: 1}


def _nhwc(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` stored channels-last, or None where that changes no stride (1x1 and depthwise kernels)."""
    if t.dim() != 4:
        return None
    new = t.detach().contiguous(memory_format=CL)
    return None if new.stride() == t.stride() else new


def _converted_module(conv: nn.Conv2d) -> nn.Conv2d:
    new = type(conv).__new__(type(conv))
    new.__dict__ = fresh_attrs(conv.__dict__)
    new._parameters = dict(conv._parameters)
    new.weight = nn.Parameter(_nhwc(conv.weight), conv.weight.requires_grad)
    return new


def _set_attr(gm: GraphModule, path: str, value) -> None:
    owner, _, name = path.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if name in mod._parameters:  # a new Parameter: the one given is never written (a pass checked on meta holds
        old = mod._parameters[name]  # plain meta tensors in its parameter slots)
        mod._parameters[name] = nn.Parameter(value, getattr(old, "requires_grad", True))
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def has_convolution(gm: GraphModule) -> bool:
    """Whether the pass has anything to convert: a 2-d convolution, as a module or a function."""
    return any((n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d))
               or (n.op == "call_function" and n.target in CONV_FUNCTIONS) for n in gm.graph.nodes)


@register_pass("channels-last")
def channels_last(gm: GraphModule) -> PassResult:
    changed = False
    laid: dict[Node, Node] = {}  # activation -> its channels-last copy

    def lay_out(conv: Node, x) -> None:
        """Make the conv's input channels-last (free when it already is): 1x1 and
        depthwise kernels have no channels-last strides of their own to pass on."""
        nonlocal changed
        if not isinstance(x, Node) or _ndim(x) != 4 or x.op == "get_attr":
            return
        if x not in laid:
            with gm.graph.inserting_before(conv):
                laid[x] = gm.graph.call_method("contiguous", (x,), {"memory_format": CL})
            laid[x].meta.update(x.meta)
        conv.replace_input_with(x, laid[x])
        changed = True

    for n in list(gm.graph.nodes):
        if n.op == "call_module":
            conv = gm.get_submodule(n.target)
            if isinstance(conv, nn.Conv2d):
                # subclasses may compute their weight in forward (weight standardization): only their input is laid out
                if type(conv) is nn.Conv2d and _nhwc(conv.weight) is not None:
                    gm.add_submodule(n.target, _converted_module(conv))
                    changed = True
                lay_out(n, n.args[0] if n.args else None)
        elif n.op == "call_function" and n.target in CONV_FUNCTIONS:
            pos = CONV_FUNCTIONS[n.target]
            w = n.args[pos] if len(n.args) > pos else n.kwargs.get("weight")
            if isinstance(w, Node) and w.op == "get_attr":
                t = attrgetter(w.target)(gm)
                new = _nhwc(t) if isinstance(t, torch.Tensor) else None
                if new is not None:
                    _set_attr(gm, w.target, new)
                    changed = True
            lay_out(n, n.args[0] if n.args else n.kwargs.get("input"))
    if not changed:
        return PassResult(gm, False)
    out = next(n for n in gm.graph.nodes if n.op == "output")

    def contiguous(a):
        if isinstance(a, Node) and _ndim(a) == 4:
            with gm.graph.inserting_before(out):
                c = gm.graph.call_method("contiguous", (a,))
            c.meta.update(a.meta)
            return c
        return a

    out.args = map_aggregate(out.args, contiguous)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
