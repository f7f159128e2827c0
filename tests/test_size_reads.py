"""Sizes read off a tensor (``B, T, C = x.size()``) and used as reshape sizes.

nanoGPT merges its heads back with ``y.transpose(1, 2).contiguous().view(B, T, C)``, where ``C`` is the
residual stream's width. A read that sizes a dim is tied to the dim it reads, except where the reshape merges
several dims into it: then the merge states the width, and the read says only what it was on the example.
Tied to a stream that cannot shrink (the model's input), the read held every head (survey 36 F09)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from oracle import dead_twin

VOCAB, D, HEADS = 50, 64, 4


class Block(nn.Module):
    """nanoGPT's block: fused qkv split by n_embd, heads sized by n_head, merged by a width read off x."""

    def __init__(self):
        super().__init__()
        self.n_head, self.n_embd = HEADS, D
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def attn(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads merged to the stream's width, read off x
        return self.c_proj(y)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(16, D)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f, self.lm_head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Attention(nn.Module):
    """Survey 36 F09: the stream is the model's input, so it keeps its width, and the heads merge into it."""

    def __init__(self):
        super().__init__()
        self.h, self.qkv, self.o = HEADS, nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


def _exact(model, small, shapes, make):
    twin = dead_twin(model, small)
    for shape in shapes:  # other batches and lengths: B and T stay read at run time
        x = make(shape)
        with torch.no_grad():
            ref, got = twin(x), small(x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_heads_merged_into_a_width_that_stays_prune_in_graph_form(tmp_path):
    """output="graph": the read of the input's width no longer holds the heads; the graph writes the merged
    width the plan keeps, and saves and loads. In the model's own classes (output="auto") the heads stay,
    as its forward reshapes to the width it reads."""
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 10, D)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", output="graph")
    assert small.o.in_features == 2 * D // HEADS and small.qkv.out_features == 3 * small.o.in_features
    _exact(model, small, [(2, 10, D), (3, 7, D), (1, 1, D)], torch.randn)
    graphprune.save(small, tmp_path)
    back = graphprune.load(Attention(), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    kept = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert kept.report.form == "module" and kept.o.in_features == D


class SplitAtOutput(nn.Module):
    """The stream is held only by the model's output splitting it into literal factors, a hold
    decided with the reshape's factors, after the merged read was."""

    def __init__(self, tail: str):
        super().__init__()
        self.tail = tail
        self.inp = nn.Linear(16, D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, z):
        x = self.inp(z)
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, HEADS, C // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        h = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return h.view(B, T, 2, D // 2) if self.tail == "view" else h.unflatten(-1, (4, D // 4))


@pytest.mark.parametrize("tail", ["view", "unflatten"])
def test_a_stream_held_by_a_split_at_the_output_frees_the_read(tail):
    """Survey 41 F2: every head stayed (o kept its 64 inputs); with ``reshape(B, T, -1)`` they were pruned."""
    torch.manual_seed(0)
    model = SplitAtOutput(tail).eval()
    small = graphprune.compile(model, (torch.randn(2, 6, 16),), ratio=0.5, importance="l1", output="graph")
    assert small.o.in_features == 2 * D // HEADS and small.o.out_features == D and small.inp.out_features == D
    _exact(model, small, [(2, 6, 16), (3, 4, 16), (1, 1, 16)], torch.randn)


class FlatLength(nn.Module):
    """The merged dim holds the length too: (B, T * D) in, heads merged back by the input's flat width."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, inp):
        B = inp.shape[0]
        x = inp.view(B, -1, D)  # (B, T, D)
        T = x.shape[1]
        q, k, v = (m(x).view(B, T, HEADS, D // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, heads, head_dim)
        return self.o(y.reshape(B, inp.shape[1]).view(B, T, -1))  # T x heads x head_dim, sized by a read


def test_a_merged_dim_that_holds_the_length_is_inferred_not_written():
    """The read set free becomes -1, not the merged width: here that width is T x heads x head_dim, and the
    example's T written in its place failed every other length (survey 41 F1)."""
    torch.manual_seed(0)
    model = FlatLength().eval()
    small = graphprune.compile(model, (torch.randn(2, 6 * D),), ratio=0.5, importance="l1", output="graph")
    assert small.o.in_features < D
    _exact(model, small, [(2, 6 * D), (3, 4 * D), (1, D)], torch.randn)


@pytest.mark.parametrize("output", ["auto", "graph"])
def test_heads_merged_into_a_stream_that_shrinks_move_with_it(output):
    """nanoGPT: the stream is prunable, and the read ties the heads to it in both forms (in step, the merged
    width is the stream's, which the forward reads again). The form itself comes back a graph here: the
    model's forward splits qkv by ``self.n_embd``, an attribute module form does not follow yet."""
    torch.manual_seed(0)
    model = GPT().eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    small = graphprune.compile(model, (ids,), ratio=0.5, importance="l1", output=output)
    attn = small.get_submodule("h.0")
    width = attn.c_proj.in_features
    assert width < D and attn.c_proj.out_features == width and attn.c_attn.out_features == 3 * width
    _exact(model, small, [(2, 10), (3, 7), (1, 16)], lambda s: torch.randint(0, VOCAB, s))


def test_a_read_that_sizes_a_dim_it_does_not_merge_stays_tied():
    """``y.view(B, T, H, x.size(2) // H)``-like splits are not merges: a view sized by a width read off another
    tensor (here the head count read off a per-head scale) keeps that width tied, and pruning stays exact."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
            self.scale = nn.Parameter(torch.rand(4))

        def forward(self, x):
            B, T, _ = x.shape
            h = self.up(x).view(B, T, self.scale.size(0), -1) * self.scale[:, None]  # (B, T, 4, 8)
            return self.down(h.flatten(2))

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(2, 5, 16)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    with torch.no_grad():
        ref = dead_twin(model, small)(torch.randn(3, 6, 16).clone())
        x2 = torch.randn(3, 6, 16)
        torch.testing.assert_close(small(x2), dead_twin(model, small)(x2), rtol=1e-5, atol=1e-6)
    assert ref.shape == (3, 6, 16)
    assert graphprune.count_params(small) < graphprune.count_params(model)
