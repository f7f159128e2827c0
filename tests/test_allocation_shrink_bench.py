"""bench/allocation_shrink.py: its shrunk allocation rules, and that its patch reaches compile."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

from bench_scripts import bench_module  # noqa: E402


def _bench():
    return bench_module("tasks", "allocation_shrink")


def _model(sizes, seed):
    rng = np.random.default_rng(seed)
    # groups on scales up to 1000-fold apart, as a rule's costs are: alone it empties the cheap ones first
    norm = {i: rng.random(n) * 10.0 ** rng.integers(-3, 3) for i, n in enumerate(sizes)}
    return SimpleNamespace(groups=[SimpleNamespace(id=i) for i in range(len(sizes))]), norm


def _removals(norm):
    """Every removal a threshold over ``norm`` makes (units per group), as ``allocate`` thresholds it."""
    taus = np.append(np.unique(np.concatenate(list(norm.values()) + [np.zeros(1)])), np.inf)
    return [tuple(int((v < t).sum()) for v in norm.values()) for t in taus]


sizes = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(sizes, st.integers(0, 10_000))
def test_lam_one_is_the_rule(sizes, seed):
    p, norm = _model(sizes, seed)
    assert set(_removals(_bench().shrunk(p, norm, 1.0))) == set(_removals(norm))


@settings(max_examples=60, deadline=None)
@given(sizes, st.integers(0, 10_000), st.sampled_from([0.0, 0.25, 0.5, 0.75]))
def test_each_removal_blends_one_of_the_rule(sizes, seed, lam):
    """Every threshold removes, per group, lam of what some threshold of the rule removes plus
    (1 - lam) of the group's share of that overall fraction (rounded down); never fewer as the
    threshold rises; inside a group, in the rule's order."""
    p, norm = _model(sizes, seed)
    out = _bench().shrunk(p, norm, lam)
    n = np.array(sizes)
    rule = [np.array(r) for r in _removals(norm)]
    prev = np.zeros_like(n)
    for counts in _removals(out):
        c = np.array(counts)
        assert (c <= n).all() and (c >= prev).all()
        prev = c
        assert any((c == np.floor(lam * r + (1 - lam) * n * r.sum() / n.sum() + 1e-9)).all() for r in rule), counts
    for i, v in norm.items():
        assert (np.diff(out[i][np.argsort(v, kind="stable")]) >= 0).all()


def test_the_patch_reaches_compile():
    """lam=0 makes a per-parameter allocation one fraction of every group; leaving the with block
    restores the rules (the same widths as before it)."""
    import graphprune

    bench = _bench()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 32, 32)

    def widths():
        small = graphprune.compile(model, (x,), target_flops=0.4, importance="l2", allocation="per_param", ignore=["7"])
        return [after / before for before, after in small.report.widths.values()]

    default = widths()
    with bench.patched(0.0):
        uniform = widths()
    assert max(uniform) - min(uniform) <= 1 / 8 + 1e-9, uniform
    assert max(default) - min(default) > 1 / 8, default  # the rules alone do not keep one fraction here
    assert widths() == default
