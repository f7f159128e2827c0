"""Would ``auto`` fine-tune better if its allocations were pulled toward uniform widths?

The task suite (``tasks.py``) shows the default trailing Torch-Pruning's near-uniform
widths by a fraction of a point on the residual digits CNN, where ``auto``'s measured
allocation keeps the residual stream and thins the branch convs: faithful before the
fine-tune, less so after. This bench asks whether shrinking every allocation rule toward
the uniform fraction (a standard hedge for noisy per-group estimates) fixes that without
costing where measured allocation wins (MobileNet, the ViT). It patches the rules in
``graphprune.allocate`` from the outside (graphprune ships no such knob) and runs the
default ``compile`` at each ``--lams`` value beside Torch-Pruning, on the same trained
network per seed, with the suite's fine-tune:

    OMP_NUM_THREADS=1 python bench/allocation_shrink.py --tasks digits_resnet --lams 1,0.5
    python bench/allocation_shrink.py --table

``shrunk(p, norm, lam)``: at each threshold a group removes ``lam * k_g + (1 - lam) *
n_g * K / N`` units (``k_g`` what the rule removes from it, ``K`` of ``N`` in all),
lowest-scoring first; ``lam=1`` is the rule, ``lam=0`` the uniform fraction.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.append(str(Path(__file__).parent))
import tasks as T  # noqa: E402  (the suite's tasks, training and fine-tune)

from graphprune import allocate  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def shrunk(p, norm: dict, lam: float) -> dict:
    """``norm`` (a rule's unit scores, thresholded together) with each group's removed fraction
    pulled toward the model-wide one, returned as unit scores (the threshold at which each
    unit goes), so ``allocate``'s budget search runs unchanged."""
    gids = [g.id for g in p.groups]
    finite = [norm[gid][np.isfinite(norm[gid])] for gid in gids]
    taus = np.append(np.unique(np.concatenate(finite + [np.zeros(1)])), np.inf)  # the last removes every unit
    n = np.array([len(norm[gid]) for gid in gids], dtype=float)
    k = np.stack([np.searchsorted(np.sort(norm[gid]), taus, side="left") for gid in gids])  # (groups, taus)
    frac = k.sum(0) / max(n.sum(), 1.0)                                                     # (taus,)
    blend = np.floor(lam * k + (1 - lam) * n[:, None] * frac[None, :] + 1e-9).astype(int)  # (groups, taus)
    blend = np.maximum.accumulate(np.minimum(blend, n[:, None].astype(int)), axis=1)
    grid = np.append(taus[:-1], 2 * taus[-2] + 1)  # +inf as a finite score above every other
    out = {}
    for row, gid in enumerate(gids):
        s = norm[gid]
        first = np.searchsorted(blend[row], np.arange(1, len(s) + 1), side="left")  # threshold where j+1 are gone
        score = np.empty(len(s))
        score[np.argsort(s, kind="stable")] = np.where(first < len(taus), grid[np.minimum(first, len(taus) - 1)], np.inf)
        out[gid] = np.where(np.isfinite(s), score, s)
    return out


def patched(lam: float):
    """Every rule but ``uniform`` shrunk by ``lam``, for the ``with`` block."""
    rules = {name: (lambda f: lambda p, kind=None: shrunk(p, f(p, kind), lam))(f)
             for name, f in allocate.RULES.items() if name != "uniform"}
    measured = allocate.measured_scores
    return mock.patch.multiple(allocate, RULES={**allocate.RULES, **rules},
                               measured_scores=lambda p, kind=None, li=None: shrunk(p, measured(p, kind, li), lam))


def method_name(lam: float) -> str:
    return "graphprune" if lam == 1 else f"graphprune_shrunk{lam:g}"


def run(tasks, seeds, lams, rivals, path: Path, targets=T.TARGETS, budget: T.Budget | None = None,
        train_epochs: int | None = None) -> list:
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["task"], r["seed"], r["method"], r["budget"]) for r in rows}
    for name in tasks:
        splits = T.TASKS[name].data()
        for seed in seeds:
            r = None
            for t in targets:
                for m, lam in [(method_name(lam), lam) for lam in lams] + [(m, None) for m in rivals]:
                    if (name, seed, m, t) in done:
                        continue
                    r = r or T.Run(T.TASKS[name], splits, budget or T.Budget(), seed, train_epochs)
                    if lam is None:
                        row = r.method(m, t)
                    else:
                        with patched(lam):
                            row = r.method("graphprune", t)
                    rows.append({"task": name, "seed": seed, "method": m, "budget": t, "code": T.code_version(), **row})
                    path.write_text(json.dumps(rows, indent=1))
                    print(f"{name} seed {seed} @{t} {m}: {100 * row['test_acc']:.2f}  {row.get('auto', '')[:80]}", flush=True)
    return rows


def table(rows: list) -> str:
    cells = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["budget"], r["method"])].append(100 * r["test_acc"])
    methods = sorted({m for _, _, m in cells}, key=lambda m: (not m.startswith("graphprune"), m))
    lines = ["| task @ FLOPs | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, budget in sorted({(t, b) for t, b, _ in cells}, key=lambda tb: (tb[0], -tb[1])):
        vals = [cells.get((task, budget, m), []) for m in methods]
        fmt = [f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else "-" for v in vals]
        lines.append(f"| {task}@{budget} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(T.TASKS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--lams", default="1,0.5", help="shrink factors; 1 is the default as it ships")
    ap.add_argument("--rivals", default="tp_magnitude,tp_taylor")
    ap.add_argument("--out", default=str(RESULTS / "allocation_shrink.json"))
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    path = Path(args.out)
    if not args.table:
        torch.set_num_threads(1)
        run(args.tasks.split(","), [int(s) for s in args.seeds.split(",")], [float(v) for v in args.lams.split(",")],
            [m for m in args.rivals.split(",") if m], path)
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
