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
