"""Per-layer latency tables (``graphprune/latency_table.py``): the shapes they time are the
layers the pruned model runs, they time each shape once per device (on disk), and under a
latency budget the measured allocation spends the budget where the tables say time goes."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import latency_table as lt
from graphprune.allocate import measured_scores, unit_costs
from graphprune.auto import unit_flops
from graphprune.latency_table import LatencyTable, LayerShape, layer_shapes, predict_ms, unit_ms
from graphprune.pruner import Pruner, remove_lowest


class Mobile(nn.Module):
    """Stem, depthwise, pointwise, linear: the layer kinds the tables time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))      # (N, 16, H, W)
        x = torch.relu(self.dw(x))                 # (N, 16, H, W)
        x = torch.relu(self.pw(x))                 # (N, 24, H, W)
        x = self.down(x).mean((2, 3))              # (N, 32)
        return self.fc2(torch.relu(self.fc1(x)))   # (N, 10)


def pruner(**kw):
    torch.manual_seed(0)
    return Pruner(Mobile().eval(), (torch.randn(2, 3, 16, 16),), **kw)


class Counting:
    """A clock that costs a shape by a formula and counts its calls."""

    def __init__(self, fn=None):
        self.fn = fn or (lambda s: 1e-3 * float(np.prod(s.x)) + 1e-4 * float(np.prod(s.w or (1,))))
        self.calls = []

    def __call__(self, shape):
        self.calls.append(shape)
        return self.fn(shape)


def test_the_table_looks_up_the_layers_the_pruned_model_runs():
    """Every layer shape ``predict_ms`` reads for a removal is a layer of the model
    built for that removal, and nothing else (depthwise groups, strides, both axes)."""
    p = pruner()
    rng = np.random.default_rng(0)
    removed = {g.id: remove_lowest(g, p.scores[g.id], int(rng.integers(1, g.n_units))) for g in p.groups}
    small = p.prune(removed, check=False, fit=False)
    built = {s.key() for calls in layer_shapes(Pruner(small, p.example_inputs)).values() for s, _ in calls}
    clock = Counting()
    predict_ms(p, removed, table=LatencyTable(None, clock))
    looked_up = {s.key() for s in clock.calls if s.op != "ewise"}
    assert looked_up == built and len(built) == 6


def test_shapes_are_timed_once_and_kept_on_disk(tmp_path):
    path = tmp_path / "latency.json"
    p = pruner()
    first = Counting()
    costs = unit_ms(p, table=LatencyTable(path, first))
    assert first.calls and path.exists()
    assert len({s.key() for s in first.calls}) == len(first.calls)  # no shape timed twice
    again = Counting()
    assert all(np.array_equal(costs[g], c) for g, c in unit_ms(p, table=LatencyTable(path, again)).items())
    assert again.calls == []  # everything read from the file
    assert json.loads(path.read_text())["device"] == lt.device_key()
    path.write_text("{not json")  # a damaged file is timed again, not trusted
    third = Counting()
    unit_ms(p, table=LatencyTable(path, third))
    assert len(third.calls) == len(first.calls)


def test_the_slope_is_the_cost_of_one_channel():
    shape = LayerShape("conv", (8, 16, 32, 32), (24, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    table = LatencyTable(None, lambda s: 0.5 + 0.07 * s.w[0] + 0.01 * s.x[1])
    assert table.slope(shape, 0) == pytest.approx(0.07)
    assert table.slope(shape, 1) == pytest.approx(0.01)
    grouped = LayerShape("conv", (8, 16, 32, 32), (16, 4, 3, 3), (1, 1), (1, 1), (1, 1), 4)
    assert table.slope(grouped, 0) is None  # not one layer of its kind when shrunk: costed by FLOPs


def test_a_slow_layer_is_pruned_harder_under_a_latency_budget(monkeypatch, tmp_path):
    """The same scores and sensitivities; only the clock differs. Where the table says the
    depthwise conv is slow per channel (as memory-bound ops are on CPUs), its group's units
    become cheaper to remove per millisecond than per FLOP, and they go first."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    p = pruner()
    group_of = {s.name: g.id for g in p.groups for s in g.params}
    dw, pw = group_of["dw.weight"], group_of["pw.weight"]
    assert dw != pw

    def slow_depthwise(s):
        return (50.0 if s.groups > 1 else 0.01) * float(np.prod(s.x)) * 1e-4
    monkeypatch.setattr(lt, "time_layer", slow_depthwise)
    by_ms = measured_scores(p, "latency")
    by_flops = measured_scores(p, "flops")
    share = lambda s: np.median(s[dw]) / np.median(s[pw])  # noqa: E731 - lower: removed first
    assert share(by_ms) < share(by_flops) / 10
    assert p.latency_table["timed"] > 0


def test_real_timings_cost_high_resolution_channels_more(tmp_path):
    """On the real clock: one channel of the stem (16x16 pixels) saves more time than one
    of the linear layers (one position), and every cost is finite and positive."""
    p = pruner()
    costs = unit_ms(p, (torch.randn(8, 3, 16, 16),), LatencyTable(tmp_path / "t.json"))
    group_of = {s.name: g.id for g in p.groups for s in g.params}
    assert all(np.isfinite(c).all() and (c > 0).all() for c in costs.values())
    assert costs[group_of["stem.weight"]].mean() > costs[group_of["fc1.weight"]].mean()


def test_a_model_without_conv_or_linear_modules_is_costed_in_flops():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(12, 6))
            self.w2 = nn.Parameter(torch.randn(3, 12))

        def forward(self, x):
            return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w1)), self.w2)

    p = Pruner(Functional(), (torch.randn(4, 6),))
    costs = unit_costs(p, "latency")
    assert all(np.array_equal(costs[g.id], unit_flops(g, p.gm)) for g in p.groups)
