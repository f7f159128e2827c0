"""Automated allocation: per-group sensitivity curves and a multi-objective search.

``sensitivity`` prunes one group at a time to each level and records the
user's metric: where a model is fragile, where it is not.

``search`` is an evolutionary search over per-group ratios (optuna's NSGA-II,
as in NetAdapt/AMC/EagleEye-style width search), maximising the user's metric
while minimising FLOPs, with the FLOP budget as a constraint. Several
processes can work on one search: give them the same ``storage`` (an optuna
storage URL such as ``sqlite:///search.db`` or a JournalStorage) and
``study_name``; each evaluates its own trials and all see the whole front.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import GraphpruneError
from .flops import count_flops
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


def sensitivity(model: torch.nn.Module, example_inputs: tuple, evaluate: Callable[[torch.nn.Module], float], *,
                levels=(0.25, 0.5, 0.75), importance="l2", ignore=(), groups=None, progress: bool = True, **kw) -> Sensitivity:
    """Prune each group alone to each level in ``levels`` and record ``evaluate(pruned)``.

    >>> s = graphprune.sensitivity(model, (x,), lambda m: accuracy(m, val), levels=(0.3, 0.6))
    >>> s.plot("sensitivity.png")
    """
    p = Pruner(model, example_inputs, kw.pop("example_kwargs", None), tuple(ignore), importance, kw.pop("calibration", None), kw.pop("loss_fn", None))
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
    names = {g.id: g.params[0].name.rpartition(".")[0] for g in chosen}
    return Sensitivity(float(evaluate(p.model)), curves, names)


@dataclass
class SearchResult:
    model: torch.nn.Module  # the best candidate within the budget
    metric: float
    flops: float  # fraction of the original
    front: list  # [{"metric", "flops", "ratios"}] Pareto-optimal candidates within the budget
    study: object

    def plot(self, path: str | None = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trials = [t for t in self.study.trials if t.values is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=12, alpha=0.4, label="candidates")
        front = sorted(self.front, key=lambda f: f["flops"])
        ax.plot([f["flops"] for f in front], [f["metric"] for f in front], "r.-", label="Pareto front (within budget)")
        ax.set_xlabel("FLOPs (fraction of original)")
        ax.set_ylabel("metric")
        ax.legend()
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig


def search(model: torch.nn.Module, example_inputs: tuple, evaluate: Callable[[torch.nn.Module], float], *,
           target_flops: float, trials: int = 50, importance="l2", ignore=(), seed: int = 0, max_ratio: float = 0.9,
           storage=None, study_name: str | None = None, n_jobs: int = 1, progress: bool = True, **kw) -> SearchResult:
    """Search per-group ratios for the best ``evaluate(pruned)`` with FLOPs <= ``target_flops``.

    Objectives: maximise the metric, minimise FLOPs; candidates over budget
    are infeasible (NSGA-II's constraint handling). The first trial is the
    uniform allocation that meets the budget, so the search starts feasible.

    >>> res = graphprune.search(model, (x,), lambda m: accuracy(m, val), target_flops=0.5, trials=40)
    >>> res.model, res.front, res.plot("front.png")
    """
    import optuna

    if not 0 < target_flops <= 1:
        raise GraphpruneError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
    p = Pruner(model, example_inputs, kw.pop("example_kwargs", None), tuple(ignore), importance, kw.pop("calibration", None), kw.pop("loss_fn", None))
    if not p.groups:
        raise GraphpruneError("the model has no prunable group; see graphprune.analyze(model, inputs).summary()")
    x = p.example_inputs
    base = count_flops(p.model, x)

    def flops_of(ratios):
        return count_flops(p.prune(p.removal_for_group_ratios(ratios), check=False, fit=False), x) / base

    def objective(trial):
        ratios = {g.id: trial.suggest_float(f"g{g.id}", 0.0, max_ratio) for g in p.groups}
        f = flops_of(ratios)
        trial.set_user_attr("flops", f)
        trial.set_constraint("flops", f - target_flops)  # <= 0 is feasible
        if f > target_flops:
            return float("-inf"), f
        return float(evaluate(p.prune(p.removal_for_group_ratios(ratios), check=False))), f

    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=storage is not None)
    if not study.trials:  # a new study starts from the uniform allocation; workers joining it do not
        uniform = min(_uniform_ratio(p, flops_of, target_flops), max_ratio)
        study.enqueue_trial({f"g{g.id}": uniform for g in p.groups})
    study.optimize(objective, n_trials=trials, n_jobs=n_jobs, show_progress_bar=progress)
    feasible = [t for t in study.trials if t.values is not None and t.user_attrs.get("flops", 2) <= target_flops]
    if not feasible:
        raise GraphpruneError(f"no candidate met target_flops={target_flops}; raise max_ratio or trials")
    best = max(feasible, key=lambda t: t.values[0])
    ratios = {g.id: best.params[f"g{g.id}"] for g in p.groups}
    front = [{"metric": t.values[0], "flops": t.values[1], "ratios": dict(t.params)} for t in study.best_trials
             if t.user_attrs.get("flops", 2) <= target_flops]
    return SearchResult(p.prune(p.removal_for_group_ratios(ratios)), best.values[0], best.values[1], front, study)


def _uniform_ratio(p: Pruner, flops_of, target: float) -> float:
    """The smallest uniform ratio whose FLOPs meet the target (bisection)."""
    lo, hi = 0.0, 0.95
    if flops_of({g.id: hi for g in p.groups}) > target:
        return hi
    for _ in range(12):
        mid = (lo + hi) / 2
        if flops_of({g.id: mid for g in p.groups}) <= target:
            hi = mid
        else:
            lo = mid
    return hi


