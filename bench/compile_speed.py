"""Analysis + rewrite time: graphprune vs Torch-Pruning, side by side in one run.

For each model both tools remove 50% of the channels of every prunable group
(classifier ignored): graphprune.compile (trace, couple, score, rewrite; once
alone, with verify=False and output="graph", and once with the defaults, which
add the self-check against the dead twin and the module-form check) against
Torch-Pruning's DependencyGraph build + MagnitudePruner.step. Each time is the
median of ``--repeat`` runs on fresh copies; Torch-Pruning mutates its model,
so it gets a deep copy made outside the timed region.

    python bench/compile_speed.py            # full table -> bench/results/compile_speed.json
    python bench/compile_speed.py --quick    # small models only
    python bench/compile_speed.py --models resnet152 vit_b_16 --out /tmp/x.json   # some rows
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import graphprune


class CifarResNet(nn.Module):
    """A deep CIFAR-style ResNet: 1 stem conv + 3 stages x n blocks x 2 convs (n=100: 601 convs)."""

    def __init__(self, n: int, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        for stage in range(3):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_Basic(width, stride))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class _Basic(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.short = nn.AvgPool2d(2) if stride == 2 else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.short(x) + self.bn2(self.conv2(y)))


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def time_graphprune(model, x, head, checked: bool) -> float:
    """checked=False: the compile alone (verify=False, output="graph"); True: the defaults, which also
    run the self-check against the dead twin and verify the module form."""
    names = {m: n for n, m in model.named_modules()}
    kw = {} if checked else {"verify": False, "output": "graph"}
    t = time.perf_counter()
    graphprune.compile(model, (x,), ratio=0.5, ignore=[names[head]], **kw)
    return time.perf_counter() - t


def time_torch_pruning(model, x, head) -> float:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    t = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[head])
    pruner.step()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="*", help="only these rows (names as printed), e.g. resnet152 vit_b_16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cases = [("resnet152", lambda: torchvision.models.resnet152(), 224)]
    if not args.quick:
        cases += [
            ("densenet201", lambda: torchvision.models.densenet201(), 224),
            ("efficientnet_v2_l", lambda: torchvision.models.efficientnet_v2_l(), 224),
            ("convnext_large", lambda: torchvision.models.convnext_large(), 224),
            ("vit_b_16", lambda: torchvision.models.vit_b_16(), 224),
        ]
    cases += [(f"cifar_resnet_{6 * n + 1}conv", (lambda n=n: CifarResNet(n)), 32) for n in (12, 25, 50, 100)]
    if args.models:
        cases = [c for c in cases if c[0] in args.models]
    rows = []
    for name, build, size in cases:
        model = build().eval()
        x = torch.randn(1, 3, size, size)
        head = _classifier(model)
        n_nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        gp = statistics.median(time_graphprune(model, x, head, False) for _ in range(args.repeat))
        gp_v = statistics.median(time_graphprune(model, x, head, True) for _ in range(args.repeat))
        try:
            tp_s = statistics.median(time_torch_pruning(model, x, head) for _ in range(args.repeat))
        except Exception as e:  # noqa: BLE001 - a peer failing is a result too
            tp_s, err = None, f"{type(e).__name__}: {e}"[:200]
        else:
            err = None
        row = {"model": name, "fx_nodes": n_nodes, "graphprune_s": round(gp, 3), "graphprune_verify_s": round(gp_v, 3),
               "torch_pruning_s": None if tp_s is None else round(tp_s, 3),
               "ratio": None if tp_s is None else round(gp / tp_s, 3),
               "ratio_verify": None if tp_s is None else round(gp_v / tp_s, 3), "torch_pruning_error": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| model | fx nodes | graphprune, verify=False (s) | graphprune, verify on (s) | Torch-Pruning (s) | "
          "ratio | ratio with verify |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fx_nodes']} | {r['graphprune_s']} | {r['graphprune_verify_s']} | {r['torch_pruning_s']} "
              f"| {r['ratio']} | {r['ratio_verify']} |")


if __name__ == "__main__":
    main()
