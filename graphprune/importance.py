"""Importance criteria: how much a group's units matter.

A criterion is a plain function ``(group, tensors) -> np.ndarray`` of shape
``(group.n_units,)`` registered by name; ``tensors`` maps parameter names to
their values. Every criterion scores whole units by summing the scores of
every parameter slice in the group: producer rows, consumer columns, norm
affine parameters, loose parameters. Lower means less important.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .errors import GraphpruneError
from .groups import Group

ImportanceFn = Callable[..., np.ndarray]
_IMPORTANCE: dict[str, ImportanceFn] = {}


def register_importance(name: str):
    """Decorator: make ``fn(group, tensors, **ctx) -> scores`` usable as ``importance=name``."""

    def deco(fn: ImportanceFn) -> ImportanceFn:
        _IMPORTANCE[name] = fn
        return fn

    return deco


def get_importance(name_or_fn) -> ImportanceFn:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in _IMPORTANCE:
        raise GraphpruneError(f"unknown importance {name_or_fn!r}; choose one of {', '.join(sorted(_IMPORTANCE))} or register your own with graphprune.register_importance")
    return _IMPORTANCE[name_or_fn]


def per_index(t: torch.Tensor, axis: int, p: int) -> np.ndarray:
    """|t|^p summed over every axis but ``axis``: one number per index of ``axis``."""
    if t.device.type == "meta":
        raise GraphpruneError("parameters are on the meta device: magnitude criteria need real weights; load them first or use importance='random'")
    t = t.detach().float().movedim(axis, 0).reshape(t.shape[axis], -1)  # (n, rest)
    return (t.abs() if p == 1 else t.square()).sum(1).cpu().numpy().astype(np.float64)


def aggregate(group: Group, tensors: dict, score_slice: Callable[[torch.Tensor, int], np.ndarray]) -> np.ndarray:
    """Sum per-index scores of every learnable slice of the group into its units."""
    total = np.zeros(group.n_units)
    for s in group.params:
        if s.name in tensors:
            total += np.bincount(s.unit_of, weights=score_slice(tensors[s.name], s.axis), minlength=group.n_units)
    return total


@register_importance("l1")
def l1(group: Group, tensors: dict, **_) -> np.ndarray:
    return aggregate(group, tensors, lambda t, a: per_index(t, a, 1))


@register_importance("l2")
def l2(group: Group, tensors: dict, **_) -> np.ndarray:
    return np.sqrt(aggregate(group, tensors, lambda t, a: per_index(t, a, 2)))


@register_importance("random")
def random(group: Group, tensors: dict, *, seed: int = 0, **_) -> np.ndarray:
    return np.random.default_rng(seed + group.id).random(group.n_units)
