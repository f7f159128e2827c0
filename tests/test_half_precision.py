"""Half-precision models: the self-check tells bf16/fp16 rounding from a wrong rewrite.

The check compares the pruned model with its dead twin. In bf16, summing in another order
moves an output by a unit or two of bf16 (1/128 relative), more than the tolerance of a
small output column; where that alone fails a check, it runs again in float32 copies
(``verify.widened_on_rounding``), where rounding is small and a wrong rewrite is not.
"""
import copy

import pytest
import torch

import graphprune
import graphprune.zeros as zeros
from oracle import dead_twin, kill_units, reference
from test_soundness import IMG, NonZeroReductions

timm = pytest.importorskip("timm")


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1,
                             embed_dim=96, num_heads=3).eval()


def test_bf16_rounding_keeps_no_group_whole():
    """These bf16 weights (seed 3) made the check of the residual group and of the MLP fail at
    0.0059 on outputs of magnitude 0.35: both were kept whole and target_flops=0.5 was
    Unreachable ("keeps 0.796"). The same weights prune to 0.5 in float32."""
    m = _vit(3).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32).bfloat16()
    small = graphprune.compile(m, (x,), target_flops=0.5, importance="l2")
    assert small.report.verify.status == "passed" and small.report.flops <= 0.5
    assert small.report.form == "module" and all(p.dtype == torch.bfloat16 for p in small.parameters())
    # widened to float32, the pruned model is its dead twin to float32's precision
    wide, twin = copy.deepcopy(small).float(), dead_twin(m, small).float()
    for xx in (x, torch.randn(3, 3, 32, 32).bfloat16()):
        with torch.no_grad():
            torch.testing.assert_close(wide(xx.float()), twin(xx.float()), rtol=1e-4, atol=1e-5)


class ChannelMean(torch.nn.Module):
    """A mean over channels in the model's own code: the pruned graph scales it back to the full
    width, the user's forward cannot, so the module form is wrong by (kept / full) there."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + 0.05 * h.mean(1, keepdim=True)  # a small share of the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mean_over_pruned_channels_in_half_precision_is_not_the_module_form(dtype):
    """At a tolerance of 8 units of bf16 (3%), the module form's mean over 12 of 16 channels
    (0.016 off at magnitude 1.8, 1%) passed as rounding and came back in the model's class."""
    torch.manual_seed(0)
    m = ChannelMean().eval()
    with torch.no_grad():
        m.a.bias.add_(1.0)  # most units on: the mean is large beside the rest of the output
    m, x = m.to(dtype), torch.randn(2, 3, 6, 6, dtype=dtype)
    small = graphprune.compile(m, (x,), ratio=0.25, importance="l1")
    assert small.report.form == "graph" and graphprune.count_params(small) < graphprune.count_params(m)
    wide, twin = copy.deepcopy(small).float(), dead_twin(m, small).float()
    with torch.no_grad():
        torch.testing.assert_close(wide(x.float()), twin(x.float()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_wrong_rewrite_in_half_precision_is_still_found(monkeypatch, dtype):
    """With the zero rule for reductions off, the sigmoid-sum group is pruned wrongly (1.0 off at
    magnitude 5.7): rerun in float32 it stays wrong, so bisection keeps it whole as in float32."""
    monkeypatch.setitem(zeros.RULES, "reduce", zeros.nothing)
    torch.manual_seed(0)
    m = NonZeroReductions().eval()
    x = torch.randn(*IMG)
    kill_units(m, (x,), 0.25)
    m, x = m.to(dtype), x.to(dtype)
    small = graphprune.compile(m, (x,), ratio=0.25, importance="l1")
    v = small.report.verify
    assert v.status == "repaired" and len(v.blocked) == 1 and "parameters of a, b" in v.blocked[0]
    assert small.a.out_channels == 8 and small.c.out_channels < 8
    with torch.no_grad():  # the reference is the original (its killed units are zero) in float32
        torch.testing.assert_close(copy.deepcopy(small).float()(x.float()), reference(m.float(), x.float()),
                                   rtol=1e-4, atol=1e-5)


def test_bf16_folds_are_checked_at_the_dtypes_precision():
    """A fold writes weights rounded to bf16, which a check in float32 copies cannot take back: held
    to float32's tolerance there, every group of a bf16 resnet18 was kept whole under the deploy
    folds ("keeps 0.907", survey 40 F03). Such a pipeline is checked at 8 units of the dtype."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    m = m.eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32).bfloat16()
    small = graphprune.compile(m, (x,), target_flops=0.5, importance="l2", pipeline="shrink-params,fold-bn,dce")
    assert small.report.flops <= 0.5 and not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in small.modules())
    wide, twin = copy.deepcopy(small).float(), dead_twin(m, small).float()
    with torch.no_grad():  # the folded weights' bf16 rounding, and nothing more
        a, b = wide(x.float()), twin(x.float())
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
