"""Accuracy after pruning and fine-tuning on real data: scikit-learn's digits.

Why: FLOPs and compile time say nothing about whether the pruned network
still works. This benchmark trains a small CNN with residual and concat
(DenseNet-style) paths on ``sklearn.datasets.load_digits`` (8x8 images, 10
classes), prunes it to 50% and 25% of its FLOPs three ways, fine-tunes each
result under the same budget, and compares test accuracy:

(a) ``graphprune.compile`` with automatic allocation and the best of eight
    criteria, picked per seed and budget on a validation split (never on test);
(b) ``graphprune.search`` (groups reweighed around compile's allocation, every
    candidate at the FLOPs target), units ranked by the criterion (a) picked;
(c) Torch-Pruning's global magnitude pruning (L2, mean-normalised), its
    ratio bisected until its FLOPs are at most the target and within 0.03 of it.

Splits: test = 30% of the data (stratified, random_state=0); the remaining
70% is split again into fit (80%) and validation (20%). The network is trained
and fine-tuned on fit only. Validation scores the criteria of (a) and the
candidates of (b) alike: minus the cross-entropy after a 1-epoch fine-tune
(validation accuracy is near 100% and would only tie).

Each seed sets the initialisation, the data order and the fine-tune; (a), (b)
and (c) of a seed start from the same trained network, get their BatchNorm
statistics recomputed on the fit set, then the same optimiser, epochs and
schedule. Recorded per network: test accuracy before (after BN
recalibration) and after the fine-tune, and FLOPs as a fraction of the
unpruned network's, counted the same way for all (``graphprune.count_flops``,
one 8x8 image). A control, the unpruned network fine-tuned under the same
budget, shows how much of the result is extra training.

Taylor and Hessian criteria need a loss on calibration batches. graphprune
passes batches to the model as positional inputs, so a batch is ``(x,)``
and the loss looks its labels up by the identity of ``x``.

Run from the repository root (7 minutes with ``--threads 1`` on 2 shared CPU
cores; use one thread on a busy machine: two threads contending with other
jobs were ten times slower, on an idle one 1.4 times faster):

    .venv/bin/python bench/accuracy_digits.py            # 5 seeds -> bench/results/accuracy_digits.json, .png
    .venv/bin/python bench/accuracy_digits.py --quick    # 1 seed, tiny budgets: a smoke run (no files written)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import graphprune

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "hessian", "activation", "fpgm", "lamp")
TARGETS = (0.5, 0.25)
RESULTS = Path(__file__).parent / "results"


@dataclass
class Budget:
    """How much work each step gets."""

    seeds: int = 5
    train_epochs: int = 40  # the unpruned network, to convergence
    finetune_epochs: int = 15  # after pruning: identical for (a), (b), (c)
    probe_epochs: int = 1  # the short fine-tune before a validation score (criterion choice, search)
    trials: int = 30  # search candidates per (seed, target)
    criteria: tuple = CRITERIA


QUICK = Budget(seeds=1, train_epochs=3, finetune_epochs=1, probe_epochs=1, trials=4, criteria=("l2", "taylor"))


# ---------------------------------------------------------------- data


@dataclass
class Split:
    x: torch.Tensor  # (n, 1, 8, 8), pixel values scaled to [0, 1]
    y: torch.Tensor


def load_splits() -> tuple[Split, Split, Split]:
    """fit, validation, test; fixed, stratified."""
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x_fit, x_val, y_fit, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
    return tuple(Split(torch.from_numpy(a), torch.from_numpy(b)) for a, b in
                 ((x_fit, y_fit), (x_val, y_val), (x_test, y_test)))


# ---------------------------------------------------------------- model


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class Dense(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all before it."""

    def __init__(self, c: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(conv_bn(c + i * growth, growth) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class DigitsNet(nn.Module):
    """8x8x1 -> stem 32 -> residual 32 -> stride 2 to 64 (4x4) -> residual 64
    -> dense (64 + 2 x 32 = 128) -> global average pool -> linear 10."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.res1 = Residual(32)
        self.down = conv_bn(32, 64, stride=2)
        self.res2 = Residual(64)
        self.dense = Dense(64, growth=32, layers=2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.dense(self.res2(self.down(self.res1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- training


def train(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam, batch 64, cosine decay to zero over all steps; in place. Dropout masks come from the
    global generator, seeded here inside a fork of it: the same pruned model fine-tunes to the same
    weights whatever ran before it (a residual MLP with dropout 0.1 moved by up to 1.5 points with
    the order of methods)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train(model, data, epochs, lr, seed)


def _train(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(data.y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y), generator=gen)
        for idx in order.split(64):
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def finetune(model: nn.Module, fit: Split, epochs: int, seed: int) -> nn.Module:
    return train(model, fit, epochs, lr=1e-3, seed=seed)


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return float((model(data.x).argmax(1) == data.y).float().mean())


# ---------------------------------------------------------------- the three pruners


class Bench:
    """One seed's trained network and everything that prunes it."""

    def __init__(self, fit: Split, val: Split, budget: Budget, seed: int):
        self.fit, self.val, self.budget, self.seed = fit, val, budget, seed
        torch.manual_seed(seed)
        self.model = train(DigitsNet(), fit, budget.train_epochs, lr=3e-3, seed=seed)
        self.example = (fit.x[:1],)
        self.base_flops = graphprune.count_flops(self.model, self.example)
        calib = [(xb,) for xb in fit.x.split(128)]
        labels = {id(b[0]): yb for b, yb in zip(calib, fit.y.split(128))}
        self.data_kw = {"calibration": calib, "loss_fn": lambda out, batch: F.cross_entropy(out, labels[id(batch[0])])}

    def flops(self, model: nn.Module) -> float:
        return graphprune.count_flops(model, self.example) / self.base_flops

    def recalibrate(self, model: nn.Module) -> nn.Module:
        """Recompute BatchNorm statistics on the fit set: pruning inputs of a conv shifts what its BN sees."""
        return graphprune.recalibrate_bn(model, self.data_kw["calibration"]).eval()

    def probe(self, model: nn.Module) -> float:
        """The score for choices and the search: minus the validation cross-entropy after a short
        fine-tune of a copy. Not accuracy: on 252 validation images it sits at or near 100% and ties."""
        model = finetune(self.recalibrate(copy.deepcopy(model)), self.fit, self.budget.probe_epochs, self.seed)
        with torch.no_grad():
            return -float(F.cross_entropy(model(self.val.x), self.val.y))

    def compile(self, target: float) -> tuple[nn.Module, str, dict]:
        """(a): automatic allocation with every criterion; keep the best on validation."""
        scores, models = {}, {}
        for crit in self.budget.criteria:
            models[crit] = graphprune.compile(self.model, self.example, target_flops=target, importance=crit,
                                              ignore=["fc"], **self.data_kw)
            scores[crit] = self.probe(models[crit])
        best = max(scores, key=scores.get)
        return models[best], best, scores

    def search(self, target: float, importance: str) -> nn.Module:
        """(b): compile's allocation with groups reweighed by the search, units ranked by the criterion (a) chose."""
        res = graphprune.search(self.model, self.example, self.probe, target_flops=target, trials=self.budget.trials,
                                importance=importance, ignore=["fc"], seed=self.seed, progress=False, **self.data_kw)
        return res.model

    def torch_pruning(self, target: float) -> nn.Module:
        """(c): the global ratio whose FLOPs are closest to the target from below (bisection)."""
        def prune(ratio):
            model = copy.deepcopy(self.model)
            tp.pruner.MagnitudePruner(model, self.example, importance=tp.importance.MagnitudeImportance(p=2),
                                      global_pruning=True, pruning_ratio=ratio, ignored_layers=[model.fc]).step()
            return model

        return bisect_ratio(prune, self.flops, target)


def bisect_ratio(prune, flops, target: float, tolerance: float = 0.03, steps: int = 12) -> nn.Module:
    """``prune(ratio)`` at the ratio whose ``flops(model)`` is closest to ``target`` from below (bisection over
    [0, 0.99]); Torch-Pruning takes a ratio of channels, not a FLOPs budget."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(steps):  # invariant: ratio lo keeps more than the target, hi at most the target
        mid = (lo + hi) / 2
        model = prune(mid)
        if flops(model) <= target:
            hi, best = mid, model
        else:
            lo = mid
    if best is None or target - flops(best) > tolerance:
        raise RuntimeError(f"Torch-Pruning's FLOPs did not come within {tolerance} below {target}")
    return best


# ---------------------------------------------------------------- run


def run_seed(fit: Split, val: Split, test: Split, budget: Budget, seed: int) -> dict:
    bench = Bench(fit, val, budget, seed)
    control = finetune(copy.deepcopy(bench.model), fit, budget.finetune_epochs, seed)
    record = {"seed": seed, "unpruned": {"test_acc": accuracy(bench.model, test), "val_acc": accuracy(bench.model, val)},
              "unpruned_finetuned": {"test_acc": accuracy(control, test), "val_acc": accuracy(control, val)}}
    print(f"seed {seed} unpruned test {record['unpruned']['test_acc']:.4f}", flush=True)
    for target in TARGETS:
        small, crit, crit_scores = bench.compile(target)
        pruned = {"compile": small, "search": bench.search(target, crit), "torch_pruning": bench.torch_pruning(target)}
        out = {"criterion": crit, "criterion_val_probe": crit_scores}
        for name, model in pruned.items():
            before = accuracy(bench.recalibrate(model), test)
            finetune(model, fit, budget.finetune_epochs, seed)
            out[name] = {"flops": bench.flops(model), "test_acc_before_finetune": before,
                         "test_acc": accuracy(model, test), "val_acc": accuracy(model, val)}
        record[f"flops_{target}"] = out
        print(f"seed {seed} target {target}: criterion {crit}; " + ", ".join(
            f"{n} {out[n]['test_acc']:.4f} @ {out[n]['flops']:.3f}" for n in pruned), flush=True)
    return record


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(records: list[dict]) -> dict:
    out = {"unpruned_test_acc": mean_std([r["unpruned"]["test_acc"] for r in records]),
           "unpruned_finetuned_test_acc": mean_std([r["unpruned_finetuned"]["test_acc"] for r in records])}
    for target in TARGETS:
        key = f"flops_{target}"
        out[key] = {name: {what: mean_std([r[key][name][what] for r in records])
                           for what in ("test_acc", "test_acc_before_finetune", "flops")}
                    for name in ("compile", "search", "torch_pruning")}
        out[key]["criteria_chosen"] = [r[key]["criterion"] for r in records]
    return out


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = summary["unpruned_test_acc"]
    ax.axhline(100 * base["mean"], color="k", lw=1, label="unpruned")
    for name, label, marker in (("compile", "(a) compile", "o"), ("search", "(b) search", "s"),
                                ("torch_pruning", "(c) Torch-Pruning", "^")):
        pts = [summary[f"flops_{t}"][name] for t in TARGETS]
        ax.errorbar([p["flops"]["mean"] for p in pts], [100 * p["test_acc"]["mean"] for p in pts],
                    yerr=[100 * p["test_acc"]["std"] for p in pts], marker=marker, capsize=3, label=label)
    ax.set_xlabel("FLOPs (fraction of the unpruned network)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("digits: accuracy after pruning and fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny budgets; writes nothing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    fit, val, test = load_splits()
    start = time.perf_counter()
    records = [run_seed(fit, val, test, budget, seed) for seed in range(budget.seeds)]
    summary = summarise(records)
    elapsed = time.perf_counter() - start
    print(json.dumps(summary, indent=1))
    print(f"{elapsed:.0f} s")
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    result = {"budget": budget.__dict__, "sizes": {"fit": len(fit.y), "val": len(val.y), "test": len(test.y)},
              "seconds": elapsed, "torch_threads": torch.get_num_threads(), "summary": summary, "seeds": records}
    (RESULTS / "accuracy_digits.json").write_text(json.dumps(result, indent=1))
    plot(summary, RESULTS / "accuracy_digits.png")


if __name__ == "__main__":
    main()
