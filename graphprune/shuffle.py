"""Fold channel shuffles into one explicit channel permutation.

ShuffleNet's shuffle is ``view(B, g, C/g, H, W) -> transpose(1, 2) -> view(B, C, H, W)``
(or ``reshape``/``unflatten``, ``permute(0, 2, 1, 3, 4)``, ``flatten(1, 2)``).
Read as reshapes, it ties channel ``i`` of every one of the ``g`` groups
together (the view needs equal groups, and the interleave needs the same
positions kept in each), and a stage of chained shuffles ties the whole stream
into a handful of units. Read as what it is, a fixed permutation of the
channels, any subset of channels can go: the pruned model permutes the
channels it kept, in the same relative order.

``fold_channel_shuffles`` finds the pattern by shapes (after shape
propagation), and ``nn.ChannelShuffle`` / ``channel_shuffle(x, g)`` calls, and replaces them with ``permute_channels(x, perm, 1)``, an
``index_select`` with the permutation as a constant. The coupling rule maps
channel ``perm[j]`` of the input to channel ``j`` of the output, and the
rewrite restricts ``perm`` to the kept channels.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .meta_keys import VAL

aten = torch.ops.aten


def permute_channels(x: torch.Tensor, perm: tuple, dim: int = 1) -> torch.Tensor:
    """``x`` with its ``dim`` reordered: output channel j is input channel ``perm[j]``."""
    return x.index_select(dim, torch.tensor(perm, dtype=torch.long, device=x.device))


torch.fx.wrap("permute_channels")

# the split of dim 1 and the merge back may be spelled as any reshape: the shapes checked in ``_match``
# (b, c, *rest) -> (b, g, c/g, *rest) and (b, c/g, g, *rest) -> (b, c, *rest) leave only those meanings
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_RESHAPE_FNS = {torch.reshape, torch.flatten, torch.unflatten, aten.view.default, aten.reshape.default,
                aten._unsafe_view.default, aten.flatten.using_ints, aten.unflatten.int}
_COPY_METHODS = {"contiguous"}
_COPY_FNS = {aten.clone.default, aten.contiguous.default}


def _is(node, methods, fns) -> bool:
    return isinstance(node, Node) and ((node.op == "call_method" and node.target in methods) or (node.op == "call_function" and node.target in fns))


def _swaps_1_2(node) -> bool:
    """transpose(1, 2) or permute(0, 2, 1, ...), in any of its spellings."""
    if not isinstance(node, Node) or node.op not in ("call_method", "call_function"):
        return False
    nd = node.meta[VAL].dim() if isinstance(node.meta.get(VAL), torch.Tensor) else None
    if nd is None:
        return False
    if node.target in ("transpose", torch.transpose, aten.transpose.int):
        dims = sorted(d % nd for d in node.args[1:3]) if len(node.args) >= 3 else None
        return dims == [1, 2]
    if node.target in ("permute", torch.permute, aten.permute.default):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [d % nd for d in dims] == [0, 2, 1, *range(3, nd)]
    return False


def _single_user(n: Node) -> bool:
    return len(n.users) == 1


def _match(r3: Node):
    """(x, groups) if ``r3`` ends a channel shuffle of ``x``, else None."""
    if not _is(r3, _RESHAPE_METHODS, _RESHAPE_FNS):
        return None
    t = r3.args[0]
    if _is(t, _COPY_METHODS, _COPY_FNS) and _single_user(t):
        t = t.args[0]
    if not (_swaps_1_2(t) and _single_user(t)):
        return None
    r1 = t.args[0]
    if not (_is(r1, _RESHAPE_METHODS, _RESHAPE_FNS) and _single_user(r1)):
        return None
    x = r1.args[0]
    vals = [n.meta.get(VAL) for n in (x, r1, r3)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    xs, s1, s3 = (tuple(v.shape) for v in vals)
    if xs != s3 or len(s1) != len(xs) + 1 or len(xs) < 2:
        return None
    b, c, rest = xs[0], xs[1], xs[2:]
    g, cg = s1[1], s1[2]
    if s1[0] != b or s1[3:] != rest or g * cg != c or g < 2 or cg < 2:
        return None
    return x, g


_SHUFFLE_FNS = {torch.channel_shuffle, torch.nn.functional.channel_shuffle, aten.channel_shuffle.default}
if hasattr(aten, "native_channel_shuffle"):
    _SHUFFLE_FNS.add(aten.native_channel_shuffle.default)


def _shuffle_op(n: Node):
    """(x, groups) if ``n`` is ``nn.ChannelShuffle`` or ``channel_shuffle(x, groups)`` on a tensor with
    channels in dim 1, else None."""
    if n.op == "call_module" and n.graph.owning_module is not None:
        mod = n.graph.owning_module.get_submodule(n.target)
        g = mod.groups if isinstance(mod, torch.nn.ChannelShuffle) else None
    elif n.op == "call_function" and n.target in _SHUFFLE_FNS:
        g = n.args[1] if len(n.args) > 1 else n.kwargs.get("groups")
    else:
        return None
    x = n.args[0] if n.args else None
    v = x.meta.get(VAL) if isinstance(x, Node) else None
    if not isinstance(g, int) or not isinstance(v, torch.Tensor) or v.dim() < 3 or v.shape[1] % g or g < 2:
        return None
    return x, g


def fold_channel_shuffles(gm: GraphModule) -> int:
    """Replace every channel shuffle in ``gm`` by ``permute_channels``; returns how many."""
    found = [(r3, m) for r3 in gm.graph.nodes if (m := _match(r3) or _shuffle_op(r3)) is not None]
    for r3, (x, g) in found:
        c = x.meta[VAL].shape[1]
        cg = c // g
        perm = tuple(k * cg + i for i in range(cg) for k in range(g))  # output i*g + k <- input k*cg + i
        with gm.graph.inserting_before(r3):
            new = gm.graph.call_function(permute_channels, (x, perm, 1))
        new.meta = {VAL: r3.meta[VAL]}
        r3.replace_all_uses_with(new)
    if found:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return len(found)
