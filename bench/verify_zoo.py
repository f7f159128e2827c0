"""The self-check on the torchvision zoo: what it costs and what it repairs.

For every torchvision classifier (the sizes of tests/test_zoo.py), compile at
ratio 0.5 with the classifier ignored, once with ``verify=False`` and once with
the default self-check, side by side; report the check's status, any groups
it kept whole, and the time ratio.

    python bench/verify_zoo.py                      # -> bench/results/verify_zoo.json
    python bench/verify_zoo.py --models resnet18 vit_b_16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

import graphprune

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_zoo import KWARGS, NAMES, _classifier, _size  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "verify_zoo.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models or NAMES:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
        s = _size(name)
        x = torch.randn(1, 3, s, s)
        ignore = _classifier(model)
        t = time.perf_counter()
        graphprune.compile(model, (x,), ratio=0.5, ignore=ignore, verify=False)
        off = time.perf_counter() - t
        t = time.perf_counter()
        small = graphprune.compile(model, (x,), ratio=0.5, ignore=ignore)
        on = time.perf_counter() - t
        v = small.report.verify
        row = {"model": name, "input": s, "verify": v.status, "kept_whole": v.blocked, "checked_inputs": v.inputs,
               "compile_s": round(off, 3), "compile_verify_s": round(on, 3), "cost_ratio": round(on / off, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    status = {}
    for r in rows:
        status[r["verify"]] = status.get(r["verify"], 0) + 1
    ratios = sorted(r["cost_ratio"] for r in rows)
    print(f"\n{len(rows)} models: {status}; compile time with verify / without: median {ratios[len(ratios) // 2]}, "
          f"max {ratios[-1]}")


if __name__ == "__main__":
    main()
