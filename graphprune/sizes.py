"""Python numbers computed from tensor widths, and where they are used as numbers.

``C = x.size(1)`` can feed a shape (``x.view(B, C // 4, 4, H, W)``), where the
pruned model must see the new width, or arithmetic (``h / C``, an attention
scale ``q.shape[-1] ** -0.5``, ``F.group_norm(h, C // 4)``), where it must see
the width the model was trained with: the dead twin divides by 16, so the
pruned model must too. This module follows every size read forward through
Python arithmetic and lists the *number uses*: edges from a size-derived
value into anything that is not a shape argument. ``shrink-params`` replaces
the value on those edges by the number it had in the original (see
``freeze_numbers``), only where a width it depends on shrinks, so batch and
sequence sizes stay symbolic.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .canon import size_args, vkey
from .meta_keys import CANON, VAL

aten = torch.ops.aten
_NONE: frozenset = frozenset()


@dataclass
class NumberUse:
    """``user`` reads the Python value of ``value`` (computed from the dims in
    ``deps``) as a number; ``number`` is what it was on the original model."""

    user: Node
    value: Node
    number: object
    deps: frozenset

    def __deepcopy__(self, memo):
        """The same use, of the same nodes (a deep copy walked the node list through them)."""
        return copy.copy(self)


def _union(d) -> frozenset:
    if isinstance(d, tuple):
        return frozenset().union(*d) if d else _NONE
    return d


def _reads(n: Node):
    """Dims a node reads off a tensor directly: a set, or a tuple of sets for ``x.shape``/``x.size()``."""
    t, a = n.target, n.args
    x = a[0] if a else None
    key = vkey(x)
    if key is None:
        return None
    nd = x.meta[VAL].dim()
    if (n.op == "call_method" and t == "size" and len(a) == 1) or (t is getattr and a[1] == "shape"):
        return tuple(frozenset({(key, i)}) for i in range(nd))
    if (n.op == "call_method" and t == "size" and len(a) == 2 and isinstance(a[1], int)) or (
            t is aten.sym_size.int and isinstance(a[1], int)):
        return frozenset({(key, a[1] % nd)})
    if (n.op == "call_method" and t in ("numel", "nelement")) or t in (torch.numel, aten.sym_numel.default):
        return frozenset((key, i) for i in range(nd))
    return None


def _inherited(n: Node, deps: dict):
    """The deps of a Python op's result from its operands; getitem keeps positions."""
    if n.op == "call_function" and n.target is operator.getitem and n.args[0] in deps:
        src, i = deps[n.args[0]], n.args[1]
        if isinstance(src, tuple) and isinstance(i, (int, slice)):
            try:
                return src[i]
            except IndexError:
                return _NONE
    out = _NONE
    for m in n.all_input_nodes:
        out = out | _union(deps.get(m, _NONE))
    return out


def _shape_positions(n: Node) -> set:
    """Argument positions of ``n`` that hold sizes of its own output (which must follow the new widths)."""
    cop = n.meta.get(CANON)
    if cop is None:
        return set()
    at = cop.attrs.get("sizes_at")
    if at == "varargs":
        return set(range(1, len(n.args)))
    if at is not None:
        return {size_args(n, at)[2]}
    if cop.op == "split":
        return {1}  # rewritten with explicit sizes when the dim shrinks
    if cop.op == "factory":
        return set(cop.attrs["size_positions"])  # torch.zeros(n, x.size(1)): a new tensor as wide as x
    return set()


def _python_valued(n: Node) -> bool:
    val = n.meta.get(VAL)
    return n.op in ("call_function", "call_method") and not isinstance(val, torch.Tensor) and not (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val))


def size_deps(gm: GraphModule) -> dict:
    """Every Python-valued node computed from tensor widths: the dims it reads
    (a set, or a tuple of sets for a whole ``x.shape``)."""
    deps: dict = {}
    for n in gm.graph.nodes:
        if _python_valued(n):
            d = _reads(n)
            if d is None:
                d = _inherited(n, deps)
            if _union(d):
                deps[n] = d
    return deps


def computed_sizes(gm: GraphModule, deps: dict | None = None):
    """``(node, i, value, dims)`` for every view/reshape/expand size at position ``i``
    that is computed from widths by arithmetic (``C // self.num_heads``), not read
    straight off a dim: after pruning it evaluates the same arithmetic on the new
    widths, which says nothing about the width dim ``i`` gets in the plan."""
    deps = size_deps(gm) if deps is None else deps
    for n in gm.graph.nodes:
        cop = n.meta.get(CANON)
        at = cop.attrs.get("sizes_at") if cop is not None else None
        if at is None:
            continue
        sizes, first, _ = size_args(n, at)
        if sizes is None:
            continue
        for i, a in enumerate(sizes, start=first):  # i: the output dim the size gives
            if isinstance(a, Node) and a in deps and _reads(a) is None and not _is_item(a):
                yield n, i, a, _union(deps[a])


def _is_item(n: Node) -> bool:
    """``x.shape[1]`` / ``x.size()[1]``: a read of one dim, not arithmetic."""
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], Node) and \
        isinstance(n.args[1], int) and _reads(n.args[0]) is not None


def number_uses(gm: GraphModule) -> list[NumberUse]:
    deps = size_deps(gm)
    uses = []
    for n in gm.graph.nodes:
        if _python_valued(n) or n.op in ("placeholder", "get_attr"):
            continue
        shape_pos = _shape_positions(n)
        positional = [(i, a) for i, a in enumerate(n.args)] + [(k, a) for k, a in n.kwargs.items()]
        for pos, a in positional:
            if pos in shape_pos:
                continue
            seen: list = []
            map_arg(a, lambda m: seen.append(m) or m)
            for m in seen:
                if m in deps:
                    uses.append(NumberUse(n, m, m.meta.get(VAL), _union(deps[m])))
    return uses


def at_original_widths(value: Node, shrunk, env: dict, graph, before: Node, names: dict | None = None):
    """A node of ``graph`` (inserted before ``before``) that computes ``value``, a number of the
    original graph, with every read of a shrunk width (``shrunk((key, axis))``) replaced by the
    width the original had, and every other read (batch, pixels, tokens) left to run time;
    ``env`` maps the original's nodes to ``graph``'s. None where a read is not of one dim
    (``x.numel()``, a whole ``x.shape`` used as a tuple): the caller freezes the whole value.

    ``e = h.pow(2).sum((1, 2, 3)) / (c * hh * ww)`` with ``c`` pruned: frozen whole, the
    number was the example's ``16 * 8 * 8`` at every image size (0.65 off at 12x12, and the
    self-check, which grows only the batch, passed). Rebuilt, it is ``16 * hh * ww``."""
    names = names or {}
    memo: dict = {}

    def dim_of(n: Node):
        """((key, axis) as the plan names it, the tensor read, axis) where ``n`` reads one dim, else None."""
        src = n.args[0].args[0] if _is_item(n) else n.args[0]
        d = _reads(n.args[0])[n.args[1]] if _is_item(n) else _reads(n)
        numel = n.target in (torch.numel, aten.sym_numel.default) or (n.op == "call_method" and n.target in ("numel", "nelement"))
        if not isinstance(d, frozenset) or len(d) != 1 or numel:
            return None
        (key, axis), = d
        return (names.get(key, key) if isinstance(key, str) else key, axis), src, axis

    def rebuild(n):
        """(replacement, whether it differs from the pruned graph's own), or None."""
        if not isinstance(n, Node):
            return n, False
        if not _python_valued(n):
            return env[n], False
        if n in memo:
            return memo[n]
        if _is_item(n) or _reads(n) is not None:
            read = dim_of(n)
            if read is None:
                out = None  # a whole shape used as one value, or numel
            else:
                d, src, axis = read
                out = (int(src.meta[VAL].shape[axis]), True) if shrunk(d) else (env[n], False)
        else:
            ok, changed = True, False

            def sub(m):
                nonlocal ok, changed
                r = rebuild(m)
                if r is None:
                    ok = False
                    return m
                changed |= r[1]
                return r[0]

            args, kwargs = map_arg(n.args, sub), map_arg(n.kwargs, sub)
            if not ok:
                out = None
            elif not changed:
                out = (env[n], False)
            else:
                with graph.inserting_before(before):
                    out = (graph.create_node(n.op, n.target, args, kwargs, name=f"{n.name}_at_original_widths"), True)
        memo[n] = out
        return out

    r = rebuild(value)
    return None if r is None else r[0]


def frozen_value(number):
    """The original number as a graph constant, or None when it is not a plain Python value."""
    if isinstance(number, bool) or isinstance(number, (int, float)):
        return number
    if isinstance(number, (torch.Size, tuple, list)) and all(isinstance(v, int) for v in number):
        return tuple(int(v) for v in number)
    return None
