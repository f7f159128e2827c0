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
weights. A correction may not be larger (Frobenius norm) than the weights it
corrects. Cross-validation cannot see a shift between calibration and real
inputs, and a fit that needs weights several times their size leans on
correlations only the calibration data has. On MiniLM the ``hessian``
criterion removed layer-0 MLP channels whose refit grew that layer's weights
2.6-fold (one entry 36-fold). The calibration sentences still looked fine
(cosine 0.996), but held-out ones fell to 0.73; with the bound they reach
0.95. The kept weights themselves are never scaled, so a channel that was
dead (always zero) changes nothing, as the lossless oracle requires.

Where a layer's output is added to a residual stream, the fit targets the
sum, so each block also mends what earlier blocks left wrong in the stream.

What it cannot see: the fit is per layer, in the layer's own output space. A
small layer error can still matter downstream (after a LayerNorm, say), and
a large one on a channel the criterion should not have removed is fit
anyway; see bench/README.md for a criterion where the refit made things worse.
It also learns only what the calibration data shows: on MiniLM, 64 sentences
from 8 templates generalise much worse than 64 sentences on varied topics.

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
TRUST = 1.0  # largest allowed ||W' - W[:, K]|| / ||W[:, K]||; see the module docstring
FOLDS = 2  # for the damping's cross-validation; 4 folds with the one-standard-error rule did no better on MiniLM
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


def _flat(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x as (positions, C), in float64."""
    x = x.detach().double().movedim(axis, -1)
    return x.reshape(-1, x.shape[-1])                                          # (positions, C)


def _rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x~: the input as (positions, C + 1), a constant 1 appended."""
    x = _flat(x, axis)                                                         # (positions, C)
    return torch.cat([x, x.new_ones(len(x), 1)], 1)                            # (positions, C + 1)


def refit(out: GraphModule, gm: GraphModule, plan: dict, layers: list[Consumer], calibration) -> dict | None:
    """Refit, in ``out`` (the pruned module), every layer whose input shrank. Returns None
    where none did, else how many were refit and the thinnest fit: the layer with the fewest
    calibration positions per input (``thin_calibration`` reads it).
    ``calibration``: input tuples. Every batch is in flight at once, so the
    live activations of all of them are held together.

    Layers are refit in graph order, each to the inputs it now really gets:
    the calibration batches run through the original and the pruned graph
    side by side, a node at a time; at each such layer the pruned graph's
    input ``x~_p`` (kept channels) and a target ``t`` give

        W~' = W~[:, K] + (E[t x~_p^T] - W~[:, K] E[x~_p x~_p^T]) (E[x~_p x~_p^T] + lambda I)^-1

    the weights that best reproduce ``t`` from what is left, damped towards
    the plain slice. The target is the original layer's output ``W~ x~_o``;
    where that output is added to a residual (``r + W x``, through
    eval-mode dropout), the target becomes ``W~ x~_o + r_o - r_p``, so the
    sum, not only the branch, is fit: what upstream layers left wrong in the
    residual stream is corrected where the branch can express it (the
    "layer output" reconstruction of Kwon et al. 2022). Upstream errors are
    corrected as they arrive (as SparseGPT does block by block). Without
    upstream changes it is the OBS update in the module docstring. A layer whose
    weight another layer reads too (a tied head) keeps its slice (``_shared_weights``).
    """
    todo = []
    by_name = {n.name: n for n in out.graph.nodes}
    shared = _shared_weights(gm)
    for c in layers:
        kept = plan.get((c.weight, c.w_in))
        if kept is not None and c.node.name in by_name and c.weight not in shared:
            todo.append((c, np.asarray(kept), by_name[c.node.name]))
    if not todo:
        return None
    batches = list(calibration)
    fitted = []  # (positions, inputs, layer) of each solve
    orig = [_Stepper(gm, b) for b in batches]
    pruned = [_Stepper(out, b) for b in batches]
    with torch.no_grad():
        for c, kept, node in todo:
            x_p_node = node.args[0] if node.op == "call_module" else _input_node(node, c)
            w, rows = _target_weight(gm, c, plan)                              # (out', C + 1)
            res = _residual(gm, c)
            res_p = by_name.get(res.name) if res is not None else None
            K = len(kept) + 1
            G_pp = torch.zeros(FOLDS, K, K, dtype=torch.float64)                # per fold: batch i goes to fold i % FOLDS
            C_tp = torch.zeros(FOLDS, len(w), K, dtype=torch.float64)           # sum of t x~_p^T
            T = torch.zeros(FOLDS, 2, dtype=torch.float64)                      # sum of ||t||^2, positions
            for i, (so, sp) in enumerate(zip(orig, pruned)):
                so.run_until(c.node)
                sp.run_until(node)
                xo = _rows(so.env[c.x], c.channel_axis)                        # (P, C + 1)
                xp = _rows(sp.env[x_p_node], c.channel_axis)                   # (P, K)
                t = xo @ w.T                                                   # (P, out')
                if res_p is not None and res in so.env and res_p in sp.env:  # r is at hand if computed before the layer
                    r_o = so.env[res]
                    if rows is not None:
                        r_o = r_o.index_select(c.channel_axis, torch.as_tensor(rows))
                    t += _flat(r_o - sp.env[res_p], c.channel_axis)            # (P, out')
                G_pp[i % FOLDS] += xp.T @ xp
                C_tp[i % FOLDS] += t.T @ xp
                T[i % FOLDS] += torch.tensor([t.square().sum(), len(t)])
            _solve_into(out, c, w, kept, G_pp, C_tp, T)
            fitted.append((float(T[:, 1].sum()), K, c.weight.removesuffix(".weight")))  # the layer's name, not its node's
    positions, inputs, name = min(fitted, key=lambda f: f[0] / f[1])
    return {"layers": len(todo), "positions": int(positions), "inputs": inputs, "layer": name}


def _shared_weights(gm: GraphModule) -> set:
    """Parameter keys whose tensor more than one layer reads: a head tied to the embedding (under two
    names, or read again by ``x @ self.embed.weight.T``). A refit of one reader wrote into the other's
    weights: the embedding table moved 0.43 and the output error grew from 0.24 to 0.31 (survey 30 f20).
    Those layers keep their sliced weights."""
    from collections import Counter

    def tensor(key):
        try:
            return _attr(gm, key)
        except AttributeError:
            return None

    readers: Counter = Counter()
    keys: dict = {}
    for n in gm.graph.nodes:
        cop = n.meta.get(CANON)
        for key in (cop.params.values() if cop is not None else ()):
            t = tensor(key) if isinstance(key, str) else None
            if isinstance(t, torch.Tensor):
                readers[id(t)] += 1
                keys[key] = id(t)
    return {key for key, i in keys.items() if readers[i] > 1}


THIN = 16  # calibration positions per input below which ``thin_calibration`` warns; see its docstring


def thin_calibration(rec: dict | None) -> str | None:
    """Why a refit (``rec``: what ``refit`` returned) had too little calibration data, or None.

    Each refit layer solves for as many weights per output as it has inputs
    (``K``), from the ``P`` positions (tokens, pixels) the calibration batches
    show it. With ``P`` a few times ``K`` the fit follows the calibration
    text itself; the cross-validated damping keeps it from hurting, not from
    being weak. SmolLM2 at 0.8 of its parameters, one removal refit from
    more and more windows of 256 tokens (MLP inputs K = 1537; held-out
    perplexity over dense on the calibration domain / another domain):
    P = 4096 x1.23 / x1.46, 8192 x1.20 / x1.44, 16384 x1.16 / x1.40,
    32768 x1.12 / x1.38. So the warning asks for ``THIN`` positions per input.
    """
    if not rec or rec["positions"] >= THIN * rec["inputs"]:
        return None
    return (f"the refit fit {rec['layer']} ({rec['inputs']} inputs) from {rec['positions']} calibration positions "
            f"({rec['positions'] / rec['inputs']:.1f} per input); it gets better with more calibration data: give at least "
            f"about {THIN * rec['inputs']} positions (calibration=: more batches or longer sequences)")


_PASS_THROUGH = {torch.ops.aten.dropout.default, torch.nn.functional.dropout, torch.ops.aten.clone.default, torch.ops.aten.alias.default}
_ADDS = {torch.ops.aten.add.Tensor, operator.add, torch.add}


def _residual(gm: GraphModule, c: Consumer):
    """The node ``r`` when the layer's output only feeds ``r + layer(x)`` (through
    eval-mode dropout) and ``r`` has the sum's shape; else None."""
    n = c.node
    while len(n.users) == 1:
        (user,) = n.users
        if user.op == "call_module" and isinstance(_attr(gm, user.target), (torch.nn.Dropout, torch.nn.Identity)) and not gm.training:
            n = user
        elif user.op == "call_function" and user.target in _PASS_THROUGH and not _train_flag(user):
            n = user
        elif user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is n else user.args[0]
            val, out_val = (other.meta.get(VAL) if isinstance(other, torch.fx.Node) else None), user.meta.get(VAL)
            return other if val is not None and out_val is not None and tuple(val.shape) == tuple(out_val.shape) else None
        else:
            return None
    return None


def _train_flag(node) -> bool:
    """Whether a dropout node drops (aten's third argument, F.dropout's ``training``)."""
    if node.target is torch.ops.aten.dropout.default:
        return bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("train", True))
    if node.target is torch.nn.functional.dropout:
        return bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("training", True))
    return False


def _input_node(node, c):
    """The pruned graph's node that plays the role of ``c.x`` (same name)."""
    for a in node.all_input_nodes:
        if a.name == c.x.name:
            return a
    raise AssertionError(f"no input named {c.x.name} on {node.name}")


def _target_weight(gm, c: Consumer, plan):
    """The original weight as (out', C + 1), restricted to the output rows the pruned layer keeps, and those rows (None: all)."""
    w = _weight_rows(gm, c)                                                    # (out, C + 1)
    rows = plan.get((c.weight, 1 if c.w_in == 0 else 0))
    if rows is not None:
        w = w[torch.as_tensor(rows)]                                           # (out', C + 1)
    return w, rows


def _solve_into(out, c: Consumer, w, kept, G_pp, C_tp, T):
    C = w.shape[1] - 1
    has_bias = c.bias is not None
    keep = torch.as_tensor(list(kept) + [C])
    if not has_bias:  # no bias to absorb the constant: leave its column out
        keep, G_pp, C_tp = keep[:-1], G_pp[:, :-1, :-1], C_tp[:, :, :-1]
    wk = w[:, keep]                                                            # (out', K)
    n = len(kept)

    def fit(G, Ct, damp):
        if damp is None:
            return wk
        A = _damped(G, n, damp)
        L, info = torch.linalg.cholesky_ex(A)  # symmetric positive definite once damped: half the cost of LU
        step = torch.cholesky_solve((Ct - wk @ G).T, L) if int(info) == 0 else torch.linalg.solve(A, (Ct - wk @ G).T)
        return wk + step.T

    def mse(v, f):  # E||t - v x~_p||^2 over fold f; traces as elementwise sums, never an (out', out') matrix (an LM head: 49152^2)
        return ((((v @ G_pp[f]) * v).sum() - 2 * (C_tp[f] * v).sum() + T[f, 0]) / T[f, 1]).item()

    G, Ct = G_pp.sum(0), C_tp.sum(0)
    folds = [f for f in range(len(T)) if T[f, 1] > 0]
    # The damping: from the most cautious candidate down, while the correction stays within TRUST
    # (a correction larger than the weights it corrects would synthesise a signal the kept inputs
    # never carried; it grows as the damping shrinks) and while the k-fold cross-validated error
    # over the calibration batches keeps falling (it is U-shaped in the damping). One batch: the
    # default damping, if trusted. Each candidate costs a solve per fold, so stopping early matters
    # on wide layers (an LLM's MLP: K ~ 1500).
    full = {None: wk}
    damp, best = None, (sum(mse(wk, f) for f in folds) if len(folds) > 1 else None)
    for d in DAMPS[1:]:
        v = fit(G, Ct, d)
        if (v - wk).norm() > TRUST * wk.norm():
            break
        full[d] = v
        if len(folds) <= 1:
            if d == DAMP:
                damp = d
            continue
        err = sum(mse(fit(G - G_pp[f], Ct - C_tp[f], d), f) for f in folds)
        if err >= best:
            break
        damp, best = d, err
    new = full[damp]
    target = _attr(out, c.weight)
    with torch.no_grad():
        target.copy_(new[:, :n].reshape(target.movedim(c.w_in, -1).shape).movedim(-1, c.w_in).to(target.dtype))
        if has_bias:
            _attr(out, c.bias).copy_(new[:, -1].to(target.dtype))


def _attr(obj, path: str):
    return operator.attrgetter(path)(obj)
