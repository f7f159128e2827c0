"""allocate._fill_gap: a budget that one coarse unit (an attention head) overshoots is filled with finer units."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from graphprune import allocate


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, q, k and v projected apart."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (b, heads, n, d / heads)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TinyViT(nn.Module):
    """Two blocks of 4 heads over a 64-wide stream: a head is 1/4 of its block's attention FLOPs."""

    def __init__(self, dim=64, heads=4, hidden=128):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = nn.ModuleList([Attention(dim, heads) for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(2)])
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):  # (b, 16, 8)
        x = self.inp(x)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.fc(x.mean(1))


TARGETS = [0.3, 0.4, 0.5, 0.6, 0.62, 0.64, 0.66, 0.68, 0.7]


def _landings(monkeypatch, tol):
    monkeypatch.setattr(allocate, "FILL_TOL", tol)
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 16, 8)
    with torch.no_grad():  # heads of uneven weight, so per parameter the attention goes head by head
        for a in model.attn:
            for lin in (a.q, a.k, a.v):
                lin.weight.view(4, 16, 64)[1] *= 0.3
            a.out.weight.view(64, 4, 16)[:, 1] *= 0.3
    out = []
    for t in TARGETS:
        small = graphprune.compile(model, (x,), target_flops=t, importance="l2", allocation="per_param", ignore=["fc"])
        got = graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))
        assert got <= t + 1e-9 and small.report.flops == pytest.approx(got, abs=1e-6)
        out.append(got)
    return out


def test_landing_moves_up_to_the_target_and_never_over(monkeypatch):
    plain = _landings(monkeypatch, 1.0)                 # the fill off: where the threshold order alone lands
    filled = _landings(monkeypatch, allocate.FILL_TOL)
    assert all(f >= p - 1e-9 for f, p in zip(filled, plain)), (plain, filled)
    gaps = [t - p for t, p in zip(TARGETS, plain)]
    assert max(gaps) > 0.02, gaps                        # the case the fill is for: a head overshoots somewhere
    for t, p, f in zip(TARGETS, plain, filled):
        if t - p > allocate.FILL_TOL:
            assert f > p, (t, p, f)


class Stream(nn.Module):
    """A 16-wide residual stream through 6 blocks of 8 hidden units: a stream unit is in 13 weight
    matrices, a hidden unit in 2, so per parameter the hidden units go first and the stream's
    units, each costly, cross the budget one after another."""

    def __init__(self, d=16, h=8, n=6):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.up = nn.ModuleList([nn.Linear(d, h) for _ in range(n)])
        self.down = nn.ModuleList([nn.Linear(h, d) for _ in range(n)])
        self.fc = nn.Linear(d, 3)

    def forward(self, x):  # (b, 4)
        x = self.inp(x)                                        # (b, d)
        for up, down in zip(self.up, self.down):
            x = x + down(torch.relu(up(x)))
        return self.fc(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_second_coarse_unit_that_overshoots_does_not_end_the_fill(monkeypatch, seed):
    """The first round keeps the stream unit that overshot; the next threshold that fits again removes
    another stream unit and lands no closer. That round used to end the fill (0.05 under a 0.3 target);
    it keeps that unit too and goes on."""
    torch.manual_seed(seed)
    model, x = Stream().eval(), torch.randn(4, 4)

    def landing():
        small = graphprune.compile(model, (x,), target_flops=0.3, importance="l2", allocation="per_param", ignore=["fc"])
        return graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))

    builds, measure = [], allocate.Meter.__call__
    monkeypatch.setattr(allocate.Meter, "__call__", lambda self, removed: builds.append(1) or measure(self, removed))
    monkeypatch.setattr(allocate, "FILL_TOL", 1.0)
    plain = landing()
    searched, builds[:] = len(builds), []
    monkeypatch.setattr(allocate, "FILL_TOL", 0.01)
    filled = landing()
    assert 0.3 - plain > 0.02, plain                             # the case: the order alone lands far under
    assert 0.3 - allocate.FILL_TOL <= filled <= 0.3, (plain, filled)
    # each round gallops from where the last landed instead of bisecting to the end of the order:
    # 8 candidates built for the fill here, 19 before (fastvit_t8: 93 -> 21 builds, same landing)
    assert len(builds) - searched <= 10, (searched, len(builds))


class GroupedUp(nn.Module):
    """Coarse groups: a grouped conv's unit is a channel in each of its 4 groups, and rounding to 8
    channels moves the narrow transposed conv by a third of its width at a time."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 64, 5, padding=2), nn.Conv1d(64, 64, 3, padding=1, groups=4)
        self.up, self.c = nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1), nn.Conv1d(32, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.up(F.relu(self.b(F.relu(self.a(x)))))))


def test_a_rounded_budget_trades_width_between_groups_to_land_close():
    """Under round_to the fill only gave units back, one group at a time: where every such offer
    overshot it stopped, 0.444 of the parameters for target_params=0.5, although widths of 64, 32
    and 24 (multiples of 8) keep 0.474 (survey 24). One group now gives back while another pays."""
    from oracle import dead_twin
    torch.manual_seed(0)
    model, x = GroupedUp().eval(), torch.randn(2, 4, 50)
    count = lambda m: sum(t.numel() for t in m.parameters())
    small = graphprune.compile(model, (x,), target_params=0.5, round_to=8)
    widths = [small.a.out_channels, small.b.out_channels, small.up.out_channels]
    assert all(w % 8 == 0 for w in widths), widths
    assert 0.47 <= count(small) / count(model) <= 0.5, (count(small) / count(model), widths)
    torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [{"target_flops": 0.5}, {"target_params": 0.9}])
def test_a_budget_lands_when_every_score_ties(budget):
    """bn_scale on a freshly built network scores every unit 1: the only thresholds were "remove
    nothing" and "remove everything", and resnet18 at target_flops=0.5 kept 0.017 (survey 26).
    Ties now go a few units at a time, the same fraction from every group."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    small = graphprune.compile(model, (x,), importance="bn_scale", **budget)
    kind, target = next(iter(budget.items()))
    got = small.report.flops if kind == "target_flops" else small.report.params
    assert target - 0.02 <= got <= target
    kept = [after / before for before, after in small.report.widths.values()]
    assert max(kept) - min(kept) < 0.15, kept  # no group emptied while another stays whole


def test_a_global_ratio_spreads_tied_scores_over_the_groups():
    """ratio_scope="global" sorted every unit's score with a stable sort: with bn_scale on a fresh
    network (all 1) every removal went to the first groups in graph order, cut to one channel
    while 14 of 20 convs stayed whole (survey 28)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    small = graphprune.compile(model, (x,), ratio=0.3, ratio_scope="global", importance="bn_scale")
    kept = [after / before for before, after in small.report.widths.values()]
    # the residual streams read two or three BatchNorms (a score of 2 or 3) and stay; the tied rest go alike
    assert min(kept) > 0.5 and len({round(k, 2) for k in kept if k < 1}) == 1, kept


def test_the_rounded_fill_meters_a_group_when_it_comes_first_not_every_round(monkeypatch):
    """Under round_to the fill gives multiples back to the group with the best score per budget. It metered
    every group in every round, a full prune each: DenseNet121 at target_flops=0.6, round_to=16 did not finish
    in 100 s (survey 28). A ratio as last metered stands until the group comes first; this small DenseNet
    lands where it did (0.592) with 29 readings where it took 68."""
    import torchvision

    readings = []
    meter = allocate.Meter.__call__
    monkeypatch.setattr(allocate.Meter, "__call__", lambda self, removed: readings.append(1) or meter(self, removed))
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=16, block_config=(3, 3, 3), num_init_features=32, bn_size=2).eval()
    small = graphprune.compile(model, (torch.randn(1, 3, 32, 32),), target_flops=0.6, round_to=8, importance="l1")
    assert 0.59 <= small.report.flops <= 0.6
    assert len(readings) <= 40, len(readings)


class GQABlocks(nn.Module):
    """Two pre-norm blocks of grouped-query attention (8 query heads over 2 key/value heads, head_dim 8,
    Hugging Face's expand-and-reshape spelling) and an MLP, over a 64-wide stream: every head count
    meets ``round_to=8``, so balanced head removals are legal rounded widths."""

    def __init__(self, d: int = 64, heads: int = 8, kv: int = 2, hidden: int = 128):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        self.k = nn.ModuleList(nn.Linear(d, kv * self.hd, bias=False) for _ in range(2))
        self.v = nn.ModuleList(nn.Linear(d, kv * self.hd, bias=False) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(d, hidden) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(hidden, d) for _ in range(2))

    def attend(self, i, x):
        b, t, _ = x.shape
        q = self.q[i](x).view(b, t, self.h, self.hd).transpose(1, 2)                   # (b, h, t, hd)
        k, v = (m[i](x).view(b, t, self.kv, self.hd).transpose(1, 2) for m in (self.k, self.v))
        r = self.h // self.kv
        k, v = (z[:, :, None].expand(b, self.kv, r, t, self.hd).reshape(b, self.h, t, self.hd) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v)                                     # (b, h, t, hd)
        return self.o[i](y.transpose(1, 2).reshape(b, t, self.h * self.hd))

    def forward(self, x):
        for i in range(2):
            x = x + self.attend(i, F.layer_norm(x, x.shape[-1:]))
            x = x + self.down[i](F.gelu(self.up[i](F.layer_norm(x, x.shape[-1:]))))
        return x


@pytest.mark.parametrize("round_to,target", [(16, 0.5), (16, 0.4), (8, 0.9)])
def test_a_rounded_budget_fills_past_balanced_head_steps(round_to, target):
    """Survey 42 F1: with ``round_to`` the fill skipped groups that shrink in step, and a threshold
    step that overshot ended the search with the stream cut. Now the step's groups are pinned
    (``_fill_gap(pin=True)``) and query heads go back and are taken in balanced bundles
    (``_offer_in_step``, ``_take``): within 0.01 of the target, every width a multiple (0.473 and 0.375
    before at round_to=16). Not yet at 0.8: 0.786, where 0.795 needs four groups to move at once."""
    torch.manual_seed(0)
    model, x = GQABlocks().eval(), torch.randn(1, 16, 64)
    small = graphprune.compile(model, (x,), target_flops=target, round_to=round_to, importance="l1",
                               output="graph")
    got = graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))
    assert small.report.flops == pytest.approx(got, abs=1e-9)
    assert target - 0.01 <= got <= target
    for name, w in small.named_parameters():
        if w.dim() == 2:
            assert all(s % 8 == 0 for s in w.shape), (name, tuple(w.shape))
