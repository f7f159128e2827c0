"""Importance criteria: how much each unit of a group matters.

A criterion is a plain function ``(group, tensors, *, ctx) -> (n_units,)``
registered by name; lower means less important. Every criterion scores whole
units by summing over every parameter slice in the group (producer rows,
consumer columns, norm affine parameters, loose parameters).

| name | measures | data |
|---|---|---|
| ``l1``, ``l2`` | weight magnitude | no |
| ``bn_scale`` | BatchNorm gamma, network slimming (magnitude where a group has no BN) | no |
| ``taylor`` | first order: abs(sum of w * dL/dw over the unit) | calibration + loss_fn |
| ``hessian`` | second order, OBD with the diagonal empirical Fisher: 1/2 * w^2 * E[g^2] | calibration + loss_fn |
| ``fisher`` | second order per unit: 1/2 * E[(sum of w * dL/dw over the unit)^2], the Fisher of the unit's mask | calibration + loss_fn |
| ``activation`` | Wanda: abs(W) x the unit's activation norm | calibration |
| ``fpgm`` | distance to the other rows (filters near the geometric median go first) | no |
| ``lamp`` | layer-adaptive magnitude: w^2 over the sum of the larger w^2 | no |
| ``random`` | a seeded random score | no |
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from .batches import as_call, flat_inputs, regroup
from .errors import GraphpruneError
from .groups import Group
from .meta_keys import CANON

ImportanceFn = Callable[..., np.ndarray]
_IMPORTANCE: dict[str, ImportanceFn] = {}
_NEEDS: dict[str, tuple] = {}


def register_importance(name: str, needs: tuple = ()):
    """Decorator: make ``fn(group, tensors, *, ctx) -> scores`` usable as ``importance=name``.
    ``tensors`` maps parameter names to tensors (``group.params`` says which slices of them
    the group owns); ``scores`` is one finite number per unit, shape ``(group.n_units,)``,
    higher meaning more important. Built-in names cannot be replaced.

    ``needs`` names what the context must compute first: ``"grad"``
    (summed gradients), ``"fisher"`` (summed squared gradients),
    ``"unit_fisher"`` (per-unit squared mask gradients), ``"act"``
    (activation norms); each needs ``calibration=`` data.
    """

    if name in globals().get("BUILTIN", ()):
        raise GraphpruneError(f"importance {name!r} is built in; register yours under another name")

    def deco(fn: ImportanceFn) -> ImportanceFn:
        _IMPORTANCE[name] = fn
        _NEEDS[name] = tuple(needs)
        fn.needs = tuple(needs)
        return fn

    return deco


def get_importance(name_or_fn) -> ImportanceFn:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in _IMPORTANCE:
        raise GraphpruneError(f"unknown importance {name_or_fn!r}; choose one of {', '.join(sorted(_IMPORTANCE))} or register your own with graphprune.register_importance")
    return _IMPORTANCE[name_or_fn]


class ScoreContext:
    """What criteria may read: the parameters, and, computed only when a
    criterion needs them, gradients, squared gradients, per-unit Fisher terms
    and activation norms from the calibration batches. Gradients are taken through
    ``torch.func.functional_call`` on detached copies, so the user's
    parameters never get a ``.grad``."""

    def __init__(self, gm: torch.fx.GraphModule, groups: list[Group], calibration=None, loss_fn=None, example_kwargs=None):
        self.gm, self.groups = gm, groups
        self.calibration, self.loss_fn, self.example_kwargs = calibration, loss_fn, dict(example_kwargs or {})
        buffers = {n for n, _ in gm.named_buffers()}
        names = {s.name for g in groups for s in g.params} - buffers
        self.tensors = {n: _attr(gm, n) for n in names if isinstance(_attr(gm, n), torch.Tensor)}
        self.owner_types = {n: type(_owner(gm, n)) for n in names}
        self._grad = self._fisher = self._unit_fisher = self._act = self._moments = self._layers = None

    def _calls(self, what: str):
        """(args, kwargs, batch) per calibration batch (see ``batches.as_call``)."""
        if self.calibration is None:
            raise GraphpruneError(f"this importance criterion needs {what}: pass calibration= (an iterable of input "
                                  "tuples, dicts of keyword inputs or tokenizer outputs)")
        for batch in self.calibration:
            yield (*as_call(batch, self.example_kwargs), getattr(batch, "given", batch))  # loss_fn sees the user's batch

    def _batches(self, what: str):
        """The graph's flat placeholder values per calibration batch (for interpreter runs)."""
        for args, kwargs, _ in self._calls(what):
            yield flat_inputs(self.gm, args, kwargs)

    @torch.enable_grad()  # compile called under torch.no_grad() (an eval loop) still takes gradients here
    def _gradients(self, with_units: bool = False):
        if self.loss_fn is None:
            raise GraphpruneError("gradient-based importance needs loss_fn=: a callable (output, batch) -> scalar loss")
        params = {n: t.detach().clone().requires_grad_(True) for n, t in self.tensors.items()}
        others = {n: t for n, t in self.gm.named_parameters() if n not in params}
        grad = {n: torch.zeros_like(t) for n, t in params.items()}
        fisher = {n: torch.zeros_like(t) for n, t in params.items()}
        units = {g.id: np.zeros(g.n_units) for g in self.groups} if with_units else None
        for args, kwargs, batch in self._calls("gradients"):
            args, kwargs = regroup(self.gm, args, kwargs)  # keyword batches for an exported graph's positional inputs
            out = functional_call(self.gm, {**others, **params}, args, kwargs)
            loss = self.loss_fn(out, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise GraphpruneError(f"loss_fn returned {what}; it must return one scalar loss per batch "
                                      "(e.g. a mean over the batch)")
            gs = torch.autograd.grad(loss.reshape(()), list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), gs):
                if g is not None:
                    grad[n] += g
                    fisher[n] += g.square()
            if units is not None:  # the squared derivative by a mask on each unit, batch by batch
                batch_grads = {n: g for n, g in zip(params, gs) if g is not None}
                for group in self.groups:
                    units[group.id] += unit_taylor(group, self.tensors, batch_grads) ** 2
        self._grad, self._fisher, self._unit_fisher = grad, fisher, units

    @property
    def unit_fisher(self) -> dict:
        """group id -> per unit, the sum over batches of (sum of w * dL/dw over the unit's slices)^2."""
        if self._unit_fisher is None:
            self._gradients(with_units=True)
        return self._unit_fisher

    @property
    def grad(self) -> dict:
        if self._grad is None:
            self._gradients()
        return self._grad

    @property
    def fisher(self) -> dict:
        if self._fisher is None:
            self._gradients()
        return self._fisher

    @property
    def act(self) -> dict:
        """(value_key, axis) -> per-index sum of squared activations, for the
        group dims that are inputs of a weighted layer (what Wanda weighs a
        weight by: the input it multiplies, e.g. after the GELU, not before)."""
        if self._act is None:
            feeds = {x for c in (n.meta.get(CANON) for n in self.gm.graph.nodes)
                     if c is not None and c.op in _WEIGHTED and c.inputs
                     for x in (c.inputs[:2] if c.op == "bilinear" else c.inputs[:1])}  # a bilinear reads two
            wanted: dict = {}
            for g in self.groups:
                for (key, axis) in g.dims:
                    if key in feeds and isinstance(key, torch.fx.Node):
                        wanted.setdefault(key, set()).add(axis)
                for node, axis, _ in g.fills.values():  # experts: what the router gives each (no layer reads that dim)
                    if (node, axis) in g.dims:
                        wanted.setdefault(node, set()).add(axis)
            self._act = {}
            for flat in self._batches("activations"):
                _Recorder(self.gm, wanted, self._act).run(*flat)
        return self._act

    @property
    def layers(self) -> list:
        """The linear and 1x1 conv layers that read a group's channels."""
        if self._layers is None:
            from .reconstruct import consumers
            self._layers = consumers(self.gm, {d for g in self.groups for d in g.dims})
        return self._layers

    @property
    def moments(self) -> dict:
        """input node -> E[x~ x~^T] of each layer in ``layers`` (its input extended by a constant 1)."""
        if self._moments is None:
            from .reconstruct import input_moments
            self._moments = input_moments(self.gm, self.layers, self._batches("input statistics"))
        return self._moments


_WEIGHTED = ("linear", "bilinear", "conv", "conv_transpose", "matmul", "einsum", "mha", "window_attention", "grouped_mm")


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, wanted, out):
        super().__init__(gm)
        self.wanted, self.out = wanted, out

    def run_node(self, n):
        with torch.no_grad():
            val = super().run_node(n)
            for axis in self.wanted.get(n, ()):
                sq = val.detach().float().movedim(axis, 0).reshape(val.shape[axis], -1).square().sum(1).cpu().numpy()
                self.out[(n, axis)] = self.out.get((n, axis), 0) + sq
        return val


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(gm, name: str):
    parent = name.rpartition(".")[0]
    return gm.get_submodule(parent) if parent else gm


def rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` as (size of ``axis``, everything else)."""
    if t.device.type == "meta":
        raise GraphpruneError("parameters are on the meta device: this criterion needs real weights; load them first or use importance='random'")
    return t.detach().float().movedim(axis, 0).reshape(t.shape[axis], -1)


def aggregate(group: Group, tensors: dict, per_index: Callable[[str, torch.Tensor, int], np.ndarray],
              reduce: str = "mean") -> np.ndarray:
    """Combine a per-index score of every learnable slice of the group into its units.

    ``mean`` scores weight tensors (biases and norm affines only where a
    group has no weight), divides each slice's scores by their mean (layers
    live on different scales), then averages over the slices a unit appears in: in a concat group one branch's channels are read by more
    layers than another's, and a plain sum would rank them higher for that
    alone. ``sum`` keeps raw scores and adds them, for criteria whose
    per-slice terms estimate a change in the loss (taylor, hessian)."""
    total = np.zeros(group.n_units)
    count = np.zeros(group.n_units)
    slices = [s for s in group.params if s.name in tensors]
    if reduce == "mean":  # weights only: a bias that starts at zero has no scale to normalise by
        slices = [s for s in slices if tensors[s.name].dim() >= 2] or slices
    for s in slices:
        v = np.asarray(per_index(s.name, tensors[s.name], s.axis), dtype=np.float64)
        if reduce == "mean":
            v = v / max(float(v.mean()), 1e-30)
        total += np.bincount(s.unit_of, weights=v, minlength=group.n_units)
        count += np.bincount(np.unique(s.unit_of), minlength=group.n_units)
    return total if reduce == "sum" else total / np.maximum(count, 1)


def norm_per_index(t: torch.Tensor, axis: int, p: int) -> np.ndarray:
    """sum |t|^p over every axis but ``axis``, fused (no transposed copy of the weight)."""
    if t.device.type == "meta":
        raise GraphpruneError("parameters are on the meta device: this criterion needs real weights; load them first or use importance='random'")
    t = t.detach()
    if t.dim() == 1:
        return t.abs().float().pow(p).numpy()
    if axis == 0:  # rows: contiguous reductions
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32  # a norm may not narrow its input
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), ord=p, dim=1, dtype=wide).pow(p).numpy()
    # columns: a strided reduction is up to 10x slower than summing rows with a matrix-vector product
    pre = t.shape[:axis].numel()
    x = t.reshape(pre, -1).float()                                   # (pre, n_axis * post)
    x = x.square() if p == 2 else x.abs().pow(p)
    return (x.new_ones(pre) @ x).reshape(t.shape[axis], -1).sum(1).numpy()


@register_importance("l1")
def l1(group, tensors, **_):
    return aggregate(group, tensors, lambda n, t, a: norm_per_index(t, a, 1))


@register_importance("l2")
def l2(group, tensors, **_):
    return np.sqrt(aggregate(group, tensors, lambda n, t, a: norm_per_index(t, a, 2)))


@register_importance("bn_scale")
def bn_scale(group, tensors, *, ctx, **_):
    bn = {n for n, typ in ctx.owner_types.items() if issubclass(typ, torch.nn.modules.batchnorm._BatchNorm) and n.endswith(".weight")}
    if not any(s.name in bn for s in group.params):
        return l1(group, tensors)
    # raw gammas: network slimming compares them across layers as they are
    return aggregate(group, {n: t for n, t in tensors.items() if n in bn}, lambda n, t, a: t.detach().abs().float().numpy(), reduce="sum")


def unit_taylor(group, tensors, grads: dict) -> np.ndarray:
    """Per unit, the sum of w * dL/dw over every slice of the unit: the
    derivative of the loss by a mask that scales the unit."""
    return aggregate(group, {n: t for n, t in tensors.items() if n in grads},
                     lambda n, t, a: rows(t * grads[n], a).sum(1).numpy(), reduce="sum")


@register_importance("taylor", needs=("grad",))
def taylor(group, tensors, *, ctx, **_):
    return np.abs(unit_taylor(group, tensors, ctx.grad))


@register_importance("hessian", needs=("fisher",))
def hessian(group, tensors, *, ctx, **_):
    return aggregate(group, tensors, lambda n, t, a: (0.5 * rows(t.square() * ctx.fisher[n], a).sum(1)).numpy(), reduce="sum")


@register_importance("fisher", needs=("unit_fisher",))
def fisher(group, tensors, *, ctx, **_):
    return 0.5 * ctx.unit_fisher[group.id]


@register_importance("activation", needs=("act",))
def activation(group, tensors, *, ctx, **_):
    weight = aggregate(group, tensors, lambda n, t, a: norm_per_index(t, a, 1))
    act = np.zeros(group.n_units)
    seen = [dim for dim in group.dims if dim in ctx.act]
    for dim in seen:
        act += np.bincount(group.dims[dim], weights=ctx.act[dim], minlength=group.n_units)
    return weight * np.sqrt(act) if seen else weight  # no dim observed: the weights alone, not zero for all


def _over_reading_layers(group, tensors, ctx, per_layer) -> np.ndarray:
    """Sum ``per_layer(layer, G, unit_of)`` (one score per unit) over the linear
    layers that read the group's channels; ``activation`` where none does."""
    total, seen = np.zeros(group.n_units), False
    for layer in ctx.layers:
        unit_of = group.dims.get((layer.weight, layer.w_in))
        if unit_of is not None and layer.x in ctx.moments:
            total += per_layer(layer, ctx.moments[layer.x], unit_of)
            seen = True
    return total if seen else activation(group, tensors, ctx=ctx)


@register_importance("obs", needs=("moments",))
def obs(group, tensors, *, ctx, **_):
    """Optimal brain surgeon, structured: the output error a unit's removal
    leaves once the layers that read it are refit to the rest
    (``reconstruct=True``), ``tr(W_U [G^-1]_UU^-1 W_U^T)`` per reading layer,
    with ``G`` the layer's input second moment (Kurtic et al. 2023, ZipLM).
    The pair to ``reconstruct=True``. Groups no linear layer reads fall
    back to ``activation``."""
    from .reconstruct import removal_error

    return _over_reading_layers(group, tensors, ctx, lambda layer, G, unit_of: removal_error(ctx.gm, layer, G, unit_of, group.n_units))


@register_importance("fluctuation", needs=("moments",))
def fluctuation(group, tensors, *, ctx, **_):
    """FLAP (An et al. 2024): the variance of a unit's input across the
    calibration data times the squared norm of the weights that read it.
    The mean part is left out because a bias can absorb it
    (``reconstruct=True`` does). Groups no linear layer reads fall back to
    ``activation``."""
    from .reconstruct import fluctuation_score

    return _over_reading_layers(group, tensors, ctx, lambda layer, G, unit_of: np.bincount(
        unit_of, weights=fluctuation_score(ctx.gm, layer, G), minlength=group.n_units))


@register_importance("fpgm")
def fpgm(group, tensors, **_):
    def per_index(n, t, a):
        r = rows(t, a)
        return torch.cdist(r[None], r[None])[0].sum(1).numpy() if r.shape[1] > 1 else r.abs().squeeze(1).numpy()

    return aggregate(group, tensors, per_index)


@register_importance("lamp")
def lamp(group, tensors, **_):
    """LAMP (Lee et al. 2021) scores layer weights; 1-D tensors (biases, norm
    affines) are left out: one that starts at zero would make its single
    nonzero entry the most important."""

    def per_index(n, t, a):
        if t.dim() < 2:
            return np.zeros(t.shape[a])
        v = torch.from_numpy(norm_per_index(t, a, 2))
        order = torch.argsort(v)
        tail = torch.flip(torch.cumsum(torch.flip(v[order], [0]), 0), [0])  # sum of this and all larger
        out = torch.empty_like(v)
        out[order] = v[order] / tail.clamp_min(1e-12)
        return out.numpy()

    return aggregate(group, tensors, per_index)


@register_importance("random")
def random(group, tensors, *, seed: int = 0, **_):
    return np.random.default_rng(seed + group.id).random(group.n_units)


BUILTIN = frozenset(_IMPORTANCE)  # the criteria above; register_importance refuses their names
