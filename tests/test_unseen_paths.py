"""Paths the self-check's example did not take, in the model's own classes, and the decisions
made with calibration data under a folding pipeline (surveys 36 and 37).

Each model here came back wrong, or said something false, on an input or setting the checks had
not run: a max over channels whose removed zeros the graph clamps in and the user's code does
not, an attribute that named an image width beside a channel count of the same size, a float
setting that sizes a slice, BatchNorms folded before their statistics were recomputed.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from oracle import dead_twin


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class _ChannelMax(nn.Module):
    def __init__(self, reduce="amax"):
        super().__init__()
        self.a, self.b, self.reduce = nn.Linear(16, 32), nn.Linear(32, 6), reduce

    def forward(self, x):
        h = self.a(x)  # (N, 32)
        return self.b(h * getattr(h, self.reduce)(-1, keepdim=True))


@pytest.mark.parametrize("reduce,sign", [("amax", -1.0), ("amin", 1.0)])
def test_a_max_over_pruned_channels_comes_back_as_the_graph_that_clamps_it(reduce, sign):
    """The graph clamps a max over pruned channels at 0 for the removed zeros; the user's code has
    no clamp and agreed only where a kept channel is positive (2.9 off where none is)."""
    torch.manual_seed(0)
    model, x = _ChannelMax(reduce).eval(), torch.randn(4, 16)
    with torch.no_grad():  # at x = 0 every hidden unit is its bias: all of the one sign
        model.a.bias.copy_(sign * (model.a.bias.abs() + 0.1))
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.report.form == "graph" and "removed zeros" in small.report.form_why
    assert small.a.weight.shape[0] < 32
    twin = dead_twin(model, small)
    with torch.no_grad():
        for inp in (x, torch.zeros(2, 16)):
            assert _rel(small(inp), twin(inp)) < 1e-5


class _Positional(nn.Module):
    """``self.width`` is an image width that equals the stem's channel count."""

    def __init__(self, c=16, size=16):
        super().__init__()
        self.height, self.width = size, size
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, c, size, size))
        self.body, self.fc = nn.Conv2d(c, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H <= self.height and W <= self.width:
            pos = self.pos[:, :, :H, :W]
        else:
            pos = F.interpolate(self.pos, size=(H, W), mode="bilinear", align_corners=False)
        return self.fc(F.relu(self.body(F.relu(self.stem(x) + pos))).mean((2, 3)))


def test_an_attribute_one_of_two_dims_of_its_size_names_stays():
    torch.manual_seed(0)
    model = _Positional().eval()
    small = graphprune.compile(model, (torch.randn(2, 3, 16, 16),), ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.pos.shape[1] < 16
    assert (small.height, small.width) == (16, 16)
    twin = dead_twin(model, small)
    with torch.no_grad():
        for hw in ((16, 16), (16, 12), (10, 9), (20, 20)):
            x = torch.randn(2, 3, *hw)
            assert _rel(small(x), twin(x)) < 1e-5, hw


class _Slimmable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x, width: float = 1.0):
        k = int(self.w1.out_features * width)
        h = F.relu(F.linear(x, self.w1.weight[:k], self.w1.bias[:k]))
        return F.linear(h, self.w2.weight[:, :k], self.w2.bias)


def test_a_float_setting_is_checked_at_other_values():
    """``weight[:int(out * width)]`` at width=0.5 read the first kept units, not the first ones."""
    torch.manual_seed(0)
    model, x = _Slimmable().eval(), torch.randn(4, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    twin = dead_twin(model, small)
    with torch.no_grad():
        for width in (1.0, 0.5, 0.25):
            assert _rel(small(x, width=width), twin(x, width=width)) < 1e-5, width


class _FoldedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)
        self.register_buffer("rv", torch.linspace(0.5, 2, 32))

    def forward(self, x):
        return self.b(F.relu(self.a(x) / (self.rv + 1e-5).sqrt()))


def test_arithmetic_on_a_buffer_alone_is_traced_and_the_buffer_pruned():
    """fx ran ``(self.rv + eps).sqrt()`` while tracing and kept a constant: the graph pruned the
    constant, the user's buffer stayed whole, and the module form was lost."""
    torch.manual_seed(0)
    model, x = _FoldedBuffer().eval(), torch.randn(4, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.rv.shape == (small.a.out_features,) and small.a.out_features < 32
    twin = dead_twin(model, small)
    with torch.no_grad():
        assert _rel(small(x), twin(x)) < 1e-5


class _OwnBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("mean", torch.zeros(16))
        self.hidden = 16

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = F.dropout(h, 0.5)
        return self.b(h.reshape(-1, self.hidden) - self.mean)


def test_a_graph_traced_with_torch_fx_says_it_keeps_its_mode():
    torch.manual_seed(0)
    model = _OwnBatchNorm().eval()
    with pytest.warns(graphprune.GraphpruneWarning, match="asks self.training"):
        small = graphprune.compile(model, (torch.randn(4, 8),), ratio=0.5, importance="l1", output="graph")
    assert "Traced with torch.fx in eval mode" in small.report.form_why


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        return self.fc(F.relu(self.n2(self.c2(h))).mean((2, 3)))


def _bns(m) -> int:
    return sum(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())


def test_a_folding_pipeline_recalibrates_before_it_folds(monkeypatch):
    """``pipeline="deploy"`` with calibration: auto judged its candidates and recalibrated them with
    their BatchNorms already folded, so no statistics moved and the report said they had. The
    deploy result is the default pipeline's result, folded; prune_iteratively's last step too."""
    from graphprune import loop

    torch.manual_seed(0)
    model = _ConvBN().eval()
    cal = [(torch.randn(8, 3, 8, 8) * 2 + 1,) for _ in range(6)]
    x = cal[0][0][:2]
    seen = []
    real = loop.recalibrated
    monkeypatch.setattr(loop, "recalibrated", lambda m, fwd: (seen.append(_bns(m)), real(m, fwd))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = graphprune.compile(model, (x,), target_flops=0.5, calibration=cal, ignore=[model.fc], output="graph")
        deploy = graphprune.compile(model, (x,), target_flops=0.5, calibration=cal, ignore=[model.fc], pipeline="deploy")
    assert seen and 0 not in seen
    assert str(plain.report.auto).split("(")[0] == str(deploy.report.auto).split("(")[0]
    assert _bns(deploy) == 0
    with torch.no_grad():
        for b, in cal[:2]:
            assert _rel(deploy(b), plain(b)) < 1e-4
    seen.clear()
    steps = graphprune.prune_iteratively(model, (x,), target_flops=0.5, steps=2, calibration=cal, importance="l2",
                                         ignore=[model.fc], pipeline="deploy", progress=False)
    plain_steps = graphprune.prune_iteratively(model, (x,), target_flops=0.5, steps=2, calibration=cal,
                                               importance="l2", ignore=[model.fc], progress=False)
    assert _bns(steps) == 0 and 0 not in seen
    with torch.no_grad():
        assert _rel(steps(x), plain_steps(x)) < 1e-4


def test_a_batch_of_one_is_left_out_of_the_statistics():
    """A BatchNorm1d given one sample refuses training mode: such a batch among others failed auto
    with a raw ValueError, or not, by the batches' order."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    sizes = list(range(1, 9))
    cal = [(torch.randn(n, 8) + 1,) for n in sizes]
    graphprune.recalibrate_bn(net, cal)
    with torch.no_grad():  # the cumulative average of the batches' means, the batch of one left out
        means = torch.stack([net[0](b).mean(0) for b, in cal[1:]])
    torch.testing.assert_close(net[1].running_mean, means.mean(0), rtol=1e-4, atol=1e-4)
    for order in (cal, cal[::-1]):
        small = graphprune.compile(net, (torch.randn(4, 8),), target_flops=0.5, calibration=order)
        assert small.report.auto is not None
    with pytest.raises(graphprune.GraphpruneError, match="one value per channel"):
        graphprune.recalibrate_bn(net, [(torch.randn(1, 8),)])


def test_calibration_the_model_cannot_take_is_said_however_many_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    for n in (6, 20):
        with pytest.raises(graphprune.GraphpruneError, match="calibration data"):
            graphprune.compile(net, (torch.randn(4, 8),), target_flops=0.5,
                               calibration=[(torch.randn(4, 8, dtype=torch.float64),) for _ in range(n)])


def test_oneDNN_layers_take_the_plain_path_under_jit_trace():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    small = graphprune.compile(net, (x,), ratio=0.5, importance="l1", pipeline="shrink-params,dce,onednn-fuse")
    with torch.no_grad():
        traced = torch.jit.trace(small, (x,))
        torch.testing.assert_close(traced(x), small(x), rtol=1e-5, atol=1e-5)


class _Pooled(nn.Module):
    """Mean pooling, or masked pooling where a mask is given; a width read from an attribute
    (``self.width``) keeps the pruned model a graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.width = nn.Linear(8, 16), nn.Linear(16, 3), 16

    def forward(self, x, attention_mask=None):
        h = torch.relu(self.a(x)).reshape(x.shape[0], x.shape[1], self.width)
        if attention_mask is not None:
            return self.b((h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True))
        return self.b(h.mean(1))


def test_a_graph_called_without_an_input_its_example_gave_says_which():
    """The graph computes the path with the mask; called without it, Python said only that
    forward() missed an argument (survey 36 F05)."""
    torch.manual_seed(0)
    model, x, mask = _Pooled().eval(), torch.randn(2, 5, 8), torch.ones(2, 5)
    small = graphprune.compile(model, (x,), example_kwargs={"attention_mask": mask}, ratio=0.5, importance="l1",
                               output="graph")
    twin = dead_twin(model, small)
    with torch.no_grad():
        assert _rel(small(x, attention_mask=mask), twin(x, attention_mask=mask)) < 1e-5
    with pytest.raises(graphprune.GraphpruneError, match="example that gave attention_mask"):
        small(x)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.width = nn.Linear(8, 16), nn.Linear(16, 3), 16

    def forward(self, x, scale=None):
        h = torch.relu(self.a(x)).reshape(x.shape[0], self.width)
        return self.b(h if scale is None else h * scale[:, None])


def test_an_fx_graph_called_without_an_input_its_example_gave_says_which(tmp_path):
    torch.manual_seed(0)
    model, x, scale = _Scaled().eval(), torch.randn(4, 8), torch.rand(4)
    small = graphprune.compile(model, (x, scale), ratio=0.5, importance="l1", output="graph")
    assert graphprune.module_form.info(small)["method"] == "symbolic_trace"
    graphprune.save(small, tmp_path)
    for m in (small, graphprune.load(_Scaled().eval(), tmp_path)):
        with torch.no_grad():
            assert _rel(m(x, scale.flip(0)), dead_twin(model, small)(x, scale.flip(0))) < 1e-5
        with pytest.raises(graphprune.GraphpruneError, match="example that gave scale"):
            m(x)


class _Counted(nn.Module):
    """A BatchNorm net whose forward also writes a buffer of its own (a call counter)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x))


def test_recalibration_moves_only_the_batchnorm_statistics():
    """Recomputing BatchNorm statistics runs the calibration batches through the model; what else its
    forward writes (a counter, a KV cache) is put back as it was."""
    torch.manual_seed(0)
    model = _Counted()
    graphprune.recalibrate_bn(model, [(torch.randn(4, 3, 8, 8),) for _ in range(3)])
    assert float(model.calls) == 0.0
    assert not torch.equal(model.bn.running_mean, torch.zeros(8))
