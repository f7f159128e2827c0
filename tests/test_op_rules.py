"""Ops that held every channel around them for want of a rule (survey 33 f05): flips, expand_as and
new_ones as torch.export records them, new_tensor; softplus, zeros and a slice at a length read at run time
(survey 45 F3); ``type_as``, whose other tensor gives a dtype and no values (survey 46 F1). Each model prunes now, exact against the dead twin on
both trace paths (a size test sends a model to torch.export)."""
import pytest
import torch
import torch.nn as nn

import graphprune
from oracle import dead_twin

OPS = {
    "flip_time": lambda s, h: h.flip(1),
    "flip_channels": lambda s, h: h.flip(-1) * s.scale,         # channel c meets scale[c]: the flip's map decides
    "fliplr_then_cat": lambda s, h: torch.cat([h, torch.fliplr(h)], 1),
    "flip_two": lambda s, h: torch.flip(h, (1, 2)) + s.scale,
    "expand_as": lambda s, h: h * s.scale.expand_as(h),
    "new_ones": lambda s, h: h * h.new_ones(h.shape[-1]),
    "new_tensor": lambda s, h: h * h.new_tensor(2.0),
    # Mamba's mixer as torch.export records it (survey 45 F3): softplus, a slice at a length read at run
    # time (its causal conv's padding cut off), a state of zeros as wide as the channels
    "softplus": lambda s, h: torch.nn.functional.softplus(h * s.scale) * h,
    "slice_at_length": lambda s, h: torch.cat([h, h], 1)[:, :h.shape[1]],
    "zeros": lambda s, h: h + torch.zeros(h.shape[0], h.shape[1], 16),
    # a causal mask cast to h's dtype (Meta's Llama reference): h gives the dtype, not values (survey 46 F1)
    "mask_type_as": lambda s, h: torch.ones(h.shape[1], h.shape[1]).tril().type_as(h) @ h,
}


class _Op(nn.Module):
    def __init__(self, op: str, exported: bool):
        super().__init__()
        self.op, self.exported = op, exported
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 16))

    def forward(self, x):                      # (N, T, 8)
        h = torch.relu(self.a(x))              # (N, T, 16)
        if self.exported and x.shape[1] > 100:
            h = h * 2
        return self.b(OPS[self.op](self, h))


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("op", list(OPS))
def test_an_op_with_a_rule_now_prunes_exactly(op, exported):
    torch.manual_seed(0)
    model = _Op(op, exported).eval()
    small = graphprune.compile(model, (torch.randn(2, 5, 8),), ratio=0.5, importance="l1")
    kept = dict(small.named_parameters())["a.weight"].shape[0]
    assert kept < 16, small.report.verify.blocked
    twin = dead_twin(model, small)
    for shape in [(2, 5, 8), (3, 7, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(small(x), twin(x))


class _GatherByPermutation(nn.Module):
    """A gather whose index, a buffer, is expanded as its input: the index's values address h's channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        self.register_buffer("perm", torch.randperm(16))

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.gather(h, 1, self.perm.view(1, 16, 1, 1).expand_as(h)))


def test_a_gather_index_expanded_as_its_input_holds_the_channels():
    """expand_as(h) ties the index's dims to h's, and gather's index addresses h's channels by value: the
    channels stay, where compile was refused with "shrink-params left an invalid graph" (survey 47 M1)."""
    torch.manual_seed(0)
    model = _GatherByPermutation().eval()
    x = torch.randn(2, 3, 5, 5)
    summary = graphprune.analyze(model, (x,)).summary()
    assert "the index's values address this dim" in summary
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.a.out_channels == 16
    torch.testing.assert_close(small(x), model(x))
