"""Budget adherence: does compile(target_flops=...) land in [target - 0.03, target]?

Prunes torchvision models (random weights) to 25%, 50% and 75% of their FLOPs
with the default criterion and automatic allocation, and ResNet-50 to 50% of
its CPU latency (batch 8), reporting the achieved fractions measured on the
returned model (FLOPs by torch.utils.flop_counter; latency as the median of
5 independent measurements, each itself a median of timed runs). The latency
search runs three ways in one run (compile time, timings and landing side by side):
as it ships, interpolating on the latency table's estimate (``guided``); interpolating
on the threshold index (``interpolated``, ``allocate.GUIDED = False``); and bisecting to
neighbouring thresholds (``bisection``, also ``allocate.LAND_TOL = 0``).

    python bench/budgets.py            # -> bench/results/budgets.json
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from unittest import mock
from pathlib import Path

import torch
import torchvision

import graphprune
import graphprune.allocate
from graphprune.flops import latency_ratio

from deploy_speed import ALLOCATOR, pin_allocator  # noqa: E402  (bench/ is on sys.path: this script's folder)

MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
TARGETS = [0.25, 0.5, 0.75]


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-only", action="store_true", help="skip the FLOPs table, keep its earlier results")
    args = ap.parse_args()
    pin_allocator()  # latency readings of a CPU model are otherwise bimodal (see deploy_speed.py)
    torch.set_num_threads(2)
    out = Path(__file__).parent / "results" / "budgets.json"
    rows = json.loads(out.read_text())["flops"] if args.latency_only and out.exists() else []
    x = torch.randn(1, 3, 224, 224)
    for name in [] if args.latency_only else MODELS:
        model = torchvision.models.get_model(name, weights=None).eval()
        for t in TARGETS:
            start = time.perf_counter()
            small = graphprune.compile(model, (x,), target_flops=t)
            took = time.perf_counter() - start
            achieved = graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))
            row = {"model": name, "target_flops": t, "achieved_flops": round(achieved, 4), "params": round(small.report.params, 4),
                   "ok": t - 0.03 <= achieved <= t, "seconds": round(took, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    model = torchvision.models.resnet50(weights=None).eval()
    xb = torch.randn(8, 3, 224, 224)
    lat = {}
    tol = graphprune.allocate.LAND_TOL
    for search, tol, guided in (("guided", tol, True), ("interpolated", tol, False), ("bisection", 0.0, False)):
        lat[search] = latency_row(model, xb, tol, guided)  # one run, same machine
        print(search, json.dumps(lat[search]), flush=True)
    for other in ("interpolated", "bisection"):
        lat[f"seconds_{other}_over_guided"] = round(lat[other]["seconds"] / lat["guided"]["seconds"], 2)
    out.write_text(json.dumps({"flops": rows, "latency": lat, "allocator": ALLOCATOR}, indent=1))
    print("\n| model | target | achieved FLOPs | params | in [t-0.03, t] |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['target_flops']} | {r['achieved_flops']} | {r['params']} | {'yes' if r['ok'] else 'NO'} |")


def latency_row(model, xb, tol: float, guided: bool = True) -> dict:
    """ResNet-50 to half its latency, the threshold search ending within ``tol`` of the
    target (0: bisection to neighbouring thresholds, as before the interpolated search),
    interpolating on the latency table's estimate or not (``guided``); every candidate
    timing counted. The table is built afresh (a cache of its own) and its time counted."""
    allocate = graphprune.allocate
    timings = []

    def counted(*a, **k):
        timings.append(1)
        return latency_ratio(*a, **k)

    with mock.patch.multiple(allocate, LAND_TOL=tol, latency_ratio=counted, GUIDED=guided), \
            mock.patch.dict(os.environ, GRAPHPRUNE_CACHE=tempfile.mkdtemp(prefix="budgets-cache-")):
        start = time.perf_counter()
        small = graphprune.compile(model, (xb,), target_latency=0.5)
        took = time.perf_counter() - start
    ratios = [latency_ratio(small, model, (xb,)) for _ in range(5)]  # each side by side: the models alternate
    return {"model": "resnet50", "batch": 8, "target_latency": 0.5, "search_tolerance": tol, "guided": guided,
            "achieved_latency_runs": [round(r, 4) for r in ratios], "median": round(statistics.median(ratios), 4),
            "ok": abs(statistics.median(ratios) - 0.5) <= 0.05, "achieved_flops": round(small.report.flops, 4),
            "reported_latency": round(small.report.latency, 4), "timings": len(timings), "seconds": round(took, 1)}


if __name__ == "__main__":
    main()
