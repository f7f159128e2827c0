"""Ops that held every channel around them for want of a rule (survey 33 f05): flips, expand_as and
new_ones as torch.export records them, new_tensor; softplus, zeros and a slice at a length read at run time
(survey 45 F3); ``type_as``, whose other tensor gives a dtype and no values (survey 46 F1); ATen ops tagged
pointwise; ``F.linear`` called by keyword (survey 60). Each model prunes now, exact against the dead twin on
both trace paths (a size test sends a model to torch.export)."""
import pytest
import torch
import torch.nn as nn

import graphprune
from oracle import dead_twin, kill_units

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
    # repeat/tile: whole copies one after another (DeBERTa repeats its position heads over the batch)
    "repeat_new_dim": lambda s, h: h.repeat(2, 1, 1, 1).sum(0) * s.scale,
    "tile_channels": lambda s, h: torch.tile(h, (1, 1, 2)).view(h.shape[0], h.shape[1], 2, -1).mean(2) * s.scale,
    "tile_then_slice": lambda s, h: h.repeat(1, 1, 3)[..., 8:24] * s.scale,
    # pointwise ATen ops torch.export keeps under their own names, without a rule of their own (tagged pointwise)
    "leaky_relu_elu": lambda s, h: torch.nn.functional.elu(torch.nn.functional.leaky_relu(h * s.scale, 0.2)),
    "lerp": lambda s, h: torch.lerp(h, h * s.scale, 0.3),
    # F.linear called by keyword alone (timm's SwinV2): a builtin with no Python signature (survey 60)
    "linear_by_keyword": lambda s, h: torch.nn.functional.linear(input=h, weight=s.mix, bias=s.scale),
}


class _Op(nn.Module):
    def __init__(self, op: str, exported: bool):
        super().__init__()
        self.op, self.exported = op, exported
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 16))
        self.mix = nn.Parameter(torch.randn(16, 16) / 4)

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


class _TiledKeyValueHeads(nn.Module):
    """Grouped-query attention written with ``repeat``: query head j reads key/value head j % 2."""

    def __init__(self, d=32, heads=8, kv=2):
        super().__init__()
        self.heads, self.kv, self.head_dim = heads, kv, d // heads
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv * self.head_dim), nn.Linear(d, kv * self.head_dim)

    def forward(self, x):                                                      # (B, T, d)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)    # (B, 8, T, 4)
        k = self.k(x).view(B, T, self.kv, self.head_dim).transpose(1, 2)       # (B, 2, T, 4)
        v = self.v(x).view(B, T, self.kv, self.head_dim).transpose(1, 2)
        n_rep = self.heads // self.kv
        y = torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1))
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class _HeadBiasRepeated(nn.Module):
    """A bias shared by every head, repeated to the head count: a broadcast whose copies go with the heads."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(1, 1, 5, 5))

    def forward(self, x):                                                      # (B, 5, d)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, 8).permute(2, 0, 3, 1, 4)   # (B, 4, 5, 8) each
        a = q @ k.transpose(-1, -2) + self.bias.repeat(1, self.heads, 1, 1)          # (B, 4, 5, 5)
        return self.o((a.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


def test_repeat_ties_each_copy_to_its_source():
    """``repeat`` had no rule: it held every channel around it. A key/value head repeated whole goes with
    the query heads that read its copies, and a bias repeated over the heads shrinks with them; both exact
    at another batch and length, the first in the model's own class (its head counts followed)."""
    torch.manual_seed(0)
    gqa = _TiledKeyValueHeads().eval()
    x = torch.randn(2, 5, 32)
    small = graphprune.compile(gqa, (x,), ratio=0.5, importance="l1")
    assert small.k.out_features == 4 and small.q.out_features == 16, small.report.verify.blocked
    assert small.report.form == "module", small.report.form_why
    twin = dead_twin(gqa, small)
    for shape in [(2, 5, 32), (3, 9, 32)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(small(x), twin(x))
    bias = _HeadBiasRepeated().eval()
    x = torch.randn(2, 5, 32)
    small = graphprune.compile(bias, (x,), ratio=0.5, importance="l1")
    assert dict(small.named_parameters())["qkv.weight"].shape[0] < 96
    twin = dead_twin(bias, small)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(small(x), twin(x))


class _TiledThenInterleaved(_TiledKeyValueHeads):
    """Key heads tiled, then each copy interleaved: query head j reads key head (j // 2) % 2."""

    def forward(self, x):                                                      # (B, T, d)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)    # (B, 8, T, 4)
        k = self.k(x).view(B, T, self.kv, self.head_dim).transpose(1, 2)       # (B, 2, T, 4)
        k = k.repeat(1, 2, 1, 1).repeat_interleave(2, dim=1)                    # (B, 8, T, 4)
        y = (q @ k.transpose(-1, -2)).softmax(-1) @ q
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_copies_tiled_and_then_shared_go_with_their_key_head():
    """Survey 56 F2: a tiled key head's two copies were balanced over the query heads as if each were its own
    head, and ``repeats`` came out 6 / 4: "shrink-params left an invalid graph". Each key head now goes whole
    with the four query heads that read its copies."""
    torch.manual_seed(0)
    model, x = _TiledThenInterleaved().eval(), torch.randn(2, 5, 32)
    kill_units(model, (x,), 0.5)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.k.out_features == 4 and small.q.out_features == 16
    twin = dead_twin(model, small)
    for shape in [(2, 5, 32), (3, 9, 32)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(small(x), twin(x))
