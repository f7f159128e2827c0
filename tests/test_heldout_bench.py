"""bench/heldout.py's networks, written after the defaults: lossless under the oracle, and the
budget holds on what compile returns (the gated net's forward computes a residual nothing reads)."""

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

import graphprune  # noqa: E402
from bench_scripts import bench_module  # noqa: E402


def _heldout():
    return bench_module("tasks", "heldout")


def _inputs(name):
    return (lambda b: (torch.randn(b, 1, 8, 8),)) if name.startswith("digits") else (lambda b: (torch.randn(b, 1, 128),))


@pytest.mark.parametrize("name", ["digits_dense", "digits_resnext", "digits_mixer", "signal_gated", "digits_gru",
                                  "digits_tabmlp", "digits_convmixer", "signal_unet1d", "digits_clstf", "digits_shuffle"])
def test_heldout_network_is_lossless(name):
    from adversarial import ADVERSARIAL, classify

    ADVERSARIAL[name] = (_heldout().HELDOUT[name].model, _inputs(name))
    try:
        label, detail = classify(name)
    finally:
        del ADVERSARIAL[name]
    assert label == "lossless", detail


def test_gated_budget_holds_on_the_result():
    torch.manual_seed(0)
    model = _heldout().Gated1d().eval()
    x = torch.randn(1, 1, 128)
    for target in (0.5, 0.25):
        small = graphprune.compile(model, (x,), target_flops=target, importance="l2", ignore=["fc"])
        got = graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))
        assert target - 0.02 <= got <= target and small.report.flops == pytest.approx(got, abs=1e-9), (target, got)
