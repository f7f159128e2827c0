"""rotate-residual: a residual stream re-expressed in its principal directions.

SliceGPT's observation (computational invariance): when a transformer's
residual stream is only ever written by linear maps and embeddings, added,
normalised by an RMSNorm and read by linear maps, any orthogonal Q (d x d) can
be pushed through the whole network without changing what it computes. With
the stream as row vectors h, the rotated stream is h Q and:

| tensor | before | after |
|---|---|---|
| embedding (vocab, d) | E | E Q |
| writer weight (d, in), bias (d,) | W, b | Q^T W, Q^T b |
| reader weight (out, d) | W | W Q |
| RMSNorm without weight | x / rms(x) | unchanged: rms(x Q) = rms(x) |

Every one of these is the same operation, the parameter's stream axis
contracted with Q, so the rewrite never needs to know which role a parameter
plays. An RMSNorm *weight* is a diagonal scale, which does not commute with Q:
it is first folded into the linears that read the norm (W <- W diag(w)) and set
so that the norm scales by 1.

With Q the eigenvectors of the stream's second moment on calibration data,
ordered by decreasing eigenvalue, the stream's energy sits in its first
channels, and graphprune's ordinary hidden-dim pruning with a data-aware
criterion (``importance="activation"``) removes the last ones: the directions
the data hardly uses.

Nothing here names a model family. The stream is the coupling group
(``groups.py``) that an embedding writes; every op that touches it is checked,
on its canonical record (``canon.py``), against a short table of ops that
commute with a rotation (``_Stream.check``); anything else is refused, naming
the op.
"""
from __future__ import annotations

import copy
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from . import hf
from .api import analyze
from .batches import as_call, flat_inputs
from .canon import tensor_names, vkey
from .errors import GraphpruneError, first_line
from .groups import Group, _tensor_values
from .meta_keys import CANON, VAL

# elementwise ops by what they do to the stream (names as ``_kind`` spells them)
SAME = {"to", "to_copy", "type_as", "contiguous", "clone", "detach", "alias", "float", "double", "half", "bfloat16",
        "lift_fresh_copy", "identity", "dropout"}  # value unchanged (dropout: in eval mode)
SUM = {"add", "sub", "neg", "iadd", "isub", "radd"}  # linear in the stream
SCALE = {"mul", "div", "truediv", "imul", "itruediv", "rmul"}  # a per-position factor, or a per-channel one (a norm weight)
SQUARE = {"pow", "square"}  # allowed only under a sum of squares over the stream's channels (an RMS)
# ops that move or select elements: they commute with a rotation when the stream's channels pass whole
STRUCTURAL = {"reshape", "permute", "expand", "index", "tuple_get", "cat", "stack", "split", "channel_permute",
              "repeat_interleave"}
_IGNORED = {"python", "shape", "get_attr", "placeholder", "output"}


@dataclass
class _Fold:
    """A diagonal scale on the stream (an RMSNorm weight) folded into the linears that read it."""

    node: Node  # the op whose output is the scaled stream (a mul, or an rms_norm)
    param: str  # graph key of the parameter the scale comes from
    scale: object  # what scales: the parameter's key, or a node computed from it alone (Gemma's 1 + w)
    axis: int  # the stream axis of the scale's value
    readers: list = field(default_factory=list)  # [(linear node, weight key, input axis)]


@dataclass
class _Plan:
    """Everything the rewrite does to one stream, decided before anything changes."""

    group: Group
    width: int
    rotate: dict = field(default_factory=dict)  # parameter key -> stream axes, contracted with Q
    folds: list = field(default_factory=list)
    probes: dict = field(default_factory=dict)  # node -> stream axis: where the stream is recorded (norm inputs)
    uses: dict = field(default_factory=dict)  # parameter key -> nodes that read it


def rotate_residual(model: torch.nn.Module, example_inputs: tuple, calibration, *, example_kwargs=None,
                    tied: str = "mix") -> torch.nn.Module:
    """A copy of ``model`` whose residual stream is expressed in the basis of its
    principal directions on ``calibration``, largest first; it computes what
    ``model`` computes (up to rounding) and is of the same classes.

    ``calibration``: an iterable of batches (tuples, dicts of keyword inputs or
    tokenizer outputs), as for ``compile``. A tied output head (``lm_head``
    sharing the embedding) cannot absorb the final norm's weight without
    breaking the tie. ``tied`` says what to do then:

    * ``"mix"`` (default): the norm keeps the tie and is followed by a d x d
      linear map, Q^T diag(w) Q in the rotated basis (``MixedNorm``): d^2
      extra parameters, sliced with the stream to d'^2 (0.3M for SmolLM2,
      where an untied head would add 28M);
    * ``"untie"``: the head gets its own copy of the embedding (vocab x d);
    * ``"refuse"``: such a model is refused.

    ``record["extra_params"]`` says what was added. The result carries what
    was done in ``result._graphprune_rotation``.

    >>> rotated = graphprune.rotate_residual(model, (ids,), batches)
    >>> stream = rotated._graphprune_rotation["folded_norms"][0].rpartition(".")[0]  # a norm on the stream
    >>> small = graphprune.compile(rotated, (ids,), ratio={stream: 0.25}, importance="activation", calibration=batches)

    (SmolLM2-135M, 10% of the hidden dim sliced this way: perplexity x1.26 on held-out
    text, x1.19 with ``reconstruct=True``; the same 10% of unrotated channels: x2.37.)
    """
    start = time.perf_counter()
    work = copy.deepcopy(model)  # the user's model is never changed, nor any tensor of it shared
    kwargs = hf.example_kwargs(work, example_kwargs)
    analysis = analyze(work, example_inputs, example_kwargs=kwargs)
    plan = _plan(analysis.gm, _stream_group(analysis))
    gram, rows = _second_moment(analysis.gm, plan, calibration, kwargs)
    q, eigenvalues = _principal_basis(gram)
    with torch.no_grad():
        scales = [_effective_scale(analysis.gm, f) for f in plan.folds]  # before any weight changes
        untied, mixed = _untie(work, analysis.gm, plan, scales, tied)
        folded = _fold(analysis.gm, work, plan, scales, untied, mixed)
        rotated = _rotate(work, plan, untied, q)
        mixes = _mix(work, plan, scales, mixed, q)
    for path in mixes:  # the wrapped norms' weights moved one module down
        folded = [f"{path}.norm.{n[len(path) + 1:]}" if n.startswith(path + ".") else n for n in folded]
    err = _check_lossless(model, work, example_inputs, kwargs)
    work._graphprune_rotation = {
        "group": plan.group.describe(), "width": plan.width, "rotated": rotated, "folded_norms": folded,
        "untied": {name: n for name, n in untied.values()}, "mixed": mixes,
        "extra_params": sum(n for _, n in untied.values()) + sum(mixes.values()),
        "energy": (eigenvalues / eigenvalues.sum()).tolist(), "calibration_rows": rows,
        "probes": len(plan.probes), "lossless_rel_err": err, "seconds": time.perf_counter() - start,
    }
    return work


# ------------------------------------------------------------------ find and check the stream

def _stream_group(analysis) -> Group:
    """The group an embedding writes (its weight's axis 1): where a residual stream starts."""
    embeds = {n.meta[CANON].params.get("weight") for n in analysis.gm.graph.nodes
              if n.meta.get(CANON) is not None and n.meta[CANON].op == "embedding"}
    found = []
    for g in analysis.groups:
        if any(s.name in embeds and s.axis == 1 for s in g.params):
            found.append(g)
    if not found:
        blocked = [b for b in analysis.blocked if any(d[0] in embeds and d[1] == 1 for d in b.dims)]
        why = (f"; the embedding's channels are kept whole by graphprune's analysis: {'; '.join(blocked[0].reasons[:3])}"
               if blocked else "")
        raise GraphpruneError("rotate_residual found no residual stream: no prunable channel group is written by an "
                              f"embedding (nn.Embedding / F.embedding){why}")
    if len(found) > 1:
        raise GraphpruneError(f"rotate_residual found {len(found)} groups written by embeddings "
                              f"({', '.join(str(g.id) for g in found)}); rotating several streams is not supported")
    return found[0]


def _plan(gm: GraphModule, group: Group) -> _Plan:
    s = _Stream(gm, group)
    for node in gm.graph.nodes:
        s.check(node)
    s.finish()
    return s.plan


class _Stream:
    """Checks every op that touches one group and collects what the rewrite needs."""

    def __init__(self, gm: GraphModule, group: Group):
        self.gm, self.group = gm, group
        self.names = tensor_names(gm)
        self.axes: dict = {}  # value key -> its stream axes
        for key, axis in group.dims:
            self.axes.setdefault(key, []).append(axis)
        self.const = _constant_nodes(gm)
        self.plan = _Plan(group, _width(group))
        self.folded: set[str] = set()

    # values ------------------------------------------------------------------
    def key(self, a):
        k = vkey(a)
        return self.names.get(k, k) if isinstance(k, str) else k

    def carries(self, a) -> list:
        """The stream axes of fx argument ``a`` (none for numbers and other tensors)."""
        k = self.key(a) if isinstance(a, Node) else (a if isinstance(a, (str, tuple)) else None)
        return self.axes.get(k, []) if k is not None else []

    def is_const(self, a) -> bool:
        return not isinstance(a, Node) or a in self.const

    def refuse(self, node: Node, what: str, fix: str = ""):
        where = _module_path(node)
        raise GraphpruneError(f"rotate_residual: {node.name}{f' (in {where})' if where else ''} {what}: that does not "
                              f"commute with a rotation of the residual stream ({self.plan.width} channels)"
                              f"{'; ' + fix if fix else ''}")

    # ops ----------------------------------------------------------------------
    def check(self, node: Node) -> None:
        c = node.meta.get(CANON)
        if c is None or c.op in _IGNORED or node in self.const:
            return  # computed from parameters alone: judged where it meets the stream
        for k in list(c.params.values()) + [k for k in c.inputs if isinstance(k, str)]:
            self.plan.uses.setdefault(k, set()).add(node)
        outputs = _tensor_values(node)
        if not any(self.axes.get(k) for k in [*c.inputs, *c.params.values(), *outputs]):
            return
        if c.op in ("embedding", "linear"):
            self.rotate_params(c)
        elif c.op == "matmul":
            self.matmul(node, c, outputs)
        elif c.op == "ewise":
            self.ewise(node)
        elif c.op == "reduce":
            self.reduce(node, c)
        elif c.op == "rms_norm":
            self.rms_norm(node, c)
        elif c.op in STRUCTURAL:
            self.passthrough(node, c, outputs)
        elif c.op == "layer_norm":
            self.refuse(node, "is a LayerNorm over the stream, which subtracts the mean of its channels",
                        "fold the centering into the layers that write the stream first (not supported yet)")
        else:
            self.refuse(node, f"applies {c.op} ({_kind(self.gm, node)}) to the stream")

    def rotate_params(self, c) -> None:
        """Embeddings and linears: every stream axis of their parameters is contracted with Q."""
        for k in c.params.values():
            if isinstance(k, str) and self.axes.get(k):
                self.plan.rotate[k] = sorted(self.axes[k])

    def matmul(self, node, c, outputs) -> None:
        """A contraction of two stream axes, or the stream carried through from one operand."""
        ins = sum(len(self.axes.get(k, [])) for k in c.inputs)
        outs = sum(len(self.axes.get(k, [])) for k in outputs)
        if (ins, outs) not in ((2, 0), (1, 1)):
            self.refuse(node, "multiplies the stream's channels with each other (a matmul that keeps a stream axis on both operands)")
        for k in c.inputs:
            if isinstance(k, str) and self.axes.get(k):
                self.plan.rotate[k] = sorted(self.axes[k])

    def ewise(self, node) -> None:
        kind = _kind(self.gm, node)
        args = [a for a in node.args if not isinstance(a, (torch.dtype, torch.device, torch.memory_format))]
        if kind in SAME:
            return
        if kind in SUM:
            return self.sum(node, args[:1] if kind == "neg" else args[:2])
        if kind in SCALE and len(args) >= 2:
            return self.scale(node, kind, args[0], args[1])
        if kind == "square" or (kind == "pow" and len(args) > 1 and args[1] == 2):
            return self.square(node, args[0])
        self.refuse(node, f"applies {kind} to each channel of the stream")

    def sum(self, node, operands) -> None:
        for a in operands:
            if not self.carries(a):
                self.refuse(node, f"adds {'a number' if not isinstance(a, Node) else a.name}, which is the same on every channel")
            if isinstance(a, Node) and a.op == "get_attr":
                self.plan.rotate[self.key(a)] = sorted(self.carries(a))  # a bias added to the stream: a stream value
            elif self.is_const(a):
                self.refuse(node, f"adds {a.name}, a value computed from parameters")

    def scale(self, node, kind, a, b) -> None:
        ca, cb = self.carries(a), self.carries(b)
        if not (ca and cb):
            if kind in ("div", "truediv", "itruediv") and cb:
                self.refuse(node, "divides by the stream")
            return  # a factor per position (the RMS), the same on every channel
        if a is b and kind in ("mul", "imul", "rmul"):
            return self.square(node, a)
        if kind in ("mul", "imul", "rmul") and self.is_const(a) != self.is_const(b):
            stream, scale = (b, a) if self.is_const(a) else (a, b)
            return self.fold(node, stream, scale)
        self.refuse(node, f"computes {kind} of two values that both carry the stream, channel by channel")

    def square(self, node, x) -> None:
        """x^2 is allowed only where its only use is a sum over the stream's channels (an RMS)."""
        for u in _users_through_same(self.gm, node):
            cu = u.meta.get(CANON)
            axes = set(self.carries(node))
            if cu is None or cu.op != "reduce" or cu.attrs.get("kind") not in ("sum", "mean") or not axes & set(cu.attrs["dims"]):
                self.refuse(node, f"squares the stream channel by channel and {u.name} reads it (not a sum of squares)")
        self.probe(x)

    def reduce(self, node, c) -> None:
        x = c.inputs[0]
        over = set(self.axes.get(x, [])) & set(c.attrs["dims"])
        if not over:
            if c.attrs.get("kind") not in ("sum", "mean"):
                self.refuse(node, f"takes the {c.attrs.get('kind')} over positions")
            return
        if c.attrs.get("kind") in ("sum", "mean") and _is_square(self.gm, node.args[0]):
            return
        if c.attrs.get("kind") == "mean":
            self.refuse(node, "takes the mean over the stream's channels (a LayerNorm's centering)",
                        "fold the mean subtraction into the layers that write the stream first (not supported yet)")
        self.refuse(node, f"takes the {c.attrs.get('kind')} over the stream's channels")

    def rms_norm(self, node, c) -> None:
        x = node.args[0]
        shape = (self.gm.get_submodule(node.target).normalized_shape if node.op == "call_module"
                 else node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape"))
        if len(tuple(shape)) != 1 or self.carries(x) != [x.meta[VAL].dim() - 1]:
            self.refuse(node, "is an RMSNorm over more than the stream's channels")
        self.probe(x)
        if "weight" in c.params:
            self.fold(node, x, c.params["weight"])

    def passthrough(self, node, c, outputs) -> None:
        """Views, permutes, slices, concatenations: fine while the stream's channels pass whole."""
        keys = [k for k in [*c.inputs, *outputs] if self.axes.get(k)]
        if any(len(self.group.dims[(k, a)]) != self.plan.width for k in keys for a in self.axes[k]):
            self.refuse(node, f"takes part of the stream's channels ({c.op})")
        if bool([k for k in c.inputs if self.axes.get(k)]) != bool([k for k in outputs if self.axes.get(k)]):
            self.refuse(node, f"creates or drops the stream's channel axis ({c.op})")
        for k in c.inputs:
            if isinstance(k, str) and self.axes.get(k):
                self.plan.rotate[k] = sorted(self.axes[k])  # a parameter that joins the stream (a class token)

    # folds ----------------------------------------------------------------------
    def fold(self, node, stream, scale) -> None:
        """A per-channel scale on the stream: fold it into the linears that read the result."""
        if isinstance(scale, Node) and scale.op == "get_attr":
            scale = self.key(scale)
        param = scale if isinstance(scale, str) else self.source_param(node, scale)
        axis = self.carries(scale)
        if len(axis) != 1:
            self.refuse(node, "scales the stream by a parameter with several stream axes")
        f = _Fold(node, param, scale, axis[0], self.readers(node))
        self.plan.folds.append(f)
        self.folded.add(param)

    def source_param(self, node, scale: Node) -> str:
        """The one stream parameter a computed scale (Gemma's ``1 + w``) comes from."""
        found = {self.key(n) for n in _ancestors(scale) if n.op == "get_attr" and self.axes.get(self.key(n))}
        if len(found) != 1:
            self.refuse(node, f"scales the stream by {scale.name}, computed from {len(found)} stream parameters")
        return found.pop()

    def readers(self, start: Node) -> list:
        """The linears that read ``start``'s output, through ops that pass values as they are."""
        out, todo, seen = [], [start], set()
        while todo:
            v = todo.pop()
            for u in v.users:
                if u in seen:
                    continue
                seen.add(u)
                cu = u.meta.get(CANON)
                if cu is None or cu.op in ("python", "shape"):
                    continue
                if cu.op == "linear" and cu.inputs and cu.inputs[0] == self.key(v) and isinstance(cu.params.get("weight"), str):
                    out.append((u, cu.params["weight"], 0 if cu.attrs.get("weight_t") else 1))
                elif (cu.op == "ewise" and _kind(self.gm, u) in SAME and u.args[0] is v) or (
                        cu.op in ("reshape", "permute", "index") and isinstance(u.meta.get(VAL), torch.Tensor)):
                    todo.append(u)
                else:
                    self.refuse(start, f"scales the stream per channel and {u.name} ({cu.op}) reads the result",
                                "only a scale read by linear layers alone (an RMSNorm's weight before attention or MLP) can be folded")
        return out

    def finish(self) -> None:
        """Every parameter on the stream must have been given a role, and one only."""
        for s in self.group.params:
            if s.name in self.folded and s.name in self.plan.rotate:
                raise GraphpruneError(f"rotate_residual: {s.name} is both a per-channel scale and a value of the stream")
            if s.name not in self.folded and s.name not in self.plan.rotate:
                raise GraphpruneError(f"rotate_residual: {s.name} lies on the residual stream (axis {s.axis}) but no "
                                      "checked op explains how it is used")
        if not self.plan.probes:  # no norm: record the stream where linears read it
            for f in self.plan.rotate:
                for n in self.plan.uses.get(f, ()):
                    if n.meta[CANON].op == "linear" and self.carries(n.args[0]):
                        self.probe(n.args[0])

    def probe(self, x) -> None:
        if isinstance(x, Node) and self.carries(x):
            self.plan.probes[x] = self.carries(x)[0]


def _width(group: Group) -> int:
    """The stream's width; its channels must be one order everywhere (no shuffles on it)."""
    arrays = list(group.dims.values())
    first = arrays[0]
    if group.part_of is not None or any(len(a) != len(first) or (a != first).any() for a in arrays):
        raise GraphpruneError("rotate_residual: the stream's channels are permuted or split between ops; "
                              "a rotation needs one channel order everywhere")
    return len(first)


# --------------------------------------------------------------------- graph helpers

def _kind(gm: GraphModule, node: Node) -> str:
    """A node's function name, normalised (``aten.add.Tensor``, ``operator.iadd``, ``x.add_``: add)."""
    if node.op == "call_module":
        name = type(gm.get_submodule(node.target)).__name__
    elif node.op == "call_method":
        name = node.target
    else:
        name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))
    name = name.lower().strip("_")
    return {"iadd": "add", "radd": "add", "isub": "sub", "imul": "mul", "rmul": "mul", "truediv": "div",
            "itruediv": "div"}.get(name, name)


def _constant_nodes(gm: GraphModule) -> set:
    """Nodes computed from parameters and constants alone (never from an input)."""
    const = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op.startswith("call_") and all(i in const for i in n.all_input_nodes)):
            const.add(n)
    return const


def _ancestors(node: Node) -> list:
    out, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            out.append(n)
            todo.extend(n.all_input_nodes)
    return out


def _users_through_same(gm, node: Node) -> list:
    """``node``'s users, looking through dtype casts and copies."""
    out = []
    for u in node.users:
        c = u.meta.get(CANON)
        if c is not None and c.op == "ewise" and _kind(gm, u) in SAME:
            out.extend(_users_through_same(gm, u))
        elif c is None or c.op not in ("python", "shape"):
            out.append(u)
    return out


def _is_square(gm, x) -> bool:
    """Whether ``x`` is (a cast of) an elementwise square."""
    while isinstance(x, Node) and x.meta.get(CANON) is not None and x.meta[CANON].op == "ewise":
        kind = _kind(gm, x)
        if kind in SAME:
            x = x.args[0]
            continue
        return kind == "square" or (kind == "pow" and len(x.args) > 1 and x.args[1] == 2) or (
            kind == "mul" and len(x.args) > 1 and x.args[0] is x.args[1])
    return False


def _module_path(node: Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _evaluate(gm: GraphModule, node, override: dict):
    """The value of a node computed from parameters alone; ``override``: parameter key -> tensor."""
    names = tensor_names(gm)
    memo: dict = {}

    def run(n):
        if n in memo:
            return memo[n]
        if n.op == "get_attr":
            v = override.get(names.get(n.target, n.target), operator.attrgetter(n.target)(gm))
        else:
            args, kwargs = map_arg(n.args, run), map_arg(n.kwargs, run)
            if n.op == "call_function":
                v = n.target(*args, **kwargs)
            elif n.op == "call_method":
                v = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                v = gm.get_submodule(n.target)(*args, **kwargs)
        memo[n] = v
        return v

    if isinstance(node, str):
        return override.get(node, operator.attrgetter(node)(gm))
    with torch.no_grad():
        return run(node)


# ------------------------------------------------------------------ calibration

class _Recorder(Interpreter):
    """Runs the traced graph, adding each probe's rows (normalised to unit RMS) to X^T X.

    Unit RMS because readers see the stream through an RMSNorm, and so every
    position and layer counts once, not the late layers' large norms mostly.
    On SmolLM2-135M, sliced from 576 to 357 channels, raw rows gave perplexity
    155 where unit-RMS rows gave 82 (16 calibration windows)."""

    def __init__(self, gm, plan: _Plan, acc: dict):
        super().__init__(gm)
        self.plan, self.acc = plan, acc

    def run_node(self, n):
        val = super().run_node(n)
        axis = self.plan.probes.get(n)
        if axis is not None:
            x = val.detach().movedim(axis, -1).reshape(-1, self.plan.width).double()  # (rows, d)
            x = x / x.square().mean(1, keepdim=True).sqrt().clamp_min(1e-30)  # (rows, d)
            self.acc["gram"] = self.acc.get("gram", 0) + x.T @ x  # (d, d)
            self.acc["rows"] = self.acc.get("rows", 0) + len(x)
        return val


def _second_moment(gm: GraphModule, plan: _Plan, calibration, kwargs) -> tuple[torch.Tensor, int]:
    """E[x x^T] (d, d) of the stream where norms read it, over every calibration batch and position."""
    acc: dict = {}
    with torch.no_grad():
        for batch in calibration:
            args, kw = as_call(batch, kwargs)
            try:
                _Recorder(gm, plan, acc).run(*flat_inputs(gm, args, kw))
            except GraphpruneError:
                raise
            except Exception as e:  # noqa: BLE001 - the traced graph may be specialised to the example's shapes
                raise GraphpruneError(f"rotate_residual: a calibration batch does not run through the traced model "
                                      f"({type(e).__name__}: {first_line(e)[:200]}); give batches shaped like "
                                      "example_inputs") from e
    if not acc.get("rows"):
        raise GraphpruneError("rotate_residual needs calibration data: an iterable of at least one batch")
    return acc["gram"] / acc["rows"], acc["rows"]


def _principal_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (d, d): eigenvectors of ``gram`` as columns, largest eigenvalue first, each
    signed so its largest entry is positive (the same data gives the same Q)."""
    vals, vecs = torch.linalg.eigh(gram)  # ascending
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)  # (d,), (d, d)
    lead = vecs.abs().argmax(0)  # (d,)
    signs = torch.sign(vecs[lead, torch.arange(vecs.shape[1])])  # (d,)
    return vecs * signs, vals


# ------------------------------------------------------------------ rewrite

def _tensor(work: torch.nn.Module, key: str) -> torch.Tensor:
    try:
        t = operator.attrgetter(key)(work)
    except AttributeError:
        t = None
    if not isinstance(t, torch.Tensor):
        raise GraphpruneError(f"rotate_residual: {key} lies on the stream but is a constant of the traced graph, not a "
                              "tensor of the model")
    return t


TIED = ("mix", "untie", "refuse")


def _untie(work, gm: GraphModule, plan: _Plan, scales: list, tied: str) -> tuple[dict, set]:
    """A reader that must absorb a norm weight but shares its weight with other ops
    (a tied ``lm_head``): with ``tied="untie"`` it gets its own copy, with
    ``"mix"`` the norm is marked to keep its scale as a mixing map instead.
    Returns ({(node, key): (new name, numel)}, {indices of the folds to mix})."""
    if tied not in TIED:
        raise GraphpruneError(f"rotate_residual: tied={tied!r}; one of {', '.join(map(repr, TIED))}")
    out, mixed = {}, set()
    for i, (f, w) in enumerate(zip(plan.folds, scales)):
        if _uniform(w):
            continue  # a uniform scale commutes with Q: nothing to fold
        mine = {r[0] for r in f.readers}
        shared = [(node, key) for node, key, _ in f.readers if not plan.uses.get(key, set()) <= mine]
        if not shared:
            continue
        if tied == "mix" and _is_module_output(gm, f.node):
            mixed.add(i)
            continue
        for node, key in shared:
            t = _tensor(work, key)
            name = _alias(work, t, _module_path(node))
            if name is None or tied != "untie":
                others = sorted(n.name for n in plan.uses[key] - mine)
                raise GraphpruneError(
                    f"rotate_residual: {node.name} reads {f.node.name}'s per-channel scale ({f.param}) through a weight "
                    f"shared with {', '.join(others)} (tied embeddings); folding the scale needs its own copy of "
                    f"{tuple(t.shape)} = {t.numel()} parameters"
                    + (': pass tied="untie"' if name is not None else ", and the model has no separate name for it")
                    + ("" if tied != "mix" else f"; tied=\"mix\" needs the scale inside a module of its own, and "
                       f"{f.node.name} is not"))
            owner, _, attr = name.rpartition(".")
            setattr(work.get_submodule(owner), attr, torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            out[(node, key)] = (name, t.numel())
            _forget_tie(work, name)
    return out, mixed


def _is_module_output(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` (or a value-preserving op on it) is all that leaves the innermost
    module it runs in, so that wrapping that module wraps exactly this value."""
    path = _module_path(node)
    if not path:
        return False
    if node.op == "call_module":
        return True

    def inside(n: Node) -> bool:
        return any(v[0] == path for v in (n.meta.get("nn_module_stack") or {}).values())

    leaving = {n for n in gm.graph.nodes if inside(n) and any(not inside(u) for u in n.users)}
    allowed, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if inside(u) and u.op == "call_function" and _kind(gm, u) in SAME and u not in allowed:
                allowed.add(u)
                todo.append(u)
    return bool(leaving) and leaving <= allowed


class MixedNorm(torch.nn.Module):
    """A norm whose per-channel scale became a linear map: ``mix(norm(x))``.

    A rotated stream keeps a tied head tied when the final norm's weight w,
    which does not commute with the rotation Q, moves into a d x d map
    Q^T diag(w) Q applied to the (unscaled) norm's output. Both of its axes
    are the stream's, so pruning the hidden dim slices it to d' x d'."""

    def __init__(self, norm: torch.nn.Module, width: int, dtype=None):
        super().__init__()
        self.norm = norm
        self.mix = torch.nn.Linear(width, width, bias=False, dtype=dtype)

    def forward(self, *args, **kwargs):
        return self.mix(self.norm(*args, **kwargs))

    @classmethod
    def wrap(cls, top: torch.nn.Module, path: str, width: int) -> None:
        """Put a ``MixedNorm`` around ``top``'s module at ``path`` (rebuilding a saved
        rotated model's structure on a fresh original; the weights come after)."""
        norm = top.get_submodule(path)
        like = next(iter(norm.parameters()), None)
        wrapped = cls(norm, width, dtype=None if like is None else like.dtype)
        if like is not None:
            wrapped.mix.to(like.device)
        owner, _, attr = path.rpartition(".")
        setattr(top.get_submodule(owner) if owner else top, attr, wrapped)


def _alias(work, t: torch.Tensor, module: str) -> str | None:
    """The name ``t`` has under ``module``, where it has another name too."""
    names = [n for n, p in work.named_parameters(remove_duplicate=False) if p is t]
    mine = [n for n in names if n.rpartition(".")[0] == module]
    return mine[0] if mine and len(names) > 1 else None


def _forget_tie(work, name: str) -> None:
    """A Hugging Face model re-ties its head on ``tie_weights()`` / ``from_pretrained``
    while its config says so; the untied copy must stay untied."""
    for config in {id(c): c for c in (getattr(work, "config", None), _text_config(work)) if c is not None}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    tied = getattr(work, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop(name, None)


def _text_config(work):
    config = getattr(work, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else None


def _effective_scale(gm, f: _Fold) -> torch.Tensor:
    """The scale's values per stream channel (d,) as the norm applies them."""
    v = _evaluate(gm, f.scale, {}).detach().double()
    v = v.movedim(f.axis, -1)
    return v.reshape(-1, v.shape[-1])[0]  # (d,): a 1-D weight, or one broadcast along the other axes


def _uniform(w: torch.Tensor) -> bool:
    return bool((w == w[0]).all())


def _fold(gm, work, plan: _Plan, scales: list, untied: dict, mixed: set) -> list[str]:
    """W <- W diag(w) for every reader of a norm, then the norm's weight set to scale by 1
    (a norm to mix: only the latter; ``_mix`` puts the scale back after the rotation)."""
    folded = []
    for i, (f, w) in enumerate(zip(plan.folds, scales)):  # w: (d,)
        if _uniform(w):
            continue
        if i in mixed:
            _neutralise(gm, work, f)
            folded.append(f.param)
            continue
        done = set()
        for node, key, axis in f.readers:
            t = _tensor(work, untied[(node, key)][0]) if (node, key) in untied else _tensor(work, key)
            if id(t) in done:
                continue
            done.add(id(t))
            shape = [1] * t.dim()
            shape[axis] = -1
            t.copy_((t.double() * w.view(shape)).to(t.dtype))
        _neutralise(gm, work, f)
        folded.append(f.param)
    return sorted(set(folded))


def _neutralise(gm, work, f: _Fold) -> None:
    """Set the scale's parameter so the scale is 1: the weight itself, or, for a
    computed scale (Gemma's ``1 + w``), whichever of 1 or 0 gives 1."""
    p = _tensor(work, f.param)
    for value in (1.0, 0.0):
        trial = torch.full_like(p, value)
        if isinstance(f.scale, str) or bool((_evaluate(gm, f.scale, {f.param: trial}) == 1).all()):
            p.copy_(trial)
            return
    raise GraphpruneError(f"rotate_residual: {f.node.name} scales the stream by a function of {f.param} that is 1 "
                          "neither at 1 nor at 0; its weight cannot be made neutral")


def _rotate(work, plan: _Plan, untied: dict, q: torch.Tensor) -> list[str]:
    """Contract every stream axis of every stream parameter with Q."""
    todo = {key: (_tensor(work, key), axes) for key, axes in plan.rotate.items()}
    for (_, key), (name, _) in untied.items():
        todo[name] = (_tensor(work, name), plan.rotate[key])
    seen = set()
    for key, (t, axes) in sorted(todo.items()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        new = t.double()
        for a in axes:
            new = torch.tensordot(new, q, dims=([a], [0])).movedim(-1, a)  # axis a now in Q's basis
        t.copy_(new.to(t.dtype))
    return sorted(todo)


def _mix(work, plan: _Plan, scales: list, mixed: set, q: torch.Tensor) -> dict:
    """Wrap each norm to mix in a ``MixedNorm`` holding Q^T diag(w) Q: in the rotated
    basis the norm's output is norm(h) Q, and its readers expect norm(h) diag(w) Q.
    Returns {module path: parameters added}."""
    out = {}
    for i in sorted(mixed):
        f, w = plan.folds[i], scales[i]  # w: (d,), in the stream's original coordinates
        path = _module_path(f.node)
        norm = work.get_submodule(path)
        dtype = _tensor(work, f.param).dtype
        m = q.T @ torch.diag(w) @ q  # (d, d), symmetric: nn.Linear's weight as it is
        wrapped = MixedNorm(norm, m.shape[0], dtype=dtype)
        wrapped.mix.weight.copy_(m.to(dtype))
        owner, _, attr = path.rpartition(".")
        setattr(work.get_submodule(owner) if owner else work, attr, wrapped)
        out[path] = m.numel()
    return out


# ------------------------------------------------------------------ check

def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def _check_lossless(model, work, example_inputs, kwargs) -> float | None:
    """The largest output difference relative to the output's largest magnitude;
    refuses a result that does not compute what ``model`` does."""
    if model.training:
        return None  # dropout draws differ: nothing to compare
    with torch.no_grad():
        want = _flat_tensors(model(*example_inputs, **(kwargs or {})))
        got = _flat_tensors(work(*example_inputs, **(kwargs or {})))
    err = 0.0
    for a, b in zip(want, got):
        if a.is_floating_point():
            err = max(err, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    tol = 1e-3 if all(t.dtype in (torch.float32, torch.float64) for t in want if t.is_floating_point()) else 5e-2
    if err > tol:
        raise GraphpruneError(f"rotate_residual: the rotated model's outputs differ from the model's by {err:.2e} "
                              "(relative); an op on the stream that the checks missed does not commute with a rotation")
    return err
