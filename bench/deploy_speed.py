"""Realized CPU speed-up against FLOPs removed, default pipeline beside ``pipeline="deploy"``.

Issue 12 asks whether removing FLOPs buys latency: efficiency = speed-up /
FLOPs reduction, 1.0 being the limit. Each model (torchvision, random
weights, eval mode, batch 8 at 224x224, 2 threads) is pruned at ``ratio=0.5``,
at ``target_flops=0.25`` and at ``target_latency=0.3`` (classifier kept, ``importance="l1"``: speed does
not depend on which channels go), once with the default pipeline and once
with ``pipeline="deploy"`` (BatchNorms and layer scales folded into the layers before them,
LayerNorm affines into the linears after them; 2-d convolutions channels-last, and
convolutions and linears as oneDNN kernels with their activations fused, each where the
unpruned model times faster so; under a FLOPs budget, widths in the multiple of 1, 8 or 16
that times fastest here).

Latency ratios are measured side by side (``graphprune.flops.latency_ratio``:
pruned and reference alternate, each keeps its fastest round), against two references:

* the original as given (what the user had);
* the original after the same lossless clean-ups (``compile(..., ratio=0,
  pipeline="deploy")``: nothing removed, everything folded, the same layout and kernels where
  faster), so the part of the speed-up that the clean-ups alone give is visible: that
  figure is what pruning itself buys.

    python bench/deploy_speed.py                   # -> bench/results/deploy_speed.json
    python bench/deploy_speed.py --models resnet50 --rounds 3
    python bench/deploy_speed.py --budgets target_latency=0.3 --pipelines deploy --redo   # those figures again
    python bench/deploy_speed.py --models timm:efficientnet_b0 timm:convnext_tiny timm:vit_small_patch16_224 \
        --budgets ratio=0.5 target_flops=0.25 --out bench/results/deploy_speed_timm.json

Each pipeline's figures carry the commit they were measured on (``code``; ``+dirty`` when
the library had uncommitted changes).

The process runs with glibc's allocator pinned (``ALLOCATOR``: a fixed mmap threshold,
no trimming; the script re-executes itself with them unless they are set). Without it,
the original as given, whose large contiguous activations sit near glibc's dynamic mmap
threshold, flips between two speeds within one process as the heap is trimmed and
regrown (EfficientNet-B0 at batch 8: 84 or 140 ms, 60-70 ms pinned), while the pruned
channels-last model stays put; a latency ratio then moved by up to half between
readings, and speed-ups against the original came out inflated. Pinned, both models
run without page-fault storms, as under the jemalloc or tcmalloc that PyTorch's CPU
tuning guide recommends.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision

import graphprune
from graphprune.flops import latency_ratio

HEADS = {"resnet50": "fc", "mobilenet_v2": "classifier.1", "efficientnet_b0": "classifier.1",
         "convnext_tiny": "classifier.2", "vit_b_16": "heads.head"}
BUDGETS = {"ratio=0.5": {"ratio": 0.5}, "target_flops=0.25": {"target_flops": 0.25},
           "target_latency=0.3": {"target_latency": 0.3}}


def build(name: str) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, its classifier) for a torchvision name, or ``timm:<name>`` (timm's own
    norm classes, BatchNormAct2d and layer-scale spellings, which fx traces through)."""
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False).eval()
        return model, model.pretrained_cfg["classifier"]
    return getattr(torchvision.models, name)(num_classes=1000).eval(), HEADS[name]


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def pin_allocator() -> None:
    """Re-execute this script with ``ALLOCATOR`` in the environment (glibc reads it at start-up)."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})


def _code() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "graphprune", "passes"], cwd=root, capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(HEADS))
    ap.add_argument("--budgets", nargs="*", default=list(BUDGETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipelines", nargs="*", default=["default", "deploy"])
    ap.add_argument("--redo", action="store_true", help="measure (model, budget) rows already in --out again; "
                    "pipelines not in --pipelines keep their old figures")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "deploy_speed.json"))
    a = ap.parse_args()
    pin_allocator()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["model"], r["budget"]): r for r in rows}
    x = torch.randn(a.batch, 3, 224, 224)
    for name in a.models:
        torch.manual_seed(0)
        model, head = build(name)
        base_flops = graphprune.count_flops(model, (x,))
        folded = graphprune.compile(model, (x,), ratio=0.0, importance="l1", ignore=[head], pipeline="deploy", verify=False)
        for budget in a.budgets:
            if (name, budget) in done and not a.redo:
                continue
            old = done.get((name, budget))
            row = {**(old or {}), "model": name, "budget": budget, "batch": a.batch, "threads": a.threads}
            for pipe in a.pipelines:
                t = time.perf_counter()
                small = graphprune.compile(model, (x,), importance="l1", ignore=[head], pipeline=pipe, **BUDGETS[budget])
                row[f"{pipe}_compile_s"] = round(time.perf_counter() - t, 1)
                row[f"{pipe}_code"] = _code()
                reduction = base_flops / graphprune.count_flops(small, (x,))
                with torch.no_grad():
                    vs_given = 1 / latency_ratio(small, model, (x,), rounds=a.rounds)
                    vs_folded = 1 / latency_ratio(small, folded, (x,), rounds=a.rounds)
                row[pipe] = {"flops_reduction": round(reduction, 3), "speedup_vs_given": round(vs_given, 3),
                             "efficiency_vs_given": round(vs_given / reduction, 3),
                             "speedup_vs_folded_original": round(vs_folded, 3),
                             "efficiency_vs_folded_original": round(vs_folded / reduction, 3)}
                if small.report.layout:  # deploy: channels-last or not, and the timing that decided it
                    row[pipe]["layout"] = small.report.layout
                if small.report.kernels:  # deploy: oneDNN kernels with fused activations or not, and the timing
                    row[pipe]["kernels"] = small.report.kernels
                if small.report.rounding:  # deploy with a FLOPs budget: the width multiple it timed fastest
                    row[pipe]["rounding"] = small.report.rounding
                if "target_latency" in BUDGETS[budget]:  # where it landed: compile's own figure and this run's
                    want = BUDGETS[budget]["target_latency"]
                    row[pipe].update(latency_reported=round(small.report.latency, 3), latency_measured=round(1 / vs_given, 3),
                                     latency_miss=round(abs(1 / vs_given - want) / want, 3))
                del small
            rows = [r for r in rows if r is not old] + [row]
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps({"command": "python bench/deploy_speed.py", "allocator": ALLOCATOR,
                                       "torch": torch.__version__, "rows": rows}, indent=1))
    print("| model | budget | FLOPs reduction | default: speed-up, efficiency | deploy: speed-up, efficiency | deploy vs folded original |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "deploy" not in r:
            continue
        d, p = r.get("default", {"speedup_vs_given": float("nan"), "efficiency_vs_given": float("nan")}), r["deploy"]
        print(f"| {r['model']} | {r['budget']} | {p['flops_reduction']:.2f}x | {d['speedup_vs_given']:.2f}x, {d['efficiency_vs_given']:.2f} | "
              f"{p['speedup_vs_given']:.2f}x, {p['efficiency_vs_given']:.2f} | {p['speedup_vs_folded_original']:.2f}x, "
              f"{p['efficiency_vs_folded_original']:.2f} |")


if __name__ == "__main__":
    main()
