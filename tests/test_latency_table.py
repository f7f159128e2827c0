"""The latency table (``graphprune/latency_table.py``): the model timed node by node at four
fractions of every width, once per device (on disk); each node's slope shared by the groups
it reads and writes; and under a latency budget the measured allocation spends the budget
where the table says time goes."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import latency_table as lt
from graphprune.allocate import measured_scores, unit_costs
from graphprune.auto import unit_flops
from graphprune.latency_table import LatencyTable, predict_ms, unit_ms
from graphprune.pruner import Pruner


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


def widths(gm, n) -> int:
    """Output width of node ``n`` in the build ``gm`` (0 for a node the build does not have)."""
    node = next((m for m in gm.graph.nodes if m.name == n), None)
    if node is None or node.op != "call_module":
        return 0
    mod = gm.get_submodule(node.target)
    return getattr(mod, "out_channels", getattr(mod, "out_features", getattr(mod, "num_features", 0)))


class Counting:
    """A clock for builds: every module node costs ``per_channel[name]`` ms per output channel
    it has in the build (others 0.01 ms); counts its calls."""

    def __init__(self, per_channel=None):
        self.per_channel = per_channel or {}
        self.calls = []

    def __call__(self, gm, inputs):
        self.calls.append({n.name: widths(gm, n.name) for n in gm.graph.nodes})
        return {n.name: self.per_channel.get(n.name, 0.0) * widths(gm, n.name) + 0.01 for n in gm.graph.nodes}


def test_the_table_times_the_model_at_each_fraction_of_every_width():
    p = pruner()
    clock = Counting()
    table = LatencyTable(p, clock=clock, path=None)
    assert [c["pw"] for c in clock.calls] == [int(round(f * 24)) for f in lt.FRACTIONS]
    assert [c["fc1"] for c in clock.calls] == [int(round(f * 40)) for f in lt.FRACTIONS]
    assert set(table.rows) == {n.name for n in p.gm.graph.nodes}


def test_a_folded_node_costs_nothing():
    """Under the deploy pipeline the BatchNorm is folded into the stem: no build runs it."""
    p = pruner(pipeline="deploy")
    table = LatencyTable(p, clock=Counting(), path=None)
    assert table.rows["bn"] == [0.0] * len(lt.FRACTIONS) and table.rows["pw"][0] > 0


def test_rows_are_timed_once_and_kept_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    p = pruner()
    first = Counting({"pw": 1.0})
    costs = unit_ms(p, table=LatencyTable(p, clock=first))
    assert len(first.calls) == len(lt.FRACTIONS) and p.latency_table["timed_now"]
    again = Counting({"pw": 5.0})
    assert all(np.array_equal(costs[g], c) for g, c in unit_ms(p, table=LatencyTable(p, clock=again)).items())
    assert again.calls == [] and not p.latency_table["timed_now"]  # everything read from the file
    other = Counting()
    LatencyTable(p, (torch.randn(4, 3, 16, 16),), clock=other)  # other input shapes: another table
    assert len(other.calls) == len(lt.FRACTIONS)
    for f in tmp_path.glob("latency-*.json"):
        assert json.loads(f.read_text())["device"] == lt.device_key()
        f.write_text("{not json")  # a damaged file is timed again, not trusted
    third = Counting()
    LatencyTable(p, clock=third)
    assert len(third.calls) == len(lt.FRACTIONS)


def test_a_nodes_slope_goes_to_the_groups_it_reads_and_writes():
    """pw reads the depthwise group's 16 channels and writes its own 24: at 1 ms per output
    channel its slope is 24 ms per unit fraction, half to each group, spread over its units."""
    p = pruner()
    table = LatencyTable(p, clock=Counting({"pw": 1.0}), path=None)
    assert table.slope("pw") == pytest.approx(24.0)
    costs = unit_ms(p, table=table)
    group_of = {s.name: g.id for g in p.groups for s in g.params}
    assert costs[group_of["pw.weight"]] == pytest.approx(np.full(24, 12.0 / 24), abs=1e-9)
    assert costs[group_of["dw.weight"]] == pytest.approx(np.full(16, 12.0 / 16), abs=1e-9)
    assert costs[group_of["fc1.weight"]].max() < 1e-6  # no slope elsewhere


def test_prediction_reads_the_rows_at_the_kept_fraction():
    """A uniform half of every width is a build the table timed: the estimate is that build's time."""
    p = pruner()
    clock = Counting({"stem": 0.3, "dw": 1.0, "pw": 0.5, "down": 0.2, "fc1": 0.1})
    table = LatencyTable(p, clock=clock, path=None)
    half = lt.FRACTIONS.index(0.5)
    timed = sum(row[half] for row in table.rows.values())
    assert predict_ms(p, p.removal_for_ratio(0.5), table) == pytest.approx(timed)
    assert predict_ms(p, {}, table) == pytest.approx(sum(row[0] for row in table.rows.values()))


def test_a_slow_layer_is_pruned_harder_under_a_latency_budget(monkeypatch, tmp_path):
    """The same scores and sensitivities; only the clock differs. Where the table says the
    depthwise conv is slow per channel (as memory-bound ops are on CPUs), its group's units
    become cheaper to remove per millisecond than per FLOP, and they go first."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "node_ms", Counting({"dw": 50.0, "pw": 0.01}))
    p = pruner()
    group_of = {s.name: g.id for g in p.groups for s in g.params}
    dw, pw = group_of["dw.weight"], group_of["pw.weight"]
    by_ms = measured_scores(p, "latency")
    by_flops = measured_scores(p, "flops")
    share = lambda s: np.median(s[dw]) / np.median(s[pw])  # noqa: E731 - lower: removed first
    assert share(by_ms) < share(by_flops) / 10
    assert p.latency_table["timed_now"]


def test_real_timings_are_positive_and_narrower_is_faster():
    """At 96x96 the model is compute-bound (the full build about 17 ms on the 2-core CI machine, a quarter of the
    widths about 3 ms); at 32x32 it was 1.7 ms of mostly per-op overhead, and a clean CI run read the narrow
    build 5% slower."""
    p = pruner()
    x = (torch.randn(8, 3, 96, 96),)
    table = LatencyTable(p, x, path=None)
    costs = unit_ms(p, x, table)
    assert all(np.isfinite(c).all() and (c > 0).all() for c in costs.values())
    assert predict_ms(p, p.removal_for_ratio(0.75), table) < predict_ms(p, {}, table)


def test_functional_layers_are_timed_too_and_keyword_inputs_fall_back_to_flops():
    """Every node is timed, so weights used through ``F.linear`` are costed like modules;
    a model called with keyword inputs cannot be run node by node here: FLOPs."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(12, 6))
            self.w2 = nn.Parameter(torch.randn(3, 12))

        def forward(self, x, scale=None):
            h = torch.relu(torch.nn.functional.linear(x, self.w1))   # (N, 12)
            return torch.nn.functional.linear(h if scale is None else h * scale, self.w2)

    p = Pruner(Functional(), (torch.randn(4, 6),))
    table = LatencyTable(p, clock=lambda gm, x: {n.name: 0.01 * widths_of(gm, n) for n in gm.graph.nodes}, path=None)
    assert max(table.slope(n.name) for n in p.gm.graph.nodes) > 0
    q = Pruner(Functional(), (torch.randn(4, 6),), {"scale": torch.ones(12)})
    costs = unit_costs(q, "latency")
    assert all(np.array_equal(costs[g.id], unit_flops(g, q.gm)) for g in q.groups)


def widths_of(gm, n) -> int:
    """The last dim of node ``n``'s value as the build computes it (shapes re-propagated)."""
    val = n.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 0


def test_a_model_whose_latency_ignores_its_widths_is_costed_in_flops(monkeypatch, tmp_path):
    """Where every build times the same (overhead-bound), the slopes are noise: FLOPs decide."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "node_ms", lambda gm, x: {n.name: 0.05 for n in gm.graph.nodes})
    p = pruner()
    costs = unit_costs(p, "latency")
    assert all(np.array_equal(costs[g.id], unit_flops(g, p.gm)) for g in p.groups)
    assert p.latency_table["used"] is False and p.latency_table["elastic"] == 0.0


def test_a_latency_budget_times_one_search_path(monkeypatch, tmp_path):
    """``allocate`` under a latency budget runs one guided search and settles it: no model
    is timed that the settled search did not read (a first unguided search before it timed
    a second path of its own). The clock is the parameter ratio, exact and repeatable."""
    from graphprune import allocate as A
    from graphprune.flops import count_params

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    def weights(gm, x):  # a module node costs its weights
        return {n.name: 1e-3 * sum(t.numel() for t in gm.get_submodule(n.target).parameters())
                if n.op == "call_module" else 0.0 for n in gm.graph.nodes}
    monkeypatch.setattr(lt, "node_ms", weights)
    p = pruner()
    base = count_params(p.model)
    timed = []

    def clock(model, reference, inputs, rounds=5):
        timed.append(count_params(model))
        return count_params(model) / base
    monkeypatch.setattr(A, "latency_ratio", clock)
    removed, got = A.allocate(p, "latency", 0.5, A.Constraints())
    assert got <= 0.5 and p.latency_table["used"]
    assert len(set(timed)) <= 5 and len(timed) <= 9
