import pytest
import torch

import graphprune
from graphprune.shuffle import permute_channels

from models import IMAGE, ORACLE_MODELS, TOKENS, ComputedHeadDim, EinsumAttention, GQAttention, Shuffle
from oracle import assert_lossless, dead_twin


@pytest.mark.parametrize("name", sorted(ORACLE_MODELS))
def test_dead_channels_are_removed_losslessly(name):
    fn, shape = ORACLE_MODELS[name]
    assert_lossless(fn, shape)


@pytest.mark.parametrize("expand", [False, True])
def test_gqa_removes_whole_kv_groups(expand):
    model, small = assert_lossless(lambda: GQAttention(n_head=8, n_kv=4, expand=expand), TOKENS)
    hd, rep = model.hd, model.n_head // model.n_kv
    assert small.k.out_features % hd == 0
    kv = small.k.out_features // hd
    assert kv < model.n_kv
    # query heads stay balanced: rep query heads per surviving kv head
    assert small.q.out_features == kv * rep * hd
    assert small.o.in_features == small.q.out_features


def test_shuffle_is_a_permutation_not_a_coupling():
    """Folded into permute_channels, a shuffle leaves every stream channel its own unit."""
    model, small = assert_lossless(Shuffle, IMAGE, output="graph")
    x = torch.randn(*IMAGE)
    analysis = graphprune.analyze(model, (x,))
    stem = next(g for g in analysis.groups if ("stem.0.weight", 0) in g.dims)
    assert len(set(stem.dims[("stem.0.weight", 0)].tolist())) == model.stem[0].out_channels  # no two stem channels tied
    assert sum(n.target is permute_channels for n in small.graph.nodes) == 2
    assert small.stem[0].out_channels < model.stem[0].out_channels
    assert small(torch.randn(3, *IMAGE[1:])).shape == (3, *model(x).shape[1:])


@pytest.mark.parametrize("spelling", ["transpose", "permute", "export"])
def test_shuffle_spellings_fold(spelling):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 12, 1), torch.nn.Conv2d(12, 5, 1)

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.shape
            y = y.reshape(b, 3, c // 3, h, w)
            y = y.transpose(1, 2) if spelling != "permute" else y.permute(0, 2, 1, 3, 4)
            return self.b(y.reshape(b, c, h, w))

    from graphprune.trace import trace

    model, x = Net().eval(), torch.randn(2, 3, 4, 4)
    traced = trace(model, (x,), method="export" if spelling == "export" else "auto")
    assert sum(n.target is permute_channels for n in traced.gm.graph.nodes) == 1
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(x), model(x))
    small = graphprune.compile(model, (x,), ratio=0.25)
    assert dict(small.named_parameters())["a.weight"].shape[0] == 9
    with torch.no_grad():
        assert small(torch.randn(3, 3, 4, 4)).shape == (3, 5, 4, 4)


def test_einsum_attention_prunes_heads_and_bias_table():
    model, small = assert_lossless(EinsumAttention, TOKENS)
    heads = small.table.shape[1]
    assert heads < model.table.shape[1]
    assert small.qkv.out_features == 3 * heads * model.hd


class TiedLM(torch.nn.Module):
    """Token embedding tied to the output head, a residual MLP between them."""

    def __init__(self, vocab=11, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.up, self.down = torch.nn.Linear(d, 32), torch.nn.Linear(32, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def test_tied_weights_stay_tied():
    from oracle import kill_units

    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 11, (2, 7))
    kill_units(model, (ids,), 0.25)
    with torch.no_grad():
        ref = model(ids)
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    assert small.head.weight is small.emb.weight
    assert small.emb.weight.shape == (11, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(ids), ref, rtol=1e-5, atol=1e-5)
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (11, 16)


def test_computed_head_dim_under_a_flops_budget():
    """``C // self.num_heads`` in a reshape (timm CaiT, CoaT, VOLO): a FLOPs budget used to
    build candidates whose reshape computed the head dim from the pruned C (a RuntimeError
    out of compile). The computed size and the width it reads now stay, the MLP still
    goes, and the result is its dead twin at two batch sizes."""
    torch.manual_seed(0)
    model = ComputedHeadDim().eval()
    x = torch.randn(*TOKENS)
    small = graphprune.compile(model, (x,), target_flops=0.6, importance="l1", ignore=["out"])
    assert graphprune.count_flops(small, (x,)) <= 0.6 * graphprune.count_flops(model, (x,))
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, *TOKENS[1:])):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)
