import pytest
import torch

import graphprune

from models import IMAGE, ORACLE_MODELS, TOKENS, EinsumAttention, GQAttention, Shuffle
from oracle import assert_lossless


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


def test_shuffle_prunes_both_halves_together():
    model, small = assert_lossless(Shuffle, IMAGE)
    # the stem feeds both branches through the shuffle; it must shrink (an even number of channels)
    assert small.stem[0].out_channels < model.stem[0].out_channels
    assert small.stem[0].out_channels % 2 == 0
    x = torch.randn(*IMAGE)
    assert small(x).shape == model(x).shape


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
