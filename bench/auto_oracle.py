"""What ``importance="auto"`` could have chosen: every candidate fine-tuned, against the one it chose.

``auto`` picks a criterion and an allocation by one label-free proxy, the held-out output error before
fine-tuning. This bench asks how well that proxy predicts what the user gets, the accuracy after the
fine-tune: on each task of ``tasks.py`` and each seed, every candidate (criterion x allocation, as the
user can fix them with ``compile(importance=..., allocation=...)``) is compiled at the FLOPs budget,
its proxy read as ``auto`` reads it (relative squared error of the outputs on the odd calibration
batches, BatchNorm statistics recomputed on the even ones, which alone score the units), then it is
fine-tuned exactly as in ``tasks.py`` and tested. The default (``importance="auto"``, every batch) runs
beside them.

Reported per task and budget: each candidate's mean test accuracy over seeds, the default's, the mean of
the candidate the proxy ranks first per seed, and the proxy's Spearman correlation with the test accuracy
across candidates (per seed, then averaged; 1 means the proxy orders candidates as the fine-tune does).
``--distill STEPS@LR,...`` also reads each candidate's proxy after that many steps of label-free
distillation from the original on the scoring batches (``graphprune.distill``, on a copy), to ask
whether a short recovery predicts the fine-tune better (it did not: ``results/auto_oracle_distill.json``).
Rows go to ``bench/results/auto_oracle.json`` as they finish:

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/auto_oracle.py --tasks digits_resnet --resume
    .venv/bin/python bench/auto_oracle.py --table
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.append(str(Path(__file__).parent))  # appended: bench/kernels.py must not shadow the kernels package
import tasks as T  # noqa: E402  (the suite's tasks, training and fine-tune)

import graphprune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CRITERIA = ("activation", "fluctuation", "l2")
ALLOCATIONS = ("score", "per_param", "measured", "uniform")


def proxy(original: torch.nn.Module, pruned: torch.nn.Module, scoring: list, held: list) -> float:
    """``auto``'s judge, from the outside: sum ||y' - y||^2 / sum ||y||^2 on ``held``,
    on a copy whose BatchNorm statistics are recomputed on ``scoring``."""
    model = graphprune.recalibrate_bn(copy.deepcopy(pruned), scoring).eval()
    num = den = 0.0
    with torch.no_grad():
        for (x,) in held:
            y, r = model(x), original(x)
            num += float((y - r).square().sum(dtype=torch.float64))
            den += float(r.square().sum(dtype=torch.float64))
    return num / den


def distilled_proxy(original, pruned, scoring: list, held: list, steps: int, lr: float) -> float:
    """The proxy after ``steps`` of label-free distillation from the original on the scoring batches
    (a copy: the candidate itself gets the suite's fine-tune): what a short recovery already buys."""
    student = graphprune.recalibrate_bn(copy.deepcopy(pruned), scoring)
    graphprune.distill(student, original, scoring, steps=steps, lr=lr, progress=False)
    return proxy(original, student.eval(), scoring, held)


def candidate(run: T.Run, target: float, criterion: str, allocation: str, distill: list) -> dict:
    scoring, held = run.calib[0::2], run.calib[1::2]
    small = graphprune.compile(run.model, run.example, target_flops=target, ignore=[run.task.head],
                               calibration=scoring, importance=criterion, allocation=allocation)
    extra = {f"proxy_distilled_{k}_{lr:g}": distilled_proxy(run.model, small, scoring, held, k, lr) for k, lr in distill}
    return {"proxy": proxy(run.model, small, scoring, held), **extra, **run.finetuned(small)}


def default(run: T.Run, target: float) -> dict:
    small = graphprune.compile(run.model, run.example, target_flops=target, ignore=[run.task.head],
                               calibration=run.calib)
    auto = small.report.auto
    return {"chose": f"{auto.criterion}/{auto.allocation}", "auto": str(auto), **run.finetuned(small)}


def summarise(rows: list[dict]) -> dict:
    cells = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["task"], r["budget"])][r["seed"]].append(r)
    out = {}
    for (task, budget), seeds in sorted(cells.items()):
        by_cand, picks, rhos, defaults = defaultdict(list), defaultdict(list), defaultdict(list), []
        for rs in seeds.values():
            cands = [r for r in rs if r["candidate"] != "default"]
            defaults += [r["test_acc"] for r in rs if r["candidate"] == "default"]
            for r in cands:
                by_cand[r["candidate"]].append(r["test_acc"])
            if len(cands) > 2:
                for key in [k for k in cands[0] if k.startswith("proxy")]:
                    picks[key].append(min(cands, key=lambda r: r[key])["test_acc"])
                    rho = spearmanr([r[key] for r in cands], [-r["test_acc"] for r in cands]).correlation
                    if np.isfinite(rho):
                        rhos[key].append(float(rho))
        means = {c: float(np.mean(v)) for c, v in by_cand.items()}
        best = max(means, key=means.get) if means else None
        out[f"{task}@{budget}"] = {
            "seeds": len(seeds), "candidates": {c: {"mean": m, "n": len(by_cand[c])} for c, m in sorted(means.items())},
            "best_candidate": best, "best_mean": means.get(best),
            "default_mean": float(np.mean(defaults)) if defaults else None,
            "proxy_pick_mean": float(np.mean(picks["proxy"])) if picks["proxy"] else None,
            "spearman": float(np.mean(rhos["proxy"])) if rhos["proxy"] else None,
            "proxies": {k: {"pick_mean": float(np.mean(v)), "spearman": float(np.mean(rhos[k])) if rhos[k] else None}
                        for k, v in picks.items()}}
    return out


def table(summary: dict) -> str:
    lines = ["| task @ FLOPs | default | proxy's pick | best candidate (mean over seeds) | proxy vs accuracy (Spearman) |",
             "|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for cell, s in summary.items():
        rho = "-" if s["spearman"] is None else f"{s['spearman']:.2f}"
        lines.append(f"| {cell} | {pct(s['default_mean'])} | {pct(s['proxy_pick_mean'])} | "
                     f"{pct(s['best_mean'])} ({s['best_candidate']}) | {rho} |")
    keys = sorted({k for s in summary.values() for k in s.get("proxies", {}) if k != "proxy"})
    if keys:  # the distilled proxies beside the plain one: pick's mean (Spearman)
        lines += ["", "| task @ FLOPs | proxy | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for cell, s in summary.items():
            px = s.get("proxies", {})
            fmt = lambda k: "-" if k not in px else f"{pct(px[k]['pick_mean'])} ({px[k]['spearman'] or 0:.2f})"  # noqa: E731
            lines.append(f"| {cell} | {fmt('proxy')} | " + " | ".join(fmt(k) for k in keys) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(T.TASKS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--targets", default=",".join(map(str, T.TARGETS)))
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--distill", default="", help="also the proxy after a short distillation: STEPS@LR,... (e.g. 20@1e-3)")
    ap.add_argument("--out", default=str(RESULTS / "auto_oracle.json"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = Path(args.out)
    result = json.loads(path.read_text()) if (args.resume or args.table) and path.exists() else {"rows": []}
    if not args.table:
        done = {(r["task"], r["seed"], r["budget"], r["candidate"]) for r in result["rows"]}
        budget, code = T.Budget(), T.code_version()
        distill = [(int(k), float(lr)) for k, _, lr in (d.partition("@") for d in args.distill.split(",") if d)]
        for name in args.tasks.split(","):
            task, splits = T.TASKS[name], None
            for seed in map(int, args.seeds.split(",")):
                todo = [(t, c, a) for t in map(float, args.targets.split(",")) for c, a in
                        [("default", None)] + [(c, a) for c in args.criteria.split(",") for a in args.allocations.split(",")]
                        if (name, seed, t, c if a is None else f"{c}/{a}") not in done]
                if not todo:
                    continue
                splits = splits or task.data()
                run = T.Run(task, splits, budget, seed)
                for t, c, a in todo:
                    cand = c if a is None else f"{c}/{a}"
                    row = {"task": name, "seed": seed, "budget": t, "candidate": cand, "code": code,
                           **(default(run, t) if a is None else candidate(run, t, c, a, distill))}
                    result["rows"].append(row)
                    result["summary"] = summarise(result["rows"])
                    path.write_text(json.dumps(result, indent=1))
                    extra = f"proxy {row['proxy']:.3f}" if a is not None else row["chose"]
                    print(f"{name} seed {seed} @{t} {cand}: test {row['test_acc']:.4f} ({extra})", flush=True)
    print(table(summarise(result["rows"])))


if __name__ == "__main__":
    main()
