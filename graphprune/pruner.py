"""Trace and analyze once, then prune as often as a search or a budget needs.

``Pruner`` holds the traced graph, its groups and the unit scores; every
``prune(removed)`` emits a fresh smaller module (through the pass pipeline)
and never touches the user's model. ``compile``, the budget allocator,
``sensitivity`` and ``search`` are all built on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import importance as _importance
from . import reconstruct as _reconstruct
from .errors import GraphpruneError
from .groups import Analysis, Group, analyze_graph
from .meta_keys import PLAN
from .pass_manager import run_pipeline
from .trace import trace

DEFAULT_PIPELINE = "shrink-params,dce"


def check_ignore(model: torch.nn.Module, ignore) -> list[str]:
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


def remove_lowest(g: Group, score: np.ndarray, k: int) -> np.ndarray:
    """The k lowest-scoring units of ``g``, skipping any whose removal would
    leave a member dim empty (a DenseNet layer whose every new channel scored
    low keeps one)."""
    order = np.argsort(score, kind="stable")
    counts = np.stack([np.bincount(u, minlength=g.n_units) for u in g.dims.values()])  # (dims, units)
    if (counts.sum(1) - counts[:, order[:k]].sum(1) > 0).all():
        return order[:k]
    left = counts.sum(1)
    out = []
    for u in order:
        if len(out) == k:
            break
        if (left - counts[:, u] > 0).all():
            left -= counts[:, u]
            out.append(u)
    return np.array(out, dtype=np.int64)


def make_plan(groups: list[Group], removed: dict[int, np.ndarray]) -> dict:
    """(value_key, axis) -> kept indices, for every dim that shrinks."""
    plan = {}
    for g in groups:
        if g.id not in removed or len(removed[g.id]) == 0:
            continue
        gone = np.zeros(g.n_units, dtype=bool)
        gone[removed[g.id]] = True
        for dim, unit_of in g.dims.items():
            plan[dim] = np.flatnonzero(~gone[unit_of])
    return plan


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
    analysis: Analysis = field(init=False)
    scores: dict = field(init=False)

    def __post_init__(self):
        self.ignore = tuple(check_ignore(self.model, self.ignore))
        traced = trace(self.model, self.example_inputs, self.example_kwargs)
        self.analysis = analyze_graph(traced.gm, traced.method, self.ignore)
        ctx = _importance.ScoreContext(traced.gm, self.analysis.groups, self.calibration, self.loss_fn)
        fn = _importance.get_importance(self.importance)
        self.scores = {g.id: np.asarray(fn(g, ctx.tensors, ctx=ctx), dtype=np.float64) for g in self.groups}
        self._ctx = ctx
        if self.reconstruct and self.calibration is None:
            raise GraphpruneError("reconstruct=True fits the layers that read pruned channels to calibration data: pass calibration= (an iterable of example input tuples)")

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.analysis.gm

    @property
    def groups(self) -> list[Group]:
        return self.analysis.groups

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
        for r, gs in by_ratio.items():
            scores = np.concatenate([self.scores[g.id] for g in gs])
            owner = np.concatenate([np.full(g.n_units, g.id) for g in gs])
            left = int(round(r * len(scores)))
            for gid in owner[np.argsort(scores, kind="stable")]:
                if left == 0:
                    break
                if counts[gid] < room[gid]:
                    counts[gid] += 1
                    left -= 1
        return counts

    def prune(self, removed: dict[int, np.ndarray], *, check: bool = True, fit: bool = True) -> torch.fx.GraphModule:
        """A new module without the ``removed`` units ({group id: unit ids}).
        ``check=False`` skips the between-pass checks and ``fit=False`` the
        reconstruction (the cost meter's inner loop, where only shapes count)."""
        gm = self.gm
        plan = gm.meta[PLAN] = make_plan(self.groups, removed)
        try:
            out, _ = run_pipeline(gm, self.pipeline or DEFAULT_PIPELINE, check=check)
        finally:
            gm.meta.pop(PLAN, None)
        if self.reconstruct and fit:
            _reconstruct.refit(out, gm, plan, self._ctx.layers, self._ctx._batches("a refit"))
        out.meta["graphprune"] = {
            "method": self.analysis.method,
            "widths": {g.id: (g.n_units, g.n_units - len(removed.get(g.id, ()))) for g in self.groups},
            "unsupported": self.analysis.unsupported,
        }
        return out


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
