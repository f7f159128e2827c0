"""fold-bn: BatchNorm folded into the conv or linear before it, lossless, never in place."""
import torch.fx.passes.shape_prop
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from graphprune.pass_manager import run_pipeline


def _trained(*bns):
    """Statistics and affines away from their defaults (mean 0, var 1, weight 1, bias 0), where a wrong fold shows."""
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)


class ConvBN(nn.Module):
    """Folds: conv->bn (with and without conv bias), linear->bn1d on (N, C).
    Stays: a bn whose conv output is also read elsewhere, a bn1d over (N, C, L) after a linear, a bn in train mode."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # c3's output is also added: stays
        self.fc, self.bf = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.seq, self.bs = nn.Linear(4, 4), nn.BatchNorm1d(8)  # a BatchNorm1d over (N, 8, 4): dim 1 is not the linear's
        _trained(self.b1, self.b2, self.b3, self.bf, self.bs)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)))
        z = self.c3(h)
        h = self.b3(z) + z
        v = self.bf(self.fc(h.mean((2, 3))))
        s = self.bs(self.seq(h.flatten(2)[..., :4]))
        return v, s


def _kinds(gm):
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def test_fold_bn_is_lossless_and_leaves_the_input_module_alone():
    torch.manual_seed(0)
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3, 8, 8)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)  # a linear folds only where its output is known to be (N, C)
    out, changed = run_pipeline(gm, "fold-bn", check=False)
    assert changed["fold-bn"]
    assert _kinds(out).count("BatchNorm2d") == 1 and _kinds(out).count("BatchNorm1d") == 1  # b3 and bs stay
    with torch.no_grad():
        ref, got = model(x), out(x)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.c2.weight.data_ptr() != out.get_submodule("c2").weight.data_ptr()


def test_train_mode_batchnorm_is_not_folded():
    model = ConvBN().train()
    gm = torch.fx.symbolic_trace(model)
    _, changed = run_pipeline(gm, "fold-bn", check=False)
    assert not changed["fold-bn"]


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v2", "classifier.1")])
def test_deploy_pipeline_prunes_and_folds_torchvision(name, head):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=10).eval()
    for m in model.modules():  # statistics that are not the identity, so folding has something to get right
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    plain = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=[head])
    deploy = graphprune.compile(model, (x,), ratio=0.5, importance="l1", ignore=[head], pipeline="deploy")
    assert deploy.report.form == "graph" and "BatchNorm2d" not in _kinds(deploy)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), plain(x), rtol=1e-4, atol=1e-4)
    assert graphprune.count_params(deploy) < graphprune.count_params(plain)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, in short: a BatchNorm subclass outside torch.nn with its own forward,
    which fx traces through (the graph holds ``F.batch_norm`` with ``get_attr`` reads)."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected (N, C, H, W)")
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps))


class Functional(nn.Module):
    """Folds: conv -> BNAct (the conv's shape read as well). Stays: a BNAct whose weight is
    read again, a BNAct after an add (no layer to fold into)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BNAct(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), BNAct(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), BNAct(8)
        _trained(self.b1, self.b2, self.b3)

    def forward(self, x):
        h = self.b1(self.c1(x))
        h = self.b2(self.c2(h)) + self.b2.weight.reshape(1, -1, 1, 1)
        return self.b3(self.c3(h) + h)


def test_fold_bn_folds_functional_batch_norms_of_traced_through_modules():
    torch.manual_seed(0)
    model = Functional().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3, 8, 8)
    out, changed = run_pipeline(gm, "fold-bn", check=False)
    assert changed["fold-bn"]
    left = [n for n in out.graph.nodes if n.target is F.batch_norm]
    assert [n.args[1].target for n in left] == ["b2.running_mean", "b3.running_mean"]  # b2: weight read again
    assert out.get_submodule("b1").running_mean is None and out.get_submodule("b1").weight is None
    assert model.b1.running_mean is not None and out.get_submodule("c1") is not model.c1
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    _, changed = run_pipeline(torch.fx.symbolic_trace(model), "fold-bn", check=False)
    assert not changed["fold-bn"]  # training=True: batch statistics, nothing to fold


class _Frozen(nn.Module):
    """A conv -> BatchNorm -> ReLU -> conv net; ``frozen`` keeps its BatchNorm in eval mode in a model in training mode."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        _trained(self.bn)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_a_deploy_result_refuses_training_mode_where_it_folded_a_batchnorm(tmp_path):
    """Survey 59 F1: a deploy result put in training mode ran its folded layers with the running statistics where
    the BatchNorms would have used the batch's: 0.68 off the default pipeline's result in training mode, without a
    word. It is refused now, by a guard in the BatchNorms' place that takes their mode: a BatchNorm frozen in a
    model in training mode was folded, and that model still runs in training mode. The guard survives save/load."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    small = graphprune.compile(_Frozen().eval(), (x,), ratio=0.5, importance="l1", pipeline="deploy")
    assert "BatchNorm2d" not in _kinds(small)
    small(x)
    with pytest.raises(graphprune.GraphpruneError, match="training mode"):
        small.train()(x)
    small.eval()
    graphprune.save(small, tmp_path)
    back = graphprune.load(_Frozen(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)
    with pytest.raises(graphprune.GraphpruneError, match="training mode"):
        back.train()(x)

    for pipeline in (None, "deploy"):  # survey 63: compiled again, the guard was run once while tracing, and lost
        again = graphprune.compile(small, (x,), ratio=0.25, importance="l1", pipeline=pipeline)
        with pytest.raises(graphprune.GraphpruneError, match="training mode.*'bn'"):
            again.train()(x)

    frozen = _Frozen().train()
    frozen.bn.eval()
    small = graphprune.compile(frozen, (x,), ratio=0.5, importance="l1", pipeline="deploy")
    assert small.training and "BatchNorm2d" not in _kinds(small)
    twin = graphprune.compile(frozen, (x,), ratio=0.5, importance="l1")
    torch.testing.assert_close(small(x), twin(x), rtol=1e-5, atol=1e-5)
