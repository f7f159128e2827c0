"""onednn-fuse: convolutions and linears as oneDNN kernels with their activations fused in; the same
values on the fast path and on the plain one (gradients, float64), the same parameter names, FLOPs
counted alike, chosen by compile only where it times faster, and replayed by load."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from graphprune.modules import OneDNNConv2d, OneDNNLinear
from graphprune.pass_manager import run_pipeline

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


class Acts(nn.Module):
    """Every activation the pass fuses, as modules, functions and methods; and what it must not:
    a conv whose output is read twice, a conv called twice, padding="same", a leaky ReLU."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1) for _ in range(9)])
        self.acts = nn.ModuleList([nn.ReLU(), nn.SiLU(), nn.ReLU6(inplace=True), nn.Hardswish(), nn.GELU(approximate="tanh")])
        self.twice, self.same = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding="same")
        self.leaky = nn.LeakyReLU(0.1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):                                          # x: (N, 6, H, W)
        for conv, act in zip(self.c, self.acts):
            x = act(conv(x))
        x = F.relu(self.c[5](x), inplace=True)
        x = torch.sigmoid(self.c[6](x)) * 2
        x = self.c[7](x).tanh()
        x = F.gelu(self.c[8](x))
        y = self.twice(x)
        x = y + torch.relu(y)                                      # read twice: the conv converts, the relu stays
        x = self.leaky(self.same(self.twice(x)))                   # twice called; "same" padding; no leaky post-op
        h = x.mean((2, 3))                                         # (N, 6)
        return self.fc3(F.silu(self.fc2(F.relu(self.fc1(h)))))


def _kinds(gm):
    return {n: (type(m).__name__, getattr(m, "post_op", (None,))[0]) for n, m in gm.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_onednn_fuse_is_lossless_on_both_paths_and_keeps_names():
    torch.manual_seed(0)
    model = Acts().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 6, 8, 8) * 30  # large enough that ReLU6 and hardtanh clip
    ref = model(x)
    out, changed = run_pipeline(gm, "onednn-fuse", check=False)
    assert changed["onednn-fuse"]
    kinds = _kinds(out)
    want = ["relu", "swish", "hardtanh", "hardswish", "gelu", "relu", "sigmoid", "tanh", "gelu"]
    assert [kinds[f"c.{i}"] for i in range(9)] == [("OneDNNConv2d", a) for a in want]
    assert kinds["twice"] == ("Conv2d", None) and kinds["same"] == ("Conv2d", None)
    assert [kinds[f"fc{i}"] for i in (1, 2, 3)] == [("OneDNNLinear", "relu"), ("OneDNNLinear", "swish"), ("OneDNNLinear", "none")]
    assert list(out.state_dict()) == list(model.state_dict())
    with torch.no_grad():  # the oneDNN kernels
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)  # gradients recorded: the plain path
    out(x).sum().backward()
    assert all(p.grad is not None for p in out.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out.double()(x.double()), model.double()(x.double()))
    assert all(torch.equal(before[k], v.float()) for k, v in model.state_dict().items())
    assert graphprune.count_flops(out.float(), (x,)) == graphprune.count_flops(model.float(), (x,))


def test_onednn_fuse_counts_flops_on_the_fast_path():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    gm, _ = run_pipeline(torch.fx.symbolic_trace(model), "onednn-fuse", check=False)
    x = torch.randn(2, 8, 6, 6)
    for p in gm.parameters():
        p.requires_grad_(False)  # no gradients: count_flops itself runs the oneDNN kernels
    conv = 2 * 2 * 16 * 36 * (4 * 9)
    assert graphprune.count_flops(gm, (x,)) == conv + 2 * 2 * 16 * 36 * 10 == graphprune.count_flops(model, (x,))


@pytest.mark.parametrize("ratio,want", [(0.9, True), (1.0, False)])
def test_deploy_adds_onednn_only_when_faster_and_load_replays_it(ratio, want, monkeypatch, tmp_path):
    monkeypatch.setattr(graphprune.api, "latency_ratio", lambda m, r, i, rounds=5, v=ratio: v)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(4, 12)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=["4"], pipeline="deploy")
    assert small.report.kernels["onednn"] is want, small.report.kernels
    assert ("onednn-fuse" in small.meta["graphprune"]["pipeline"]) is want
    assert any(isinstance(m, OneDNNLinear) for m in small.modules()) is want
    plain = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=["4"])
    with torch.no_grad():
        torch.testing.assert_close(small(x), plain(x), rtol=1e-5, atol=1e-5)
    graphprune.save(small, tmp_path)
    back = graphprune.load(nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)), tmp_path)
    assert any(isinstance(m, OneDNNLinear) for m in back.modules()) is want
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


def test_a_onednn_conv_traces_and_exports_as_a_plain_conv():
    """A trace or an export of the deployed model sees ordinary ops (the oneDNN kernel is for eager CPU runs)."""
    gm, _ = run_pipeline(torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()), "onednn-fuse",
                         check=False)
    assert isinstance(gm.get_submodule("0"), OneDNNConv2d)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        ep = torch.export.export(gm, (x,))
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("mkldnn" in o for o in ops), ops
        torch.testing.assert_close(ep.module()(x), gm(x))
