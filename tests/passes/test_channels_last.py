"""channels-last: conv weights and activations NHWC, same values, outputs in the layout callers always got."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
import graphprune.api
from graphprune.pass_manager import run_pipeline

CL = torch.channels_last


class Mixed(nn.Module):
    """A full 3x3 conv, a depthwise and a 1x1 conv (no channels-last strides of their own), a functional conv
    on a parameter, an unbatched-capable conv fed a 4-d input, a 4-d output and a 2-d output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.w = nn.Parameter(torch.randn(24, 24, 3, 3) * 0.1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.pw(self.dw(h)))
        h = F.conv2d(h, self.w, padding=1) + h
        return h, self.fc(h.mean((2, 3)))


class Viewer(nn.Module):
    """``view`` on a conv activation: raises on channels-last strides."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.fc(h.view(h.shape[0], -1))


def test_channels_last_is_lossless_and_never_touches_the_input():
    torch.manual_seed(0)
    model = Mixed().eval()
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 10, 10)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)
    out, changed = run_pipeline(gm, "channels-last", check=False)
    assert changed["channels-last"]
    assert out.get_submodule("stem").weight.is_contiguous(memory_format=CL) and not out.get_submodule("stem").weight.is_contiguous()
    assert out.w.is_contiguous(memory_format=CL) and not out.w.is_contiguous()
    with torch.no_grad():
        ref, got = model(x), out(x)
        inner = torch.fx.Interpreter(out)
        seen = []
        inner.run_node = lambda n, f=inner.run_node: seen.append((n, f(n))) or seen[-1][1]
        inner.run(x)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert got[0].is_contiguous()  # the 4-d output comes back in the layout the model always returned
    # every conv ran on a channels-last input, the depthwise and 1x1 ones included
    for n, v in seen:
        if n.op == "call_module" and isinstance(out.get_submodule(n.target), nn.Conv2d):
            assert dict(seen)[n.args[0]].is_contiguous(memory_format=CL), n.name
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.stride() for k, v in model.state_dict().items())


def test_unbatched_and_non_conv_graphs_are_left_alone():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    _, changed = run_pipeline(gm, "channels-last", check=False)
    assert not changed["channels-last"]


def test_deploy_uses_channels_last_only_when_it_times_faster(monkeypatch):
    """compile(pipeline="deploy") times the unpruned model in both layouts (here a fake clock) and adds the
    pass only when the channels-last one is 5% faster; the saved pipeline replays it on load."""
    x = torch.randn(2, 3, 10, 10)
    torch.manual_seed(0)
    model = Mixed().eval()
    for ratio, want in ((0.9, True), (1.0, False)):
        monkeypatch.setattr(graphprune.api, "latency_ratio", lambda m, r, i, rounds=5, v=ratio: v)
        small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=["fc"], pipeline="deploy")
        assert small.report.layout["channels_last"] is want, small.report.layout
        assert ("channels-last" in small.meta["graphprune"]["pipeline"]) is want
        plain = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=["fc"])
        with torch.no_grad():
            for g, r in zip(small(x), plain(x)):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=["fc"]).report.layout is None


def test_a_view_on_an_activation_keeps_the_contiguous_layout(monkeypatch):
    monkeypatch.setattr(graphprune.api, "latency_ratio", lambda m, r, i, rounds=5: 0.5)
    x = torch.randn(2, 3, 6, 6)
    small = graphprune.compile(Viewer().eval(), (x,), ratio=0.5, importance="l1", ignore=["fc"], pipeline="deploy")
    assert small.report.layout["channels_last"] is False and "raised" in small.report.layout["why"]
    assert small(x).shape == (2, 4)


def test_channels_last_round_trips_through_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(graphprune.api, "latency_ratio", lambda m, r, i, rounds=5: 0.5)
    x = torch.randn(2, 3, 10, 10)
    torch.manual_seed(0)
    small = graphprune.compile(Mixed().eval(), (x,), ratio=0.5, importance="l1", ignore=["fc"], pipeline="deploy")
    graphprune.save(small, tmp_path)
    back = graphprune.load(Mixed(), tmp_path)
    assert back.get_submodule("stem").weight.is_contiguous(memory_format=CL)
    assert not back.get_submodule("stem").weight.is_contiguous()
    with torch.no_grad():
        for g, r in zip(back(x), small(x)):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_channels_last_on_an_exported_graph_under_a_budget():
    """Under a budget the pipeline is checked on a meta copy, whose parameter slots hold plain
    meta tensors: writing the NHWC weight back raised TypeError from inside the pass (with
    pipeline="deploy" whenever channels-last timed faster)."""
    class Asserting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            assert h.shape[1] == 8  # a width check: traced with torch.export
            return self.fc(self.b(h).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Asserting().eval(), torch.randn(2, 3, 8, 8)
    small = graphprune.compile(model, (x,), importance="l1", target_flops=0.6, round_to=1,
                               pipeline="shrink-params,channels-last,dce")
    assert graphprune.count_flops(small, (x,)) <= 0.6 * graphprune.count_flops(model, (x,))
    with torch.no_grad():
        assert small(x).shape == (2, 4) and torch.isfinite(small(x)).all()
