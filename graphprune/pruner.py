"""Trace and analyze once, then prune as often as a search or a budget needs.

``Pruner`` holds the traced graph, its groups and the unit scores; every
``prune(removed)`` emits a fresh smaller module (through the pass pipeline)
and never touches the user's model. ``compile``, the budget allocator,
``sensitivity`` and ``search`` are all built on it.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._pytree import tree_map

from .batches import read_batches, with_targets
from .modes import Snapshot, copy_modes, mixed
from . import importance as _importance
from . import reconstruct as _reconstruct
from . import verify as _verify
from .effects import mutates
from .errors import GraphpruneError, first_line
from .groups import Analysis, Group, analyze_graph
from .meta_keys import PLAN, PYTHON_STATE
from .pass_manager import check_graph, format_pipeline, parse_pipeline, run_pipeline
from .trace import shadow, trace, unwrapped

DEFAULT_PIPELINE = "shrink-params,dce"


def check_ignore(model: torch.nn.Module, ignore) -> list[str]:
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]  # one module, not its characters (search, sensitivity and GroupLasso took those)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, str) and _has_submodule(model, item):
            out.append(item)
        elif isinstance(item, torch.nn.Module) and id(item) in names:
            out.append(names[id(item)])
        else:
            raise GraphpruneError(f"ignore entry {item!r} is not a submodule of {type(model).__name__}; pass a name from model.named_modules() or the module itself")
    return out


def _has_submodule(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def remove_lowest(g: Group, score: np.ndarray, k: int, min_keep: float = 0.0) -> np.ndarray:
    """The k lowest-scoring units of ``g``, skipping any whose removal would
    leave a member dim empty (a DenseNet layer whose every new channel scored
    low keeps one), or under ``min_keep`` of its entries (a budget's floor,
    ``allocate.MIN_KEEP``: a concatenated branch is a member of its concat's group
    and would otherwise go to one channel), never more than leaves ``g.min_units``, and fewer where the kept
    count must be a multiple of ``g.multiple``."""
    k = max(0, min(k, g.n_units - g.min_units))
    keep = g.n_units - k
    if g.multiple > 1 and keep % g.multiple:
        k = g.n_units - min(g.n_units, keep + g.multiple - keep % g.multiple)
    if g.part_of is not None:
        return remove_balanced(g, score, k)
    order = np.argsort(score, kind="stable")
    counts = np.stack([np.bincount(u, minlength=g.n_units) for u in g.dims.values()])  # (dims, units)
    need = np.maximum(1, np.ceil(min_keep * counts.sum(1)))                              # (dims,)
    if g.even is not None:
        return remove_even(g, score, k, counts, need)
    if (counts.sum(1) - counts[:, order[:k]].sum(1) >= need).all():
        return order[:k]
    left = counts.sum(1)
    out = []
    for u in order:
        if len(out) == k:
            break
        if (left - counts[:, u] >= need).all():
            left -= counts[:, u]
            out.append(u)
    return np.array(out, dtype=np.int64)


def remove_even(g: Group, score: np.ndarray, k: int, counts: np.ndarray, need: np.ndarray) -> np.ndarray:
    """At most k units of a group whose dims a ``chunk`` splits into equal parts (``g.even``):
    units outside the parts one at a time, those inside in bundles of the j-th lowest of every
    part (j = 0, 1, ...), so the parts stay equal. Items go cheapest first by their mean score
    (a bundle's grows with j, as every part is sorted), each only while every member dim
    keeps ``need`` entries and every part keeps one unit."""
    free = np.flatnonzero(g.even < 0)
    parts = [u[np.argsort(score[u], kind="stable")] for u in (np.flatnonzero(g.even == p) for p in range(g.even.max() + 1))]
    bundles = [np.array([u[j] for u in parts]) for j in range(len(parts[0]) - 1)]   # the last of each part stays
    items = [np.array([u]) for u in free] + bundles
    order = sorted(range(len(items)), key=lambda i: float(score[items[i]].mean()))     # stable: free units first on ties
    left, out, taken = counts.sum(1), [], 0
    next_bundle = len(free)  # bundles only in their own order: j before j + 1
    for i in order:
        if i >= len(free) and i != next_bundle:
            continue
        unit = items[i]
        if taken + len(unit) > k:
            continue
        gone = counts[:, unit].sum(1)
        if (left - gone >= need).all():
            left, taken = left - gone, taken + len(unit)
            out.extend(unit.tolist())
            next_bundle += i >= len(free)
        elif i >= len(free):
            next_bundle = -1  # a bundle that does not fit: none after it either
    return np.sort(np.array(out, dtype=np.int64))


def remove_balanced(g: Group, score: np.ndarray, k: int) -> np.ndarray:
    """At most k units of a partitioned group (query heads over key/value heads):
    ``whole`` partitions entirely and the ``m`` lowest of every other one, so
    every kept partition keeps as many. Of the splits that remove the most
    units up to k, the one that removes the least score."""
    parts = [np.flatnonzero(g.part_of == p) for p in range(g.n_parts)]
    parts = [u[np.argsort(score[u], kind="stable")] for u in parts]    # lowest first in each
    r = len(parts[0])
    cum = np.stack([np.concatenate([[0.0], np.cumsum(score[u])]) for u in parts])  # (P, r + 1)
    best = None
    for whole in range(len(parts)):                                      # never all of them
        m = (k - whole * r) // (len(parts) - whole) if k >= whole * r else -1
        if m < 0:
            break
        m = min(m, r - 1)
        extra = cum[:, r] - cum[:, m]                                    # cost of going whole instead of m
        gone_whole = np.argsort(extra, kind="stable")[:whole]
        cost = cum[:, m].sum() + extra[gone_whole].sum()
        count = whole * r + (len(parts) - whole) * m
        if best is None or (count, -cost) > (best[0], -best[1]):
            best = (count, cost, set(gone_whole.tolist()), m)
    count, _, whole_set, m = best
    out = [u if i in whole_set else u[:m] for i, u in enumerate(parts)]
    return np.sort(np.concatenate(out)).astype(np.int64)


def make_plan(groups: list[Group], removed: dict[int, np.ndarray]) -> dict:
    """(value_key, axis) -> kept indices, for every dim that shrinks."""
    plan = {}
    for g in groups:
        if g.id not in removed or len(removed[g.id]) == 0:
            continue
        gone = np.zeros(g.n_units, dtype=bool)
        gone[removed[g.id]] = True
        if g.n_units - gone.sum() < g.min_units:
            raise GraphpruneError(f"group {g.id}: a removal must keep at least {g.min_units} units (a topk chooses that "
                                  f"many of them), not {g.n_units - gone.sum()}; use remove_lowest")
        for dim, unit_of in g.dims.items():
            plan[dim] = np.flatnonzero(~gone[unit_of])
        if g.part_of is not None:
            kept_per_part = np.bincount(g.part_of[~gone], minlength=g.n_parts)   # (partitions,)
            alive = kept_per_part > 0
            if len(set(kept_per_part[alive].tolist())) != 1:
                raise GraphpruneError(f"group {g.id}: a removal must keep as many query heads over every kept key/value "
                                      f"head (kept {kept_per_part.tolist()}); use remove_balanced")
            for dim, part_of in g.shared.items():
                if not alive.all():
                    plan[dim] = np.flatnonzero(alive[part_of])
            for dim, r in g.replicas.items():
                if kept_per_part[alive][0] != r:
                    plan[dim] = np.arange(kept_per_part[alive][0])
    return plan


def _checked_scores(raw, g, importance) -> np.ndarray:
    """A criterion's scores for group ``g``: one finite number per unit. A registered criterion
    that returned None or the wrong length was taken as given, and ``ratio=0.5`` removed one
    to three units per group, silently."""
    name = getattr(importance, "__name__", importance)
    try:
        s = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GraphpruneError(f"importance {name!r} returned {type(raw).__name__} for a group of {g.n_units} units; a "
                              f"criterion returns one score per unit, a 1-D tensor or array of {g.n_units} finite numbers") from e
    if s.shape == (g.n_units,) and importance in _importance.BUILTIN:
        return np.nan_to_num(s, nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)  # 0/0 of a dead unit: lowest
    if s.shape != (g.n_units,) or not np.isfinite(s).all():
        what = f"shape {s.shape}" if s.shape != (g.n_units,) else f"{int((~np.isfinite(s)).sum())} non-finite scores"
        raise GraphpruneError(f"importance {name!r} returned {what} for a group of {g.n_units} units; a criterion returns "
                              f"one finite score per unit (shape ({g.n_units},))")
    return s


@dataclass
class Pruner:
    """A traced model, its groups and their unit scores."""

    model: torch.nn.Module
    example_inputs: tuple
    example_kwargs: dict | None = None
    ignore: tuple = ()
    importance: object = "l2"
    calibration: object = None
    loss_fn: object = None
    pipeline: str | None = None
    reconstruct: bool = False
    check_trace: bool = False  # compare the traced graph with the model first (needs real weights)
    method: str = "auto"  # tracer: "auto" (symbolic_trace, else export), "symbolic_trace" or "export"
    free_reads: bool = False  # output="graph": widths read off a stream that stays free the heads merged into them (groups.py)
    analysis: Analysis = field(init=False)
    scores: dict = field(init=False)
    unsafe: set = field(init=False, default_factory=set)  # group ids kept whole after failing the self-check
    runtime_checked: bool = field(init=False, default=False)  # set by verify: results are checked by running them
    param_writes: bool = field(init=False, default=True)  # does forward write to its parameters? (check_trace finds out)
    wrong_sizes: str | None = field(init=False, default=None)  # batch sizes the code tests where the trace differs from it
    sensitivity: dict = field(init=False, default_factory=dict)  # {group id: (units, held-out error)}: auto.probe, for allocation by "measured"
    meta_check: bool | None = field(init=False, default=None)  # whether the meta-tensor check can run (see _meta_checkable)
    latency_tables: dict = field(init=False, default_factory=dict)  # {(pipeline, input shapes): LatencyTable}: latency_table.table_for
    latency_table: dict | None = field(init=False, default=None)  # what the last table read was (report.latency_table)

    def __post_init__(self):
        # contiguous examples: torch.export guards the strides it saw, and a sliced example (ids[:, :5])
        # made every other batch size fail its guard (stride[0] != size[1]), reported as a batch-1 problem
        self.example_inputs, self.example_kwargs = tree_map(
            lambda t: t.contiguous() if isinstance(t, torch.Tensor) and not _dense(t) else t,
            (self.example_inputs, self.example_kwargs))  # a tensor for a tuple is refused later, by name
        if self.calibration is not None and not isinstance(self.calibration, (list, tuple)):
            self.calibration = read_batches(self.calibration)  # a generator: read more than once
        if self.calibration is not None:  # (x, y) from a DataLoader: the model gets x, loss_fn the pair
            self.calibration = with_targets(self.model, list(self.calibration), _n_positional(self.example_inputs))
        if self.calibration is not None and _empty(self.calibration):
            raise GraphpruneError(
                "calibration holds no batches (an empty list, or a generator an earlier call already used up): the "
                "data-aware criteria would score every unit alike and the choice would be arbitrary. Give batches, or "
                "calibration=None for a criterion that needs no data")
        self.model = unwrapped(self.model)
        self.ignore = tuple(check_ignore(self.model, self.ignore))
        traced = self._faithful_trace() if self.check_trace else trace(self.model, self.example_inputs, self.example_kwargs, method=self.method)
        # calibration batches run through a copy in training mode move its BatchNorm statistics: every build restores them
        self._buffers0 = Snapshot(traced.gm)
        self.analysis = analyze_graph(traced.gm, traced.method, self.ignore, self.free_reads)
        ctx = _importance.ScoreContext(traced.gm, self.analysis.groups, self.calibration, self.loss_fn, self.example_kwargs)
        self._ctx = ctx
        # "auto" starts from weight norms; api.compile swaps in the criterion auto.choose picks
        self.scores = self.score_with("l2" if self.importance == "auto" else self.importance, ctx)
        if self.reconstruct and self.calibration is None:
            raise GraphpruneError("reconstruct=True fits the layers that read pruned channels to calibration data: pass calibration= (an iterable of example input tuples)")

    def score_with(self, importance, ctx=None) -> dict:
        """{group id: unit scores} under ``importance`` (a name or a function)."""
        ctx = ctx or self._ctx
        fn = _importance.get_importance(importance)
        try:
            return {g.id: _checked_scores(fn(g, ctx.tensors, ctx=ctx), g, importance) for g in self.analysis.groups}
        except GraphpruneError:
            raise
        except Exception as e:  # noqa: BLE001 - a batch the model does not take surfaced as a raw conv error
            name = getattr(importance, "__name__", importance)
            if self.calibration is None:
                raise
            raise calibration_failed(self, f"importance {name!r}", e) from e

    def _wrong_at_tested_batches(self, gm) -> str | None:
        """``verify.wrong_at_tested_batches``, on copies of the weights where the forward writes them:
        one that writes only at a size past the example's (``if x.shape[0] > 4: w.data = ...``) is
        stopped by the guard, and every later check then runs on copies (``param_writes``)."""
        args, kwargs = self.example_inputs, dict(self.example_kwargs or {})
        try:
            return _verify.wrong_at_tested_batches(shadow(self.model), gm, args, kwargs, self.param_writes)
        except _verify.ParamWrite:
            self.param_writes = True
            return _verify.wrong_at_tested_batches(shadow(self.model), gm, args, kwargs, True)

    def _faithful_trace(self):
        """A trace that computes what the model computes (ratio 0). Symbolic tracing
        cannot see in-place updates through an alias (``r = h; h += y``); where its
        graph differs from the model, ``torch.export`` (which follows them) is used."""
        args, kwargs = self.example_inputs, dict(self.example_kwargs or {})
        traced = trace(self.model, args, kwargs)
        problem, self.param_writes = _verify.check_trace(shadow(self.model), traced.gm, args, kwargs)
        if problem is None:
            self.wrong_sizes = self._wrong_at_tested_batches(traced.gm)
            if self.wrong_sizes is None or traced.method == "export":
                return traced
            try:  # torch.export answers some questions fx does not (hasattr), and bounds the batch
                exported = trace(self.model, args, kwargs, method="export")
                again, writes = _verify.check_trace(shadow(self.model), exported.gm, args, kwargs)
            except GraphpruneError:
                return traced
            if again is None:
                self.param_writes, traced = writes, exported
                self.wrong_sizes = self._wrong_at_tested_batches(traced.gm)
            return traced
        first = f"{traced.method}: {problem}"
        if traced.method == "symbolic_trace":
            try:
                traced = trace(self.model, args, kwargs, method="export")
                problem, self.param_writes = _verify.check_trace(shadow(self.model), traced.gm, args, kwargs)
            except GraphpruneError as e:
                problem = first_line(e)
            if problem is None:
                self.wrong_sizes = self._wrong_at_tested_batches(traced.gm)
                return traced
        suspects = [n.name for n in traced.gm.graph.nodes if mutates(n) and n.name != "_guards_fn"]  # export's own
        hint = f" In-place ops in the graph: {', '.join(suspects[:8])}." if suspects else ""
        advice = ("make the forward deterministic and free of in-place updates through aliases (write h = h + y "
                  "instead of h += y where h is also used elsewhere), or pass verify=False")
        if "a tracer runs the Python" in first:  # Python state a forward changes each call: traced at one value
            advice = ("keep state that changes from call to call in a buffer (register_buffer, updated in place), which "
                      "a trace computes with, not in a Python attribute, which it reads once; or fix it at the value "
                      "the model will run with before compile")
        elif "not a buffer" in first:  # a tensor outside the buffers: fx ran what the forward does to it once
            advice = ("register a tensor the forward updates as a buffer (register_buffer), not a plain attribute or an "
                      "item of a list or dict: torch.fx takes such a tensor for a constant, and ran what the forward does "
                      "to it once, while tracing")
        elif "on a second call" in first:  # state the first call wrote sends later calls down another path
            advice = ("call the model once before compile, so that what its forward initialises on the first call is "
                      "done and the trace follows the path every later call takes")
        elif "Guard failed" in f"{first} {problem}":  # torch.export fixed how the input sizes relate at the example
            advice = ("torch.export fixed a relation between input sizes at the example's sizes, and the check at another "
                      "batch size broke it: give an example with a batch of 2 or more (a batch of 1 is specialised)")
        raise GraphpruneError(
            f"the traced graph of {type(self.model).__name__} does not compute what the model computes, before anything is "
            f"removed ({first}; then {problem}).{hint} No model was returned: {advice}.")

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.analysis.gm

    @property
    def groups(self) -> list[Group]:
        """The prunable groups, less any the self-check found unsafe."""
        if not self.unsafe:
            return self.analysis.groups
        return [g for g in self.analysis.groups if g.id not in self.unsafe]

    def removal_for_ratio(self, ratio, scope: str = "group") -> dict[int, np.ndarray]:
        """``ratio`` a float (every group) or ``{module pattern: ratio}`` (the groups those modules produce).

        ``scope="group"`` removes that fraction of every group; ``scope="global"``
        removes that fraction of all the units the ratio covers together, the
        lowest-scoring wherever they are, so groups that matter keep more. Raw
        scores are compared: data-driven criteria (taylor, hessian, fisher) estimate
        the change in loss and are comparable across layers as they are."""
        if scope not in ("group", "global"):
            raise GraphpruneError(f"ratio_scope must be 'group' or 'global', got {scope!r}")
        if scope == "global":
            counts = self._global_counts(ratio)
            return {g.id: remove_lowest(g, self.scores[g.id], counts[g.id]) for g in self.groups if counts[g.id] > 0}
        return self.removal_for_group_ratios({g.id: group_ratio(g, ratio) for g in self.groups})

    def removal_for_group_ratios(self, ratios: dict[int, float]) -> dict[int, np.ndarray]:
        """{group id: ratio} -> the round(ratio * n) lowest units of each group (never all)."""
        out = {}
        for g in self.groups:
            k = min(int(round(ratios.get(g.id, 0.0) * g.n_units)), g.n_units - 1)
            if k > 0:
                out[g.id] = remove_lowest(g, self.scores[g.id], k)
        return out

    def _global_counts(self, ratio) -> dict[int, int]:
        """Per group, how many of the lowest-scoring units of all groups with the
        same ratio fall in it; a group that is down to one unit passes its
        share on to the next lowest elsewhere."""
        by_ratio: dict[float, list[Group]] = {}
        for g in self.groups:
            by_ratio.setdefault(group_ratio(g, ratio), []).append(g)
        counts = {g.id: 0 for g in self.groups}
        room = {g.id: g.n_units - 1 for g in self.groups}
        from .allocate import untied

        for r, gs in by_ratio.items():
            # equal scores ranked within their group first (a fresh network's BatchNorm gammas are all 1: the
            # stable sort gave every removal to the first groups in graph order, cut to one channel, survey 28)
            ranked = untied({g.id: self.scores[g.id] for g in gs})
            scores = np.concatenate([ranked[g.id] for g in gs])
            owner = np.concatenate([np.full(g.n_units, g.id) for g in gs])
            left = int(round(r * len(scores)))
            for gid in owner[np.argsort(scores, kind="stable")]:
                if left == 0:
                    break
                if counts[gid] < room[gid]:
                    counts[gid] += 1
                    left -= 1
        return counts

    def _meta_checkable(self) -> bool:
        """Whether the between-pass check (a run on meta tensors) can evaluate this
        graph at all. Symbolic traces passed it while tracing; an exported graph
        is tried once, unpruned, so a failure is never blamed on a pass. Data-dependent
        shapes (boolean masks) cannot run on meta tensors: then the runtime
        self-check (verify) is what checks the result, or nothing comes back."""
        if self.meta_check is None:
            try:
                if self.analysis.method != "symbolic_trace":
                    check_graph(self.gm)
                self.meta_check, self._meta_error = True, None
            except Exception as e:  # noqa: BLE001 - kept for the message below
                self.meta_check, self._meta_error = False, f"{type(e).__name__}: {e}".splitlines()[0]
        if not self.meta_check and not self.runtime_checked:
            raise GraphpruneError(
                f"graphprune cannot check this model's graph on meta tensors, even before anything is removed "
                f"({self._meta_error}); such checks cannot evaluate data-dependent shapes (boolean masks, nonzero). "
                "Pass real weights with verify on (the default): the pruned model is then checked by running it.")
        return self.meta_check

    def refit(self, out: torch.fx.GraphModule, removed: dict) -> dict | None:
        """Refit the layers of ``out`` that read pruned channels (``reconstruct=True``); ``reconstruct.refit``'s record."""
        plan = make_plan(self.groups, removed)
        return _reconstruct.refit(out, self.gm, plan, self._ctx.layers, self._ctx._batches("a refit"))

    def discard(self, candidate: torch.nn.Module) -> None:
        """Free the tensors of a ``candidate`` this Pruner built and nobody keeps (a budget
        search's or the automatic recipe's): a GraphModule is a reference cycle, so its
        weights (a copy of the model's) waited for a full collection, and a ``gc.collect()``
        after each one walked every object of the process (0.2 s a candidate where
        transformers is loaded, 2 s late in the test suite). Module objects the traced graph
        or the user's model hold are left alone; the rest of the cycle is left to the collector."""
        theirs = {id(m) for root in (self.gm, self.model) for m in root.modules()}
        for mod in candidate.modules():
            if id(mod) not in theirs:
                mod._parameters.clear()
                mod._buffers.clear()
                for k in [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]:
                    delattr(mod, k)

    @functools.cached_property
    def _original_record(self) -> dict:
        """What ``save`` holds a fresh original to: its tensor shapes, its modules' classes and settings
        (``module_form.described``), the plain settings of its modules (``settings.settings``, less what
        the forward changed on the example). Read once: the user's model does not change while it is pruned,
        and ``prune`` runs for every candidate ``auto`` and ``search`` build."""
        from .module_form import described
        from .settings import settings

        original = {n: list(t.shape) for n, t in [*self.model.named_parameters(remove_duplicate=False),
                                                     *self.model.named_buffers(remove_duplicate=False)]}
        return {
            "original": original,
            # the tensors the trace made attributes of its graph (a bias kept in a dict: ``_tensor_constant0``),
            # which a later step's trace names alike: ``checkpoint.composed`` takes their pruning as the first's
            "constants": sorted({n.target for n in self.gm.graph.nodes if n.op == "get_attr"} - set(original)),
            "original_modules": described(self.model),  # classes and settings: load refuses another original
            "original_settings": settings(self.model, skip=self.gm.meta.get(PYTHON_STATE) or ()),
        }

    def prune(self, removed: dict[int, np.ndarray], *, check: bool = True, fit: bool = True) -> torch.fx.GraphModule:
        """A new module without the ``removed`` units ({group id: unit ids}).
        ``check=False`` skips the between-pass checks and ``fit=False`` the
        reconstruction (the cost meter's inner loop, where only shapes count)."""
        gm = self.gm
        self._buffers0.restore()  # scoring and judging ran calibration through it (a model in training mode)
        plan = gm.meta[PLAN] = make_plan(self.groups, removed)
        try:
            out, _ = run_pipeline(gm, self.pipeline or DEFAULT_PIPELINE, check=check and self._meta_checkable())
        finally:
            gm.meta.pop(PLAN, None)
        if self.analysis.method == "symbolic_trace":  # a module a pass built (PrunedSelfAttention, built in training
            copy_modes(out, gm)  # mode) takes the mode of the one it replaced: its attention dropout ran in eval
        _own_storage(out, self.model)
        if self.reconstruct and fit:
            self.refit(out, removed)
        out.meta["graphprune"] = {
            "method": self.analysis.method,
            "free_reads": self.free_reads,
            "widths": {g.id: (g.n_units, g.n_units - len(removed.get(g.id, ()))) for g in self.groups},
            "unsupported": self.analysis.unsupported,
            # what graphprune.save records to rebuild this model onto a fresh original
            "kept": {(k, a): v for (k, a), v in plan.items() if isinstance(k, str)},
            "source": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "example": (self.example_inputs, self.example_kwargs),
            "ignore": list(self.ignore),
            **self._original_record,
            # the passes by name, not "deploy": a checkpoint replays what ran, whatever "deploy" comes to mean
            "pipeline": format_pipeline(parse_pipeline(self.pipeline or DEFAULT_PIPELINE)),
            "training": bool(self.model.training),  # an exported graph keeps the mode it was traced in
            "built_modes": mixed(self.model),  # modules in the other mode (a frozen BatchNorm, which fold-bn folds)
        }
        from .module_form import info

        before = info(self.model)
        if before is not None and "kept" in before and "original" in before:  # a graphprune result, pruned again
            from .hf import is_hf

            from .checkpoint import composed

            out.meta["graphprune"] = composed(out.meta["graphprune"], before,
                                              folded=before.get("form") == "module" and is_hf(self.model))
        return out


def _empty(batches) -> bool:
    """Whether ``batches`` says it holds none (a DataLoader over a stream has ``__len__`` and raises)."""
    try:
        return len(batches) == 0
    except TypeError:
        return False


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in some memory format (a channels-last image is the user's choice, kept)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.is_contiguous() or (t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()]))


def _own_storage(out: torch.nn.Module, model: torch.nn.Module) -> None:
    """No tensor of the result may share memory with the user's model (fine-tuning
    the result must never change the original): copy any that do."""
    theirs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    copies: dict = {}  # tied tensors stay tied
    for mod in out.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None and not t.is_meta and t.untyped_storage().data_ptr() in theirs:
                    if id(t) not in copies:
                        data = t.detach().clone()
                        copies[id(t)] = torch.nn.Parameter(data, t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
                    store[k] = copies[id(t)]


def producers(g: Group) -> set[str]:
    """Modules whose parameters are sliced along their first axis in ``g``: the
    layers that produce the group's channels (a conv's output rows, a norm's
    affine), not those that merely read them."""
    return {s.name.rpartition(".")[0] for s in g.params if s.axis == 0}


def matching_ratio(g: Group, patterns: dict) -> float | None:
    """The ratio of the first fnmatch pattern naming one of ``g``'s producers, or None."""
    from fnmatch import fnmatch

    names = producers(g)
    for pattern, r in patterns.items():
        if any(fnmatch(n, pattern) for n in names):
            return float(r)
    return None


def group_ratio(g: Group, ratio) -> float:
    if not isinstance(ratio, dict):
        return float(ratio)
    r = matching_ratio(g, ratio)
    return 0.0 if r is None else r


def calibration_failed(p: "Pruner", what: str, e: Exception) -> GraphpruneError:
    """The error for calibration batches the traced graph does not take: where torch.export fixed input
    dims to the example's size (the model itself may take others), it says which."""
    from .meta_keys import FIXED_DIMS

    stale = _stale_example_kwargs(p)
    if stale:
        return GraphpruneError(f"{what} failed on the calibration data ({type(e).__name__}: {first_line(e)[:200]}): {stale}")
    fixed = p.gm.meta.get(FIXED_DIMS) or []
    why = (f"the graph was traced with torch.export, which fixed these input dims to the example's size: "
           f"{', '.join(fixed[:6])}{' ...' if len(fixed) > 6 else ''}; give calibration batches of those sizes, or "
           "make the forward traceable by torch.fx" if fixed else
           "give batches the model takes as it takes the example inputs")
    return GraphpruneError(f"{what} failed on the calibration data ({type(e).__name__}: {first_line(e)[:200]}): {why}")


def _n_positional(example_inputs) -> int | None:
    return len(example_inputs) if isinstance(example_inputs, (tuple, list)) else None


def _stale_example_kwargs(p: "Pruner") -> str | None:
    """Where keyword tensors of the example, which every calibration batch gets unless it gives its
    own, hold another number of samples than a batch's first input: what went wrong, said so (the
    guard error named dims the batches had right, survey 18)."""
    from .batches import as_call

    kw = {k: v for k, v in (p.example_kwargs or {}).items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    lead = _first_tensor(tuple(p.example_inputs), {k: v for k, v in (p.example_kwargs or {}).items() if k not in kw})
    for batch in p.calibration or ():
        args, kwargs = as_call(batch)
        first = _first_tensor(args, kwargs)
        if first is None:
            continue
        for k, v in kw.items():
            # the dims where the example's keyword tensor followed its first input (a mask's samples and tokens)
            dims = [d for d in range(min(v.dim(), first.dim()))
                    if d == 0 or (lead is not None and d < lead.dim() and v.shape[d] == lead.shape[d])]
            off = next((d for d in dims if v.shape[d] != first.shape[d]), None)
            if k in kwargs or off is None:
                continue
            what = "samples" if off == 0 else f"entries in dim {off}"
            return (f"example_kwargs [{k!r}] are passed with every calibration batch that does not give its own, and "
                    f"hold {v.shape[off]} {what} where this batch has {first.shape[off]}: give {k!r} in each batch "
                    "(as a dict of keyword inputs with the positional one by name), or batches of the example's "
                    f"shape {tuple(v.shape)}")
    return None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor of at least one dim among a call's inputs, positional first."""
    return next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.dim() >= 1), None)
