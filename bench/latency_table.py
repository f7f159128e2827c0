"""Does the latency table predict what pruning buys better than FLOPs do?

Issue 12 asks for allocation that weighs what a unit saves per measured
millisecond under a latency budget, from NetAdapt-style tables
(``graphprune/latency_table.py``: every node timed in the model at four widths).
This script checks the table against the clock: for each model (torchvision, random weights, eval, batch 8 at 224x224,
2 threads, ``pipeline="deploy"`` with the layout ``compile`` would choose), it
draws random allocations (each group keeps a fraction drawn from [0.2, 1]),
builds each candidate, times it side by side with the unpruned deploy model
(``flops.latency_ratio``), and compares three predictions of that ratio:

* ``flops``: the candidate's FLOPs over the original's (``torch.utils.flop_counter``);
* ``table``: NetAdapt's lookup, every node's row read at the width its groups keep (``predict_ms``);
* ``slopes``: the first-order estimate the allocation uses, 1 - (milliseconds of the removed
  units, ``unit_ms``) / (the unpruned model's ``predict_ms``).

The first version timed each layer shape alone; its figures are in bench/README.md.

Reported per model: Spearman rank correlation with the measured ratio (which
candidate is faster) and mean absolute error (how much faster). Run with the
allocator pinned, like ``deploy_speed.py`` (it re-executes itself so).

    python bench/latency_table.py                       # -> bench/results/latency_table.json
    python bench/latency_table.py --models mobilenet_v2 --draws 6
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_speed import HEADS, _code, pin_allocator  # noqa: E402

from graphprune.api import fastest_layout  # noqa: E402
from graphprune.flops import count_flops, latency_ratio  # noqa: E402
from graphprune.latency_table import LatencyTable, predict_ms, unit_ms  # noqa: E402
from graphprune.pruner import Pruner, remove_lowest  # noqa: E402


def draws(p, k: int, rng) -> list[dict]:
    out = []
    for _ in range(k):
        removed = {}
        for g in p.groups:
            keep = max(g.min_units, int(round(rng.uniform(0.2, 1.0) * g.n_units)))
            if keep < g.n_units:
                removed[g.id] = remove_lowest(g, p.scores[g.id], g.n_units - keep)
        out.append(removed)
    return out


def run_model(name: str, k: int, seed: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(8, 3, 224, 224)
    p = Pruner(model, (x[:1],), ignore=(HEADS[name],), importance="l1", pipeline="deploy")
    layout = fastest_layout(p)
    t0 = time.perf_counter()
    table = LatencyTable(p, (x,))
    costs = unit_ms(p, (x,), table)
    full = predict_ms(p, {}, table)
    table_s = time.perf_counter() - t0
    ref = p.prune({}, check=False, fit=False)
    base_flops = count_flops(ref, (x[:1],))
    rows = []
    for removed in draws(p, k, np.random.default_rng(seed)):
        cand = p.prune(removed, check=False, fit=False)
        with torch.no_grad():
            measured = latency_ratio(cand, ref, (x,), rounds=rounds)
        saved = sum(float(costs[gid][idx].sum()) for gid, idx in removed.items())
        rows.append({"measured": round(measured, 4), "flops": round(count_flops(cand, (x[:1],)) / base_flops, 4),
                     "table": round(predict_ms(p, removed, table) / full, 4),
                     "slopes": round(1 - saved / full, 4)})
        print(name, rows[-1], flush=True)
    m = np.array([r["measured"] for r in rows])
    summary = {}
    for key in ("flops", "table", "slopes"):
        v = np.array([r[key] for r in rows])
        summary[key] = {"spearman": round(float(spearmanr(v, m)[0]), 3), "mae": round(float(np.abs(v - m).mean()), 4)}
    return {"model": name, "layout": layout, "draws": rows, "summary": summary, "table_seconds": round(table_s, 1),
            "timed_now": table.timed, "code": _code()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0", "resnet50", "convnext_tiny"])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_table.json"))
    args = ap.parse_args()
    pin_allocator()
    torch.set_num_threads(2)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models:
        results[name] = run_model(name, args.draws, args.seed, args.rounds)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print("| model | FLOPs: Spearman, MAE | table: Spearman, MAE | slopes: Spearman, MAE | table built |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        cells = " | ".join(f"{s[k]['spearman']:.2f}, {s[k]['mae']:.3f}" for k in ("flops", "table", "slopes"))
        print(f"| {name} | {cells} | {r['table_seconds']} s |")


if __name__ == "__main__":
    main()
