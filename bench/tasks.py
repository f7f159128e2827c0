"""A task suite for pruning defaults: five small tasks, five methods, two FLOPs budgets, five seeds.

Why: a default tuned on one task (``accuracy_digits.py``) says nothing about the next. Each task here is
a different architecture on real data where scikit-learn ships it (nothing downloads), or on generated data
with real structure:

* ``digits_resnet``: the residual + dense 2-D CNN of ``accuracy_digits.py`` on digits (8x8, 10 classes);
* ``digits_mobile``: inverted residuals with depthwise convs and squeeze-excite, on digits;
* ``digits_vit``: a ViT on 2x2 patches of the digits (16 tokens, width 64, 2 blocks, 4 heads, pre-norm);
* ``cancer_mlp``: an MLP (Linear-BN-ReLU, 256-256-128) on ``load_breast_cancer`` (30 standardised features, 2 classes);
* ``signal_1d``: a 1-D CNN with residual, squeeze-excite and concat paths on generated signals (10 classes, each
  a pair of frequencies, with jitter, random phases and amplitudes, a distractor tone and noise; 128 samples).

Splits are fixed: test = 30% (stratified, random_state=0), the rest split 80/20 into fit and validation
(the ``load_splits`` protocol of ``accuracy_digits.py``). Each seed trains its network on fit, then every
method prunes that same network to ``target_flops`` 0.5 and 0.25 (FLOPs counted by ``graphprune.count_flops``
on one sample, for every method), BatchNorm statistics are recomputed on fit, and the pruned network gets
the same fine-tune (``finetune_epochs`` of Adam at 1e-3, cosine; ``accuracy_digits.finetune``):

* ``graphprune``: ``graphprune.compile(model, (x,), target_flops=t, ignore=[head], calibration=batches)``,
  as documented, so ``importance="auto"``; no loss function is given;
* ``tp_magnitude``, ``tp_taylor``: Torch-Pruning 1.6 global pruning (``MagnitudeImportance(p=2)``,
  ``TaylorImportance()`` with gradients of the cross-entropy on the fit set), classifier ignored, its channel
  ratio bisected to the largest FLOPs <= t (``accuracy_digits.bisect_ratio``); ViT heads as in Torch-Pruning's
  own ViT example (``num_heads`` given, head dims pruned alike in every head);
* ``gp_search``: ``graphprune.search`` with the same calibration batches (it starts from the default's own
  choice and allocation, then reweighs groups), ``trials`` candidates each scored by minus the validation
  cross-entropy after BatchNorm recalibration (no training);
* ``gp_iterative``: ``graphprune.prune_iteratively`` in ``steps`` steps (cubic schedule, each step a default
  ``compile``), its fine-tune between steps being the same total budget split evenly (no fine-tune after).

Recorded per (task, method, budget, seed): test accuracy after fine-tune (and before it), validation accuracy,
FLOPs and parameters kept, seconds (pruning alone and in all), the widths of every conv/linear, and for
graphprune's default what ``report.auto`` chose. Also the unpruned accuracy, and the unpruned network
fine-tuned under the same budget (a control: how much is extra training).

Run from the repository root; rows are written to ``bench/results/tasks.json`` as they finish, the plot
to ``bench/results/tasks.png`` at the end (``--plot-only`` redraws it, ``--table`` prints the README table):

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/tasks.py --resume
    .venv/bin/python bench/tasks.py --tasks signal_1d --seeds 0 --methods graphprune,tp_magnitude --out /tmp/t.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

sys.path.append(str(Path(__file__).parent))  # appended: bench/kernels.py must not shadow the kernels package
import accuracy_digits as digits  # noqa: E402  (the training loop, splits, the digits CNN, the ratio bisection)
from accuracy_digits import Split, accuracy, bisect_ratio, conv_bn, finetune, train  # noqa: E402

import graphprune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("graphprune", "tp_magnitude", "tp_taylor", "gp_search", "gp_iterative")
TARGETS = (0.5, 0.25)


@dataclass
class Budget:
    seeds: int = 5
    finetune_epochs: int = 6  # after pruning, the same for every method
    trials: int = 16  # gp_search candidates
    steps: int = 3  # gp_iterative steps (finetune_epochs // steps epochs after each)
    batch: int = 128  # calibration batch


# ---------------------------------------------------------------- data


def split(x: np.ndarray, y: np.ndarray) -> tuple[Split, Split, Split]:
    """fit, validation, test: the protocol of ``accuracy_digits.load_splits``."""
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x_fit, x_val, y_fit, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
    return tuple(Split(torch.from_numpy(np.ascontiguousarray(a, np.float32)), torch.from_numpy(b.astype(np.int64)))
                 for a, b in ((x_fit, y_fit), (x_val, y_val), (x_test, y_test)))


def cancer_splits() -> tuple[Split, Split, Split]:
    """Breast cancer (569 x 30, 2 classes), standardised with the fit split's mean and std."""
    data = load_breast_cancer()
    fit, val, test = split(data.data, data.target)
    mu, sd = fit.x.mean(0), fit.x.std(0) + 1e-6
    return tuple(Split((s.x - mu) / sd, s.y) for s in (fit, val, test))


def signal_splits(n: int = 2400, length: int = 128) -> tuple[Split, Split, Split]:
    """Generated 1-D signals, fixed generator. Class c = (a, b): two tones at frequencies from a shared
    set, so every frequency belongs to several classes and only the pair tells them apart; each tone's
    frequency jittered by +-0.5 cycles, random phase and amplitude in [0.5, 1.5]; plus a distractor tone
    (amplitude up to 0.5) at a random frequency in [1, 24] and Gaussian noise of std 0.8."""
    rng = np.random.default_rng(1234)
    base = (3.0, 5.0, 7.0, 9.0, 11.0)
    pairs = [(base[i], base[i] + d) for i in range(5) for d in (3.0, 5.0)]  # 10 classes
    y = np.arange(n) % len(pairs)
    t = np.arange(length) / length
    x = np.zeros((n, 1, length))
    for i, c in enumerate(y):
        for f in pairs[c]:
            x[i, 0] += rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * (f + rng.uniform(-0.5, 0.5)) * t + rng.uniform(0, 2 * np.pi))
        x[i, 0] += rng.uniform(0, 0.5) * np.sin(2 * np.pi * rng.uniform(1, 24) * t + rng.uniform(0, 2 * np.pi))
    x += rng.normal(0, 0.8, x.shape)
    return split(x, y)


# ---------------------------------------------------------------- models


class SE(nn.Module):
    """Squeeze-excite over dim 1 of (B, C, *spatial)."""

    def __init__(self, c: int, r: int = 4, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.reduce, self.expand = conv(c, c // r, 1), conv(c // r, c, 1)
        self.dims = tuple(range(2, 2 + dims))

    def forward(self, x):
        s = x.mean(self.dims, keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2/EfficientNet block: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project (+ x)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int):
        super().__init__()
        hid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6())
        self.se = SE(hid)
        self.project = nn.Sequential(nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """8x8x1 -> stem 16 -> IR(16, x4) -> IR(24, x4, stride 2) -> IR(24, x4) -> IR(32, x4) -> 1x1 128 -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 4, 1), InvertedResidual(16, 24, 4, 2),
                                    InvertedResidual(24, 24, 4, 1), InvertedResidual(24, 32, 4, 1))
        self.last = nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.last(self.blocks(self.stem(x))).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """8x8x1 -> 2x2 patches (16 tokens) -> width 64 + learned positions -> 2 pre-norm blocks (4 heads, MLP 128)
    -> norm -> mean over tokens -> linear 10."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(x)).mean(1))


class MLP(nn.Module):
    """30 -> 256 -> 256 -> 128 -> 2, each hidden layer Linear-BN-ReLU."""

    def __init__(self, cin: int = 30, widths=(256, 256, 128), classes: int = 2):
        super().__init__()
        layers, c = [], cin
        for w in widths:
            layers += [nn.Linear(c, w), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def conv_bn1d(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())


class ResSE1d(nn.Module):
    """x + SE(BN(conv(ReLU(BN(conv(x))))))."""

    def __init__(self, c: int, se: bool):
        super().__init__()
        self.conv1 = conv_bn1d(c, c)
        self.conv2 = nn.Sequential(nn.Conv1d(c, c, 3, 1, 1, bias=False), nn.BatchNorm1d(c))
        self.se = SE(c, dims=1) if se else nn.Identity()

    def forward(self, x):
        return torch.relu(x + self.se(self.conv2(self.conv1(x))))


class Net1d(nn.Module):
    """(1, 128) -> stem 32 (k7, /2) -> residual 32 -> 64 (k5, /2) -> residual + SE 64 -> dense (64 + 2 x 24 = 112)
    -> mean over time -> linear 10."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn1d(1, 32, 7, 2)
        self.res1 = ResSE1d(32, se=False)
        self.down = conv_bn1d(32, 64, 5, 2)
        self.res2 = ResSE1d(64, se=True)
        self.dense = nn.ModuleList([conv_bn1d(64, 24), conv_bn1d(88, 24)])
        self.fc = nn.Linear(112, 10)

    def forward(self, x):
        x = self.res2(self.down(self.res1(self.stem(x))))
        for layer in self.dense:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(x.mean(2))


# ---------------------------------------------------------------- tasks


def vit_tp(model: nn.Module) -> dict:
    """Torch-Pruning's ViT recipe: heads declared, head dims pruned alike in every head."""
    return {"num_heads": {m.qkv: m.heads for m in model.modules() if isinstance(m, Attention)}}


@dataclass
class Task:
    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple]
    train_epochs: int
    lr: float
    head: str = "fc"
    tp_kw: Callable[[nn.Module], dict] | None = None


TASKS = {t.name: t for t in (
    Task("digits_resnet", digits.DigitsNet, digits.load_splits, 15, 3e-3),
    Task("digits_mobile", MobileNet, digits.load_splits, 20, 3e-3),
    Task("digits_vit", ViT, digits.load_splits, 40, 2e-3, tp_kw=vit_tp),
    Task("cancer_mlp", MLP, cancer_splits, 30, 1e-3),
    Task("signal_1d", Net1d, signal_splits, 20, 3e-3),
)}


# ---------------------------------------------------------------- one seed of one task


class Run:
    """One task's trained network for one seed, and every method that prunes it."""

    def __init__(self, task: Task, splits: tuple, budget: Budget, seed: int, train_epochs: int | None = None):
        self.task, self.budget, self.seed = task, budget, seed
        self.fit, self.val, self.test = splits
        torch.manual_seed(seed)
        t = time.perf_counter()
        self.model = train(task.model(), self.fit, train_epochs or task.train_epochs, lr=task.lr, seed=seed)
        self.train_seconds = time.perf_counter() - t
        self.example = (self.fit.x[:1],)
        self.base_flops = graphprune.count_flops(self.model, self.example)
        self.base_params = graphprune.count_params(self.model)
        self.calib = [(xb,) for xb in self.fit.x.split(budget.batch)]
        self.labelled = list(zip(self.fit.x.split(budget.batch), self.fit.y.split(budget.batch)))

    def flops(self, model: nn.Module) -> float:
        return graphprune.count_flops(model, self.example) / self.base_flops

    def recalibrate(self, model: nn.Module) -> nn.Module:
        return graphprune.recalibrate_bn(model, self.calib).eval()

    def val_score(self, model: nn.Module) -> float:
        """gp_search's metric: minus the validation cross-entropy after BatchNorm recalibration of a copy."""
        model = self.recalibrate(copy.deepcopy(model))
        with torch.no_grad():
            return -float(F.cross_entropy(model(self.val.x), self.val.y))

    # each returns (pruned model, extra record fields, whether it was already fine-tuned)

    def graphprune(self, target: float):
        small = graphprune.compile(self.model, self.example, target_flops=target, ignore=[self.task.head],
                                   calibration=self.calib)
        auto = getattr(small.report, "auto", None)
        return small, {"auto": str(auto), "auto_tried": getattr(auto, "tried", None)}, False

    def _torch_pruning(self, target: float, taylor: bool):
        grads = self._gradients() if taylor else None

        def prune(ratio):
            model = copy.deepcopy(self.model)
            head = model.get_submodule(self.task.head)
            kw = self.task.tp_kw(model) if self.task.tp_kw else {}
            ignored = [head, *kw.pop("ignored_layers", [])]  # a task's recipe may list more (bench/heldout.py)
            imp = tp.importance.TaylorImportance() if taylor else tp.importance.MagnitudeImportance(p=2)
            pruner = tp.pruner.MetaPruner(model, self.example, importance=imp, global_pruning=True, pruning_ratio=ratio,
                                          ignored_layers=ignored, **kw)
            if taylor:
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
            pruner.step()
            for m in model.modules():  # what Torch-Pruning's ViT example does after a step
                if isinstance(m, Attention):
                    m.heads = pruner.num_heads[m.qkv]
            model.zero_grad(set_to_none=True)
            return model

        return bisect_ratio(prune, self.flops, target), {}, False

    def _gradients(self) -> list[torch.Tensor]:
        """Gradients of the cross-entropy summed over the fit batches, as in training (BatchNorm on batch
        statistics), once per Taylor run: every ratio of the bisection prunes a copy holding them."""
        model = copy.deepcopy(self.model).train()
        for xb, yb in self.labelled:
            F.cross_entropy(model(xb), yb).backward()
        # zeros for a parameter the loss does not reach (a WaveNet's last residual conv: its output is unused)
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    def tp_magnitude(self, target: float):
        return self._torch_pruning(target, taylor=False)

    def tp_taylor(self, target: float):
        return self._torch_pruning(target, taylor=True)

    def gp_search(self, target: float):
        res = graphprune.search(self.model, self.example, self.val_score, target_flops=target, trials=self.budget.trials,
                                ignore=[self.task.head], calibration=self.calib, seed=self.seed, progress=False)
        return res.model, {"search_val_score": res.metric}, False

    def gp_iterative(self, target: float):
        per_step = max(1, self.budget.finetune_epochs // self.budget.steps)
        small = graphprune.prune_iteratively(self.model, self.example, target_flops=target, steps=self.budget.steps,
                                             finetune=lambda m: finetune(m, self.fit, per_step, self.seed),
                                             calibration=self.calib, ignore=[self.task.head], progress=False)
        return small, {"finetune_epochs": per_step * self.budget.steps}, True

    def method(self, name: str, target: float) -> dict:
        t = time.perf_counter()
        model, extra, tuned = getattr(self, name)(target)
        prune_seconds = time.perf_counter() - t
        return {**self.finetuned(model, tuned), "seconds_prune": prune_seconds, "seconds": time.perf_counter() - t,
                **extra}

    def finetuned(self, model: nn.Module, tuned: bool = False) -> dict:
        """``model`` (pruned, in place) given the suite's fine-tune unless ``tuned``, and what it then scores."""
        flops = self.flops(model)
        before = accuracy(self.recalibrate(model), self.test) if not tuned else None
        if not tuned:
            finetune(model, self.fit, self.budget.finetune_epochs, self.seed)
        return {"test_acc": accuracy(model, self.test), "val_acc": accuracy(model, self.val),
                "test_acc_before_finetune": before, "flops": flops,
                "params": graphprune.count_params(model) / self.base_params, "widths": widths(model)}

    def unpruned(self) -> dict:
        t = time.perf_counter()
        control = finetune(copy.deepcopy(self.model), self.fit, self.budget.finetune_epochs, self.seed)
        return {"test_acc": accuracy(self.model, self.test), "val_acc": accuracy(self.model, self.val),
                "test_acc_finetuned": accuracy(control, self.test), "flops": 1.0, "params": 1.0,
                "base_flops": self.base_flops, "base_params": self.base_params, "seconds_train": self.train_seconds,
                "seconds": time.perf_counter() - t + self.train_seconds, "widths": widths(self.model)}


def widths(model: nn.Module) -> dict:
    """Output width of every conv and linear, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


# ---------------------------------------------------------------- results


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(rows: list[dict]) -> dict:
    """summary[task][method][budget] = test accuracy mean, std, per seed; FLOPs and seconds; unpruned under "1.0"."""
    out: dict = {}
    for r in rows:
        if "error" in r:
            out.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(str(r["budget"]), [])
            continue
        out.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(str(r["budget"]), []).append(r)
    for task, methods in out.items():
        for method, budgets in methods.items():
            for b, rs in budgets.items():
                errors = sorted({r["error"] for r in rows if "error" in r and (r["task"], r["method"], str(r["budget"])) == (task, method, b)})
                if not rs:
                    budgets[b] = {"errors": errors}
                    continue
                rs = sorted(rs, key=lambda r: r["seed"])
                s = {"test_acc": mean_std([r["test_acc"] for r in rs]),
                     "per_seed": {str(r["seed"]): r["test_acc"] for r in rs},
                     "flops": mean_std([r["flops"] for r in rs]), "flops_per_seed": [r["flops"] for r in rs],
                     "params": mean_std([r["params"] for r in rs]), "seconds": mean_std([r["seconds"] for r in rs])}
                if method == "unpruned":
                    s["test_acc_finetuned"] = mean_std([r["test_acc_finetuned"] for r in rs])
                elif rs[0].get("test_acc_before_finetune") is not None:
                    s["test_acc_before_finetune"] = mean_std([r["test_acc_before_finetune"] for r in rs])
                if method == "graphprune":
                    s["auto"] = [r.get("auto") for r in rs]
                if errors:
                    s["errors"] = errors
                budgets[b] = s
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save(path: Path, result: dict):
    result["summary"] = summarise(result["rows"])
    result["paired"] = paired(result["summary"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def table(summary: dict, methods=METHODS) -> str:
    """Markdown: task x method, test accuracy (%) mean ± std at each budget; best pruned mean per row in bold."""
    lines = []
    seeds = max((len(c["per_seed"]) for by in summary.values() for b in by.values() for c in b.values() if "per_seed" in c),
                default=0)
    for target in TARGETS:
        lines += [f"FLOPs kept <= {target} (test accuracy %, mean ± std over {seeds} seeds unless n= says):", "",
                  "| task | unpruned | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
        for task, by_method in summary.items():
            cells = {m: by_method.get(m, {}).get(str(target)) for m in methods}
            best = max((c["test_acc"]["mean"] for c in cells.values() if c and "test_acc" in c), default=None)
            base = by_method.get("unpruned", {}).get("1.0")
            row = [task, f"{100 * base['test_acc']['mean']:.2f} ± {100 * base['test_acc']['std']:.2f}" if base else ""]
            for m in methods:
                c = cells[m]
                if not c:
                    row.append("")
                    continue
                if "test_acc" not in c:
                    row.append("fails")
                    continue
                txt = f"{100 * c['test_acc']['mean']:.2f} ± {100 * c['test_acc']['std']:.2f}"
                txt = f"**{txt}**" if c["test_acc"]["mean"] == best else txt
                n = len(c["per_seed"])
                row.append(txt if n == seeds else f"{txt} (n={n})")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def paired(summary: dict, method: str = "graphprune", rivals=("tp_magnitude", "tp_taylor")) -> list[dict]:
    """``method`` against the rival with the best mean, per task and budget, paired by seed (a seed
    trains one network that every method prunes): the mean difference in test accuracy points
    and its 95% t-interval over seeds. An interval that holds 0 is a difference the suite
    cannot tell from the spread of fine-tuning; one test sample is ``100 / test size`` points."""
    from scipy import stats

    out = []
    for task, by in summary.items():
        for target in TARGETS:
            mine = by.get(method, {}).get(str(target), {})
            cells = {r: by.get(r, {}).get(str(target), {}) for r in rivals}
            cells = {r: c for r, c in cells.items() if "per_seed" in c}
            if "per_seed" not in mine or not cells:
                continue
            rival = max(cells, key=lambda r: cells[r]["test_acc"]["mean"])
            seeds = sorted(set(mine["per_seed"]) & set(cells[rival]["per_seed"]), key=int)
            d = np.array([mine["per_seed"][k] - cells[rival]["per_seed"][k] for k in seeds]) * 100
            half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
            out.append({"task": task, "budget": target, "rival": rival, "seeds": len(d), "diff": float(d.mean()),
                        "ci95": None if half is None else [float(d.mean() - half), float(d.mean() + half)],
                        "wins": int((d > 0).sum()),
                        "ties": int((d == 0).sum()), "losses": int((d < 0).sum())})
    return out


def paired_table(rows: list[dict], method: str = "graphprune") -> str:
    lines = [f"{method} minus the best Torch-Pruning mean, paired by seed (test accuracy points):", "",
             "| task | FLOPs kept | rival | difference | 95% interval | seeds won / tied / lost |", "|---" * 6 + "|"]
    for r in rows:
        lo, hi = r["ci95"] or (float("-inf"), float("inf"))  # one seed: no interval
        mark = "" if lo <= 0 <= hi else (" (better)" if lo > 0 else " (worse)")
        lines.append(f"| {r['task']} | {r['budget']} | {r['rival']} | {r['diff']:+.2f}{mark} | [{lo:+.2f}, {hi:+.2f}] | "
                     f"{r['wins']} / {r['ties']} / {r['losses']} |")
    return "\n".join(lines + [""])


def plot(summary: dict, path: Path, methods=METHODS):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.6), squeeze=False)
    markers = dict(zip(methods, "osD^vPX"))
    for ax, task in zip(axes[0], tasks):
        by = summary[task]
        base = by.get("unpruned", {}).get("1.0")
        if base:
            ax.axhline(100 * base["test_acc"]["mean"], color="k", lw=1, label="unpruned")
        for i, m in enumerate(methods):
            pts = [by[m][str(t)] for t in TARGETS if "test_acc" in by.get(m, {}).get(str(t), {})]
            if not pts:
                continue
            x = [p["flops"]["mean"] * (1 + 0.015 * (i - 2)) for p in pts]  # a small dodge so error bars don't overlap
            ax.errorbar(x, [100 * p["test_acc"]["mean"] for p in pts], yerr=[100 * p["test_acc"]["std"] for p in pts],
                        marker=markers[m], capsize=2, label=m, color=f"C{i}")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("FLOPs kept")
        ax.set_xticks(TARGETS)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    legend = {}  # every method that drew anywhere (one that fails on the last task is still named)
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(list(legend.values()), list(legend), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def width_table(rows: list[dict], task: str, target: float, methods=("graphprune", "tp_magnitude", "tp_taylor")) -> str:
    """Markdown: the fraction of each conv/linear's outputs kept, mean over seeds, per method: where each
    method's allocation puts the budget. graphprune's auto choices are listed below it."""
    base = next(r["widths"] for r in rows if r["task"] == task and r["method"] == "unpruned")
    kept = {}
    for m in methods:
        rs = [r for r in rows if (r["task"], r["method"], r["budget"]) == (task, m, target) and "widths" in r]
        if rs:
            kept[m] = {k: statistics.fmean(r["widths"].get(k, 0) / v for r in rs) for k, v in base.items()}
    lines = ["| module | width | " + " | ".join(kept) + " |", "|---" * (len(kept) + 2) + "|"]
    lines += [f"| {k} | {v} | " + " | ".join(f"{kept[m][k]:.2f}" for m in kept) + " |" for k, v in base.items()]
    autos = [r.get("auto") for r in rows if (r["task"], r["method"], r["budget"]) == (task, "graphprune", target)]
    return "\n".join(lines + [""] + [f"- {a}" for a in autos])


# ---------------------------------------------------------------- main


def code_version() -> str:
    """The commit graphprune was imported from, and whether graphprune/ had uncommitted edits: others commit to
    graphprune/ while a suite runs, and a process keeps what it imported."""
    import subprocess

    root = Path(__file__).parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "graphprune"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" + uncommitted graphprune/ edits" if dirty else "")


def run(tasks, seeds, methods, budget: Budget, path: Path, resume: bool, train_epochs: int | None = None,
        targets=TARGETS) -> dict:
    result = load(path) if resume else {"rows": []}
    code = code_version()
    result["budget"] = asdict(budget)
    result["torch_threads"] = torch.get_num_threads()
    done = {(r["task"], r["seed"], r["method"], r["budget"]) for r in result["rows"]}
    splits = {}
    for seed in seeds:  # seeds outermost: a partial run covers every task
        for name in tasks:
            task = TASKS[name]
            todo = [(m, t) for t in targets for m in methods if (name, seed, m, t) not in done]
            need_base = (name, seed, "unpruned", 1.0) not in done
            if not todo and not need_base:
                continue
            if name not in splits:
                splits[name] = task.data()
            r = Run(task, splits[name], budget, seed, train_epochs)
            if need_base:
                row = {"task": name, "seed": seed, "method": "unpruned", "budget": 1.0, "code": code, **r.unpruned()}
                result["rows"].append(row)
                save(path, result)
                print(f"{name} seed {seed} unpruned {row['test_acc']:.4f} ({row['seconds_train']:.0f}s train)", flush=True)
            for m, t in todo:
                row = {"task": name, "seed": seed, "method": m, "budget": t, "code": code}
                try:
                    row.update(r.method(m, t))
                except Exception as e:  # noqa: BLE001 - a method that fails on a task is a result, recorded as such
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    result["rows"].append(row)
                    save(path, result)
                    print(f"{name} seed {seed} {m} @{t}: FAILS {row['error']}", flush=True)
                    continue
                result["rows"].append(row)
                save(path, result)
                print(f"{name} seed {seed} {m} @{t}: test {row['test_acc']:.4f}, FLOPs {row['flops']:.3f}, "
                      f"{row['seconds']:.1f}s" + (f"  [{row['auto']}]" if m == "graphprune" else ""), flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="FLOPs budgets, comma-separated")
    ap.add_argument("--finetune-epochs", type=int, default=Budget.finetune_epochs)
    ap.add_argument("--train-epochs", type=int, default=None, help="override every task's (smoke runs)")
    ap.add_argument("--out", default=str(RESULTS / "tasks.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows in --out and run only the missing ones")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--widths", metavar="TASK@TARGET", help="print the widths each method kept (e.g. signal_1d@0.25)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    if args.widths:
        task, _, target = args.widths.partition("@")
        print(width_table(load(path)["rows"], task, float(target or 0.5)))
        return
    if args.table or args.plot_only:
        result = load(path)
        summary = summarise(result["rows"])
        print(table(summary))
        print(paired_table(paired(summary)))
        if args.plot_only:
            plot(summary, path.with_suffix(".png"))
        return
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    for n in tasks:
        if n not in TASKS:
            ap.error(f"unknown task {n!r}; one of {', '.join(TASKS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; one of {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = Budget(seeds=len(seeds), finetune_epochs=args.finetune_epochs)
    result = run(tasks, seeds, methods, budget, path, args.resume, args.train_epochs,
                 [float(t) for t in args.targets.split(",")])
    print(table(result["summary"]))
    print(paired_table(result["paired"]))
    plot(result["summary"], path.with_suffix(".png"))


if __name__ == "__main__":
    main()
