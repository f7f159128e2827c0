"""Automated allocation: per-group sensitivity curves and a budgeted width search.

``sensitivity`` prunes one group at a time to each level and records the
user's metric: where a model is fragile, where it is not.

``search`` looks for the allocation of a FLOPs budget between groups that
scores best by the user's metric (NetAdapt, AMC and EagleEye search widths
the same way): each candidate weighs the groups' scores and lets ``compile``'s
allocation meet the budget, so every candidate spends all of it (optuna's TPE
sampler draws the weights). Several processes can work on one search: give
them the same ``storage`` (an optuna storage URL such as
``sqlite:///search.db`` or a JournalStorage) and ``study_name``; each
evaluates its own trials and all see every result.
"""
from __future__ import annotations

import copy
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import read_batches
from .errors import GraphpruneError
from .flops import count_flops
from .allocate import report
from . import module_form
from .verify import retried_on_weight_writes
from .pruner import Pruner


@dataclass
class Sensitivity:
    """``curves[group id] = [(ratio, metric), ...]``; ``baseline`` is the unpruned metric."""

    baseline: float
    curves: dict
    names: dict = field(default_factory=dict)  # group id -> a readable name (its first parameter's module)

    def plot(self, path: str | None = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for gid, pts in self.curves.items():
            r, m = zip(*pts)
            ax.plot((0.0, *r), (self.baseline, *m), marker=".", label=self.names.get(gid, str(gid)))
        ax.set_xlabel("fraction of the group's units removed")
        ax.set_ylabel("metric")
        ax.set_title("sensitivity per group")
        if len(self.curves) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig


def group_names(p: Pruner, groups) -> dict:
    """{group id: a name a reader can tell apart}: the layers that write its channels (a weight's
    dim 0), the first the model registers and how many more, with the group's id where two would read alike.
    The first parameter's module was often a layer reading the channels: a residual stream and a
    block's inner group were both "b1.0", Llama's stream "lm_head" (survey 26 f14)."""
    dims = {n: t.dim() for n, t in p.gm.named_parameters()}  # in the order the model registers them
    order = {n: i for i, n in enumerate(dims)}
    names = {}
    for g in groups:
        written = sorted((ps.name for ps in g.params if ps.axis == 0 and dims.get(ps.name, 0) >= 2), key=order.get)
        writers = list(dict.fromkeys(n.rpartition(".")[0] for n in written))
        first = writers[0] if writers else g.params[0].name.rpartition(".")[0]
        names[g.id] = first + (f" +{len(writers) - 1}" if len(writers) > 1 else "")
    alike = Counter(names.values())
    return {gid: n if alike[n] == 1 else f"{n} (group {gid})" for gid, n in names.items()}


def sensitivity(model: torch.nn.Module, example_inputs: tuple, evaluate: Callable[[torch.nn.Module], float], *,
                levels=(0.25, 0.5, 0.75), importance="l2", ignore=(), groups=None, progress: bool = True, **kw) -> Sensitivity:
    """Prune each group alone to each level in ``levels`` and record ``evaluate(pruned)``.

    >>> s = graphprune.sensitivity(model, (x,), lambda m: accuracy(m, val), levels=(0.3, 0.6))
    >>> s.plot("sensitivity.png")
    """
    from .verify import why_not

    bad = [r for r in levels if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1]
    if bad:
        raise GraphpruneError(f"levels are fractions of a group to remove, in [0, 1); got {bad}")
    # the trace checked against the model, as compile checks it: a forward fx misreads is retraced
    p = Pruner(model, example_inputs, kw.pop("example_kwargs", None), ignore, importance, kw.pop("calibration", None),
               kw.pop("loss_fn", None), check_trace=why_not(model) is None)
    chosen = [g for g in p.groups if groups is None or g.id in groups]
    curves = {}
    bar = tqdm(total=len(chosen) * len(levels), desc="sensitivity", disable=not progress)
    for g in chosen:
        pts = []
        for r in levels:
            pts.append((float(r), float(evaluate(p.prune(p.removal_for_group_ratios({g.id: r}), check=False)))))
            bar.update()
        curves[g.id] = pts
    bar.close()
    names = group_names(p, chosen)
    # the baseline on a copy too: an evaluate that recalibrates BatchNorm or takes a step changes what it is given
    return Sensitivity(float(evaluate(p.prune({}, check=False))), curves, names)


@dataclass
class SearchResult:
    model: torch.nn.Module  # the best candidate within the budget
    metric: float
    flops: float  # fraction of the original
    front: list  # [{"metric", "flops", "base", "widths", "weights"}]: candidates no other beats at no more FLOPs
    study: object

    def plot(self, path: str | None = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trials = [t for t in self.study.trials if t.value is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.number for t in trials], [t.value for t in trials], s=12, alpha=0.5, label="candidates")
        best = np.maximum.accumulate([t.value for t in trials]) if trials else []
        ax.plot([t.number for t in trials], best, "r-", label="best so far")
        ax.set_xlabel("trial (the first two: compile's allocations by score and uniform)")
        ax.set_ylabel("metric")
        ax.set_title(f"search at {self.flops:.3f} of the FLOPs")
        ax.legend()
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig


@retried_on_weight_writes
def search(model: torch.nn.Module, example_inputs: tuple, evaluate: Callable[[torch.nn.Module], float], *,
           target_flops: float, trials: int = 50, importance="auto", ignore=(), seed: int = 0, max_ratio: float = 0.9,
           spread: float = 4.0, calibration=None, loss_fn=None, example_kwargs=None, storage=None,
           study_name: str | None = None, n_jobs: int = 1, progress: bool = True, output: str = "auto") -> SearchResult:
    """Search per-group widths for the best ``evaluate(pruned)`` at ``target_flops``.

    The search starts where ``compile`` would stop: the same criterion,
    allocation rule, refit and BatchNorm recalibration (``importance="auto"``
    with ``calibration`` chooses them from the data, as ``compile`` does), and
    its first two candidates are ``compile``'s allocation and the uniform one
    (the same fraction from every group), so it returns nothing worse by
    ``evaluate`` than those. Each further candidate weighs every group's
    scores by a factor drawn log-uniformly within ``spread`` of 1 (optuna's
    TPE sampler; a factor of 2 makes a group's units look twice as important,
    so it keeps more of them) and lets the same allocation meet the budget,
    at most 0.01 under it, each group keeping at least ``1 - max_ratio`` of
    its units: every candidate spends the whole budget, the search only moves
    it between groups. Until 2026-12-05 a candidate was a ratio drawn per
    group, ranked by weight norm, and landed wherever the draw fell: on the
    task suite's MobileNet at 25% of its FLOPs the best of 16 kept 16% and
    21% and fine-tuned to 73% and 46%, where ``compile`` reaches 93%. A draw
    that builds a model already evaluated reuses its metric. The model comes
    back as ``compile``'s does: in the user's own classes where they are
    verified (``output="auto"``, ``"module"`` or ``"graph"``, as there).

    >>> res = graphprune.search(model, (x,), lambda m: accuracy(m, val), target_flops=0.5, trials=40,
    ...                         calibration=batches)
    >>> res.model, res.front, res.plot("search.png")
    """
    import math

    import optuna

    from .allocate import RULES, Constraints, allocate, measured_scores
    from .api import _choose_form, _gc_paused, _graph_checks, _module_paths, choose_rule, recalibrate_on, verified_in_classes
    from .verify import verified, why_not

    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise GraphpruneError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
    if not 0 < max_ratio < 1:
        raise GraphpruneError(f"max_ratio must be a fraction in (0, 1), got {max_ratio!r}")
    if spread < 1:
        raise GraphpruneError(f"spread must be at least 1 (a weight per group within [1/spread, spread]), got {spread!r}")
    if output not in ("auto", "module", "graph"):
        raise GraphpruneError(f"output must be 'auto', 'module' or 'graph', got {output!r}")
    if calibration is not None:
        calibration = read_batches(calibration)  # scored, judged, refit and recalibrated on: read more than once
    with _gc_paused():  # the trace checked against the model, as compile checks it
        p = Pruner(model, example_inputs, example_kwargs, ignore, importance, calibration, loss_fn,
                   check_trace=why_not(model) is None, free_reads=output == "graph")
    if not p.groups:
        raise GraphpruneError("the model has no prunable group; see graphprune.analyze(model, inputs).summary()")
    constraints = Constraints(min_keep=1.0 - max_ratio)

    def decide_with(rule, budget: tuple | None = None) -> dict:
        by, fraction = budget or ("flops", target_flops)
        return allocate(p, by, fraction, constraints, rule=rule)[0]

    choice, rule = choose_rule(p, decide_with, "flops", target_flops, allocation="auto", reconstruct=None,
                               choosing=importance == "auto" and calibration is not None)
    bases = {name: (measured_scores(p, "flops") if name == "measured" else RULES[name](p, "flops"))
             for name in dict.fromkeys((rule, "uniform"))}
    built: dict = {}  # kept widths -> (metric, flops): a draw that builds the same model again

    def candidate(params: dict) -> tuple[dict, float]:
        base = bases[params["base"]]
        scores = {g.id: base[g.id] * math.exp(params.get(f"g{g.id}", 0.0)) for g in p.groups}
        return allocate(p, "flops", target_flops, constraints, rule=lambda _p, _kind: dict(scores))

    def build(removal: dict, check: bool) -> torch.nn.Module:
        out = p.prune(removal, check=check)  # refit too, where compile's choice refits
        if choice is not None and choice.recalibrate:
            recalibrate_on(out, p, p.calibration)  # (x, y) batches split: x is the input
        return out

    lock = threading.Lock()  # one Pruner builds every candidate: optuna's n_jobs threads take turns (they
    # shared its meta-device counting and crashed); the user's evaluate runs outside the lock

    def objective(trial):
        params = {"base": trial.suggest_categorical("base", list(bases))}
        params.update({f"g{g.id}": trial.suggest_float(f"g{g.id}", -math.log(spread), math.log(spread)) for g in p.groups})
        with lock:
            removal, flops = candidate(params)
            key = tuple(len(removal.get(g.id, ())) for g in p.groups)
            todo = None if key in built else build(removal, check=False)
        if todo is not None:
            metric = float(evaluate(todo))
            with lock:
                built.setdefault(key, (metric, flops))
        trial.set_user_attr("flops", built[key][1])
        trial.set_user_attr("widths", [g.n_units - k for g, k in zip(p.groups, key)])
        return built[key][0]

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(4, trials // 5))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage, study_name=study_name,
                                load_if_exists=storage is not None)
    # what makes trials comparable: the budget, the model, the criterion and the rankings drawn from (another
    # importance's trials quoted a metric its model did not have; other rankings crashed optuna's sampler)
    asked = {"target_flops": float(target_flops), "groups": [g.n_units for g in p.groups],
             "importance": importance if isinstance(importance, str) else repr(importance), "bases": list(bases)}
    if study.trials and any(study.user_attrs.get(k) != v for k, v in asked.items()):  # another search's trials
        raise GraphpruneError(f"study {study.study_name!r} in this storage holds a search of another budget, model or criterion "
                              f"({ {k: study.user_attrs.get(k) for k in asked} }, not {asked}): give a new study_name")
    if not study.trials:  # a new study starts from compile's allocations; workers joining it do not
        for k, v in asked.items():
            study.set_user_attr(k, v)
        for base in bases:
            study.enqueue_trial({"base": base, **{f"g{g.id}": 0.0 for g in p.groups}})
    study.optimize(objective, n_trials=trials, n_jobs=n_jobs, show_progress_bar=progress)
    done = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if not done:
        raise GraphpruneError(f"no candidate could be evaluated at target_flops={target_flops}")
    best = max(done, key=lambda t: t.value)
    front = [{"metric": t.value, "flops": t.user_attrs["flops"], "base": t.params.get("base"),
              "widths": t.user_attrs["widths"], "weights": {k: math.exp(v) for k, v in t.params.items() if k != "base"}}
             for t in done if not any(_dominates(o, t) for o in done)]
    # the winner held to its dead twin, as compile's result is: groups that break it are kept whole and the
    # same weights allocate again (then measured again); candidates were built unchecked, for speed
    # and, where it may come back in the user's classes, their forward held to the twin on paths the trace
    # did not take (training mode, sizes past an export bound), as compile holds it
    _, removal, check = verified_in_classes(p, lambda: candidate(best.params)[0], _module_paths(model, p, output))
    graph = build(removal, check=True)
    rep = report(p, removal, graph, {"flops": target_flops})
    rep.auto, rep.verify = choice, check
    result, rep.form, rep.form_why = _choose_form(model, graph, p, output, rep)
    _graph_checks(model, p, result, rep, check)
    module_form.record_tree(result)
    result.report = rep
    metric = float(best.value)
    if check.blocked or rep.form == "module":  # another model than the one evaluated: its own figure, read on a
        # copy (an evaluate that adapts what it is given, a few steps as NetAdapt takes, trained the result: 0.6 off
        # its twin, survey 30 f15)
        metric = float(evaluate(copy.deepcopy(result)))
    return SearchResult(result, metric, rep.flops, front, study)


def _dominates(a, b) -> bool:
    """``a`` scores at least as well as ``b`` at no more FLOPs, and strictly better in one."""
    ma, fa, mb, fb = a.value, a.user_attrs["flops"], b.value, b.user_attrs["flops"]
    return ma >= mb and fa <= fb and (ma > mb or fa < fb)
