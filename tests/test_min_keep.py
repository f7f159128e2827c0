"""allocate.MIN_KEEP: a budget leaves every group, and every member of a concat group, a tenth of its units."""
import math

import pytest
import torch
import torch.nn as nn

import graphprune
from graphprune import allocate


class Concat(nn.Module):
    """A trunk and a thin branch concatenated into one head: their channels form one group,
    and the branch's weights are 100x smaller, so a ranking by weight norm takes it first."""

    def __init__(self):
        super().__init__()
        self.trunk, self.branch = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(3, 40, 3, padding=1)
        self.mix = nn.Conv2d(72, 16, 1)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.branch.weight.mul_(0.01)
            self.mix.weight[:, 32:].mul_(0.01)

    def forward(self, x):
        h = torch.cat([torch.relu(self.trunk(x)), torch.relu(self.branch(x))], 1)  # (B, 72, H, W)
        return self.fc(torch.relu(self.mix(h)).mean((2, 3)))


def _branch_width(small) -> int:
    return small.branch.out_channels if hasattr(small, "branch") else small.get_submodule("branch").out_channels


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_a_concatenated_branch_keeps_a_tenth(target):
    torch.manual_seed(0)
    model, x = Concat().eval(), torch.randn(2, 3, 16, 16)
    small = graphprune.compile(model, (x,), target_flops=target, importance="l2", ignore=["fc"])
    assert small.report.flops <= target
    assert _branch_width(small) >= math.ceil(allocate.MIN_KEEP * 40)


def test_without_the_floor_the_branch_goes(monkeypatch):
    """The case the floor is for: the same budget with no floor empties the branch to one channel."""
    torch.manual_seed(0)
    model, x = Concat().eval(), torch.randn(2, 3, 16, 16)
    floor = math.ceil(allocate.MIN_KEEP * 40)
    monkeypatch.setattr(allocate, "MIN_KEEP", 0.0)
    small = graphprune.compile(model, (x,), target_flops=0.25, importance="l2", ignore=["fc"])
    assert _branch_width(small) < floor


def test_the_floor_yields_to_the_budget():
    """A tenth of every group costs more than this budget: the budget is met below the floor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 4)).eval()
    small = graphprune.compile(model, (torch.randn(4, 16),), target_params=0.01, importance="l2", ignore=["4"])
    assert small.report.params <= 0.01
    assert min(after for _, after in small.report.widths.values()) < math.ceil(allocate.MIN_KEEP * 200)


def test_ratio_is_not_floored():
    """ratio= is the user's own fraction per group: no floor there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 4)).eval()
    small = graphprune.compile(model, (torch.randn(4, 16),), ratio=0.95, importance="l2", ignore=["2"])
    assert small.get_submodule("0").out_features == 2
