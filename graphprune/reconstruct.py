"""Least-squares reconstruction of the layers that read pruned channels.

Removing input channels of a linear layer ``y = W x + b`` drops the terms
``W[:, R] x[R]``. Where calibration data shows those inputs are correlated with
the kept ones (or simply have a nonzero mean), the kept weights can take over
much of what was lost, in closed form and without training. With
``G = E[x~ x~^T]`` the second moment of the input extended by a constant 1
(so the bias takes part) and ``K`` the kept inputs (plus the constant), the
weights that minimise ``E||W~ x~ - W~' x~[K]||^2`` are

    W~'[:, K] = W~[:, K] + W~[:, R] G[R, K] G[K, K]^-1

This is the structured form of the optimal brain surgeon update (Hassibi
and Stork 1993; Kwon et al. 2022 and Kurtic et al.'s ZipLM use it for heads
and MLP channels). ``refit`` solves its sequential form: each layer is fit to
the inputs the pruned model really feeds it, so upstream errors are
corrected as they arrive.

The correction is damped (``G[K, K] + lambda I``), which shrinks it towards
the plain slice; lambda is picked per layer by 2-fold cross-validation over
the calibration batches, and "no correction" is one of the candidates, so a
layer whose fit does not carry over to unseen batches keeps its sliced
weights. The kept weights themselves are never scaled, so a channel that was
dead (always zero) changes nothing, as the lossless oracle requires.

What it cannot see: the fit is per layer, in the layer's own output space. A
small layer error can still matter downstream (after a LayerNorm, say), and
a large one on a channel the criterion should not have removed is fit
anyway; see bench/README.md for a criterion where the refit made things worse.

Covered: ``linear`` (any weight layout) and ``conv`` with a 1x1 kernel, one
group and unchanged spatial size, whose input dim shrinks. Other convs keep
their plain sliced weights.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import GraphModule

from .meta_keys import CANON, VAL

DAMP = 0.3  # lambda for obs scores, relative to the mean channel diagonal of G[K, K]
DAMPS = (None, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01)  # refit candidates, most cautious first; None: keep the plain slice


@dataclass
class Consumer:
    node: torch.fx.Node
    x: object        # value key of the input
    weight: str      # parameter key
    bias: str | None
    w_in: int        # the weight's input axis
    channel_axis: int  # the input's channel axis (-1 for linear, 1 for conv)


def consumers(gm: GraphModule, shrinkable: set) -> list[Consumer]:
    """The layers whose input dim is a group dim (``shrinkable``: a set of (value key, axis))."""
    out = []
    for n in gm.graph.nodes:
        c = n.meta.get(CANON)
        if c is None or c.op not in ("linear", "conv") or not c.inputs or not isinstance(c.params.get("weight"), str):
            continue
        w = c.params["weight"]
        if c.op == "linear":
            w_in = 0 if c.attrs.get("weight_t") else 1
            axis = -1
        else:
            shape, xs, ys = _attr(gm, w).shape, c.inputs[0].meta.get(VAL), n.meta.get(VAL)
            if c.attrs.get("groups", 1) != 1 or any(k != 1 for k in shape[2:]) or xs is None or ys is None or xs.shape[2:] != ys.shape[2:]:
                continue  # only a 1x1 conv is a linear layer applied at every position
            w_in, axis = 1, 1
        if (w, w_in) in shrinkable:
            out.append(Consumer(n, c.inputs[0], w, c.params.get("bias"), w_in, axis))
    return out


class _Gram(torch.fx.Interpreter):
    """Accumulates, for each wanted input node, sum of x~ x~^T over every position."""

    def __init__(self, gm, wanted: dict, sums: dict):
        super().__init__(gm)
        self.wanted, self.sums = wanted, sums

    def run_node(self, n):
        val = super().run_node(n)
        axis = self.wanted.get(n)
        if axis is not None:
            x = _rows(val, axis)                                              # (positions, C + 1)
            g, count = self.sums.get(n, (0, 0))
            self.sums[n] = (g + x.T @ x, count + len(x))
        return val


def input_moments(gm: GraphModule, layers: list[Consumer], calibration) -> dict:
    """input node -> E[x~ x~^T] (C + 1, C + 1), over every calibration batch (a tuple) and position."""
    wanted = {c.x: c.channel_axis for c in layers}
    sums: dict = {}
    with torch.no_grad():
        for batch in calibration:
            _Gram(gm, wanted, sums).run(*batch)
    return {n: g / count for n, (g, count) in sums.items()}


def _damped(G: torch.Tensor, channels: int, damp: float = None) -> torch.Tensor:
    """G + lambda I on the first ``channels`` entries, lambda = ``damp`` times
    their mean diagonal; the constant input is not damped, so a mean shift
    always goes into the bias in full."""
    d = torch.zeros(len(G), dtype=G.dtype)
    d[:channels] = (DAMP if damp is None else damp) * G.diagonal()[:channels].mean().clamp_min(1e-12)
    return G + torch.diag(d)


def _weight_rows(gm, c: Consumer) -> torch.Tensor:
    """The layer's weight as (out, C + 1): the bias is the constant input's column (zero if none)."""
    w = _attr(gm, c.weight).detach().double().movedim(c.w_in, -1)
    w = w.reshape(-1, w.shape[-1])                                             # (out, C)
    b = _attr(gm, c.bias).detach().double().reshape(-1, 1) if c.bias is not None else w.new_zeros(len(w), 1)
    return torch.cat([w, b], 1)                                                # (out, C + 1)


def fluctuation_score(gm, c: Consumer, G: torch.Tensor):
    """Per input index: Var(x_j) * ||W[:, j]||^2."""
    w = _weight_rows(gm, c)[:, :-1]                                            # (out, C)
    mean = G[:-1, -1]
    var = (G.diagonal()[:-1] - mean.square()).clamp_min(0)
    return (var * w.square().sum(0)).numpy()


def removal_error(gm, c: Consumer, G: torch.Tensor, unit_of, n_units: int):
    """Per unit, E||y - y'||^2 left after removing that unit's inputs alone and refitting the rest."""
    w = _weight_rows(gm, c)                                                    # (out, C + 1)
    inv = torch.linalg.inv(_damped(G, len(G) - 1))                            # (C + 1, C + 1)
    unit_of = torch.as_tensor(unit_of)
    err = torch.zeros(n_units, dtype=torch.float64)
    sizes = torch.bincount(unit_of, minlength=n_units)
    if bool((sizes <= 1).all()):                                               # one index per unit: closed form
        d = inv.diagonal()[:-1]
        per = (w[:, :-1].square().sum(0) / d)                                  # (C,)
        return torch.zeros(n_units, dtype=torch.float64).index_add_(0, unit_of, per).numpy()
    for u in torch.unique(unit_of).tolist():
        idx = torch.nonzero(unit_of == u).flatten()
        wu = w[:, idx]                                                         # (out, |u|)
        err[u] = torch.trace(wu @ torch.linalg.solve(inv[idx][:, idx], wu.T))
    return err.numpy()


class _Stepper(torch.fx.Interpreter):
    """Runs one batch through a graph a node at a time, freeing values after their last use."""

    def __init__(self, gm: GraphModule, batch: tuple):
        super().__init__(gm)
        self.env, self.args_iter = {}, iter(batch)
        self.nodes, self.at = list(gm.graph.nodes), 0

    def run_until(self, stop: torch.fx.Node | None):
        """Run every node before ``stop`` (all of them if None)."""
        while self.at < len(self.nodes) and self.nodes[self.at] is not stop:
            n = self.nodes[self.at]
            self.env[n] = self.run_node(n)
            for dead in self.user_to_last_uses.get(n, ()):
                del self.env[dead]
            self.at += 1


def _rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x~: the input as (positions, C + 1), a constant 1 appended."""
    x = x.detach().double().movedim(axis, -1)
    x = x.reshape(-1, x.shape[-1])                                             # (positions, C)
    return torch.cat([x, x.new_ones(len(x), 1)], 1)                            # (positions, C + 1)


def refit(out: GraphModule, gm: GraphModule, plan: dict, layers: list[Consumer], calibration) -> int:
    """Refit, in ``out`` (the pruned module), every layer whose input shrank. Returns how many changed.
    ``calibration``: input tuples. Every batch is in flight at once, so the
    live activations of all of them are held together.

    Layers are refit in graph order, each to the inputs it now really gets:
    the calibration batches run through the original and the pruned graph
    side by side, a node at a time; at each such layer the pruned graph's
    input ``x~_p`` (kept channels) and the original's ``x~_o`` give

        W~' = W~[:, K] + (W~ E[x~_o x~_p^T] - W~[:, K] E[x~_p x~_p^T]) (E[x~_p x~_p^T] + lambda I)^-1

    the weights that best reproduce the original layer's output
    ``W~ x~_o`` from what is left, damped towards the plain slice. Upstream
    errors are corrected as they arrive (as SparseGPT does block by block).
    Without upstream changes it is the OBS update in the module docstring.
    """
    todo = []
    by_name = {n.name: n for n in out.graph.nodes}
    for c in layers:
        kept = plan.get((c.weight, c.w_in))
        if kept is not None and c.node.name in by_name:
            todo.append((c, np.asarray(kept), by_name[c.node.name]))
    if not todo:
        return 0
    batches = list(calibration)
    orig = [_Stepper(gm, b) for b in batches]
    pruned = [_Stepper(out, b) for b in batches]
    with torch.no_grad():
        for c, kept, node in todo:
            x_p_node = node.args[0] if node.op == "call_module" else _input_node(node, c)
            C = _attr(gm, c.weight).shape[c.w_in]
            K = len(kept) + 1
            G_pp = torch.zeros(2, K, K, dtype=torch.float64)                    # per fold: even and odd batches
            C_op = torch.zeros(2, C + 1, K, dtype=torch.float64)
            for i, (so, sp) in enumerate(zip(orig, pruned)):
                so.run_until(c.node)
                sp.run_until(node)
                xo = _rows(so.env[c.x], c.channel_axis)                        # (P, C + 1)
                xp = _rows(sp.env[x_p_node], c.channel_axis)                   # (P, K)
                G_pp[i % 2] += xp.T @ xp
                C_op[i % 2] += xo.T @ xp
            _solve_into(out, gm, c, kept, plan, G_pp, C_op)
    return len(todo)


def _input_node(node, c):
    """The pruned graph's node that plays the role of ``c.x`` (same name)."""
    for a in node.all_input_nodes:
        if a.name == c.x.name:
            return a
    raise AssertionError(f"no input named {c.x.name} on {node.name}")


def _solve_into(out, gm, c: Consumer, kept, plan, G_pp, C_op):
    w = _weight_rows(gm, c)                                                    # (out, C + 1) in the original
    rows = plan.get((c.weight, 1 if c.w_in == 0 else 0))                        # its output rows may shrink too
    if rows is not None:
        w = w[torch.as_tensor(rows)]                                           # (out', C + 1)
    C = w.shape[1] - 1
    has_bias = c.bias is not None
    keep = torch.as_tensor(list(kept) + [C])
    if not has_bias:  # no bias to absorb the constant: leave its column out
        keep, G_pp, C_op = keep[:-1], G_pp[:, :-1, :-1], C_op[:, :, :-1]
    wk = w[:, keep]                                                            # (out', K)
    n = len(kept)

    def fit(G, Co, damp):
        return wk + torch.linalg.solve(_damped(G, n, damp), (w @ Co - wk @ G).T).T

    def loss(v, G, Co):  # E||W~ x~_o - v x~_p||^2, less a term that does not depend on v
        return (torch.trace(v @ G @ v.T) - 2 * torch.trace(w @ Co @ v.T)).item()

    def held_out(d):  # fit on one fold, score on the other, both ways; None: no refit at all
        return sum(loss(wk if d is None else fit(G_pp[a], C_op[a], d), G_pp[1 - a], C_op[1 - a]) for a in (0, 1))

    # the damping, by 2-fold cross-validation over the calibration batches (one batch: the default)
    damp = min(DAMPS, key=held_out) if bool(G_pp[1].any()) else DAMP
    new = wk if damp is None else fit(G_pp.sum(0), C_op.sum(0), damp)
    target = _attr(out, c.weight)
    with torch.no_grad():
        target.copy_(new[:, :n].reshape(target.movedim(c.w_in, -1).shape).movedim(-1, c.w_in).to(target.dtype))
        if has_bias:
            _attr(out, c.bias).copy_(new[:, -1].to(target.dtype))


def _attr(obj, path: str):
    return operator.attrgetter(path)(obj)
