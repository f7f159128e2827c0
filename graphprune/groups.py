"""Find the groups of channels that must be removed together.

The coupling graph is a ``networkx.Graph`` whose nodes are tensor dims
``(value_key, axis)`` and whose edges carry index maps (two index arrays:
index ``ia[k]`` of one end is index ``ib[k]`` of the other; ``None`` for the
identity). Its connected
components are the groups. Within a group, the index-level graph (every
channel of every dim a node, built in one vectorised ``scipy`` call) says
which channels are one *unit*: removing a unit removes every index mapped to
it, in activations and in every parameter slice.

Reshapes that split or merge dims (``C -> (heads, head_dim)``, channel
shuffle, flatten) are recorded as product relations and resolved once the
plain components are known: exactly one factor of each product may be
pruned, the others keep their width. The free factor is the one that is the
outer factor of every product it appears in (heads, not head_dim); where no
factor is (a channel shuffle swaps the order), it is the widest.
"""
from __future__ import annotations

import functools

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

import torch
from torch.fx import GraphModule, Node

from .canon import COp, canonicalize, size_args, size_source, tensor_names, vkey
from .meta_keys import CANON, NUMBERS, SYMBOLIC_DIMS, VAL
from .rules import RULES, carry_ids
from .sizes import NumberUse, computed_sizes, frozen_value, number_uses
from .zeros import block_unproven_reductions
from .errors import first_line


@dataclass
class ParamSlice:
    """Parameter ``name`` loses the indices of ``axis`` whose unit is removed."""

    name: str
    axis: int
    unit_of: np.ndarray  # (size,) unit id of every index


@dataclass
class Group:
    """Units that go together. Grouped-query attention adds a second level: the
    units are query heads, each in one *partition* (its key/value head); dims in
    ``shared`` (key/value projections, the cache) are indexed by partition and
    keep an index while any unit of its partition stays. A removal takes the
    same number of units from every partition it does not remove whole, so the
    query heads stay balanced over their key/value heads; ``replicas`` are
    broadcast dims (``repeat_kv``'s expand) whose size is the units each kept
    partition keeps."""

    id: int
    dims: dict  # (value_key, axis) -> unit_of array
    params: list[ParamSlice]
    n_units: int
    channels: int  # width of the widest member dim
    part_of: np.ndarray | None = None  # (n_units,) partition of every unit, where units are balanced
    shared: dict = field(default_factory=dict)  # (value_key, axis) -> partition of every index
    shared_params: list = field(default_factory=list)  # ParamSlice whose unit_of holds partitions
    replicas: dict = field(default_factory=dict)  # (value_key, axis) -> original size (units per partition)
    fills: dict = field(default_factory=dict)  # (value_key, axis) -> (node, dim, value): the twin's removed entries (verify)
    min_units: int = 1  # a removal keeps at least this many (a topk over the group's dim keeps k)
    multiple: int = 1  # a removal keeps a multiple of this many, or all (an op's alignment: grouped_mm)
    even: np.ndarray | None = None  # (n_units,) the equal part (a chunk) each unit lies in, -1 for none: kept alike

    @property
    def in_step(self) -> bool:
        """Whether its removals come in bundles of their own (query heads balanced over key/value heads,
        equal chunks, multiples): part of a removal may leave it unbalanced."""
        return self.even is not None or self.part_of is not None or self.multiple > 1

    @property
    def n_parts(self) -> int:
        return 0 if self.part_of is None else int(self.part_of.max()) + 1

    @property
    def size(self) -> int:
        return self.n_units

    @functools.cached_property
    def branches(self) -> list[np.ndarray]:
        """The units split by the dims that cover them: a concatenation's branches (each branch
        conv covers its own units, the conv after the concat all of them); one for a group every
        dim covers whole. Read by the allocation under round_to/min_width, after analysis."""
        covers = np.stack([np.bincount(u, minlength=self.n_units) > 0 for u in self.dims.values()])  # (dims, units)
        _, branch = np.unique(covers.T, axis=0, return_inverse=True)                                # (units,)
        branch = branch.reshape(-1)
        return [np.flatnonzero(branch == b) for b in range(branch.max() + 1)]

    @functools.cached_property
    def channels_per_unit(self) -> int:
        """The fewest channels one unit holds along any parameter dim it spans: a head holds
        ``head_dim`` rows of its projections, a channel of a grouped conv one input channel of
        each group's kernel. ``round_to`` and ``min_width`` count channels, so a group of heads
        of 64 keeps any number of them under ``round_to=8`` (counted in units, 12 heads could
        keep only 8 or 12). 1 where a dim gives its units unequal shares."""
        shares = self._shares
        return 1 if not shares or 0 in shares else min(shares)

    @functools.cached_property
    def _shares(self) -> list[int]:
        """Channels one unit holds along each parameter dim (0 where a dim gives units unequal shares)."""
        out = []
        for ps in self.params:
            share = np.bincount(ps.unit_of[ps.unit_of >= 0], minlength=self.n_units)
            out.append(int(share[0]) if share.min() == share.max() else 0)
        return out

    def unit_multiple(self, round_to: int) -> int:
        """Units a width must be a multiple of for every parameter dim's channels to be one of
        ``round_to``: a whole group of a grouped conv holds 4 input and 6 output channels, so
        round_to=8 needs units in fours (counted by the fewest, twos, 36 output channels came out)."""
        return math.lcm(1, *(round_to // math.gcd(round_to, c) if c else round_to for c in self._shares))

    def one_multiple_wide(self, round_to: int) -> bool:
        """Whether ``round_to`` holds the whole group: no multiple of it fits under its width."""
        return round_to > 1 and self.n_units <= self.unit_multiple(round_to)

    def unit_floor(self, min_width: int) -> int:
        """Units that hold at least ``min_width`` channels."""
        return -(-min_width // self.channels_per_unit)

    def describe(self) -> str:
        names = sorted({p.name for p in [*self.params, *self.shared_params]})
        more = f" (+{len(names) - 6} more)" if len(names) > 6 else ""
        parts = (f", kept in equal numbers over the {self.n_parts} units they share (key/value heads in grouped-query "
                 "attention, or any repeated slice)") if self.part_of is not None else ""
        if self.even is not None:
            parts += f", kept equal in the {int(self.even.max()) + 1} parts a chunk splits it into"
        if self.fills:
            parts += f", routed over by top-{self.min_units} (a removed one gets no tokens)"
        return f"group {self.id}: {self.n_units} units{parts} over {len(self.dims) + len(self.shared)} dims; params {', '.join(names[:6])}{more}"


@dataclass
class BlockedGroup:
    dims: list
    reasons: list[str]
    params: list[str]


@dataclass
class Analysis:
    """What ``graphprune.analyze`` returns: the prunable groups and what blocks the rest."""

    gm: GraphModule
    method: str
    groups: list[Group]
    blocked: list[BlockedGroup]
    unsupported: list[str]  # ops without a rule: they blocked the channels touching them
    graph: nx.Graph = field(repr=False)

    def holding(self) -> list[tuple[float, list[str], list[str]]]:
        """The blocked groups as (share of the model's weights their parameters hold, reasons,
        parameter names), most first: what keeps the most weights out of pruning leads a
        message, not whichever unsupported op came first in the graph (a Llama's mask
        arithmetic, while the stream was held by the ignored embedding)."""
        sizes = {n: t.numel() for n, t in self.gm.named_parameters(remove_duplicate=False)}
        total = max(1, sum(t.numel() for t in self.gm.parameters()))
        out = [(sum(sizes.get(n, 0) for n in set(b.params)) / total, b.reasons, b.params) for b in self.blocked
               if not _structural(b)]
        return sorted(out, key=lambda h: -h[0])

    def summary(self) -> str:
        kernels = sum(map(_structural, self.blocked))
        lines = [f"traced with {self.method}: {len(self.groups)} prunable groups, {len(self.blocked) - kernels} blocked groups "
                 f"with parameters" + (f" (and {kernels} dims no op could shrink: kernel sizes and the like)" if kernels else "")]
        lines += ["  " + g.describe() for g in self.groups]
        if self.blocked:
            lines.append("blocked groups (their channels stay), by the share of the weights in the parameters they touch:")
            for share, reasons, params in self.holding():
                more = f" (+{len(params) - 4} more)" if len(params) > 4 else ""
                lines.append(f"  {share:.1%}: {'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}; "
                             f"params {', '.join(params[:4])}{more}")
        if self.unsupported:
            lines.append("unsupported ops (their channels stay):")
            lines += [f"  {u}" for u in self.unsupported]
        return "\n".join(lines)


def _structural(b) -> bool:
    """A blocked group that is a parameter dim no op could shrink (a conv kernel's height): not
    channels anything holds back, and, listed twice per conv, 40 of resnet18's 42 lines."""
    return bool(b.reasons) and all(r.endswith("keeps this parameter dim") for r in b.reasons)


class Builder:
    """Collects couplings, products and blocks from the rules (see rules.py)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.g = nx.Graph()
        self.sizes: dict = {}
        self.blocked: dict = {}
        self.products: list = []
        self.shares: list = []  # (parent dim, child dim, r, replica dim or None): see share()
        self.replicas: set = set()  # broadcast dims: every index a copy of the same values
        self.touched: set = set()
        self.unsupported: set[str] = set()  # "node: why" for every op no rule could explain
        self.links: dict = {}  # node -> the couplings and products its rule stated (read by zeros.py)
        self.fills: dict = {}  # dim -> (node, dim, value): removed entries the twin fills (rules.topk)
        self.min_kept: dict = {}  # dim -> entries that must stay (rules.topk)
        self.routes: set = set()  # dims that count rows per expert id (rules.histc)
        self.multiple: dict = {}  # dim -> its kept width must be a multiple of this (rules.grouped_mm)
        self.evens: dict = {}  # dim -> n: the user's code splits it into n equal parts (chunk), see even()
        self.merged_reads: list = []  # (reshape COp, merged output dim, dim read): see _tie_merged_reads
        self._log: list | None = None
        self._attr_cache: dict = {}

    # shapes ----------------------------------------------------------------
    def shape(self, key) -> tuple:
        if isinstance(key, Node):
            return tuple(key.meta[VAL].shape)
        if isinstance(key, tuple) and isinstance(key[0], Node):
            return tuple(key[0].meta[VAL][key[1]].shape)
        if isinstance(key, tuple):  # a declared virtual dim holder
            return (self.sizes[(key, 0)],)
        if key not in self._attr_cache:
            self._attr_cache[key] = tuple(operator.attrgetter(key)(self.gm).shape)
        return self._attr_cache[key]

    def _add(self, d):
        self.touched.add(d)
        if d not in self.sizes:
            self.sizes[d] = self.shape(d[0])[d[1]]
            self.g.add_node(d)

    def declare(self, value, size: int):
        self.sizes[(value, 0)] = size
        self.g.add_node((value, 0))

    # rule interface ----------------------------------------------------------
    def couple(self, a, b, ia=None, ib=None):
        self._add(a)
        self._add(b)
        if self._log is not None:
            self._log.append((a, b))
        if ia is None:
            if self.sizes[a] != self.sizes[b]:
                self.block(a, f"sizes {self.sizes[a]} and {self.sizes[b]} do not match")
                self.block(b, f"sizes {self.sizes[a]} and {self.sizes[b]} do not match")
                return  # identity maps stay None until a live group needs them (most are batch/spatial dims)
        data = self.g.get_edge_data(a, b)
        if data is None:
            self.g.add_edge(a, b, maps=[(a, ia, ib)])
        else:
            data["maps"].append((a, ia, ib))

    def product(self, flat, factors):
        for d in [flat, *factors]:
            self._add(d)
        self.products.append((flat, factors))
        if self._log is not None:
            self._log.append(("product", flat, factors))

    def share(self, parent, child, r: int, replica=None):
        """Index ``i`` of dim ``child`` reads index ``i // r`` of dim ``parent``
        (a query head reads its key/value head). Unlike ``couple``, the two are
        not one unit: a parent index stays while any of its children does. The
        dims join one group (so a block on either blocks both)."""
        self._add(parent)
        self._add(child)
        self.shares.append((parent, child, r, replica))
        for other in (parent, replica):
            if other is not None and not self.g.has_edge(other, child):
                self.g.add_edge(other, child, maps=[])
        if self._log is not None:
            self._log.append(("share", parent, child, r))

    def even(self, a, n: int):
        """Dim ``a`` is split into ``n`` equal parts by code that computes their size from the width
        (``chunk``): a removal keeps the parts equal, so the user's own forward still splits the pruned
        tensor where the graph does (module form). The graph form would take unequal parts too."""
        self._add(a)
        self.evens[a] = n

    def replica(self, a):
        """Dim ``a`` is a broadcast (``expand`` of a size-1 dim): its indices are copies."""
        self._add(a)
        self.replicas.add(a)

    def touch(self, a):
        """Explain dim ``a`` without coupling it: it may shrink with whatever group it is in."""
        self._add(a)

    def block(self, a, why: str):
        self._add(a)
        self.blocked.setdefault(a, why)

    def unknown(self, c: COp, why: str):
        self.unsupported.add(f"{c.node.name}: {why}")
        for t in c.inputs:
            if t is not None:
                for k in range(len(self.shape(t))):
                    self.block((t, k), f"{c.node.name}: {why}")
        for v in _tensor_values(c.node):
            for k in range(len(self.shape(v))):
                self.block((v, k), f"{c.node.name}: {why}")


def _tensor_values(node: Node) -> list:
    val = node.meta.get(VAL)
    if isinstance(val, torch.Tensor):
        return [node]
    if isinstance(val, (tuple, list)):
        return [(node, i) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
    return []


def _module_of(node: Node) -> set[str]:
    paths = {node.target} if node.op == "call_module" else set()
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        paths.add(path)
    return paths


def _ignored_outputs(gm: GraphModule, ignore: set[str]):
    """(node, ignored module) for nodes inside an ignored module whose value leaves it: their width stays."""
    if not ignore:
        return
    inside = {}
    for n in gm.graph.nodes:
        inside[n] = {i for p in _module_of(n) for i in ignore if p == i or p.startswith(i + ".")}
    for n in gm.graph.nodes:  # leaving one ignored module for another (layer3 read by layer4, both ignored) is leaving it
        left = sorted(i for i in inside[n] if any(i not in inside[u] for u in n.users))
        if left:
            yield n, left[0]


# ops that read sizes at run time (x.size(1), x.dim()); what they compute adapts to the new widths
_SIZE_ONLY = ("shape", "python", "get_attr")


def build(gm: GraphModule, ignore=(), free_reads: bool = False) -> Builder:
    b = Builder(gm)
    cops = canonicalize(gm)
    for c in cops:
        node = c.node
        b.touched = set()
        b._log = b.links.setdefault(node, [])
        if c.op == "placeholder":
            for v in _tensor_values(node):
                for k in range(len(b.shape(v))):
                    b.block((v, k), "model input")
        elif c.op == "output":
            for a in _flatten_args(node.args):
                key = vkey(a)
                if key is not None:
                    for k in range(len(b.shape(key))):
                        b.block((key, k), "model output")
        else:
            try:
                RULES.get(c.op, RULES["unknown"])(b, c)
            except Exception as e:  # noqa: BLE001 - a rule that cannot read this node explains nothing about it
                b.unknown(c, f"the {c.op} rule failed on it ({type(e).__name__}: {first_line(e)[:120]})")
            if c.op not in _SIZE_ONLY:
                carry_ids(b, c)
            if c.attrs.get("sizes_at") is not None:
                _couple_size_reads(b, c)
            if c.op == "get_attr" or (c.op in _SIZE_ONLY and not _tensor_values(node)):
                continue
            # whatever the rule did not explain keeps its width
            for v in list(c.inputs) + _tensor_values(node):
                if v is None:
                    continue
                for k in range(len(b.shape(v))):
                    if (v, k) not in b.touched:
                        b.block((v, k), f"{node.name}: {c.op} does not relate this dim")
            for p in c.params.values():
                for k in range(len(b.shape(p))):
                    if (p, k) not in b.touched:
                        b.block((p, k), f"{node.name}: {c.op} keeps this parameter dim")
    b._log = None
    for n, module in _ignored_outputs(gm, set(ignore)):
        for v in _tensor_values(n):
            for k in range(len(b.shape(v))):
                b.block((v, k), f"output of ignored module {module}")
    _tie_merged_reads(b, free_reads)
    block_unproven_reductions(b, cops)
    _record_number_uses(b, gm)
    _block_computed_sizes(b, gm)
    _resolve_products(b)
    return b


def _record_number_uses(b: Builder, gm: GraphModule) -> None:
    """Widths used as numbers (``h / h.shape[1]``) keep their original value in the
    pruned model (``shrink-params`` freezes them); where that value is not a plain
    Python number, the widths it comes from stay."""
    names = tensor_names(gm)
    kept = []
    for use in number_uses(gm):
        use.deps = frozenset((names.get(k, k) if isinstance(k, str) else k, a) for k, a in use.deps)
        if frozen_value(use.number) is None:
            for d in use.deps:
                b.block(d, f"{use.user.name}: reads a width as a number ({use.value.name})")
        else:
            kept.append(use)
    gm.meta[NUMBERS] = kept


def _block_computed_sizes(b: Builder, gm: GraphModule) -> None:
    """A view/reshape size computed from widths (timm CaiT/CoaT/VOLO/DaViT: ``C // self.num_heads``
    with a literal head count) would be evaluated anew on the pruned widths, which need not
    give the width the plan keeps for that dim. The dim it sizes keeps its width (head_dim
    stays, heads may go), and the size is frozen to its original value like a width read as
    a number (``shrink-params``' ``_freeze_numbers``), so the widths it reads (the residual
    stream) are free. Where the value is not a plain number, or a width it reads is a factor
    of the very dim it sizes (``kv * n_rep`` merging key/value heads and their copies), the
    widths it reads stay too."""
    names = tensor_names(gm)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    for node, i, value, dims in computed_sizes(gm):
        out_shape = b.shape(node)
        twin = _size_twin(b, gm, order, node, i) if i < len(out_shape) else None
        if twin is not None:  # shrink-params reads the size off the twin dim at run time
            cop = node.meta[CANON]
            cop.attrs["read_sizes"] = {**cop.attrs.get("read_sizes", {}), i: twin}
            continue
        why = f"{node.name}: size {i} is computed from a width ({value.name})"
        if i < len(out_shape):
            b.block((node, i), why)
        deps = frozenset((names.get(k, k) if isinstance(k, str) else k, a) for k, a in dims)
        factors = {d for flat, fs in b.products if (node, i) in (flat, *fs) for d in (flat, *fs)} - {(node, i)}
        reads_a_factor = any(d in b.g and f in b.g and nx.has_path(b.g, d, f) for d in deps for f in factors)
        if i < len(out_shape) and frozen_value(value.meta.get(VAL)) is not None and not reads_a_factor:
            gm.meta[NUMBERS].append(NumberUse(node, value, value.meta.get(VAL), deps))
        else:
            for d in deps:
                b.block(d, why)


def _size_twin(b: Builder, gm: GraphModule, order: dict, node: Node, i: int):
    """A dim ``(m, k)`` of a tensor computed before ``node`` whose size is, by the exported program's
    own shape symbols, the size ``node`` computes for its dim ``i`` at every input it takes, and which
    is joined to it by identity maps alone, so the plan keeps the same indices of both: reading the
    size off it at run time gives the pruned width. DeBERTa expands its relative positions to
    ``query.size(0)`` of ``(B * heads, T, d)``, which torch.export writes ``4 * s0``: frozen, the
    heads stayed whole. Only for exported graphs, whose sizes are symbols or guarded constants;
    a torch.fx graph holds the example's numbers, which prove no equality at other sizes."""
    if SYMBOLIC_DIMS not in gm.meta:
        return None
    size = node.meta[VAL].shape[i]
    start = (node, i)
    if start not in b.g:
        return None
    seen, todo = {start}, [start]
    while todo:
        d = todo.pop()
        for e in b.g.neighbors(d):
            maps = b.g.edges[d, e]["maps"]
            if e in seen or not maps or any(ia is not None for _, ia, _ in maps):
                continue
            seen.add(e)
            todo.append(e)
            m, k = e
            val = m.meta.get(VAL) if isinstance(m, Node) else None
            if isinstance(val, torch.Tensor) and order.get(m, len(order)) < order[node] and _same_size(val.shape[k], size):
                return e
    return None


def _same_size(a, b) -> bool:
    """Equal at every input an exported program takes: the same symbolic expression, or one guarded constant."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea, eb = getattr(getattr(a, "node", None), "expr", None), getattr(getattr(b, "node", None), "expr", None)
    return ea is not None and eb is not None and ea == eb


def _couple_size_reads(b: Builder, c: COp) -> None:
    """A view/expand size read off another tensor's dim has that dim's width after pruning too.
    Where a reshape merges several dims into the dim a read sizes, the tie waits for ``_tie_merged_reads``."""
    node = c.node
    sizes, first, _ = size_args(node, c.attrs["sizes_at"])
    if sizes is None:
        return
    out_shape = b.shape(node)
    merged = {flat[1] for flat, _ in b.products if flat[0] is node} if c.op == "reshape" else set()
    for i, a in enumerate(sizes, start=first):
        src = size_source(a)
        if src is None or i >= len(out_shape) or out_shape[i] <= 1:
            continue
        if i in merged:
            b.merged_reads.append((c, i, src))
        else:
            b.couple(src, (node, i))


def _tie_merged_reads(b: Builder, free: bool) -> None:
    """nanoGPT and timm merge heads back with ``y.transpose(1, 2).reshape(B, N, C)``, ``B, N, C = x.shape``:
    a width read off the residual stream sizes the merged heads. Tied to the stream, heads and stream move
    together, and the model's own forward, which reads ``C`` again, runs the result (timm CaiT, CoaT, XCiT,
    BEiT keep their classes so). Where the stream cannot shrink (the model's input, its output), the tie held
    every head for nothing (survey 36 F09). With ``free`` (``output="graph"``, which never runs the model's
    own forward) the read is set free there: the merge already relates the dim to the heads it merges
    (``rules.reshape``'s product), and shrink-params writes -1 in the read's place (``attrs["free_reads"]``;
    the stream keeps its width, so nothing else reads a changed value): one read a reshape, and none where it
    already holds a -1.
    Not the new width: a merged dim may hold a length too (``y.reshape(B, inp.shape[1])`` over T x heads x
    head_dim), and the example's length written there failed every other (survey 41 F1). Without it
    the heads stay, and the model keeps its classes, which read ``C`` again (timm XCiT)."""
    if not b.merged_reads:
        return
    comp_of: dict = {}
    held: set = set()
    for k, comp in enumerate(nx.connected_components(b.g)):
        for d in comp:
            comp_of[d] = k
        if any(d in b.blocked for d in comp):
            held.add(k)
    held |= _held_by_products(b, comp_of, held)
    inferred = {}  # reshape -> its sizes already hold a -1, or one read is set free (which becomes the -1)
    for c, i, src in b.merged_reads:
        sizes = size_args(c.node, c.attrs["sizes_at"])[0]
        inferred.setdefault(c.node, any(s == -1 for s in sizes if isinstance(s, int)))
        holds = src in comp_of and comp_of[src] in held and comp_of.get((c.node, i)) not in held
        if free and holds and not inferred[c.node]:
            inferred[c.node] = True
            c.attrs["free_reads"] = c.attrs.get("free_reads", frozenset()) | {i}
            continue
        b._log = b.links.setdefault(c.node, [])
        b.couple(src, (c.node, i))
        b._log = None
        if holds and not free:  # the reason analyze and a refusal give, beside the stream's own ("model input")
            b.block((c.node, i), f"heads merged by {c.node.name} into a width read off {getattr(src[0], 'name', src[0])}, which "
                                 "stays: output='graph' prunes them")


def _held_by_products(b: Builder, comp_of: dict, held: set) -> set:
    """Components ``_resolve_products`` will hold, decided before it runs: a dim a reshape splits
    into factors that all keep their width (the model's output, ``h.view(B, T, 2, 16)``) keeps its
    own, and so does all it is coupled to, which may be the factor of another such split. Without
    this a stream held only by such a split at the output left a merged read tied to it, and every
    head stayed in graph form (survey 41 F2)."""
    out: set = set()
    plain = [(flat, factors) for flat, factors in b.products if _share_pattern(b, flat, factors) is None]
    grew = True
    while grew:
        grew = False
        for flat, factors in plain:
            k = comp_of.get(flat)
            if k is None or k in held or k in out:
                continue
            if all(b.sizes[f] <= 1 or comp_of.get(f) in held or comp_of.get(f) in out for f in factors):
                out.add(k)
                grew = True
    return out


def _flatten_args(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten_args(a)
        elif isinstance(a, dict):
            yield from _flatten_args(list(a.values()))
        else:
            yield a


def _share_pattern(b: Builder, flat, factors):
    """``(outer, replica)`` if ``flat`` merges a dim with a broadcast copy dim right
    inside it (``repeat_kv``: (kv heads, r) -> kv heads * r), else None."""
    big = [f for f in factors if b.sizes[f] > 1]
    if len(big) == 2 and big[1] in b.replicas and big[0] not in b.replicas and big[0] not in b.blocked:
        if _literal_size(*flat) and _literal_size(*big[1]):  # shrink-params can rewrite both sizes
            return big[0], big[1]
    return None


def _literal_size(node, axis: int) -> bool:
    """Whether ``node`` (a view/reshape/expand) states the size of ``axis`` as a
    literal; a size computed at run time (``kvh * n_rep``) would keep its value."""
    c = node.meta.get(CANON) if isinstance(node, Node) else None
    at = c.attrs.get("sizes_at") if c is not None else None
    if at is None:
        return False
    sizes = list(node.args[1:]) if at == "varargs" else node.args[at]
    return isinstance(sizes, (list, tuple)) and axis < len(sizes) and isinstance(sizes[axis], int)


def _resolve_products(b: Builder) -> None:
    if not b.products:
        return
    plain = []
    for flat, factors in b.products:
        pattern = _share_pattern(b, flat, factors)
        if pattern is not None:  # index i of the merged dim reads index i // r of the outer one
            outer, rep = pattern
            b.share(outer, flat, b.sizes[rep], rep)
        else:
            plain.append((flat, factors))
            for f in factors:  # copies are not pruned through a general reshape
                if f in b.replicas:
                    b.block(f, "a broadcast dim merged by a reshape")
    b.products = plain
    if not plain:
        return
    comp_of = {}
    blocked_comp = set()
    for i, comp in enumerate(nx.connected_components(b.g)):
        for d in comp:
            comp_of[d] = i
            if d in b.blocked:
                blocked_comp.add(i)
    # a component qualifies as "outer" when it is the first non-fixed factor of every product it is in
    outer_ok: dict[int, bool] = {}
    for flat, factors in b.products:
        live = [f for f in factors if comp_of[f] not in blocked_comp]
        for pos, f in enumerate(live):
            outer_ok[comp_of[f]] = outer_ok.get(comp_of[f], True) and pos == 0
    for flat, factors in b.products:
        sizes = [b.sizes[f] for f in factors]
        live = [f for f in factors if comp_of[f] not in blocked_comp and b.sizes[f] > 1]
        if not live:
            b.block(flat, "every factor of this reshape keeps its width")
            continue
        preferred = [f for f in live if outer_ok[comp_of[f]]]
        free = preferred[0] if preferred else max(live, key=lambda f: b.sizes[f])
        pos = factors.index(free)
        inner = int(np.prod(sizes[pos + 1:], dtype=np.int64))
        o = np.arange(b.sizes[flat])
        b.couple(flat, free, o, (o // inner) % sizes[pos])
        for f in factors:
            if f is not free:
                b.block(f, "another factor of this reshape is the one pruned")


def resolve_groups(b: Builder) -> tuple[list[Group], list[BlockedGroup]]:
    comps = list(nx.connected_components(b.g))
    live = []
    blocked_groups = []
    weights = {n for n, _ in b.gm.named_parameters(remove_duplicate=False)}
    for comp in comps:
        reasons = [b.blocked[d] for d in comp if d in b.blocked]
        if not any(isinstance(d[0], str) and d[0] in weights for d in comp):
            # buffers alone: rows of an index or position table are positions, not channels (Swin3D's
            # relative_position_index, read as index[:N, :N] with N computed at run time, became a group of
            # its rows, pruned, and then picked other rows: 1e-4 off, under the self-check's tolerance)
            reasons.append("holds no parameter, only buffers (positions or tables, not channels)")
        if any(d in b.fills for d in comp) and not any(d in b.routes for d in comp):
            reasons.append("a topk over this dim whose indices route nothing (no per-expert counts): a removed "
                           "entry would have to be one never chosen, which only routing makes sense of")
        params = sorted({d[0] for d in comp if isinstance(d[0], str)})
        if reasons:
            if params:
                blocked_groups.append(BlockedGroup(sorted(comp, key=str), sorted(set(reasons)), params))
        elif params:
            live.append(comp)
    # Index-level units over all live groups in one connected_components call.
    # Dims joined by identity maps (most edges: a conv's output and the BN
    # after it) have the same units, so they share one block of indices; only
    # the other maps (offsets, products, groups) become index-level edges.
    rep = _identity_classes(b, live)
    offset = {}
    total = 0
    for comp in live:
        for d in comp:
            if rep[d] == d:
                offset[d] = total
                total += b.sizes[d]
    rows, cols = [], []
    for a, c, maps in b.g.edges(data="maps"):
        if a not in rep:  # an edge of a blocked or parameterless component
            continue
        for src, ia, ib in maps:
            if ia is not None:
                dst = c if src == a else a
                rows.append(offset[rep[src]] + ia)
                cols.append(offset[rep[dst]] + ib)
    offset = {d: offset[r] for d, r in rep.items()}
    if total == 0:
        return [], blocked_groups
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cidx = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    m = sp.coo_matrix((np.ones(len(r), dtype=np.int8), (r, cidx)), shape=(total, total))
    _, labels = connected_components(m, directed=False)
    groups = []
    for comp in live:
        order = sorted(comp, key=lambda d: (not isinstance(d[0], str), str(d)))
        lab = np.concatenate([labels[offset[d]:offset[d] + b.sizes[d]] for d in order])
        uniq, inv = _relabel(lab)
        dims, params, pos = {}, [], 0
        for d in order:
            n = b.sizes[d]
            dims[d] = inv[pos:pos + n]
            if isinstance(d[0], str):
                params.append(ParamSlice(d[0], d[1], dims[d]))
            pos += n
        shares = [sh for sh in b.shares if sh[1] in comp]
        n_units = len(uniq)
        if shares:
            parts = _partition(b, dims, shares, n_units)
            if not isinstance(parts, str):
                groups.append(Group(len(groups), channels=max(b.sizes[d] for d in comp), **parts))
                continue
            dims = _whole_partitions(b, dims, shares)  # no balance to keep: key/value heads go whole
            params = [ParamSlice(d[0], d[1], u) for d, u in dims.items() if isinstance(d[0], str)]
            n_units = 1 + max(int(u.max()) for u in dims.values())
            if n_units < 2:
                blocked_groups.append(BlockedGroup(sorted(comp, key=str), [parts], [p.name for p in params]))
                continue
        if n_units >= 2:
            comp = [d for d in comp if d in dims]  # the copy dims a fallback left out keep their size
            floor = _min_units(b, dims, comp)
            if isinstance(floor, str):
                blocked_groups.append(BlockedGroup(sorted(comp, key=str), [floor], [p.name for p in params]))
                continue
            groups.append(Group(len(groups), dims, params, n_units, max(b.sizes[d] for d in comp),
                                fills={d: b.fills[d] for d in comp if d in b.fills}, min_units=floor,
                                multiple=math.lcm(1, *(b.multiple[d] for d in comp if d in b.multiple)),
                                even=_even_parts(b, dims, comp, n_units)))
    return groups, blocked_groups


def _even_parts(b: Builder, dims: dict, comp, n: int) -> np.ndarray | None:
    """(n_units,) for a group holding dims the user's code splits into equal parts (``Builder.even``):
    the part each unit lies in, -1 for a unit outside every such dim or spread over its parts
    alike (a GLU's pair ``a_i, b_i``: removing it keeps the parts equal anyway). Removing as many
    units from every part keeps each split even. Two splits combine into their common refinement,
    which must again be parts of equal size, as many in every part of each split. None where no
    such labelling exists (a unit with two channels in one part and one in another: qkv's q and k
    channels paired over v's): the parts are then free, and only the graph form splits them right."""
    splits = [d for d in comp if d in b.evens]
    if not splits:
        return None
    labels = []
    for d in splits:
        parts = b.evens[d]
        chunk = np.arange(b.sizes[d]) // (b.sizes[d] // parts)          # (width,) the part of every index
        counts = np.zeros((n, parts), dtype=np.int64)
        np.add.at(counts, (dims[d], chunk), 1)                           # (units, parts)
        alike = (counts == counts[:, :1]).all(1)
        inside = (counts > 0).sum(1) == 1
        if not (alike | inside).all() or len(np.unique(counts.max(1)[inside])) > 1:
            return None  # a unit over two parts unevenly, or units of unequal widths in them
        labels.append(np.where(alike, -1, counts.argmax(1)))
    stacked = np.stack(labels, 1)                                        # (units, splits)
    bound = (stacked >= 0).any(1)
    _, part = np.unique(stacked[bound], axis=0, return_inverse=True)
    out = np.full(n, -1, dtype=np.int64)
    out[bound] = part.reshape(-1)
    sizes = np.bincount(out[bound])
    if len(sizes) < 2 or (sizes != sizes[0]).any():
        return None
    for j in range(stacked.shape[1]):  # every part of each split holds as many refined parts
        per = [len(np.unique(out[stacked[:, j] == c])) for c in range(b.evens[splits[j]])]
        if len(set(per)) != 1:
            return None
    return out


def _min_units(b: Builder, dims: dict, comp) -> int | str:
    """Units that must stay so that every ``min_kept`` dim keeps its entries (one
    unit an entry there), or why that cannot be said."""
    floor = 1
    for d in comp:
        if d in b.min_kept:
            units = dims[d]
            if len(np.unique(units)) != len(units):
                return f"{d[0]}: a topk over entries that are not one unit each"
            floor = max(floor, b.min_kept[d])
    return floor


class _Sets:
    """Disjoint sets of units (union-find): ``join`` puts two units' sets together, ``find`` names a set."""

    def __init__(self, n: int):
        self.link = np.arange(n)

    def find(self, u: int) -> int:
        while self.link[u] != u:
            self.link[u] = self.link[self.link[u]]
            u = self.link[u]
        return u

    def join(self, a: int, z: int) -> None:
        a, z = self.find(a), self.find(z)
        if a != z:
            self.link[z] = a


def _child_parent(dims: dict, shares: list):
    """(child unit, parent unit) at every index of each shared dim: index i of the child reads i // r of the parent."""
    for parent, child, r, _ in shares:
        pu = dims[parent][np.arange(len(dims[child])) // r]                 # (child width,) the parent of each index
        yield from zip(dims[child].tolist(), pu.tolist())


def _whole_partitions(b: Builder, dims: dict, shares: list) -> dict:
    """Each key/value head one unit with every query head it serves: ``dims`` relabelled so a
    child takes its parent's unit, copy dims (``repeat_kv``'s expand) left out, as they keep
    their size. The fallback where query heads cannot be balanced over their key/value heads
    (``_partition`` says why): one parameter dim holds both kinds (Phi-3's ``qkv_proj``, gpt-fast's
    ``wqkv``), or a fused layout already made them one unit (Falcon's interleaved ``query_key_value``).
    Whole partitions remove rows of both kinds together, so no dim needs two labellings."""
    n = 1 + max(int(u.max()) for u in dims.values())
    sets = _Sets(n)
    for c, p in _child_parent(dims, shares):
        sets.join(p, c)
    roots = np.array([sets.find(u) for u in range(n)])
    kept = {d: roots[u] for d, u in dims.items() if d not in b.replicas}  # a copy dim's own labels name no unit
    _, new = np.unique(np.concatenate(list(kept.values())), return_inverse=True)
    out, pos = {}, 0
    for d, u in kept.items():
        out[d] = new[pos:pos + len(u)]
        pos += len(u)
    return out


def _partition(b: Builder, dims: dict, shares: list, n: int):
    """Split a group's units into children (query heads) and their parents
    (key/value heads), each parent a partition; the group's units become the
    children. A string says why it cannot be done (then nothing is pruned)."""
    for parent, _, _, _ in shares:  # ``repeats`` is rewritten as one count for every parent index: each must be
        if len(np.unique(dims[parent])) < len(dims[parent]):  # its own unit (survey 56 F2: tiled, then shared)
            return "key/value heads repeated whole before their copies are shared out (repeat, then repeat_interleave)"
    parent_units, child_of = set(), {}
    sets = _Sets(n)  # parents that serve one child are one partition
    for c, p in _child_parent(dims, shares):
        parent_units.add(p)
        child_of.setdefault(c, p)
        sets.join(child_of[c], p)
    children = set(child_of)
    every = set(np.concatenate([u for d, u in dims.items() if d not in b.replicas]).tolist())
    if children & parent_units or children | parent_units != every:
        return "grouped-query heads that cannot be told apart from their key/value heads"
    child_ids = np.full(n, -1)
    child_ids[sorted(children)] = np.arange(len(children))
    roots = sorted({sets.find(p) for p in parent_units})
    part_ids = np.full(n, -1)
    for p in parent_units:
        part_ids[p] = roots.index(sets.find(p))
    part_of = np.empty(len(children), dtype=np.int64)
    for c, p in child_of.items():
        part_of[child_ids[c]] = part_ids[p]
    counts = np.bincount(part_of)
    if (counts != counts[0]).any():
        return "grouped-query heads whose key/value heads serve unequal numbers of them"
    if len(children) < 2:
        return "a single query head"
    out = {"dims": {}, "params": [], "shared": {}, "shared_params": [], "replicas": {}}
    for d, units in dims.items():
        if np.isin(units, sorted(children)).all():
            out["dims"][d] = child_ids[units]
            if isinstance(d[0], str):
                out["params"].append(ParamSlice(d[0], d[1], out["dims"][d]))
        elif np.isin(units, sorted(parent_units)).all():
            out["shared"][d] = part_ids[units]
            if isinstance(d[0], str):
                out["shared_params"].append(ParamSlice(d[0], d[1], out["shared"][d]))
        elif d in b.replicas:
            continue
        else:
            return "a dim that mixes query heads and key/value heads"
    for _, _, r, replica in shares:
        if replica is not None:
            out["replicas"][replica] = r
            out["dims"].pop(replica, None)
    return {**out, "n_units": len(children), "part_of": part_of}


def _identity_classes(b: Builder, live: list) -> dict:
    """dim -> representative dim, merging dims that an identity map joins (union-find)."""
    dims = [d for comp in live for d in comp]
    index = {d: i for i, d in enumerate(dims)}
    parent = list(range(len(dims)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, c, maps in b.g.edges(data="maps"):
        if a in index and any(ia is None for _, ia, _ in maps):
            ra, rc = find(index[a]), find(index[c])
            if ra != rc:
                parent[rc] = ra
    return {d: dims[find(i)] for i, d in enumerate(dims)}


def _relabel(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(lab, return_inverse=True)`` by counting over the labels'
    range instead of sorting (a group's labels are close together: components
    are numbered in index order, and a group's indices are contiguous). The
    argsort inside np.unique cost 0.15 s on EfficientNet-V2-L."""
    lo = int(lab.min())
    present = np.bincount(lab - lo) > 0
    uniq = np.flatnonzero(present)
    local = np.cumsum(present) - 1
    return uniq + lo, local[lab - lo]


def analyze_graph(gm: GraphModule, method: str = "symbolic_trace", ignore=(), free_reads: bool = False) -> Analysis:
    b = build(gm, ignore, free_reads)
    groups, blocked = resolve_groups(b)
    return Analysis(gm, method, groups, blocked, sorted(b.unsupported), b.g)
