"""Hand-written attention with a KV cache held in buffers, and head counts read from attributes.

The cache is written the ways such code writes it: ``index_copy`` (functional and in place), an index
assignment (``cache[:, :, pos] = k``, which torch.export records as ``index_put_``), and Meta's Llama
reference's slice assignment (``cache[:B, start:start + T] = k``, a slice and a ``copy_``). The cache's
key/value-head and head_dim dims go with the projections that fill them, the query heads read their
key/value head through ``repeat_interleave``, and the module form's ``self.nh`` follows the kept heads
(``module_form.follow_literals``). Each pruned model is held to its dead twin over a run of calls whose
cache carries from one to the next: a prefill, then decode steps at positions the prefill did not write.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from oracle import dead_twin


class CachedAttention(nn.Module):
    def __init__(self, nh: int, nkv: int, hd: int, write: str, maxlen: int = 16, maxb: int = 1):
        super().__init__()
        self.nh, self.nkv, self.hd, self.write = nh, nkv, hd, write
        dim = nh * hd
        self.wq = nn.Linear(dim, nh * hd, bias=False)
        self.wk = nn.Linear(dim, nkv * hd, bias=False)
        self.wv = nn.Linear(dim, nkv * hd, bias=False)
        self.wo = nn.Linear(nh * hd, dim, bias=False)
        shape = (maxb, maxlen, nkv, hd) if write == "slice" else (maxb, nkv, maxlen, hd)
        # random, not zeros: a position the example never wrote must still read the same in twin and result
        self.register_buffer("k_cache", torch.randn(shape))
        self.register_buffer("v_cache", torch.randn(shape))

    def forward(self, x, pos):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.hd)
        k = self.wk(x).view(B, T, self.nkv, self.hd)
        v = self.wv(x).view(B, T, self.nkv, self.hd)
        if self.write == "slice":  # pos is the start position, an int
            self.k_cache[:B, pos:pos + T] = k
            self.v_cache[:B, pos:pos + T] = v
            keys, values = self.k_cache[:B, :pos + T].transpose(1, 2), self.v_cache[:B, :pos + T].transpose(1, 2)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if self.write == "index_copy":
                keys, values = self.k_cache.index_copy(2, pos, k), self.v_cache.index_copy(2, pos, v)
            elif self.write == "index_copy_":
                self.k_cache.index_copy_(2, pos, k)
                self.v_cache.index_copy_(2, pos, v)
                keys, values = self.k_cache, self.v_cache
            else:
                self.k_cache[:, :, pos] = k
                self.v_cache[:, :, pos] = v
                keys, values = self.k_cache, self.v_cache
        keys = keys.repeat_interleave(self.nh // self.nkv, dim=1)
        values = values.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, nh, nkv, hd, write, **kw):
        super().__init__()
        dim = nh * hd
        self.attn = CachedAttention(nh, nkv, hd, write, **kw)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, pos):
        x = x + self.attn(x, pos)
        return x + self.down(F.gelu(self.up(x)))


def _calls(write: str, dim: int) -> tuple:
    """(example, calls): a prefill of 16 positions, then shorter calls at positions it wrote and did not."""
    if write == "slice":
        return ((torch.randn(1, 8, dim), 0),
                [(torch.randn(1, 8, dim), 0), (torch.randn(1, 1, dim), 8), (torch.randn(1, 3, dim), 9)])
    return ((torch.randn(1, 16, dim), torch.arange(16)),
            [(torch.randn(1, 16, dim), torch.arange(16)), (torch.randn(1, 5, dim), torch.arange(5) + 3),
             (torch.randn(1, 1, dim), torch.tensor([9]))])


def _against_twin(model, small, calls) -> float:
    twin = dead_twin(model, small)
    worst = 0.0
    for args in calls:  # in order: each call reads what the ones before wrote into the cache
        with torch.no_grad():
            ref, got = twin(*args), small(*args)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return worst


WRITES = ["index_copy", "index_copy_", "index_put", "slice"]


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("nh,nkv,hd", [(8, 2, 16), (12, 4, 8)])
def test_cached_heads_prune_in_the_users_class(write, nh, nkv, hd):
    torch.manual_seed(0)
    model = Block(nh, nkv, hd, write, maxb=2 if write == "slice" else 1).eval()
    before = copy.deepcopy(model.state_dict())
    example, calls = _calls(write, nh * hd)
    small = graphprune.compile(model, example, ratio=0.5, importance="l1")
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items()), "the user's model changed"
    assert small.report.form == "module", small.report.form_why
    assert isinstance(small, Block)
    kept_rows = small.attn.wq.weight.shape[0]
    assert kept_rows < nh * hd, "no query head was removed"
    assert small.attn.nh == kept_rows // hd  # the attribute follows the kept heads
    kv = small.attn.wk.weight.shape[0] // hd
    heads_dim = 2 if write == "slice" else 1
    assert small.attn.k_cache.shape[heads_dim] == kv and small.attn.v_cache.shape[heads_dim] == kv
    assert _against_twin(model, small, calls) < 1e-5


@pytest.mark.parametrize("write,output", [("index_put", "graph"), ("index_put", "auto"), ("slice", "auto")])
def test_the_self_check_leaves_the_results_cache_as_the_user_had_it(write, output):
    """The result's cache holds the user's values: the checks that run it (at other sizes too) run it
    on copies. ``cache[:, :, pos] = k`` traced with torch.export as a graph, whose size check ran the
    result itself, left the check's keys in it (0.15 off its twin at the next call)."""
    torch.manual_seed(0)
    model = Block(8, 2, 16, write, maxb=2 if write == "slice" else 1).eval()
    example, calls = _calls(write, 128)
    small = graphprune.compile(model, example, ratio=0.5, importance="l1", output=output)
    assert small.report.form == ("graph" if output == "graph" else "module")
    for name in ("attn.k_cache", "attn.v_cache"):
        mine, theirs = small.get_buffer(name), model.get_buffer(name)
        assert mine.shape == theirs.shape  # the key/value heads stay at this ratio (query heads go)
        assert torch.equal(mine, theirs)
    assert _against_twin(model, small, calls) < 1e-5


def test_a_head_count_equal_to_head_dim_is_not_guessed():
    """nh == hd == 8: the view's 8 that became 6 and the 8 that stayed cannot be told apart, so no
    attribute is set from them; the heads are then kept whole or the result is a graph, right either way."""
    torch.manual_seed(0)
    model = Block(8, 2, 8, "index_copy").eval()
    example, calls = _calls("index_copy", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = graphprune.compile(model, example, ratio=0.5, importance="l1")
    if small.report.form == "module":
        assert small.attn.nh * small.attn.hd == small.attn.wq.weight.shape[0]
    assert _against_twin(model, small, calls) < 1e-5
