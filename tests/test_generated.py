"""Hypothesis builds random conv architectures (residual, concat, split, reshape, grouped conv)
and checks compile at random ratios: it runs, shapes are right, dead channels go losslessly."""
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune
from oracle import assert_lossless, kill_units

BLOCKS = ["plain", "residual", "concat", "split", "grouped", "shuffle"]
# constructs that read channels without weights (issue "Soundness"): each must stay exact or keep its channels
CONSTRUCTS = ["inplace", "sigmoid_sum", "width_div", "norm_chw", "max_values", "alias_update"]


class Generated(nn.Module):
    def __init__(self, plan, width):
        super().__init__()
        self.plan = plan
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.ModuleList()
        c = width
        for kind, extra in plan:
            if kind == "plain":
                mods = nn.ModuleList([nn.Conv2d(c, c + extra, 3, padding=1), nn.BatchNorm2d(c + extra)])
                c = c + extra
            elif kind == "residual":
                mods = nn.ModuleList([nn.Conv2d(c, 4 + extra, 1), nn.Conv2d(4 + extra, c, 3, padding=1)])
            elif kind == "concat":
                mods = nn.ModuleList([nn.Conv2d(c, 2 + extra, 3, padding=1)])
                c = c + 2 + extra
            elif kind == "split":
                a = max(1, c // 3)
                mods = nn.ModuleList([nn.Conv2d(a, a + extra, 1), nn.Conv2d(c - a, 3, 1)])
                mods.sizes = (a, c - a)
                c = a + extra + 3
            elif kind == "grouped":
                g = 2
                mods = nn.ModuleList([nn.Conv2d(c, 2 * g * (1 + extra), 1), nn.Conv2d(2 * g * (1 + extra), 2 * g * (1 + extra), 3, padding=1, groups=g)])
                c = 2 * g * (1 + extra)
            elif kind == "shuffle":
                mods = nn.ModuleList([nn.Conv2d(c, 2 * (2 + extra), 1)])
                c = 2 * (2 + extra)
            elif kind == "norm_chw":
                mods = nn.ModuleList([nn.Conv2d(c, c + extra, 1), nn.GroupNorm(1, c + extra)])
                c = c + extra
            else:  # constructs on a fresh conv output
                mods = nn.ModuleList([nn.Conv2d(c, c + extra, 1), nn.Conv2d(c, c + extra, 1)])
                c = c + extra
            self.layers.append(mods)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        for (kind, _), mods in zip(self.plan, self.layers):
            if kind == "plain":
                x = torch.relu(mods[1](mods[0](x)))
            elif kind == "residual":
                x = x + mods[1](torch.relu(mods[0](x)))
            elif kind == "concat":
                x = torch.cat([x, mods[0](x)], 1)
            elif kind == "split":
                a, b = torch.split(x, list(mods.sizes), dim=1)
                x = torch.cat([mods[0](a), mods[1](b)], 1)
            elif kind == "grouped":
                x = mods[1](mods[0](x))
            elif kind == "shuffle":
                y = mods[0](x)
                b, c, h, w = y.shape
                x = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            elif kind == "norm_chw":
                x = mods[1](mods[0](x))
            elif kind == "inplace":
                x = mods[0](x)
                x.relu_()
            elif kind == "sigmoid_sum":
                y = mods[0](x)
                x = y + torch.sigmoid(y).sum(1, keepdim=True)
            elif kind == "width_div":
                y = mods[0](x)
                x = y / y.shape[1] + y.mean(1, keepdim=True) * y.size(1)
            elif kind == "max_values":
                y = mods[0](x)
                x = y + y.max(1, keepdim=True).values
            else:  # alias_update: r sees the in-place add, as in eager PyTorch
                y = mods[0](x)
                r = y
                y += mods[1](x)
                x = torch.relu(r)
        return self.head(x)


plans = st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(0, 3)), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, width=st.integers(4, 12), ratio=st.floats(0.0, 0.9))
def test_generated_models_compile_at_random_ratios(plan, width, ratio):
    torch.manual_seed(0)
    model = Generated(plan, width).eval()
    x = torch.randn(2, 3, 8, 8)
    small = graphprune.compile(model, (x,), ratio=ratio)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
        assert small(torch.randn(3, 3, 8, 8)).shape == (3, *model(x).shape[1:])
    assert graphprune.count_params(small) <= graphprune.count_params(model)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, width=st.integers(4, 12), seed=st.integers(0, 1000))
def test_generated_models_lossless_on_dead_channels(plan, width, seed):
    assert_lossless(lambda: Generated(plan, width), (2, 3, 8, 8), frac=0.25, seed=seed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.sampled_from(BLOCKS + CONSTRUCTS), st.integers(0, 3)), min_size=1, max_size=4),
       width=st.integers(4, 10), seed=st.integers(0, 1000))
def test_generated_constructs_match_the_dead_twin(plan, width, seed):
    """With constructs that read channels without weights mixed in, compile at 0.25
    reproduces the dead twin (at two batch sizes), whatever it had to keep; at
    ratio 0 it reproduces the model."""
    torch.manual_seed(seed)
    model = Generated(plan, width).eval()
    x, x3 = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(graphprune.compile(model, (x,), ratio=0.0)(x), model(x), rtol=1e-5, atol=1e-5)
    kill_units(model, (x,), 0.25, seed)
    with torch.no_grad():
        ref, ref3 = model(x), model(x3)
        small = graphprune.compile(model, (x,), ratio=0.25, importance="l1")
        for got, want in ((small(x), ref), (small(x3), ref3)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
    assert graphprune.count_params(small) <= graphprune.count_params(model)
