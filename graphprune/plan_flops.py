"""FLOPs of a candidate read off the slicing plan, without building it.

A FLOPs budget reads the cost of a dozen to a few dozen candidates (the bisection over
thresholds, then the fill), and each was built on meta tensors and run under torch's
counter: on ViT-B/16 and EfficientNet-B0 that was 60% of a ``target_flops`` compile.
Here the traced original is counted once, node by node, and every node that does counted
work in an op of ``TERMS`` (or a two-operand einsum) gets its count as a formula in the sizes of its operands' dims
(a conv: 2 x its output's elements x its kernel's elements per output channel). A
candidate's count is those formulas over the sizes the plan keeps (``pruner.make_plan``:
what ``shrink-params`` slices by), plus the work of every other node, which no group
reaches and so does not change.

Nothing is taken on trust. A formula that does not give its node's own count on the
original, or counted work in an op without one whose dims a group reaches, leaves the
model to the built count (``PlanFlops.build`` returns None); and ``allocate.Meter``
holds the plan's count to a built one on the first candidate it measures and on the
answer, and measures every candidate built once they differ.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading

import torch
import torch.fx as fx

from .effects import has_effect
from .meta_keys import CANON


def _all(value: str):
    return lambda shapes: [(value, a) for a in range(len(shapes[value]))]


def _axes(value: str, *axes):
    return lambda shapes: [(value, a % len(shapes[value])) for a in axes]


def _from(value: str, start: int):
    return lambda shapes: [(value, a) for a in range(start, len(shapes[value]))]


def _rows(value: str):  # every axis but the last: the positions a projection is applied at
    return lambda shapes: [(value, a) for a in range(len(shapes[value]) - 1)]


# {canonical op: terms}; a term is (factor, [dims]) and counts factor x the product of its dims'
# sizes, a dim being (operand, axis) with the operands "out" (the node's value), "x" (its first
# input), "a", "k" (matmul and attention operands) and the weights by their role. A factor is a
# number, or a function of the node's COp and operand shapes for sizes no group reaches (a window's
# positions). The counts are torch's own (torch.utils.flop_counter): multiply-adds twice, a bias or
# an elementwise op nothing.
TERMS = {
    "conv": [(2, [_all("out"), _from("weight", 1)])],                 # N Co S' x Ci/g K
    "conv_transpose": [(2, [_axes("x", 0), _from("x", 2), _all("weight")])],  # N S x Ci Co/g K
    "linear": [(2, [_all("out"), _axes("x", -1)])],                   # rows Co x Ci
    "matmul": [(2, [_all("out"), _axes("a", -1)])],                   # [..., m, n] x k
    # Hugging Face's grouped_mm_fallback, x (S, K) by w (E, K, N): each routed row by its expert's matrix, S N x K
    # (the experts kept change which matrix a row meets, not how many rows there are)
    "grouped_mm": [(2, [_all("out"), _axes("x", -1)])],
    "sdpa": [(2, [_all("x"), _axes("k", -2)]), (2, [_all("out"), _axes("k", -2)])],  # q k^T, then by v
    # nn.MultiheadAttention, query x and key k (the same tensor in self-attention): the packed in-projection, E' x E
    # per query position and two per key position, q k^T and the product by v (B Lq x Lk x E' each; L is dim 1, or dim 0
    # where the batch is second), the out-projection
    "mha": [(2, [_rows("x"), _axes("out_weight", 1), _axes("in_weight", 1)]),
            (4, [_rows("k"), _axes("out_weight", 1), _axes("in_weight", 1)]),
            (lambda c, s: 4 * s["k"][1 if c.attrs.get("batch_first", True) else 0], [_rows("x"), _axes("out_weight", 1)]),
            (2, [_rows("x"), _all("out_weight")])],
    # torchvision's shifted_window_attention on x (B, H, W, C) padded to whole windows of N positions, T of them in
    # all: the qkv projection, q k^T and the product by v (T x N x heads' width each), the output projection
    "window_attention": [(lambda c, s: 2 * _padded(c, s), [_all("qkv_weight")]),
                         (lambda c, s: 4 * _padded(c, s) * _window(c), [_axes("proj_weight", 1)]),
                         (lambda c, s: 2 * _padded(c, s), [_all("proj_weight")])],
}


def _window(cop) -> int:
    ws = cop.attrs["window_size"]
    return int(ws[0]) * int(ws[1])


def _padded(cop, shapes) -> int:
    """Positions of x (B, H, W, C) padded up to whole windows."""
    (b, h, w, _), ws = shapes["x"], cop.attrs["window_size"]
    return b * (-(-h // ws[0]) * ws[0]) * (-(-w // ws[1]) * ws[1])
FORMULAS = {*TERMS, "einsum", "rnn"}  # einsum's terms follow its equation, an RNN's its layers (SPECIAL)
# where each operand of a canonical op is: its role in ``COp.params``, or its position in ``COp.inputs``
OPERANDS = {"x": 0, "a": 0, "k": 1, **{w: w for w in ("weight", "in_weight", "out_weight", "qkv_weight", "proj_weight")}}


class PlanFlops:
    """``count(groups, removed)``: the FLOPs of the candidate that removes ``removed`` (units of
    ``groups``), as the pipeline ``shrink-params,dce`` builds it."""

    def __init__(self, constant: int, terms: list, sizes: dict):
        self.constant = constant
        self.terms = terms      # [(factor, [(value key, axis), ...], gate), ...]: see count
        self.sizes = sizes      # {(value key, axis): size on the original}

    def count(self, groups, removed: dict) -> int:
        from .pruner import make_plan

        plan = make_plan(groups, removed)
        size = lambda d: self.sizes[d] if plan.get(d) is None else len(plan[d])  # noqa: E731
        total = self.constant
        for factor, dims, gate in self.terms:
            if gate is not None and math.prod(size(d) for d in gate) == 1:
                continue  # an einsum with nothing left to contract runs as a product of elements: no counted work
            total += factor * math.prod(size(d) for d in dims)
        return total

    @classmethod
    def build(cls, p, example_inputs, example_kwargs, state) -> PlanFlops | None:
        """From the Pruner ``p`` (its traced graph run on ``state``, meta copies of its tensors);
        None where the plan cannot say (see the module's docstring)."""
        per_node, shapes = _counted_by_node(p.gm, example_inputs, example_kwargs, state)
        if per_node is None:
            return None
        reached = {k for g in p.analysis.groups for k, _ in [*g.dims, *g.shared, *g.replicas]}
        live = _live(p.gm)
        constant, terms, sizes = 0, [], {}
        for node, flops in per_node.items():
            if not flops or node not in live:
                continue
            cop = node.meta.get(CANON)
            made = _terms(cop, node, shapes, p.gm) if cop is not None else None
            if made is None:
                keys = {node, *(cop.inputs if cop else ()), *(cop.params.values() if cop else ())}
                if cop is None or keys & reached or any(isinstance(k, tuple) and k[0] in reached for k in keys):
                    return None  # counted work whose size the groups may change, in an op without a formula
                constant += flops
                continue
            node_terms, node_sizes = made
            if sum(f * math.prod(node_sizes[d] for d in dims) for f, dims, gate in node_terms
                   if gate is None or math.prod(node_sizes[d] for d in gate) > 1) != flops:
                return None  # the formula is not what the counter counted here
            terms += node_terms
            sizes.update(node_sizes)
        return cls(constant, terms, sizes)


def _einsum_terms(cop, shapes: dict, gm) -> tuple[list, dict] | None:
    """A two-operand einsum, as torch runs it (a batched matmul): 2 x the product of the sizes of its
    letters that are in the output or in both operands (a letter in one operand alone is summed out first,
    which the counter does not count). None for anything else (three operands, an ellipsis, a diagonal)."""
    eq = str(cop.attrs.get("equation", "")).replace(" ", "")
    if cop.attrs.get("counted") is False:  # a vecdot, dot or outer: products and sums, which the counter does not count
        return [], {}
    if len(cop.inputs) != 2 or "->" not in eq or "." in eq or any(k is None for k in cop.inputs):
        return None
    lhs, out = eq.split("->")
    sides = lhs.split(",")
    if len(sides) != 2 or any(len(set(t)) != len(t) for t in (*sides, out)):
        return None
    dims, contracted, sizes = [], [], {}
    for letter in sorted(set(lhs) - {","}):
        if letter not in out and not all(letter in t for t in sides):
            continue
        i = 0 if letter in sides[0] else 1
        key = cop.inputs[i]
        shape = _param_shape(gm, key) if isinstance(key, str) else shapes.get(key)
        if shape is None or len(shape) != len(sides[i]):
            return None
        d = (key, sides[i].index(letter))
        sizes[d] = int(shape[d[1]])
        dims.append(d)
        if letter not in out:
            contracted.append(d)
    # where the contracted letters come to one element, torch multiplies elementwise, which the counter does not count
    return [(2, dims, contracted)], sizes


def _rnn_terms(cop, shapes: dict, gm) -> tuple[list, dict] | None:
    """nn.LSTM / GRU / RNN: every layer and direction multiplies each position's input by its input
    weights and its hidden state by its hidden weights, 2 x positions x the weight's size each (every
    gate's rows). The layers after the first read the one before (its hidden size, both directions):
    that is the width of their input weights, so each term is a product of one weight's dims."""
    x = cop.inputs[0] if cop.inputs else None
    shape = shapes.get(x) if x is not None else None
    if shape is None or len(shape) < 2:
        return None
    rows = [(x, a) for a in range(len(shape) - 1)]  # (N, T) or (T, N), or (T,) unbatched
    sizes = {d: int(shape[d[1]]) for d in rows}
    out = []
    for role, name in cop.params.items():
        if not role.startswith(("weight_ih", "weight_hh")):
            continue  # biases: elementwise, not counted
        w = _param_shape(gm, name)
        if w is None or len(w) != 2:
            return None
        dims = [(name, 0), (name, 1)]
        sizes.update({d: int(w[d[1]]) for d in dims})
        out.append((2, rows + dims, None))
    return out, sizes


def _terms(cop, node: fx.Node, shapes: dict, gm) -> tuple[list, dict] | None:
    """([(factor, [(value key, axis)], gate)], {(value key, axis): size}) for one node, or None; a term whose
    ``gate`` dims (when not None) come to one element counts nothing."""
    if cop.op in SPECIAL:
        return SPECIAL[cop.op](cop, shapes, gm)
    table = TERMS.get(cop.op)
    if table is None:
        return None
    keys, shape_of = {"out": node}, {"out": shapes.get(node)}
    for role, where in OPERANDS.items():
        key = cop.params.get(where) if isinstance(where, str) else (cop.inputs[where] if len(cop.inputs) > where else None)
        if key is None:
            continue
        keys[role] = key
        shape_of[role] = _param_shape(gm, key) if isinstance(key, str) else shapes.get(key)
    out, sizes = [], {}
    try:
        for factor, parts in table:
            factor = factor(cop, shape_of) if callable(factor) else factor
            dims = []
            for part in parts:
                for role, axis in part(shape_of):
                    if shape_of[role] is None:
                        return None
                    d = (keys[role], axis)
                    sizes[d] = int(shape_of[role][axis])
                    dims.append(d)
            out.append((factor, dims, None))
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):  # an operand the op lacks, or without a shape
        return None
    return out, sizes


SPECIAL = {"einsum": _einsum_terms, "rnn": _rnn_terms}  # ops whose terms are read off the op itself


def _param_shape(gm, name: str) -> tuple | None:
    try:
        t = operator.attrgetter(name)(gm)
    except AttributeError:
        return None
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _live(gm: fx.GraphModule) -> set:
    """Nodes ``dce`` keeps: what the output reads, what writes or calls for effect, and what those read."""
    live: set = set()
    for n in reversed(gm.graph.nodes):
        if n.op == "output" or has_effect(n) or any(u in live for u in n.users):
            live.add(n)
    return live


_ACTIVE = threading.local()  # this thread's recording: (counter, [(node name, total so far, operand shapes)])


def _after(name: str, *values) -> None:
    """Called by the marked graph after each node: the counter's total so far, and the shapes
    of the node's value and tensor inputs."""
    counter, out = _ACTIVE.recording
    out.append((name, counter.get_total_flops(), [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values]))


def _counted_by_node(gm: fx.GraphModule, args: tuple, kwargs: dict | None, state: dict):
    """({node: FLOPs}, {node: its value's shape and its inputs'}) from one meta run of a copy of
    ``gm``'s graph with a marker after every call; (None, None) where the graph does not run on meta."""
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.flop_counter import FlopCounterMode

    from .flops import _more_flops, _on_fake, _on_meta, _own
    from .trace import to_meta

    nodes: dict = {}     # name -> node, for every call
    operands: dict = {}  # name -> [the node, its tensor inputs where a formula reads them]
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            cop = n.meta.get(CANON)
            ins = [k for k in (cop.inputs if cop is not None and cop.op in FORMULAS else ()) if isinstance(k, fx.Node)]
            nodes[n.name], operands[n.name] = n, [n, *ins]

    def marked(on_meta: bool) -> fx.GraphModule:
        graph = fx.Graph()
        graph._codegen = gm.graph._codegen
        env: dict = {}
        for n in gm.graph.nodes:
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], lambda a: env[a]), type_expr=n.type)
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
            if on_meta and n.kwargs.get("device") is not None:  # a tensor the graph makes: torch.export bakes the
                # example's device in (arange(17, device=cpu), Hugging Face ViT's mask); made on meta, counted alike
                env[n].kwargs = {**n.kwargs, "device": torch.device("meta")}
            if n.name in operands:
                graph.call_function(_after, (n.name, *(env[k] for k in operands[n.name])))
        return fx.GraphModule(gm, graph)

    for run, on_meta in ((_on_meta, True), (_on_fake, False)):  # as count_flops: fake tensors where the graph
        # reads a value (an .item()); those run on the example's device
        copy = marked(on_meta)
        out: list = []
        try:
            with _reparametrize_module(gm, state, tie_weights=False), contextlib.ExitStack() as stack:
                counter = stack.enter_context(FlopCounterMode(display=False, custom_mapping=_more_flops()))
                _ACTIVE.recording = (counter, out)
                stack.callback(delattr, _ACTIVE, "recording")
                run(_own(copy), to_meta(tuple(args)), to_meta(dict(kwargs or {})))
            break
        except Exception:  # noqa: BLE001 - a graph that makes real-device tensors of its own: counted built
            continue
    else:
        return None, None
    if len(out) != len(nodes):  # a node ran twice or never: the marks do not say what each did
        return None, None
    per_node, shapes, before = {}, {}, 0
    for name, total, seen in out:
        n = nodes[name]
        per_node[n] = total - before
        before = total
        for key, shape in zip(operands[name], seen):
            if shape is not None:
                shapes.setdefault(key, shape)
    return per_node, shapes
