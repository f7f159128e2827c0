"""Choose per-group widths under a budget (FLOPs, parameters, measured latency).

Scores are normalised per group (divided by the group's mean), so that a
single threshold ranks units of every group on one scale; a unit goes when
its normalised score is below the threshold. The threshold is found by
bisection over the sorted scores; each candidate is built for real through
the pass pipeline and measured: FLOPs with ``torch.utils.flop_counter`` and
parameters on a meta-tensor twin (no weight memory, no compute), latency on
the real model, timed alternately with the original (warm-up, then medians). The allocation
returned is the one that removes least while meeting the budget, so the
result never exceeds it.
"""
from __future__ import annotations

import math
import warnings

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn.utils.stateless import _reparametrize_module

from .errors import GraphpruneError, GraphpruneWarning, first_line, user_level
from .flops import count_flops, count_params, graph_params, latency_ratio
from .pruner import DEFAULT_PIPELINE, Pruner, matching_ratio, remove_lowest
from .meta_keys import ORIGINAL_FLOPS, ORIGINAL_PARAMS, PLAN_FLOPS, UNREAD
from .trace import meta_state, on_meta, to_meta


@dataclass
class Report:
    """What a budgeted ``compile`` achieved; ``model.report`` on the result."""

    widths: dict  # group id -> (units before, units after)
    flops: float | None  # fraction of the original kept (None: not measured, as for ratio=)
    params: float | None
    latency: float | None = None
    budget: dict = field(default_factory=dict)
    verify: object = None  # verify.Verification: what the self-check did
    form: str = "graph"  # "module": the user's own classes; "graph": an fx GraphModule
    form_why: str = ""
    auto: object = None  # auto.Choice: what importance="auto" chose, and why
    rounding: dict | None = None  # pipeline="deploy": the width multiple chosen by timing, and the timings
    layout: dict | None = None  # pipeline="deploy": whether convolution weights went channels-last, and the timing
    kernels: dict | None = None  # pipeline="deploy": whether layers run as fused oneDNN kernels, and the timing
    latency_table: dict | None = None  # a latency budget costed per unit from a latency table: nodes, timed now, cache
    unrun: list = field(default_factory=list)  # modules with weights the traced forward never runs (outside the counts)

    def __str__(self) -> str:
        lat = "" if self.latency is None else f", latency {self.latency:.3f}"
        cost = f"FLOPs {self.flops:.3f}, params {self.params:.3f}{lat} of the original; " if self.flops is not None else ""
        check = f"; {self.verify}" if self.verify is not None else ""
        chose = f"; {self.auto}" if self.auto is not None else ""
        rounded = "" if not self.rounding else (f"; widths in multiples of {self.rounding['chosen']} (timed: latency vs "
                                                f"unrounded {self.rounding['latency_vs_unrounded']})")
        if self.rounding and self.rounding.get("too_coarse"):
            rounded += f" (not timed, landing too far under the budget: {self.rounding['too_coarse']})"
        laid = "" if not self.layout else (f"; channels-last {'on' if self.layout['channels_last'] else 'off'} "
                                           f"({self.layout['why']})")
        fused = "" if not self.kernels else (f"; oneDNN kernels {'on' if self.kernels['onednn'] else 'off'} "
                                             f"({self.kernels['why']})")
        lt = self.latency_table
        table = "" if not lt else (f"; latency table of {lt['nodes']} nodes ({'timed now' if lt['timed_now'] else 'cached'}) "
                                   "guides the search and costs units" if lt["used"] else
                                   f"; latency table not used: 1/4 of every width saved only {lt['elastic']:.0%} of the time")
        unrun = "" if not self.unrun else (f"; never run by the traced forward, so outside the counts and "
                                           f"{'kept as they were' if self.form == 'module' else 'dropped'}: "
                                           f"{', '.join(self.unrun[:4])}{', ...' if len(self.unrun) > 4 else ''}")
        return f"{cost}{len(self.widths)} groups{check}{chose}{rounded}{laid}{fused}{table}{unrun}"


class Unreachable(GraphpruneError):
    """Every group at its minimum width still costs more than the budget."""


MIN_KEEP = 0.1
"""Under a budget every group keeps at least this fraction of its units (a user's
``min_width`` may ask more), unless the budget cannot be met so. Ranking units across
groups by any rule can empty a group whose scores are flat (every unit near the
group's mean goes at one threshold) or that the outputs barely feel before fine-tuning:
on the task suite's 1-D CNN at 25% of its FLOPs both concatenated dense branches kept
1 of 24 channels in three of five seeds, a pathway the fine-tune cannot bring back.
The probes of measured allocation stop at 90% of a group (``auto.probe``), so past
this floor its curve is extrapolation anyway."""


@dataclass
class Constraints:
    round_to: int = 1  # kept channels per group rounded down to a multiple of this (8 for tensor cores; Group.unit_multiple)
    min_width: int = 1  # at least this many channels kept per group (Group.unit_floor)
    overrides: dict | None = None  # {module pattern: fixed ratio} for the groups those modules produce
    min_keep: float = field(default_factory=lambda: MIN_KEEP)  # ... and this fraction of its units, where the budget allows

    def removal(self, p: Pruner, norm: dict, tau: float) -> dict:
        return self._bounded(p, {g.id: int((norm[g.id] < tau).sum()) for g in p.groups})

    def applied(self, p: Pruner, removed: dict) -> dict:
        """A ratio's removal ({group id: units}) with these constraints: overrides fix their
        groups' ratios, and kept widths are rounded and floored as under a budget (ratio=
        took round_to, min_width and overrides and ignored them). No ``min_keep``: a ratio
        says how much every group loses."""
        return replace(self, min_keep=0.0)._bounded(p, {g.id: len(removed.get(g.id, ())) for g in p.groups})

    def _bounded(self, p: Pruner, counts: dict) -> dict:
        out = {}
        for g in p.groups:
            fixed = matching_ratio(g, self.overrides) if self.overrides else None
            if fixed is not None:
                k = int(round(fixed * g.n_units))
            else:
                k = counts[g.id]
            if k == 0:  # nothing asked of this group (ratio 0, a pattern that names others): rounding is not a reason to cut it
                continue
            keep = g.n_units - k
            floor = min(g.n_units, max(g.unit_floor(self.min_width), 1,
                                       math.ceil(self.min_keep * g.n_units) if fixed is None else 1))
            q = g.unit_multiple(self.round_to)
            q = q if g.even is None else math.lcm(q, int(g.even.max()) + 1)
            if q > 1 and g.n_units < q:  # no multiple fits under its width: it stays whole (it was cut unrounded)
                continue
            if q > 1:  # a chunk's parts go in bundles: a multiple of both
                floor = max(floor, q)
                keep = max(keep - keep % q, floor)
            keep = max(keep, floor)
            k = g.n_units - keep
            if k > 0:
                units = remove_lowest(g, p.scores[g.id], k, self.min_keep if fixed is None else 0.0)
                if (self.round_to > 1 or self.min_width > 1) and not g.in_step:
                    units = _per_branch(g, p.scores[g.id], units, g.unit_multiple(self.round_to), g.unit_floor(self.min_width))
                if len(units):
                    out[g.id] = units
        return out


def _per_branch(g, score: np.ndarray, removed: np.ndarray, q: int, min_width: int) -> np.ndarray:
    """``removed`` with ``round_to`` and ``min_width`` held by every branch of a concatenation, not
    only by the group: each set of units that the same dims cover (a branch conv's outputs; a
    DenseNet layer's new channels) keeps a multiple of ``q`` and at least ``min_width`` units, or
    all of them where it has fewer (two branches of 16 and 24 kept 5 and 11 for round_to=8, survey 24).
    Each branch gives up its lowest-scoring units."""
    branches = g.branches
    if len(branches) == 1:
        return removed  # one branch: the group's rounding is the layer's
    gone = np.zeros(g.n_units, dtype=bool)
    gone[removed] = True
    out = []
    for units in branches:
        keep = len(units) - int(gone[units].sum())
        if len(units) >= max(q, min_width):
            keep = max(keep - keep % q, min_width, q) if keep < len(units) else keep
            keep = min(keep + (-keep) % q if keep % q else keep, len(units))
        else:
            keep = len(units)  # a branch narrower than the multiple or the floor stays whole
        order = units[np.argsort(score[units], kind="stable")]
        out.extend(order[:len(units) - keep].tolist())
    return np.array(sorted(out), dtype=np.int64)


def unrounded(p: Pruner, removed: dict, round_to: int) -> list[tuple[str, int, int, Group]]:
    """(parameter, width, kept, group) for every pruned parameter dim whose kept width is not a
    multiple of ``round_to``: what the allocation could not round, since the group's units go in
    bundles of their own (query heads in the same number for every key/value head, the equal parts
    a ``chunk`` splits a stream into, and dims that read several branches of a concatenation or a shuffle
    where a branch kept whole is not a multiple: ShuffleNetV2 interleaves halves of branches of 12).
    Not a dim that reads a concatenation's branch left whole for being narrower than the multiple
    (``_per_branch``): its width is a sum of multiples and that branch's, as documented. A layer's
    output is said whatever it writes: a conv before a shuffle writes several branches, and one of 3
    kept whole beside multiples left 20 of 24 under round_to=8 without a word (ShuffleNetV2 at 64 px,
    target_flops=0.5: 11 convs)."""
    ndim = {n: t.dim() for n, t in p.gm.named_parameters()}
    out = []
    for g in p.groups:
        units = removed.get(g.id)
        if units is None or not len(units) or round_to <= 1:
            continue
        gone = np.zeros(g.n_units, dtype=bool)
        gone[units] = True
        branch = np.empty(g.n_units, dtype=np.int64)
        for b, members in enumerate(g.branches):
            branch[members] = b
        q = g.unit_multiple(round_to)
        narrow = {b for b, members in enumerate(g.branches) if len(members) < q and not gone[members].any()}
        for ps in g.params:
            idx = ps.unit_of[ps.unit_of >= 0]
            writes = ps.axis == 0 and ndim.get(ps.name, 0) >= 2  # a layer's output channels
            if not len(idx) or (not writes and narrow.intersection(branch[idx].tolist())):
                continue
            kept = int((~gone[idx]).sum())
            if kept < len(idx) and kept % round_to:
                out.append((ps.name, len(idx), kept, g))
    return out


def original_params(p: Pruner) -> float:
    """Parameters the traced original reads, dead code included: what a params budget and
    the report divide by (cached on the graph). Not every parameter of the module tree: a
    module the forward never runs (GoogLeNet's auxiliary heads in eval mode, 49% of its
    weights) cannot be pruned, and counted, it made a 0.5 budget cut the network that runs
    to 0.06 of its FLOPs."""
    if ORIGINAL_PARAMS not in p.gm.meta:
        p.gm.meta[ORIGINAL_PARAMS] = float(sum(t.numel() for t in graph_params(p.gm).values()))
    return p.gm.meta[ORIGINAL_PARAMS]


def params_read(p: Pruner, model: torch.nn.Module) -> float:
    """Parameters of ``model`` (the pruned result, graph or module form) counted as
    ``original_params`` counts the original's: every parameter but those the traced
    original never read, by name. A result counted whole holds them (Dinov2's
    ``mask_token``, read only when a mask is passed): at target_params=0.5 it was
    reported at 0.50009, over the budget its allocation had met."""
    if UNREAD not in p.gm.meta:
        read = graph_params(p.gm)
        p.gm.meta[UNREAD] = {n for n, t in p.gm.named_parameters(remove_duplicate=False) if id(t) not in read}
    unread = p.gm.meta[UNREAD]
    counted = {id(t): t for n, t in model.named_parameters(remove_duplicate=False) if n not in unread}
    return float(sum(t.numel() for t in counted.values()))


def normalized_scores(p: Pruner, kind: str | None = None) -> dict[int, np.ndarray]:
    return {g.id: p.scores[g.id] / max(float(np.mean(p.scores[g.id])), 1e-30) for g in p.groups}


PLAN_FLOPS_ON = True  # False: every FLOPs count builds its candidate (bench/flops_meter.py compares the two)


class Meter:
    """Cost of a candidate as a fraction of the original model's.

    Latency is measured side by side: candidate and original alternate, and
    the ratio of their fastest rounds is the cost (``flops.latency_ratio``),
    so load that comes and goes on the machine hits both alike."""

    def __init__(self, p: Pruner, kind: str, *, latency_inputs: tuple | None = None, runs: int = 5):
        self.p, self.kind, self.runs = p, kind, runs
        self.inputs = latency_inputs or p.example_inputs
        self.kwargs = None if latency_inputs else p.example_kwargs  # keyword inputs a required parameter takes
        self._meta_state = meta_state(p.gm)
        # the plan gives parameter counts exactly where the default passes only slice parameters
        default = (p.pipeline or DEFAULT_PIPELINE) == DEFAULT_PIPELINE
        self.exact_params = None if default else False
        self._read = graph_params(p.gm)  # what the pipeline's dce keeps, so what a candidate holds
        # FLOPs read off the plan (plan_flops) where the default passes build the candidate: trusted once a built
        # candidate's count matched, and the answer's count is held to a built one (``confirmed``)
        self.exact_flops = None if PLAN_FLOPS_ON and kind == "flops" and default else False
        self.base = 1.0 if kind == "latency" else original_params(p) if kind == "params" \
            else self._original_flops() if kind == "flops" else self._measure({})
        if not self.base:  # an embedding and a sum: torch.utils.flop_counter counts no matmul or conv
            raise GraphpruneError(f"target_{kind} is a fraction of the model's {kind}, and it has none to count "
                                  f"({'no matmul or convolution' if kind == 'flops' else 'no parameters'}): "
                                  "give ratio= or another budget")

    def _plan_params(self, removed: dict) -> float:
        """Parameters after ``removed``, read off the slicing plan: every parameter keeps
        the product of its kept sizes (tied ones counted once). What shrink-params
        builds, without building it (a pass over a 30-layer LLM costs seconds)."""
        from .pruner import make_plan

        plan = make_plan(self.p.groups, removed)
        kept: dict = {}
        for name, t in self.p.gm.named_parameters(remove_duplicate=False):
            if id(t) not in self._read:
                continue  # in a module the forward never runs: the built candidate drops it (dce)
            sizes = kept.setdefault(id(t), list(t.shape))
            for axis in range(t.dim()):
                idx = plan.get((name, axis))
                if idx is not None:
                    sizes[axis] = min(sizes[axis], len(idx))
        return float(sum(int(np.prod(v)) for v in kept.values()))

    def _plan_flops(self, removed: dict) -> float | None:
        """FLOPs of the candidate read off the slicing plan (``plan_flops``), or None where it cannot say."""
        from .plan_flops import PlanFlops

        plan = self.p.gm.meta.get(PLAN_FLOPS)
        if plan is None:
            plan = self.p.gm.meta[PLAN_FLOPS] = PlanFlops.build(
                self.p, self.p.example_inputs, self.p.example_kwargs, self._meta_state) or False
        return None if plan is False else float(plan.count(self.p.groups, removed))

    def confirmed(self, removed: dict) -> bool:
        """Whether the FLOPs the plan gave ``removed`` (an answer) are the built candidate's; where they
        are not, every count from here on is built (and the caller searches again)."""
        if self.kind != "flops" or self.exact_flops is False:
            return True
        if self._plan_flops(removed) == self._built(removed):
            self.exact_flops = True
            return True
        self.exact_flops = False
        return False

    def _measure(self, removed: dict) -> float:
        if self.kind == "flops" and self.exact_flops is not False:
            fast = self._plan_flops(removed)
            if fast is not None and removed and self.exact_flops is None:  # trusted once it matched a built candidate
                self.exact_flops = fast == self._built(removed)
            if fast is not None and self.exact_flops is not False:
                return fast
            self.exact_flops = False
        if self.kind == "params" and self.exact_params is not False:
            fast = self._plan_params(removed)
            if removed and self.exact_params is None:  # trusted once it matched a model built for real
                self.exact_params = fast == self._built_for_real(removed)
                if not self.exact_params:
                    self.base = self._built({})  # every count from here is meta-built, the base too
            if self.exact_params:
                return fast
        return self._built(removed)

    def _built_for_real(self, removed: dict) -> float:
        """Parameters of the candidate built with its real weights (meta-built
        counts have been seen to miss parameters some modules re-create)."""
        if any(t.is_meta for t in self.p.gm.parameters()):
            return self._built(removed)
        candidate = self.p.prune(removed, check=False, fit=False)
        n = float(count_params(candidate))
        self.p.discard(candidate)  # a reference cycle as large as the model: freed now
        return n

    def _original_flops(self) -> float:
        """FLOPs of the traced original, every node counted: what the report divides by
        (the user's model as it runs). Not the original rebuilt through the pipeline:
        its ``dce`` drops computations nothing reads (a WaveNet's last residual conv, an
        auxiliary head left in ``forward``), so a budget measured against that build
        landed under the target by the dead code's share (0.17 for a 0.5 target where
        it was two thirds of the model), and the report disagreed with the search."""
        cached = self.p.gm.meta.get(ORIGINAL_FLOPS)
        if cached is None:
            with _reparametrize_module(self.p.gm, self._meta_state, tie_weights=False):
                try:
                    cached = float(count_flops(self.p.gm, to_meta(self.p.example_inputs), to_meta(self.p.example_kwargs)))
                except RuntimeError:  # graphs that make real-device tensors of their own
                    cached = None
            if cached is None:
                cached = float(count_flops(self.p.gm, self.p.example_inputs, self.p.example_kwargs))
            self.p.gm.meta[ORIGINAL_FLOPS] = cached
        return cached

    def _built(self, removed: dict) -> float:
        if self.kind == "latency":
            candidate = self.p.prune(removed, check=False, fit=False)
            ratio = latency_ratio(candidate, self.p.model, self.inputs, rounds=self.runs,
                                  **({"example_kwargs": self.kwargs} if self.kwargs else {}))
            self.p.discard(candidate)
            return ratio
        with _reparametrize_module(self.p.gm, self._meta_state, tie_weights=False):
            model = self.p.prune(removed, check=False, fit=False)
        if self.kind == "params":
            return float(count_params(model))
        try:
            return float(count_flops(model, to_meta(self.p.example_inputs), to_meta(self.p.example_kwargs)))
        except RuntimeError:  # graphs that make real-device tensors of their own: count on real weights
            try:
                return float(count_flops(self.p.prune(removed, check=False, fit=False), self.p.example_inputs,
                                         self.p.example_kwargs))
            except RuntimeError as e:  # a candidate the rewrite got wrong: raw, it escaped compile (weights sliced by ints)
                raise GraphpruneError(
                    f"a candidate pruned model does not run ({type(e).__name__}: {first_line(e)[:200]}): the rewrite "
                    "cannot follow part of this model. Keep that part whole with ignore=[...] (analyze(model, "
                    "inputs).summary() lists the groups and their modules), and please report the model") from e

    def __call__(self, removed: dict) -> float:
        if not removed and self.kind != "flops":
            return 1.0  # the original, by definition (under a FLOPs budget the pipeline may drop dead code: counted)
        return self._measure(removed) / self.base


def per_param_scores(p: Pruner, kind: str | None = None) -> dict[int, np.ndarray]:
    """Normalised scores divided by what a unit weighs (its parameters, relative to the
    mean unit): a unit that holds many weights must matter more to stay."""
    from .auto import unit_params

    sizes = {g.id: unit_params(g, p.gm) for g in p.groups}
    mean = float(np.mean(np.concatenate(list(sizes.values())))) if sizes else 1.0
    return {gid: v / (sizes[gid] / mean) for gid, v in normalized_scores(p).items()}


def measured_scores(p: Pruner, kind: str | None = None, latency_inputs: tuple | None = None) -> dict[int, np.ndarray]:
    """Units ranked by the output error they are expected to add, per unit of budget they
    free: per FLOP for a FLOPs budget (a unit of an early, high-resolution conv saves more
    FLOPs than one of a late conv with as many weights), per millisecond read off the
    latency table for a latency budget (``unit_costs``), else per parameter.

    ``p.sensitivity`` ({group id: ((units, error), ...)}, from ``auto.probe``)
    holds, per group, the held-out output error measured with that group's
    lowest-scoring units dead and nothing else touched, at one or two depths.
    Within a group the error is modelled as ``a * S**gamma``, ``S`` the summed
    (normalised) scores of the units gone, fit through the measured points
    (``gamma`` from two depths, clipped to [1, 4]; 1 with one). A unit costs
    what it adds to that curve where it comes in score order: the criterion
    still orders units inside a group, increasingly (so a threshold removes
    a prefix, as ``remove_lowest`` does), and across groups the scale is
    the model's own error at its outputs instead of each group's mean: a
    layer the outputs barely feel gives more, a sensitive one less (the
    first and last layers of an LLM, a stem conv), and the bend stops a
    quiet group from being emptied on a straight-line extrapolation."""
    norm = normalized_scores(p)
    saves = unit_costs(p, kind, latency_inputs)
    curves = {}
    for gid, points in p.sensitivity.items():
        if gid not in norm:
            continue
        (u1, e1), *rest = points
        s1 = max(float(norm[gid][u1].sum()), 1e-30)
        e1 = max(e1, 1e-12)
        gamma = 1.0
        if rest:
            u2, e2 = rest[0]
            s2 = float(norm[gid][u2].sum())
            if s2 > s1 * (1 + 1e-9) and e2 > e1:
                gamma = float(np.clip(np.log(e2 / e1) / np.log(s2 / s1), 1.0, 4.0))
        curves[gid] = (e1 / s1 ** gamma, gamma)
    typical = (float(np.median([a for a, _ in curves.values()])), 1.0) if curves else (1.0, 1.0)
    out = {}
    for g in p.groups:
        a, gamma = curves.get(g.id, typical)  # a group not probed: a typical one
        s = norm[g.id]
        order = np.argsort(s, kind="stable")
        upto = np.cumsum(s[order])                                            # S after each unit, in score order
        added = a * (upto ** gamma - np.concatenate([[0.0], upto[:-1]]) ** gamma)
        cost = np.empty_like(s)
        cost[order] = np.maximum.accumulate(added)  # never decreasing along the order (ties, rounding)
        out[g.id] = cost / saves[g.id]
    return out


def unit_costs(p: Pruner, kind: str | None, latency_inputs: tuple | None = None) -> dict[int, np.ndarray]:
    """{group id: what removing each unit saves} in the budget's currency: FLOPs, parameters,
    or for a latency budget milliseconds from the latency table timed on this device
    (``latency_table.unit_ms``: depthwise convolutions, activations and norms cost time
    their FLOPs do not show), kept on ``p`` per pipeline and input shapes. A model called
    with keyword inputs, or whose latency barely moves with its widths (the table's
    ``elastic`` share under ``latency_table.ELASTIC``), is costed in FLOPs."""
    from .auto import unit_cost

    if kind == "latency":
        from .latency_table import table_for, unit_ms

        table = table_for(p, latency_inputs)
        if table is not None and table.trusted:
            return unit_ms(p, latency_inputs, table)
    return {g.id: unit_cost(g, p.gm, kind) for g in p.groups}


def uniform_scores(p: Pruner, kind: str | None = None) -> dict[int, np.ndarray]:
    """Each unit's rank within its group as a fraction of the group (the lowest-scoring
    of ``n`` is ``1/n``): one threshold then takes the same fraction from every group,
    the criterion only choosing which units. The classic uniform baseline (Liu et al.
    2019, "Rethinking the value of network pruning"), a user's choice, never ``auto``'s:
    after the task suite's fine-tune (``bench/auto_oracle.py``) it is within 0.1 point
    of the best rule on the residual digits CNN, where measured allocation fine-tunes
    0.2 to 0.5 point worse, but 1 to 4 points behind the best measured candidate on
    the depthwise MobileNet."""
    out = {}
    for gid, v in normalized_scores(p).items():
        rank = np.empty(len(v))
        rank[np.argsort(v, kind="stable")] = np.arange(1, len(v) + 1)
        out[gid] = rank / max(len(v), 1)
    return out


RULES = {"score": normalized_scores, "per_param": per_param_scores, "measured": measured_scores,
         "uniform": uniform_scores}


def allocate(p: Pruner, kind: str, target: float, constraints: Constraints, rule="score", **meter_kw) -> tuple[dict, float]:
    """The allocation that removes least while keeping cost <= target (a fraction).
    ``rule`` (a key of ``RULES``) ranks units across groups: by normalised score, per
    parameter, by measured output error per unit of budget, or by rank within the group;
    or it is a function ``(p, kind) -> {group id: scores}`` of the caller's (``search``)."""
    if not 0 < target <= 1:
        raise GraphpruneError(f"target_{kind} must be a fraction in (0, 1], got {target!r}")
    if constraints.min_keep > 0:
        try:
            return _allocate(p, kind, target, constraints, rule, **meter_kw)
        except Unreachable:
            constraints = replace(constraints, min_keep=0.0)  # the floor yields to the budget
    try:
        return _allocate(p, kind, target, constraints, rule, **meter_kw)
    except Unreachable as e:
        if not p.groups:
            kept = (f" left: the self-check kept all {len(p.unsafe)} whole (its pruned results differed from the "
                    "original with the removed channels zeroed; the warnings and report.verify.blocked of a "
                    "compile with ratio= say where)") if p.unsafe else ""
            raise Unreachable(f"target_{kind}={target} cannot be reached: the model has no prunable group"
                              f"{kept}{'' if kept else blocked_hint(p)}") from None
        narrow = [g for g in p.groups if g.one_multiple_wide(constraints.round_to)]
        if narrow:  # a group one multiple wide keeps every channel: round_to, not the model, holds it
            e = Unreachable(f"{e}. round_to={constraints.round_to} keeps {len(narrow)} of {len(p.groups)} prunable group(s) "
                            f"whole, no wider than one multiple (first: {narrow[0].describe()[:120]})")
        raise Unreachable(f"{e}{blocked_hint(p)}") from None


def blocked_hint(p: Pruner) -> str:
    """What in the model holds its channels, for a message: without it, a budget that
    ops without a rule put out of reach was blamed on min_width, round_to and ignore.
    The blocked groups that hold the most weights come first (``Analysis.holding``)."""
    held = [h for h in p.analysis.holding() if h[0] > 0]
    if held:
        parts = list(dict.fromkeys(  # one op holding several groups alike is named once (it was 3 times)
            f"{'; '.join(reasons[:2])}{'; ...' if len(reasons) > 2 else ''} "
            f"(touches {share:.0%} of the weights: {', '.join(params[:2])}{', ...' if len(params) > 2 else ''})"
            for share, reasons, params in held))
        return (f". What holds channels out of pruning, by the weights it touches: {' | '.join(parts[:3])}"
                f"{' | ...' if len(parts) > 3 else ''}; analyze(model, inputs).summary() lists all of it")
    why = p.analysis.unsupported
    if not why:
        return ""
    head = "; ".join(why[:3]) + ("; ..." if len(why) > 3 else "")
    return (f". {len(why)} op(s) without a coupling rule hold the channels they touch ({head}); "
            "analyze(model, inputs).summary() lists them")


def _allocate(p: Pruner, kind: str, target: float, constraints: Constraints, rule="score", **meter_kw) -> tuple[dict, float]:
    meter = Meter(p, kind, **meter_kw)
    if callable(rule):  # scores of the caller's own (``search`` weighs each group's)
        norm = rule(p, kind)
    else:
        norm = RULES[rule](p, kind) if rule != "measured" else measured_scores(p, kind, meter_kw.get("latency_inputs"))
    if kind != "params":  # a token goes through top-k experts however many there are: fewer save no compute
        norm.update({g.id: np.full(g.n_units, np.inf) for g in p.groups if g.fills})
    norm = untied(norm)
    taus = np.unique(np.concatenate([v for v in norm.values()] + [np.zeros(1)]))
    taus = np.append(taus, np.inf)
    removals: dict[int, dict] = {}  # threshold index -> removal (computed once; a latency's value is re-read)
    cache: dict[int, float] = {}
    readings = Readings(meter) if kind == "latency" else None

    def removal(i: int) -> dict:
        if i not in removals:
            removals[i] = constraints.removal(p, norm, float(taus[i]))
        return removals[i]

    def cost(i: int) -> tuple[dict, float]:
        removed = removal(i)
        if readings is not None:  # a timing: pooled over every threshold that builds the same model
            return removed, readings(removed)
        if i not in cache:
            cache[i] = meter(removed)
        return removed, cache[i]

    if kind == "latency":  # one search, settled on pooled readings (a second search would time other models)
        guess = _guess(p, meter_kw.get("latency_inputs"), removal)
        best = _landed(readings, cost, len(taus), target, guess=guess)
        _warn_near_floor(target, cost(len(taus) - 1)[1], best[1])
        return best

    def search() -> tuple[dict, float]:
        lo, hi = _bisect(cost, len(taus), target, kind)
        best = cost(hi)
        if meter.exact_params and best[0] and meter._built_for_real(best[0]) / meter.base > target:
            meter.exact_params = False  # the plan's count disagreed with the model: measure every candidate for real
            meter.base = meter._built({})
            cache.clear()
            lo, hi = _bisect(cost, len(taus), target, kind)
            best = cost(hi)
        if rule != "uniform":  # one fraction everywhere is the point of uniform
            rounded = constraints.round_to > 1  # whole multiples: the groups of the step that overshot are pinned
            filled = _fill_gap(p, removal, meter, lo, hi, len(taus), target, best, pin=rounded)
            if target - filled[1] > FILL_TOL:  # every finer unit past the threshold overshot too: units below it go
                # back, a bundle at a time (a search's candidate with one group at its floor landed at 0.465 for 0.5,
                # survey 26); rounded, from the threshold's landing too, where the greedy fill may go further
                starts = (filled, best) if rounded and filled is not best else (filled,)
                filled = max((_fill_rounded(p, norm, meter, constraints, target, b) for b in starts), key=lambda b: b[1])
            best = filled
        return best

    best = search()
    if not meter.confirmed(best[0]):  # the plan's FLOPs of the answer are not the built model's: again, every count built
        cache.clear()
        best = search()
    return best


def overrides_ceiling(p: Pruner, kind: str, overrides: dict, round_to: int = 1) -> float:
    """The most of the original's FLOPs or parameters a budget can keep when ``overrides``
    fix some groups' ratios (their widths rounded to ``round_to`` too): every other group whole.
    A target above it lands here, under its target by what the overrides take (compile says so)."""
    removed = Constraints(round_to=round_to, overrides=overrides, min_keep=0.0)._bounded(p, {g.id: 0 for g in p.groups})
    return Meter(p, kind)(removed)


def steps_back(p: Pruner, kind: str, removed: dict, round_to: int = 1, overrides: dict | None = None) -> list[tuple]:
    """[(landing, group, units)]: for each pruned group the ``overrides`` leave free, where ``removed``
    lands with that group's smallest step given back (a multiple of ``round_to``; a balanced bundle
    where it shrinks in step: a key/value head with its queries), and how many units the step holds.
    Where a budget lands far under, these say why: every step overshoots it. A GQA attention at
    ``target_flops=0.85`` landed at 0.75 with nothing said but the report (survey 42)."""
    meter = Meter(p, kind)
    norm = {g.id: np.zeros(g.n_units) for g in p.groups}  # any units: a step's cost is its count's
    out = []
    for g in p.groups:
        if g.id not in removed or (overrides and matching_ratio(g, overrides) is not None):
            continue
        offer = _offer(g, removed, norm, g.unit_multiple(round_to))
        if offer is not None:
            out.append((meter(offer[0]), g, len(removed[g.id]) - len(offer[0].get(g.id, ()))))
    return out


def untied(norm: dict) -> dict:
    """``norm`` with equal scores made unequal, in the order of each unit's rank within its group,
    by less than any gap between distinct scores (which keep their order): thresholds then step
    through tied units a few at a time, the same fraction from every group. Every BatchNorm
    gamma of a freshly built network is 1, so ``bn_scale`` scored every unit alike; the only
    thresholds were "remove nothing" and "remove everything", and resnet18 at target_flops=0.5
    kept 0.017 of its FLOPs (survey 26; so did taylor with a loss whose gradient is zero)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in norm.values()] + [np.zeros(0)])
    distinct = np.unique(finite)
    if len(distinct) == len(finite):
        return norm
    gap = float(np.diff(distinct).min()) if len(distinct) > 1 else max(abs(float(distinct[0])), 1.0)
    out = {}
    for gid, v in norm.items():
        rank = np.argsort(np.argsort(v, kind="stable"), kind="stable") / max(len(v), 1)  # (units,) in [0, 1)
        out[gid] = np.where(np.isfinite(v), v + 0.5 * gap * rank, v)
    return out


def _fill_rounded(p: Pruner, norm: dict, meter: Meter, constraints: Constraints, target: float, best: tuple) -> tuple:
    """``_fill_gap`` for widths rounded to multiples of ``q``: a threshold moves every group by
    whole multiples at once, so the search stopped far under its budget (``round_to=8`` at
    ``target_flops=0.5``: 0.373, where a uniform allocation with the same rounding reached 0.436).
    Here ``q`` removed units at a time go back, the best-scoring removed ones of a group, into
    the group that gets the most score back for the budget they take, while the budget holds
    (a group goes back to full width where fewer than ``q`` are removed). Where every such
    offer overshoots, one group gives back while another takes ``q`` more (``_swap``; a 1-D
    conv net at target_params=0.5, round_to=8 stopped at 0.447 where 0.474 fits). A group that
    shrinks in step (query heads over key/value heads, chunks, multiples) gives back and takes a
    bundle at a time (``_offer_in_step``, ``_take``): it had been left as it was, and a GQA attention at
    round_to=8 kept 3 of 8 query heads a block for a 0.5 budget (0.41) where 4 over 2 key/value heads
    fit (0.49, survey 42 F1). Groups whose ratio ``overrides`` fixes are left as they are (an override
    of 0.5 on resnet18's layer4 came back at 440 of 512 channels)."""
    removed, at = dict(best[0]), best[1]
    fixed = constraints.overrides or {}
    free = [g for g in p.groups if not fixed or matching_ratio(g, fixed) is None]
    for _ in range(SWAP_ROUNDS + 1):
        removed, at = _give_back(free, norm, meter, constraints.round_to, target, removed, at)
        if target - at <= FILL_TOL:
            break
        swapped = _swap(free, norm, meter, constraints, target, removed, at)
        if swapped is None:
            break
        removed, at = swapped
    return (removed, at) if at > best[1] else best


SWAP_ROUNDS = 3  # the rounded fill trades units between two groups at most this many times
GIVE_BACK_DOUBLINGS = 16  # offers taken beyond four a group: a width restored by doubling offers takes its log


def _give_back(free: list, norm: dict, meter: Meter, q: int, target: float, removed: dict, at: float) -> tuple[dict, float]:
    """``_fill_rounded``'s greedy part: the offer that gets the most score back per unit of budget, while one fits.

    Lazily: each group's ratio as last metered stands for it until it comes first, and only then is it metered
    again (an accepted offer makes the others' dearer, never cheaper, so an old ratio is an upper bound). Every
    round metered every group before: a full prune a reading, DenseNet121 at round_to=16 did not finish in 100 s.

    A group's offer doubles each time one is taken and halves when it overshoots, down to one multiple: what a
    group gives back is found in a number of offers that grows with the log of its width. With one unit an offer
    and a few offers a group, a GQA attention whose output projection had lost 32 of 64 channels to a coarse
    head step got 4 back and landed at 0.70 for a 0.85 budget, where the projection whole gives 0.76."""
    # A group leaves for good once it has nothing to give back, or one multiple of it overshoots: giving
    # units back only raises what every later offer costs, so it would overshoot again.
    times = {g.id: 1 for g in free}  # multiples a group offers next
    bound = {g.id: math.inf for g in free if _offer(g, removed, norm, g.unit_multiple(q)) is not None}
    groups = {g.id: g for g in free}
    seen: dict = {}  # group id -> (removal, cost) metered since the last offer taken: its ratio is current
    taken = 0
    while target - at > FILL_TOL and bound and taken < 4 * len(free) + GIVE_BACK_DOUBLINGS:
        gid = max(bound, key=bound.get)  # ties: the first in graph order
        if bound[gid] == -math.inf:
            break
        if gid in seen:  # the best ratio, and a current one: taken
            removed, at = seen[gid]
            seen.clear()
            times[gid] *= 2
            taken += 1
            continue
        offer = _offer(groups[gid], removed, norm, groups[gid].unit_multiple(q), times[gid])
        if offer is None:
            del bound[gid]
            continue
        cand, score = offer
        c = meter(cand)
        if c > target:
            if times[gid] == 1:
                del bound[gid]
            else:
                times[gid] //= 2
            continue
        bound[gid] = score / max(c - at, 1e-12) if c >= at else -math.inf  # units that cost nothing come back first
        seen[gid] = (cand, c)
    return removed, at


def _swap(free: list, norm: dict, meter: Meter, constraints: Constraints, target: float, removed: dict,
          at: float) -> tuple[dict, float] | None:
    """One group's offer that overshoots, paid for by another group giving up as many of its
    lowest-scoring kept multiples as that takes: the pair that lands closest under the budget
    (more score back breaks ties). Each move is metered alone and pairs are ranked by the sum of
    their effects (a multiple's saving taken as linear), so this costs two meter readings per
    group and one per pair tried, not one per pair."""
    q = constraints.round_to
    gives, takes = [], []
    for g in free:
        offer = _offer(g, removed, norm, g.unit_multiple(q))
        if offer is not None:
            c = meter(offer[0])
            if c > target:
                gives.append((g, offer[0][g.id] if g.id in offer[0] else None, offer[1], c - at))
        take = _take(g, removed, norm, constraints)
        if take is not None:
            takes.append((g, at - meter({**removed, g.id: take[0]})))
    pairs = []
    for g, g_gone, g_score, up in gives:
        for h, down in takes:
            if h is g or down <= 0:
                continue
            times = max(1, math.ceil((at + up - target) / down))  # multiples of h that pay for g's offer
            guess = at + up - times * down
            if at + FILL_TOL / 4 < guess <= target:
                pairs.append((guess, g_score, g, g_gone, h, times))
    pairs.sort(key=lambda t: (-t[0], -t[1]))
    for _, _, g, g_gone, h, times in pairs[:SWAP_TRIES]:
        # h's saving was metered at g's width before the give-back; with it, a multiple of h may save more
        # or less: one multiple fewer or more is tried where the guess lands under ``at`` or over the target
        # (a Llama at round_to=8 asked 7 multiples, 0.869 under 0.881, where 6 gave 0.8875, survey 42 F2)
        tried = set()
        while times >= 1 and times not in tried:
            tried.add(times)
            take = _take(h, removed, norm, constraints, times)
            if take is None:
                break
            cand = {k: v for k, v in removed.items() if k != g.id}
            if g_gone is not None:
                cand[g.id] = g_gone
            cand[h.id] = take[0]
            c = meter(cand)
            if at < c <= target:
                return cand, c
            times += 1 if c > target else -1
    return None


SWAP_TRIES = 8  # pairs metered per swap, best guesses first


def _take(g, removed: dict, norm: dict, constraints: Constraints, times: int = 1) -> tuple[np.ndarray, float] | None:
    """``g``'s removal with its kept width ``times`` multiples lower (its lowest-scoring kept units), and
    the score that costs; None where its floor (``min_width``, ``min_keep``, the multiple) or its
    branches (each keeps its own multiple) forbid it. A group that shrinks in step takes ``times``
    bundles more: the next larger balanced removals (``_offer_in_step``'s other way)."""
    if len(g.branches) > 1:
        return None
    gone = removed.get(g.id, np.zeros(0, dtype=np.int64))
    keep = g.n_units - len(gone)
    q = g.unit_multiple(constraints.round_to)
    floor = max(g.unit_floor(constraints.min_width), math.ceil(constraints.min_keep * g.n_units), q, g.min_units, 1)
    if g.in_step:
        units = gone
        for _ in range(times):
            units = _next_balanced(g, norm, units, q, more=True, min_keep=constraints.min_keep)
            if units is None or g.n_units - len(units) < floor:
                return None
        return units, float(norm[g.id][units].sum() - norm[g.id][gone].sum())
    new = keep - (keep % q or q) - (times - 1) * q
    if new < floor:
        return None
    kept = np.setdiff1d(np.arange(g.n_units), gone)
    more = kept[np.argsort(norm[g.id][kept], kind="stable")[:keep - new]]
    return np.union1d(gone, more), float(norm[g.id][more].sum())


def _offer(g, removed: dict, norm: dict, q: int, times: int = 1) -> tuple[dict, float] | None:
    """The removal with ``times`` multiples of ``q`` of ``g``'s removed units back (the best-scoring
    ones of one branch; all of that branch's where fewer are removed), and their score; None where
    it has none to give in whole multiples."""
    gone = removed.get(g.id)
    if gone is None or not len(gone):
        return None
    if g.in_step:
        return _offer_in_step(g, removed, norm, q)
    best = None
    for units in g.branches:  # a concatenation's branches each keep their multiple (``_per_branch``)
        out = np.intersect1d(gone, units)
        back = min(q * times, len(out)) if len(out) <= q * times or (len(units) - len(out)) % q == 0 else 0
        if not back:
            continue
        order = out[np.argsort(-norm[g.id][out], kind="stable")]
        score = float(norm[g.id][order[:back]].sum())
        if best is None or score > best[0]:
            best = (score, order[:back])
    if best is None:
        return None
    rest = np.setdiff1d(gone, best[1])
    cand = {**removed, g.id: rest} if len(rest) else {k: v for k, v in removed.items() if k != g.id}
    return cand, best[0]


def _offer_in_step(g, removed: dict, norm: dict, q: int) -> tuple[dict, float] | None:
    """``_offer`` for a group that shrinks in step: its removal one bundle lighter, the largest balanced
    removal (``remove_lowest``: query heads over key/value heads, a chunk's parts, multiples) of fewer
    units than it removes now whose kept count is a multiple of ``q`` (or none at all), and the score
    that comes back. Which units go may change (three query heads over three key/value heads become
    four over two)."""
    gone = removed[g.id]
    units = _next_balanced(g, norm, gone, q, more=False)
    if units is None:
        return None
    back = float(norm[g.id][gone].sum() - norm[g.id][units].sum())
    cand = {**removed, g.id: units} if len(units) else {k: v for k, v in removed.items() if k != g.id}
    return cand, max(back, 0.0)


def _next_balanced(g, norm: dict, gone: np.ndarray, q: int, *, more: bool, min_keep: float = 0.0) -> np.ndarray | None:
    """For a group that shrinks in step: the balanced removal (``remove_lowest``) next to ``gone``, the
    smallest that removes more units (``more``) or the largest that removes fewer, whose kept count is a
    multiple of ``q`` (going down, removing none is one too); None where there is none. ``_take`` and
    ``_offer_in_step`` step up and down the same ladder."""
    ks = range(len(gone) + 1, g.n_units + 1) if more else range(len(gone) - 1, -1, -1)
    for k in ks:
        units = remove_lowest(g, norm[g.id], k, min_keep) if k else np.zeros(0, dtype=np.int64)
        if (len(units) > len(gone) if more else len(units) < len(gone)) and (
                not len(units) or (g.n_units - len(units)) % q == 0):
            return units
    return None


FILL_TOL = 0.01  # a budget search that lands further under its target than this steps over the unit that overshot
FILL_ROUNDS = 6  # ... at most this many times (each a bisection of its own; it stops once within FILL_TOL)


def _fill_gap(p: Pruner, removal, meter: Meter, lo: int | None, hi: int, n: int, target: float, best: tuple,
              pin: bool = False) -> tuple:
    """Land closer under the budget when one coarse unit overshoots it.

    The thresholds remove units in one order, so the step that crosses the budget
    removes whatever unit comes next, however large: on the task suite's two-block
    ViT an attention head is a sixth of a block's FLOPs, and a 50% budget landed at
    0.44 (seed 3), a twelfth of the budget unused. Where the landing is more than
    ``FILL_TOL`` under the target, the units of that last step are kept and the
    search goes on along the same order without them (finer units further on take
    their place), up to ``FILL_ROUNDS`` times (a round whose landing overshoots again,
    on the next coarse unit along the order, keeps that unit too and goes on); the
    result is the candidate that keeps the most within the budget. A group that must shrink in step (query heads
    over key/value heads, equal chunks, multiples) cannot keep part of a step, which would unbalance it: it stays
    as the threshold before the step left it, a removal that kept it balanced, at every threshold on. Ending
    the search there had landed a GQA attention at 0.70 for a 0.9 budget, one key/value head and its queries
    gone, where its output projection alone could give the rest. With ``pin`` (widths in multiples of
    ``round_to``) every group of the step stays so, as part of a multiple would break it."""
    if lo is None:
        return best
    kept: dict[int, np.ndarray] = {}  # units a threshold reached but the search keeps
    pinned: dict[int, np.ndarray] = {}  # groups that shrink in step: the removal they keep at every threshold on
    groups = {g.id: g for g in p.groups}

    def without(i: int) -> dict:
        out = {}
        for gid, units in removal(i).items():
            left = units[~np.isin(units, kept[gid])] if gid in kept else units
            if len(left) and gid not in pinned:
                out[gid] = left
        out.update({gid: units for gid, units in pinned.items() if len(units)})
        return out

    below, above, at = hi, lo, best  # ``at``: where the last round landed; ``best``: the closest landing so far
    for _ in range(FILL_ROUNDS):
        if target - best[1] <= FILL_TOL:
            break
        over = without(above)
        step = {gid: np.setdiff1d(u, over.get(gid, [])) for gid, u in at[0].items()}
        step = {gid: u for gid, u in step.items() if len(u)}
        if not step:
            break
        for gid, u in step.items():
            if groups[gid].in_step or pin:
                pinned[gid] = over.get(gid, np.zeros(0, dtype=np.int64))  # as the threshold before the step left it
            else:
                kept[gid] = np.union1d(kept.get(gid, np.zeros(0, dtype=np.int64)), u)
        a, b, c, jump = below, None, None, 1
        while b is None:  # galloping from ``below``: what fits again is mostly a few thresholds on
            m = min(below + jump, n - 1)                      # (fastvit_t8: about 100 candidate builds, 6 minutes,
            cm = meter(without(m))                            # when every round bisected all the way to the end)
            if cm <= target:
                b, c = m, cm
            elif m == n - 1:
                break
            else:
                a, jump = m, 2 * jump
        if b is None:
            break
        while b - a > 1:                                      # the first threshold past ``below`` that fits again
            m = (a + b) // 2
            cm = meter(without(m))
            a, b, c = (a, m, cm) if cm <= target else (m, b, c)
        at, below, above = (without(b), c), b, a
        if c > best[1]:
            best = at
        # else: the next coarse unit along the order overshot too (a second residual-stream
        # channel); the next round keeps it as well and goes on from here
    return best


GUIDED = True  # latency searches interpolate on the latency table's estimate (bench/budgets.py turns it off to compare)


def _guess(p: Pruner, latency_inputs, removal):
    """``guess(i)`` for ``_bisect``: the latency ratio the table (``latency_table.table_for``)
    estimates for threshold index ``i`` (``removal(i)``, the search's own cached removal),
    or None where there is no table to trust."""
    from .latency_table import predict_ms, table_for

    table = table_for(p, latency_inputs) if GUIDED else None
    if table is None or not table.trusted:
        return None
    full = predict_ms(p, {}, table)
    known: dict[int, float] = {}

    def guess(i: int) -> float:
        if i not in known:
            known[i] = predict_ms(p, removal(i), table) / full
        return known[i]
    return guess


class Readings:
    """Latency ratios pooled per candidate model. Thresholds that build the same model
    (widths rounded to a multiple make runs of them) share one pool, so the bisection
    sees one value per model instead of a fresh draw at every step: on the 2-core
    machine nine readings of one ResNet-50 candidate spread from 0.26 to 0.35, and a
    bisection over independent draws is steered by whichever came first. A pool's
    value is its median (interference only ever adds time, in bursts)."""

    def __init__(self, meter: "Meter"):
        self.meter = meter
        self.pools: dict[tuple, list[float]] = {}

    @staticmethod
    def key(removed: dict) -> tuple:
        return tuple(sorted((gid, len(units)) for gid, units in removed.items() if len(units)))

    def add(self, removed: dict) -> float:
        """One more timing of ``removed``; returns the pool's value."""
        self.pools.setdefault(self.key(removed), []).append(self.meter(removed))
        return self(removed)

    def count(self, removed: dict) -> int:
        return len(self.pools.get(self.key(removed), ()))

    def __call__(self, removed: dict) -> float:
        pool = self.pools.get(self.key(removed))
        if not pool:
            return self.add(removed)
        return float(np.median(pool))


FLOOR_MARGIN = 0.8  # a latency target under floor / 0.8 lands on the flat stretch of the curve


def _warn_near_floor(target: float, floor: float, got: float) -> None:
    """Latency does not fall with FLOPs all the way: memory-bound work (depthwise
    convolutions, activations, layout reorders) and per-op overhead stay. Near
    that floor the latency curve is flat, so the bisection's choice swings with a
    few percent of timing noise, and what meets the target may have removed most
    of the model (bench/deploy_speed.py: MobileNetV2 at 0.3 of its latency kept
    1/94 of its FLOPs). Say so rather than return such a model silently."""
    if floor > FLOOR_MARGIN * target:
        warnings.warn(GraphpruneWarning(
            f"target_latency={target} is near this model's latency floor on this device: every group at its minimum "
            f"width still takes {floor:.3f} of the original's time (chosen: {got:.3f}). Widths this close to the floor "
            "are chosen by timing noise and may remove far more than the latency gained suggests; check "
            "result.report.flops, or prefer a target above the floor / 0.8 or a FLOPs budget"), stacklevel=user_level())


SETTLED = 3  # readings of each of the final pair: a median of three outvotes one lucky or unlucky reading


def _landed(readings: Readings, cost, n: int, target: float, rounds: int = 4, guess=None) -> tuple:
    """Settle a latency search on more than one reading per model. The search ends
    on a pair, ``lo`` read above the target and ``hi`` at or below it (within
    ``LAND_TOL``, or its neighbour), each on as few as one timing. Time both again
    (their pools grow) and search again over the pooled values, until the pair stays the same: a candidate
    accepted or rejected on one lucky or unlucky reading is revisited from both
    sides (until each of the pair holds ``SETTLED`` readings), so the result lands near the target rather than wherever the first
    misreading sent it (re-timing only the choice, and aiming lower while it
    read high, gave ResNet-50 a model timed at 0.223 for a target of 0.3).
    Where ``hi`` reads within ``LAND_TOL`` under the target, ``lo`` no longer matters
    (the search would stop at ``hi`` whatever ``lo`` read): only ``hi`` is re-timed.
    Returns ``hi``'s (removal, pooled latency)."""
    def unsettled(lo, hi) -> set:
        close = LAND_TOL > 0 and cost(hi)[1] >= target * (1 - LAND_TOL)
        return ({hi} if close else {lo, hi}) - {None}

    seen: set = set()
    lo, hi = _bisect(cost, n, target, "latency", seen, guess)
    for _ in range(rounds):
        for i in unsettled(lo, hi):
            readings.add(cost(i)[0])
        pair = _bisect(cost, n, target, "latency", seen, guess)
        if pair == (lo, hi) and all(readings.count(cost(i)[0]) >= SETTLED for i in unsettled(lo, hi)):
            break
        lo, hi = pair
    return cost(hi)


LAND_TOL = 0.03  # a latency search stops at a candidate timed within 3% under its target: closer is timing noise


def _bisect(cost, n: int, target: float, kind: str, seen: set | None = None, guess=None) -> tuple[int | None, int]:
    """(lo, hi): ``hi`` the threshold index that removes least while cost <= target, ``lo``
    the one before it (None where nothing needs removing).

    FLOPs and parameters are counted exactly and cheaply: plain bisection to neighbouring
    thresholds. A latency reading costs seconds to minutes (ViT-B/16 at batch 8 on two
    cores: about 40 s, the original timed beside every candidate), and two neighbouring
    thresholds differ by one unit, far below the few percent two readings of one model
    differ by. So a latency search interpolates (regula falsi on the threshold index,
    aimed ``LAND_TOL / 2`` under the target, Illinois-weighted so that a curve bent
    like a latency floor is not approached from one side forever; after two steps in
    a row that do not halve the bracket, one halving step, so at worst it takes three
    times bisection's steps) and stops once
    ``hi`` reads within ``LAND_TOL`` of the target. ``lo`` is then not always ``hi``'s
    neighbour; ``_landed`` re-times both either way.

    ``seen`` (indices read before, added to as the search reads more) resumes a search:
    it starts from the tightest bracket those readings give now. ``_landed`` re-times
    the final pair and resumes; started afresh instead, an interpolating search whose
    readings moved takes a new path through models never timed, and never settles.

    ``guess(i)`` (a latency budget with a latency table: the ratio ``predict_ms``
    estimates for threshold ``i``, falling as ``i`` grows) is the scale the search
    interpolates on instead of the index: measured latency is close to an affine map of
    the estimate, so its first step goes where the estimate itself meets the target
    (both read 1.0 with nothing removed), and later ones where the line through the
    bracket's two readings, read on that scale, does: near the target in a step or
    two, where on the index the curve bends (ResNet-50's
    latency against the threshold index is a staircase). The invariant and the halving
    fallback are the same, so a wrong guess costs steps, not the result."""
    lo, hi = 0, n - 1
    c_hi = cost(hi)[1]
    if c_hi > target:
        raise Unreachable(
            f"target_{kind}={target} cannot be reached: pruning every group to its minimum width keeps {c_hi:.3f}; "
            "lower min_width/round_to, loosen overrides (their ratios are fixed), remove entries from ignore, or pick a "
            "larger target")
    c_lo = cost(lo)[1]
    if c_lo <= target:
        return None, lo
    seen = set() if seen is None else seen
    if seen:  # noisy readings need not be monotone: the first that fits, and the last over it before
        hi = min([i for i in seen if cost(i)[1] <= target] + [hi])
        lo = max([i for i in seen if i < hi and cost(i)[1] > target] + [lo])
        c_lo, c_hi = cost(lo)[1], cost(hi)[1]
    timed = kind == "latency" and LAND_TOL > 0  # LAND_TOL = 0: bisection to neighbours (bench/budgets.py compares)
    aim, halve = target * (1 - LAND_TOL / 2), not timed
    slow = 0  # interpolations in a row that did not halve the bracket
    w_lo = w_hi = 1.0  # Illinois weights: an end kept twice in a row counts half in the next interpolation
    first = not seen  # a search not resumed: nothing read between the ends yet
    while hi - lo > 1 and not (timed and c_hi >= target * (1 - LAND_TOL)):  # invariant: cost(lo) > target >= cost(hi)
        if halve:
            mid = (lo + hi) // 2
        else:  # where the line through the bracket's two (weighted) readings meets the aim
            a, b = aim + (c_lo - aim) * w_lo, aim - (aim - c_hi) * w_hi
            frac = (a - aim) / max(a - b, 1e-12)
            if guess is None:
                mid = lo + int(round(frac * (hi - lo)))
            else:  # the first step trusts the estimate as it is (both are 1.0 at no removal); then the bracket's line
                mid = _where(guess, lo, hi, aim if first else guess(lo) + frac * (guess(hi) - guess(lo)))
            first = False
            mid = min(max(mid, lo + 1), hi - 1)
        width = hi - lo
        c = cost(mid)[1]
        seen.add(mid)
        if c <= target:
            hi, c_hi, w_hi, w_lo = mid, c, 1.0, w_lo * 0.5
        else:
            lo, c_lo, w_lo, w_hi = mid, c, 1.0, w_hi * 0.5
        slow = 0 if halve or hi - lo <= width // 2 else slow + 1
        halve = not timed or slow == 2
    return lo, hi


def _where(guess, lo: int, hi: int, want: float) -> int:
    """The first index in (lo, hi) whose guess falls to ``want`` (bisection on the guess,
    which falls as the index grows)."""
    a, b = lo, hi  # guess(a) > want >= guess(b), as far as the guess is monotone
    while b - a > 1:
        m = (a + b) // 2
        if guess(m) > want:
            a = m
        else:
            b = m
    return b


def report(p: Pruner, removed: dict, model: torch.nn.Module, budget: dict, latency_inputs=None) -> Report:
    x, kw = p.example_inputs, p.example_kwargs
    if on_meta(p.model):
        x, kw = to_meta(x), to_meta(kw)  # weights on meta, inputs given on the CPU: count on shapes alone
    lat = None
    if "latency" in budget:
        lat = latency_ratio(model, p.model, latency_inputs or x, **({"example_kwargs": kw} if kw and not latency_inputs else {}))
    return Report(
        widths={g.id: (g.n_units, g.n_units - len(removed.get(g.id, ()))) for g in p.groups},
        flops=count_flops(model, x, kw) / count_flops(p.model, x, kw),
        params=params_read(p, model) / original_params(p),
        latency=lat,
        budget=budget,
    )


def light_report(p: Pruner, removed: dict) -> Report:
    """The widths only (a ratio compile measures no cost)."""
    return Report(widths={g.id: (g.n_units, g.n_units - len(removed.get(g.id, ()))) for g in p.analysis.groups},
                  flops=None, params=None)
