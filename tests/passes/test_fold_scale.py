"""fold-scale: a constant per-channel scale folded into the linear or conv before it,
lossless, never in place, and only where the scale runs along that layer's output features."""
import torch.fx.passes.shape_prop
import pytest
import torch
import torch.nn as nn

import graphprune
from graphprune.pass_manager import run_pipeline


class Scaled(nn.Module):
    """Folds: ConvNeXt's ``gamma * permute(linear(x))`` (gamma (C, 1, 1) over NCHW), a conv
    times (1, C, 1, 1), a linear times (C,) through an eval dropout. Stays: a scale over
    the spatial dims (W, not channels), a scale whose layer output is read elsewhere,
    a scale computed in the graph."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.cs = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.fc, self.drop, self.fs = nn.Linear(8, 5), nn.Dropout(0.1), nn.Parameter(torch.rand(5) + 0.5)
        self.w_scale = nn.Parameter(torch.rand(4) + 0.5)  # along W (size 4): not a channel scale
        self.c2 = nn.Conv2d(8, 8, 1)
        self.shared, self.ss = nn.Conv2d(8, 8, 1), nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):                                           # x: (N, 4, 4, 6)
        h = self.gamma * self.lin(x).permute(0, 3, 1, 2)            # (N, 8, 4, 4)
        h = self.conv(h) * self.cs
        h = self.c2(h) * self.w_scale                               # along the last dim: stays
        z = self.shared(h)
        h = z * self.ss + z                                         # z read twice: stays
        h = self.c2(h) * torch.sigmoid(self.cs)                     # c2 called twice, and a computed scale: stays
        return self.fs * self.drop(self.fc(h.mean((2, 3))))


def _muls(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "mul" in str(n.target))


def test_fold_scale_is_lossless_folds_only_channel_scales_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = Scaled().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4, 4, 6)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)
    for n in gm.graph.nodes:  # the pass reads ranks from node.meta["val"], as graphprune's graphs carry them
        if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, device="meta")
    ref = model(x)
    muls = _muls(gm)
    out, changed = run_pipeline(gm, "fold-scale", check=False)
    assert changed
    assert _muls(out) == muls - 3  # gamma, cs, fs; w_scale, ss and sigmoid(cs) stay
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out.get_submodule("lin") is not model.lin and out.get_submodule("shared") is model.shared


def test_deploy_pipeline_folds_convnext_layer_scale():
    """The deploy pipeline of a pruned ConvNeXt has no layer-scale multiply left and
    passes the self-check. torchvision's ConvNeXt blocks at a quarter of convnext_tiny's widths
    and two stages (the whole convnext_tiny took a minute of the suite for the same code path)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(24, 48, 2), CNBlockConfig(48, None, 2)], num_classes=10).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)  # torchvision starts them at 1e-6: a fold that dropped them would hide
    x = torch.randn(1, 3, 32, 32)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", pipeline="deploy")
    assert small.report.verify.status == "passed"
    assert not any(n.op == "get_attr" and n.target.endswith("layer_scale") for n in small.graph.nodes)
    ref = graphprune.compile(model, (x,), ratio=0.5, importance="l1", output="graph")
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-5)


class Reshaped(nn.Module):
    """timm's ConvNeXt writes its layer scale as ``x.mul(self.gamma.reshape(1, -1, 1, 1))``: folds.
    Stays: a reshape to (1, 1, 1, W) (along the width, not channels), a reshape of a scale that is
    also read elsewhere."""

    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.rand(8) + 0.5)
        self.c2, self.g2 = nn.Conv2d(8, 8, 1), nn.Parameter(torch.rand(8) + 0.5)
        self.c3, self.g3 = nn.Conv2d(8, 8, 1), nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):                                           # x: (N, 3, 8, 8)
        h = self.c1(x).mul(self.g1.reshape(1, -1, 1, 1))
        h = self.c2(h) * self.g2.reshape(1, 1, 1, -1)              # along W: stays
        g3 = self.g3.view(1, -1, 1, 1)
        return self.c3(h) * g3 + g3                                 # g3 read twice: stays


def test_fold_scale_follows_a_reshape_of_the_scale():
    torch.manual_seed(0)
    model = Reshaped().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape"):
            n.meta["val"] = torch.empty(n.meta["tensor_meta"].shape, device="meta")
    ref = model(x)
    out, changed = run_pipeline(gm, "fold-scale", check=False)
    assert changed["fold-scale"]
    assert {n.target for n in out.graph.nodes if n.op == "get_attr"} == {"g2", "g3"}
    assert "g1" not in dict(out.named_parameters()) and model.g1 is not None
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["convnext_atto", "mobilenetv3_small_050"])
def test_deploy_folds_timm_norms_and_scales(name):
    """timm's BatchNormAct2d and LayerNorm classes are traced through (functional calls in the graph)
    and its ConvNeXt reshapes the layer scale: the deploy form of a pruned timm net keeps no
    BatchNorm and no layer-scale multiply, and equals the trainable graph."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    small_kw = {"depths": (1, 1, 1, 1)} if name.startswith("convnext") else {}  # one block of each stage will do
    model = timm.create_model(name, pretrained=False, num_classes=10, **small_kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(std=0.3)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    small = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", pipeline="deploy")
    ref = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", output="graph")
    assert not [n for n in small.graph.nodes if "batch_norm" in str(n.target)]
    assert not [n for n in small.graph.nodes if n.op == "get_attr" and n.target.endswith("gamma")]
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-4)
