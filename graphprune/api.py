"""The public entry points: ``analyze`` and ``compile``.

``compile`` reads top to bottom as the compiler's pipeline::

    trace -> couple (groups) -> score -> select -> shrink-params -> dce
"""
from __future__ import annotations

import numpy as np
import torch

from . import importance as _importance
from .errors import GraphpruneError
from .groups import Analysis, Group, analyze_graph
from .pass_manager import run_pipeline
from .trace import trace

DEFAULT_PIPELINE = "shrink-params,dce"


def _check_ignore(model: torch.nn.Module, ignore) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise GraphpruneError(f"ignore entry {item!r} is not a submodule of {type(model).__name__}; pass a name from model.named_modules() or the module itself") from None
            out.append(item)
        elif isinstance(item, torch.nn.Module) and id(item) in names:
            out.append(names[id(item)])
        else:
            raise GraphpruneError(f"ignore entry {item!r} is not a submodule of {type(model).__name__}; pass a name from model.named_modules() or the module itself")
    return out


def analyze(model: torch.nn.Module, example_inputs: tuple, *, ignore=(), example_kwargs=None) -> Analysis:
    """Trace ``model`` and find its channel groups, without changing anything.

    >>> a = graphprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> print(a.summary())          # groups, their sizes and members; what blocked the rest
    """
    ignore = _check_ignore(model, ignore)
    traced = trace(model, example_inputs, example_kwargs)
    return analyze_graph(traced.gm, traced.method, ignore)


def _tensors(gm: torch.fx.GraphModule, groups: list[Group]) -> dict:
    buffers = {n for n, _ in gm.named_buffers()}
    out = {}
    for g in groups:
        for s in g.params:
            if s.name not in out and s.name not in buffers:
                out[s.name] = _attr(gm, s.name)
    return out


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def select_units(groups: list[Group], scores: dict[int, np.ndarray], ratio: float) -> dict[int, np.ndarray]:
    """Per group, the units to remove: the round(ratio * n) lowest-scoring.

    A unit is skipped when removing it would leave some member dim empty
    (a DenseNet layer whose every new channel scored low keeps one).
    """
    removed = {}
    for g in groups:
        k = min(int(round(ratio * g.n_units)), g.n_units - 1)
        if k > 0:
            removed[g.id] = remove_lowest(g, scores[g.id], k)
    return removed


def remove_lowest(g: Group, score: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(score, kind="stable")
    counts = np.stack([np.bincount(u, minlength=g.n_units) for u in g.dims.values()])  # (dims, units)
    if (counts.sum(1) - counts[:, order[:k]].sum(1) > 0).all():
        return order[:k]  # the common case: nothing empties
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
        if g.id not in removed:
            continue
        gone = np.zeros(g.n_units, dtype=bool)
        gone[removed[g.id]] = True
        for dim, unit_of in g.dims.items():
            plan[dim] = np.flatnonzero(~gone[unit_of])
    return plan


def compile(model: torch.nn.Module, example_inputs: tuple, *, ratio: float | None = None, importance="l2", ignore=(),
            pipeline=None, example_kwargs=None) -> torch.nn.Module:
    """Return a physically smaller copy of ``model``; ``model`` itself is not changed.

    ``ratio=r`` removes ``round(r * n)`` units from every prunable group of
    ``n`` units (a unit is a channel, a head, a conv group: whatever must go
    together). ``ignore`` names modules whose output width must stay.

    >>> small = graphprune.compile(model, (x,), ratio=0.5, ignore=["fc"])
    """
    if ratio is None:
        ratio = 0.0
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise GraphpruneError(f"ratio must be a number in [0, 1), got {ratio!r}")
    score_fn = _importance.get_importance(importance)
    ignore = _check_ignore(model, ignore)
    traced = trace(model, example_inputs, example_kwargs)
    analysis = analyze_graph(traced.gm, traced.method, ignore)
    gm = traced.gm
    tensors = _tensors(gm, analysis.groups)
    scores = {g.id: score_fn(g, tensors) for g in analysis.groups}
    removed = select_units(analysis.groups, scores, ratio)
    gm.meta["gp_plan"] = make_plan(analysis.groups, removed)
    out, _ = run_pipeline(gm, pipeline or DEFAULT_PIPELINE)
    out.meta["graphprune"] = {
        "method": traced.method,
        "groups": {g.id: (g.n_units, g.n_units - len(removed.get(g.id, ()))) for g in analysis.groups},
        "unsupported": analysis.unsupported,
    }
    return out
