import pytest
import torch
import torch.nn.functional as F

import graphprune
from graphprune.shuffle import permute_channels

from models import (IMAGE, ORACLE_MODELS, TOKENS, ChannelStatistics, ComputedHeadDim, EinsumAttention, GQAttention, PaddedWindows, Recurrent, Shuffle,
                    StdConv, WeightStandardized)
from oracle import assert_lossless, dead_twin, kill_units, reference, removed_alive


@pytest.mark.parametrize("name", sorted(ORACLE_MODELS))
def test_dead_channels_are_removed_losslessly(name):
    fn, shape = ORACLE_MODELS[name]
    assert_lossless(fn, shape)


def _heads_kept(small, name: str, hd: int) -> dict[int, int]:
    """{original head: positions kept} of a projection's output rows, from the kept indices."""
    from graphprune.module_form import info

    rows = [int(i) for i in info(small)["kept"][(name, 0)]]
    out: dict[int, int] = {}
    for r in rows:
        out[r // hd] = out.get(r // hd, 0) + 1
    return out


@pytest.mark.parametrize("expand", [False, True])
def test_gqa_stays_balanced(expand):
    """Grouped-query attention prunes losslessly and stays a valid GQA layout: every kept key
    head keeps the same positions count d', every kept query head too, and each kept key head
    still serves n_head / n_kv query heads. With the key/value heads indexed by
    repeat_interleave (expand=False) whole key/value groups go (d' = head_dim); with them
    expanded by view/expand (expand=True) graphprune shrinks head_dim in every head instead."""
    model, small = assert_lossless(lambda: GQAttention(n_head=8, n_kv=4, expand=expand), TOKENS)
    hd, rep = model.hd, model.n_head // model.n_kv
    k, q = _heads_kept(small, "k.weight", hd), _heads_kept(small, "q.weight", hd)
    d = set(k.values())
    assert len(d) == 1 and set(q.values()) == d, (k, q)
    assert len(q) == rep * len(k)
    assert small.o.in_features == small.q.out_features == len(q) * d.pop()
    if not expand:
        assert set(k.values()) == {hd} and len(k) < model.n_kv  # whole key/value groups removed
    else:
        assert len(k) == model.n_kv and all(v < hd for v in k.values())  # every head kept, head_dim shrunk


class _FusedGQA(torch.nn.Module):
    """gpt-fast's attention: one ``wqkv`` projection, split, key/value heads repeated by
    ``repeat_interleave``. Its rows hold query heads and key/value heads in one dim."""

    def __init__(self, d=32, n_head=8, n_kv=2, hd=4):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, hd
        self.inp = torch.nn.Linear(16, d)
        self.wqkv = torch.nn.Linear(d, (n_head + 2 * n_kv) * hd)
        self.wo = torch.nn.Linear(n_head * hd, d)
        self.out = torch.nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)                 # (B, nh, T, hd)
        k, v = (t.view(B, T, self.n_kv, self.hd).transpose(1, 2).repeat_interleave(self.n_head // self.n_kv, dim=1)
                for t in (k, v))                                                # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(x + self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)))


@pytest.mark.parametrize("output", ["graph", "auto"])
def test_query_heads_repeated_by_repeat_interleave_go_alone(output):
    """``repeat_interleave`` copies each key/value head for its query heads (gpt-fast, mistral-inference):
    the query heads are units of their own, balanced over their key/value heads, as with ``repeat_kv``'s
    expand, and the graph's ``repeats`` follows the kept heads. They were one unit with their key/value
    head, so a budget could take attention only a key/value head at a time (0.756 for 0.9, survey 42 F3)."""
    model, x = GQAttention(n_head=8, n_kv=2, sdpa=True).eval(), torch.randn(*TOKENS)
    heads = next(g for g in graphprune.analyze(model, (x,)).groups if ("q.weight", 0) in g.dims)
    assert (heads.n_units, heads.n_parts) == (8, 2)
    torch.manual_seed(0)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", output=output)
    q, k = _heads_kept(small, "q.weight", model.hd), _heads_kept(small, "k.weight", model.hd)
    assert len(q) == 4 and len(q) % len(k) == 0 and set(q.values()) == set(k.values()) == {model.hd}
    if output == "graph":
        repeats = [n.args[1] for n in small.graph.nodes if n.op == "call_method" and n.target == "repeat_interleave"]
        assert repeats == [len(q) // len(k)] * 2
    other = torch.randn(3, 5, TOKENS[-1])
    with torch.no_grad():
        torch.testing.assert_close(small(other), dead_twin(model, small)(other))


def test_a_fused_projection_of_query_and_key_value_heads_removes_whole_key_value_heads():
    """Where one parameter dim holds query rows and key/value rows (gpt-fast's ``wqkv``, Phi-3's
    ``qkv_proj``), no removal can keep query heads balanced by rows of one kind: each key/value head
    goes whole with its query heads. Where the heads are shared (``repeat_kv``'s expand, now
    ``repeat_interleave`` too), trying to balance them blocked the group ("a dim that mixes query
    heads and key/value heads": Phi-3's attention was never pruned, ``test_hf``)."""
    model, x = _FusedGQA().eval(), torch.randn(*TOKENS)
    heads = next(g for g in graphprune.analyze(model, (x,)).groups if ("wqkv.weight", 0) in g.dims)
    assert heads.n_units == model.n_kv and heads.part_of is None
    torch.manual_seed(0)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", output="graph")
    assert small.wqkv.out_features == (model.n_head + 2 * model.n_kv) * model.hd // 2
    other = torch.randn(3, 5, TOKENS[-1])
    with torch.no_grad():
        torch.testing.assert_close(small(other), dead_twin(model, small)(other))


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


@pytest.mark.parametrize("spelling", ["transpose", "permute", "export", "flatten", "unflatten"])
def test_shuffle_spellings_fold(spelling):
    """The split of dim 1 and the merge back spelled as flatten/unflatten (survey 25: reshape, permute,
    flatten(1, 2) held the whole group) fold as the view/transpose/view spelling does."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 12, 1), torch.nn.Conv2d(12, 5, 1)

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.shape
            y = y.unflatten(1, (3, c // 3)) if spelling == "unflatten" else y.reshape(b, 3, c // 3, h, w)
            y = y.transpose(1, 2) if spelling in ("transpose", "export") else y.permute(0, 2, 1, 3, 4)
            return self.b(y.flatten(1, 2) if spelling in ("flatten", "unflatten") else y.reshape(b, c, h, w))

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


def _exact_without_verify(model, x, other, **kw):
    """Compile ``model`` (l2, ratio 0.5, no self-check, so no rule hides behind it) and hold the result to
    its dead twin at the example and at ``other``; returns the result."""
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", verify=False, **kw)
    for o in (x, other):
        torch.testing.assert_close(small(o), dead_twin(model, small)(o), rtol=1e-5, atol=1e-5)
    return small


class _ShuffleOp(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.shuffle = how, torch.nn.ChannelShuffle(4)
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(self.shuffle(h) if self.how == "module" else F.channel_shuffle(h, 4))


@pytest.mark.parametrize("how", ["module", "functional"])
def test_a_channel_shuffle_op_is_a_permutation_too(how):
    """``nn.ChannelShuffle`` and ``F.channel_shuffle`` had no rule and kept the conv before them whole
    (survey 14); folded like the view/transpose/view spelling, any subset of channels may go."""
    torch.manual_seed(0)
    small = _exact_without_verify(_ShuffleOp(how).eval(), torch.randn(2, 3, 8, 8), torch.randn(3, 3, 9, 7))
    assert small.a.out_channels == 8


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
    out of compile). The computed size keeps its original value (head_dim stays, frozen in
    the graph), so C is free: it moves in whole heads (``reshape(B, N, C)`` merges heads and
    head_dim back into it), the literal head count follows, the MLP goes too, and the
    result is its dead twin at two batch sizes."""
    torch.manual_seed(0)
    model = ComputedHeadDim().eval()
    x = torch.randn(*TOKENS)
    small = graphprune.compile(model, (x,), target_flops=0.4, importance="l1", ignore=["out"])
    assert graphprune.count_flops(small, (x,)) <= 0.4 * graphprune.count_flops(model, (x,))
    assert small.inp.weight.shape[0] in (8, 16, 24) and small.qkv.weight.shape[0] == 3 * small.inp.weight.shape[0]
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, *TOKENS[1:])):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


def test_weight_standardized_convs_lose_input_channels_under_a_flops_budget():
    """Weight standardization (timm NFNet's ``ScaledStdConv2d``: ``F.batch_norm`` over a
    weight reshaped to (1, out, in * k * k), batch statistics) used to keep every
    channel (``reshape_as`` had no rule). A standardized conv's input channels now go,
    its statistics counted over the original row (``batch_norm_full``), and the result is
    its dead twin at two batch sizes."""
    from graphprune.modules import batch_norm_full

    torch.manual_seed(0)
    model = WeightStandardized().eval()
    x = torch.randn(*IMAGE)
    small = graphprune.compile(model, (x,), target_flops=0.5, importance="l1")
    assert graphprune.count_flops(small, (x,)) <= 0.5 * graphprune.count_flops(model, (x,))
    assert small.conv3.weight.shape[1] < 24 and small.conv1.weight.shape[1] < 16
    assert sum(n.target is batch_norm_full for n in small.graph.nodes) >= 3
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, *IMAGE[1:])):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


def test_a_computed_weight_needs_zeros_on_the_channels_it_contracts():
    """A standardized weight is not zero on removed input channels (they sit at -mean/std),
    so the input must be: a conv reading ``silu(x) + 1`` keeps the channels of x."""
    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = torch.nn.Conv2d(3, 8, 1), StdConv(8, 8)

        def forward(self, x):
            return self.conv(torch.nn.functional.silu(self.stem(x)) + 1.0)

    a = graphprune.analyze(Shifted().eval(), (torch.randn(*IMAGE),))
    assert not any(("stem.weight", 0) in g.dims for g in a.groups)
    assert any("computed weight" in r for bg in a.blocked for r in bg.reasons)


def test_padded_windows_traced_by_export_prune_the_padded_stream():
    """``F.pad`` under torch.export is ``aten.pad``: it had no rule and kept the whole
    residual stream of TinyViT and SAM-ViT. Padded dims keep their width, the channels map through."""
    torch.manual_seed(0)
    model = PaddedWindows().eval()
    x = torch.randn(2, 3, 8, 8)
    assert graphprune.analyze(model, (x,)).method == "export"
    small = graphprune.compile(model, (x,), target_flops=0.5, importance="l1")
    assert small.inp.weight.shape[0] < 16
    twin = dead_twin(model, small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), twin(x), rtol=1e-5, atol=1e-6)


def test_channel_max_norm_and_addcmul_let_their_channels_go():
    """``x.amax(1)`` over channels (CBAM, timm CSATv2) kept every channel it read, and
    ``x.norm`` / ``torch.addcmul`` (GlobalResponseNorm) had no rule. The max now takes
    the removed zeros in (``clamp_min(0)``), and the result is its dead twin."""
    torch.manual_seed(0)
    model = ChannelStatistics().eval()
    x = torch.randn(*IMAGE)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", output="graph")
    assert small.pw.weight.shape[0] == 12
    assert sum(n.target is torch.clamp_min for n in small.graph.nodes) == 1
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, *IMAGE[1:])):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


class _Mm(torch.nn.Module):
    """``torch.mm`` and ``Tensor.mm`` on flattened tokens against a weight of the model's own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(24, 4)
        self.w, self.v = torch.nn.Parameter(torch.randn(32, 24)), torch.nn.Parameter(torch.randn(24, 24))

    def forward(self, x):  # (B, T, 8)
        h = torch.relu(self.a(x))
        b, t, _ = h.shape
        h = torch.relu(torch.mm(h.flatten(0, 1), self.w))     # (B*T, 24)
        return self.b(h.mm(self.v).view(b, t, -1))


@pytest.mark.parametrize("output", ["graph", "auto"])
def test_mm_prunes_what_it_contracts_and_what_it_writes(output):
    """``torch.mm`` had no rule: the channels on both sides stayed (survey 31 f04), where ``@`` and ``bmm`` prune."""
    torch.manual_seed(0)
    model, x = _Mm().eval(), torch.randn(2, 5, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", output=output)
    assert small.a.out_features == 16 and dict(small.named_parameters())["w"].shape == (16, 12)
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, 7, 8)):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


class _Normalized(torch.nn.Module):
    """``F.normalize`` over the channels (a cosine head) and over the tokens, and after a sigmoid, whose
    removed channels hold 0.5, not zero."""

    def __init__(self, gate: bool):
        super().__init__()
        self.gate = gate
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

    def forward(self, x):  # (B, T, 8)
        h = self.a(x)
        h = torch.sigmoid(h) if self.gate else torch.relu(h)
        h = torch.nn.functional.normalize(h, dim=-1)
        return self.b(torch.nn.functional.normalize(h, p=1, dim=1))


@pytest.mark.parametrize("gate", [False, True])
def test_normalize_lets_zero_channels_go(gate):
    """``F.normalize`` had no rule, so the channels it read stayed (timm's XCA, cosine classifiers: survey 31
    f04). A removed channel that is zero adds nothing to the norm and stays zero; after a sigmoid it is not
    zero, and the group stays whole."""
    torch.manual_seed(0)
    model, x = _Normalized(gate).eval(), torch.randn(2, 5, 8)
    for output in ("graph", "auto"):
        small = graphprune.compile(model, (x,), ratio=0.5, importance="l1", output=output)
        assert dict(small.named_parameters())["a.weight"].shape[0] == (32 if gate else 16)
        twin = dead_twin(model, small)
        for xb in (x, torch.randn(3, 7, 8)):
            with torch.no_grad():
                torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


def test_recurrent_hidden_units_go_in_every_layer_and_direction_at_once():
    """nn.LSTM / nn.GRU had no rule and kept every channel they touched (timm Sequencer2d).
    A hidden unit is one across gates, layers and directions (the module keeps one
    hidden_size); the residual stream they read goes too, and the result is still an
    nn.LSTM (module form), equal to its dead twin."""
    torch.manual_seed(0)
    model = Recurrent().eval()
    x = torch.randn(*TOKENS)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.report.form == "module"
    assert small.lstm.hidden_size == 6 and small.lstm.weight_ih_l0_reverse.shape == (24, 8)
    assert small.gru.hidden_size == 6 and small.gru.weight_ih_l1.shape == (18, 6) and small.fc.in_features == 12
    twin = dead_twin(model, small)
    for xb in (x, torch.randn(3, 7, 16)):
        with torch.no_grad():
            torch.testing.assert_close(small(xb), twin(xb), rtol=1e-5, atol=1e-6)


def test_a_projected_lstm_keeps_its_channels_and_the_rest_prunes():
    """An LSTM with ``proj_size`` has no rule (its weight_hh is (4 hidden, proj)): it holds
    the channels it touches, and the layers around it still prune. The rebuilt module took
    its hidden size from weight_hh's columns, the projection's, and failed even at ratio 0."""
    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
            self.rnn = torch.nn.LSTM(16, 24, batch_first=True, proj_size=8)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.rnn(self.pre(x))[0].mean(1))

    torch.manual_seed(0)
    model, x = Projected().eval(), torch.randn(2, 7, 16)
    same = graphprune.compile(model, (x,), ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.pre[0].out_features == 16
    assert (small.rnn.hidden_size, small.rnn.proj_size) == (24, 8)
    twin = dead_twin(model, small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), twin(x), rtol=1e-5, atol=1e-6)
    assert any("projection" in u for u in graphprune.analyze(model, (x,)).unsupported)


def test_a_model_with_nothing_to_prune_says_what_holds_it():
    """Channels held by an op without a rule (here a roll over the channels): a budget
    was blamed on min_width, round_to and ignore, and ratio=0.5 came back unchanged without a word."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _RollChannels(), torch.nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(graphprune.GraphpruneError, match="no prunable group.*roll"):
        graphprune.compile(model, (x,), target_flops=0.5)
    with pytest.warns(graphprune.GraphpruneWarning, match="nothing to prune.*roll"):
        graphprune.compile(model, (x,), ratio=0.5)


class _RollChannels(torch.nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, 1)


def test_count_flops_counts_a_fused_cpu_lstm_as_on_meta():
    """On the CPU an LSTM runs as one fused op (``aten.mkldnn_rnn_layer``) the counter
    had no formula for: its FLOPs counted 0 there, and as its matmuls on meta."""
    lstm = torch.nn.LSTM(16, 12, batch_first=True, bidirectional=True).eval()
    model, x = torch.nn.Sequential(), torch.randn(2, 5, 16)
    model.forward = lambda t: lstm(t)[0]
    on_cpu = graphprune.count_flops(model, (x,))
    assert on_cpu == 2 * 2 * 10 * (48 * 16 + 48 * 12)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        lstm.to("meta")(x.to("meta"))
    assert counter.get_total_flops() == on_cpu


@pytest.mark.parametrize("low", [float("-inf"), 0.1])
def test_clamp_by_buffers_keeps_zeros_only_where_its_bounds_hold_zero(low):
    """Gemma4's clippable linears clamp by one-element buffers (``aten.clamp.Tensor`` under
    export, which had no rule). A clamp keeps a removed channel zero where its bounds hold
    zero, so the RMSNorm after it may count the removed ones as zeros; with a lower bound
    of 0.1 a removed channel would read 0.1 and the stream keeps its width."""
    class Clipped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.fc, self.out = torch.nn.Linear(16, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 4)
            self.register_buffer("lo", torch.tensor(low))
            self.register_buffer("hi", torch.tensor(float("inf")))

        def forward(self, x):
            h = self.inp(x)
            h = h + torch.clamp(self.fc(h), self.lo, self.hi)
            return self.out(torch.nn.functional.rms_norm(h, (12,)))

    torch.manual_seed(0)
    model, x = Clipped().eval(), torch.randn(*TOKENS)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.inp.weight.shape[0] == (6 if low < 0 else 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 3])
def test_layer_norm_over_a_shape_read_at_run_time(dims):
    """``F.layer_norm(y, y.shape[-dims:])``: one runtime value for the normalized shape. Over the
    last dim alone the rewrite is exact and the channels prune; over (C, H, W) it took the
    value for one dim and normalized W alone, so the channels stay (analyze listed them
    prunable and only the self-check kept them)."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = self.a(x)
            y = F.layer_norm(y, y.shape[-dims:]) if dims == 3 else F.layer_norm(y.transpose(1, 3), y.shape[1:2]).transpose(1, 3)
            return self.b(y).mean((2, 3))

    torch.manual_seed(0)
    model, x = Norm().eval(), torch.randn(2, 3, 8, 8)
    groups = graphprune.analyze(model, (x,)).groups
    assert bool(groups) == (dims == 1)
    if dims == 1:
        assert_lossless(Norm, (2, 3, 8, 8))


def test_an_unreachable_budget_names_what_holds_the_most_weights_first():
    """A Llama's mask and rotary arithmetic has no rules; the message named those ops
    (``and_1``, ``arange``) while the stream was held by the user's own ``ignore``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model, ids = LlamaForCausalLM(cfg).eval(), torch.randint(0, 256, (2, 16))
    ignore = ["lm_head", "model.embed_tokens"]
    with pytest.raises(graphprune.GraphpruneError, match=r"holds channels out of pruning.*: output of ignored "
                                                         r"module (lm_head|model.embed_tokens) \(touches 100%"):
        graphprune.compile(model, (ids,), target_params=0.3, ignore=ignore)
    summary = graphprune.analyze(model, (ids,), ignore=ignore).summary()
    assert "blocked groups (their channels stay)" in summary and "100.0%: output of ignored module" in summary


class _InstanceNormed(torch.nn.Module):
    """conv -> InstanceNorm (module or functional) -> conv, at 1, 2 or 3 spatial dims."""

    def __init__(self, dims: int, affine: bool, running: bool, functional: bool):
        super().__init__()
        conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[dims - 1]
        norm = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)[dims - 1]
        self.a, self.b = conv(3, 12, 3, padding=1), conv(12, 6, 1)
        self.norm = norm(12, affine=affine, track_running_stats=running)
        self.functional = functional
        if running:  # stats a trained model would have
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.a(x)
        y = F.instance_norm(y, eps=1e-5) if self.functional else self.norm(y)
        return self.b(torch.relu(y))


@pytest.mark.parametrize("dims,affine,running,functional", [
    (2, True, False, False), (2, False, False, False), (2, True, True, False), (1, False, True, False),
    (3, True, False, False), (2, False, False, True)])
def test_instance_norm_passes_channels_one_at_a_time(dims, affine, running, functional):
    """InstanceNorm had no rule, so every channel through it stayed (a style-transfer or
    GAN generator pruned nothing). It normalizes each channel alone: by its own
    statistics it is GroupNorm with one channel per group, by running buffers an eval
    BatchNorm. The result matches the dead twin and keeps the user's InstanceNorm, with
    num_features following its width."""
    shape = (2, 3) + (6,) * dims
    model, small = assert_lossless(lambda: _InstanceNormed(dims, affine, running, functional), shape)
    assert small.a.weight.shape[0] < 12 and small.report.form == "module"
    assert functional or small.norm.num_features == small.a.weight.shape[0]
    x = torch.randn(3, 3, *(5,) * dims)  # another batch and size
    with torch.no_grad():
        torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("running", [False, True])
def test_instance_norm_in_an_exported_graph(running):
    """The same through torch.export (forced by keyword inputs): ATen's instance_norm."""
    torch.manual_seed(0)
    model, x = _InstanceNormed(2, True, running, False).eval(), torch.randn(2, 3, 6, 6)
    small = graphprune.compile(model, (), example_kwargs={"x": x}, ratio=0.5, importance="l1")
    assert small.a.weight.shape[0] == 6 and small.norm.num_features == 6
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x=x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-5)


def test_group_norm_holds_the_dims_it_averages_over():
    """GroupNorm's statistics run over every dim after the channel. Over (N, tokens, features)
    with the features made by a linear, those features were listed prunable and came back
    0.37 off under ``verify=False``: no rewrite counts the removed entries."""
    class TokenGroupNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.gn, self.out = torch.nn.Linear(16, 32), torch.nn.GroupNorm(2, 6), torch.nn.Linear(32, 4)

        def forward(self, x):  # (N, 6, 16)
            return self.out(torch.relu(self.gn(self.inp(x))))

    torch.manual_seed(0)
    model, x = TokenGroupNorm().eval(), torch.randn(2, 6, 16)
    assert not graphprune.analyze(model, (x,)).groups
    with pytest.warns(graphprune.GraphpruneWarning, match="nothing to prune"):
        small = graphprune.compile(model, (x,), ratio=0.5, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


@pytest.mark.parametrize("slopes,functional,export", [(12, False, False), (1, False, False), (12, True, False), (12, False, True)])
def test_prelu_slopes_go_with_their_channels(slopes, functional, export):
    """nn.PReLU was a module without a rule (and F.prelu a function without one): every channel
    through it stayed. Its per-channel slopes now go with their channels; one shared slope stays."""
    class Slopes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.PReLU(slopes), torch.nn.Conv2d(12, 6, 1)
            with torch.no_grad():
                self.act.weight.uniform_(-0.5, 0.5)

        def forward(self, x):
            y = self.a(x)
            return self.b(F.prelu(y, self.act.weight) if functional else self.act(y))

    torch.manual_seed(0)
    model, x = Slopes().eval(), torch.randn(2, 3, 6, 6)
    kill_units(model, (x,), 0.25)
    call = ((), {"x": x}) if export else ((x,), {})
    small = graphprune.compile(model, *call[:1], example_kwargs=call[1] or None, ratio=0.25, importance="l1")
    assert small.a.weight.shape[0] == 9 and small.act.weight.shape[0] == (9 if slopes > 1 else 1)
    y = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,offsets", [("sum", False), ("mean", True), ("max", False), ("max", True)])
def test_embedding_bag_width_prunes(mode, offsets):
    """nn.EmbeddingBag (traced into: F.embedding_bag) had no rule and held its width. Each bag
    sums, averages or takes the max of weight rows, so its width is the weight's columns;
    bags given by offsets are not input positions."""
    class Bags(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.mid, self.out = torch.nn.EmbeddingBag(50, 16, mode=mode), torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, ids, offs=None):
            return self.out(torch.relu(self.mid(self.bag(ids, offs))))

    torch.manual_seed(0)
    model = Bags().eval()
    args = (torch.randint(0, 50, (10,)), torch.tensor([0, 3, 7])) if offsets else (torch.randint(0, 50, (4, 6)),)
    kill_units(model, args, 0.25)
    small = graphprune.compile(model, args, ratio=0.25, importance="l1")
    assert small.bag.weight.shape == (50, 12) and small.mid.weight.shape == (24, 12)
    other = (torch.randint(0, 50, (7,)), torch.tensor([0, 2])) if offsets else (torch.randint(0, 50, (5, 3)),)
    with torch.no_grad():
        torch.testing.assert_close(small(*other), model(*other), rtol=1e-5, atol=1e-6)


class _SubPixel(torch.nn.Module):
    """Sub-pixel upsampling as ESPCN/EDSR write it (module and functional), and its inverse (space to depth)."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r
        self.a = torch.nn.Conv2d(3, 4 * r * r, 3, padding=1)
        self.up = torch.nn.PixelShuffle(r)
        self.b = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 6 * r * r, 1)
        self.d = torch.nn.Conv2d(6, 5, 1)
        self.down = torch.nn.PixelUnshuffle(r)
        self.e = torch.nn.Conv2d(5 * r * r, 7, 1)

    def forward(self, x):
        h = torch.relu(self.b(self.up(self.a(x))))
        h = F.pixel_shuffle(self.c(h), self.r)
        h = self.down(torch.relu(self.d(h)))
        return F.pixel_unshuffle(self.e(h), 1).mean((2, 3))


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle_prunes_whole_blocks_of_the_layer_before(r):
    """Output channel j of pixel_shuffle is input channels j*r*r .. j*r*r + r*r - 1: the conv before it
    loses whole blocks, the conv after it single channels (pixel_unshuffle the other way round). It had no
    rule, so every channel around a sub-pixel upsampler stayed."""
    model = _SubPixel(r).eval()
    x = torch.randn(2, 3, 4, 5)
    assert kill_units(model, (x,), 0.5) == 4
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert type(small) is _SubPixel  # the user's own class: the shuffles hold no state
    assert small.a.out_channels == 2 * r * r and small.b.in_channels == 2
    assert small.c.out_channels == 3 * r * r and small.d.in_channels == 3
    assert small.d.out_channels == 3 and small.e.in_channels == 3 * r * r
    assert not removed_alive(model, small)
    for y in (x, torch.randn(3, 3, 3, 7)):
        torch.testing.assert_close(small(y), reference(model, y), rtol=1e-5, atol=1e-6)


class _ShiftedWindows(torch.nn.Module):
    """Swin-style cyclic shifts over the spatial dims of (B, H, W, C), and one roll over the channels."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)
        self.c = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.roll(torch.relu(self.a(x)), shifts=(1, -1), dims=(1, 2)).roll(2, 1)
        return self.c(torch.roll(self.b(h), 1, -1)).mean((1, 2))


def test_roll_maps_the_dims_it_does_not_move():
    """A roll over H and W leaves the channels where they are, so a's channels prune through it; a roll over
    the channels is another permutation on fewer of them, so b keeps its width. roll had no rule: a shifted
    window held every channel it touched."""
    model = _ShiftedWindows().eval()
    x = torch.randn(2, 5, 6, 8)
    assert kill_units(model, (x,), 0.5) == 1
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert (small.a.out_features, small.b.in_features, small.b.out_features) == (8, 8, 8)
    assert any("roll" in why for why in graphprune.analyze(model, (x,)).summary().splitlines() if "b.weight" in why)
    for y in (x, torch.randn(3, 4, 7, 8)):
        torch.testing.assert_close(small(y), reference(model, y), rtol=1e-5, atol=1e-6)


class _AddmmLayers(torch.nn.Module):
    """transformers' Conv1D (GPT-2's layer: torch.addmm, then a view to x.size()[:-1] + (nf,)), and addmm
    with a bias that broadcasts over the output channels (one value) or over the rows."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a, self.b = Conv1D(16, 8), Conv1D(12, 16)
        self.w, self.bias = torch.nn.Parameter(torch.randn(12, 6)), torch.nn.Parameter(torch.randn(1))
        self.w2, self.bias2 = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(1, 5))

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x)))).flatten(0, -2)
        z = torch.relu(torch.addmm(self.bias, h, self.w, beta=0.5, alpha=2.0))
        return torch.addmm(self.bias2, z, self.w2)


def test_addmm_prunes_like_a_linear_layer():
    """torch.addmm had a rule only as ATen (torch.export's graphs): under torch.fx every Conv1D kept its width.
    Conv1D's output shape is computed whole, with its width a literal inside it; the rewrite puts the new
    width there."""
    pytest.importorskip("transformers")
    model = _AddmmLayers().eval()
    x = torch.randn(2, 3, 8)
    assert kill_units(model, (x,), 0.5) == 3
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert type(small) is _AddmmLayers, small.report.form_why  # Conv1D's nf follows its weight
    assert (small.a.weight.shape, small.b.weight.shape, small.w.shape) == ((8, 8), (8, 6), (6, 3))
    assert small.bias.shape == (1,) and small.w2.shape == (3, 5)
    assert not removed_alive(model, small)
    for y in (x, torch.randn(4, 5, 8)):
        torch.testing.assert_close(small(y), reference(model, y), rtol=1e-5, atol=1e-6)


class _TokenMixer(torch.nn.Module):
    """MLP-Mixer: a biased Linear over the tokens (a removed channel's row comes out as the bias), a LayerNorm
    over the channels after it, and a channel MLP whose hidden width is free to go."""

    def __init__(self, tokens=16, c=24, hidden=32):
        super().__init__()
        self.stem = torch.nn.Linear(8, c)
        self.norm1, self.norm2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.tok = torch.nn.Linear(tokens, tokens)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, c))
        self.head = torch.nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class _TimeLinear(torch.nn.Module):
    """DLinear-style: a biased Linear over the time axis, per channel, then a LayerNorm over the channels."""

    def __init__(self):
        super().__init__()
        self.embed, self.temporal = torch.nn.Linear(7, 16), torch.nn.Linear(24, 12)
        self.norm, self.out = torch.nn.LayerNorm(16), torch.nn.Linear(16, 7)

    def forward(self, x):
        return self.out(self.norm(self.temporal(self.embed(x).permute(0, 2, 1)).permute(0, 2, 1)))


@pytest.mark.parametrize("model, x", [(_TokenMixer, (2, 16, 8)), (_TimeLinear, (2, 24, 7))], ids=["mixer", "dlinear"])
def test_a_bias_over_another_dim_makes_removed_channels_nonzero(model, x):
    """A Linear over tokens or time adds its bias to every channel's row, a removed one too; the LayerNorm
    over channels then counts it. The zero proof took those rows for zeros, so with verify=False the result
    was 0.02 to 0.3 off its dead twin (found by survey 11); the channels a norm reads stay now, and the
    channel MLP still prunes."""
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(*x)
    small = graphprune.compile(model, (x,), ratio=0.5, verify=False)
    for y in (x, torch.randn(3, *x.shape[1:])):
        torch.testing.assert_close(small(y), reference(dead_twin(model, small), y), rtol=1e-5, atol=1e-6)
    if isinstance(model, _TokenMixer):
        assert small.mlp[0].out_features == 16 and small.stem.out_features == 24


class _MessagePassing(torch.nn.Module):
    """Graph layers as written without a graph library: degree by index_add_ into torch.zeros, messages
    gathered by index_select / gather / x[src], summed into zeros_like / new_zeros by index_add_ and
    scatter_add_, then a LayerNorm over the channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(32, 12)
        self.norm, self.head = torch.nn.LayerNorm(12), torch.nn.Linear(12, 3)

    def forward(self, x, edges):
        src, dst = edges
        n = x.size(0)
        deg = torch.zeros(n, dtype=x.dtype).index_add_(0, dst, torch.ones(dst.size(0), dtype=x.dtype)) + 1
        h = self.a(x)
        agg = torch.zeros_like(h).index_add_(0, dst, h[src] / deg[dst, None])  # GCN
        h = torch.relu(agg + h)
        idx = dst.unsqueeze(-1).expand(-1, h.size(1))
        pooled = h.new_zeros(n, h.size(1)).scatter_add_(0, idx, torch.index_select(h, 0, src))  # SAGE
        h = torch.relu(self.b(pooled) + h)
        pair = torch.cat([torch.gather(h, 0, idx), h.index_select(0, src)], -1)  # EdgeConv
        m = torch.relu(self.c(pair))
        out = h.new_zeros(n, m.size(1)).index_add_(0, dst, m)
        return self.head(self.norm(out))


def test_message_passing_prunes_through_index_add_scatter_and_gather():
    """index_select, gather, index_add(_), scatter_add(_), zeros_like, torch.zeros and new_zeros sized by a
    tensor's width had no rules: every channel of a hand-written GNN stayed (survey 11). Exact against the dead
    twin at another graph size, with verify=False so that no rule hides behind the self-check."""
    torch.manual_seed(0)
    model = _MessagePassing().eval()
    x, edges = torch.randn(10, 8), torch.randint(0, 10, (2, 30))
    assert kill_units(model, (x, edges), 0.5) == 2  # a and b add into one stream
    small = graphprune.compile(model, (x, edges), ratio=0.5, verify=False)
    # c's removed channels are zeros added into zeros, so the LayerNorm may count them
    assert (small.a.out_features, small.b.out_features, small.c.out_features) == (8, 8, 6)
    assert not removed_alive(model, small)
    twin = dead_twin(model, small)
    for args in ((x, edges), (torch.randn(7, 8), torch.randint(0, 7, (2, 19)))):
        torch.testing.assert_close(small(*args), reference(twin, *args), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small(*args), reference(model, *args), rtol=1e-5, atol=1e-5)


class _AddIntoChannels(torch.nn.Module):
    """index_add / scatter_add along the channels: the index's values address the channel dim."""

    def __init__(self, how, perm):
        super().__init__()
        self.how, self.a, self.b = how, torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.register_buffer("idx", torch.arange(16).flip(0) if perm else torch.arange(16) % 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "index_add":
            h = torch.zeros_like(h).index_add(1, self.idx, h)
        else:
            h = torch.zeros_like(h).scatter_add(1, self.idx.expand_as(h), h)
        return self.b(h)


@pytest.mark.parametrize("how", ["index_add", "scatter_add"])
@pytest.mark.parametrize("perm", [True, False])
def test_adding_into_channels_by_index_keeps_the_channels_the_index_addresses(how, perm):
    """The target's indexed dim was coupled to the output and shrank, its index values never renumbered:
    1.2 off the twin, or an out-of-bounds index at run time (survey 14, verify=False)."""
    torch.manual_seed(0)
    model, x = _AddIntoChannels(how, perm).eval(), torch.randn(4, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", verify=False)
    for o in (x, torch.randn(5, 8)):
        torch.testing.assert_close(small(o), dead_twin(model, small)(o), rtol=1e-5, atol=1e-5)


# Zero-proof probes of survey 12: each made removed channels nonzero where zeros.py said zero, so a
# reduction or norm over the channels after it was wrong with verify=False (verify kept the group whole).
class _NormOverTokens(torch.nn.Module):
    """BatchNorm1d(T) or a biased LayerNorm(T) on (N, T, D): a zero D-slice comes out as a shift."""

    def __init__(self, kind):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(6) if kind == "bn" else None
        self.ln = torch.nn.LayerNorm(6) if kind == "ln" else None
        if self.norm is not None:
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.fc(x)
        h = self.norm(h) if self.norm is not None else self.ln(h.transpose(1, 2)).transpose(1, 2)
        return h.sum(-1)


class _BufferLayers(torch.nn.Module):
    """A fixed projection held as a buffer (its columns are not zeroed in the twin), a bias of one value,
    and a sinusoid embedding table held as a buffer."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(8, 16)
        self.register_buffer("proj", torch.randn(16, 16))
        self.register_buffer("table", torch.randn(10, 16))
        self.bias = torch.nn.Parameter(torch.randn(1))
        self.w = torch.nn.Parameter(torch.randn(16, 16))
        self.ln = torch.nn.LayerNorm(16)

    def forward(self, x):
        if self.kind == "buffer_weight":
            return self.ln(F.linear(self.fc(x), self.proj))
        if self.kind == "scalar_bias":
            return self.ln(F.linear(self.fc(x), self.w, self.bias))
        ids = (x[..., 0].abs() * 3).long().clamp(0, 9)
        return self.ln(F.embedding(ids, self.table) + self.fc(x))


class _GroupedAttention(torch.nn.Module):
    """sdpa with enable_gqa (4 query heads over 2 key/value heads), then a sum over the heads."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = (f(x).view(b, t, 2, 8).transpose(1, 2) for f in (self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum(1)


class _InPlace(torch.nn.Module):
    """An in-place op on a producer's output, or on a flat view of it, then a reduction over its channels."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "add_":
            h.add_(1.0)
        elif self.kind == "sigmoid_":
            h.sigmoid_()
        else:  # the view merges the channels with the tokens: it holds no zeros of its own to lose
            h.view(h.shape[0], -1).add_(1.0)
        return h.sum(-1)


class _CentredWeight(torch.nn.Module):
    """Weight centring written by hand on a parameter read directly: its mean over the input channels."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.w = torch.nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return F.linear(torch.relu(self.fc(x)), self.w - self.w.mean(1, keepdim=True)) + self.w.amax(1)


ZERO_PROBES = {
    "bn_over_tokens": lambda: _NormOverTokens("bn"), "ln_over_tokens": lambda: _NormOverTokens("ln"),
    "buffer_weight": lambda: _BufferLayers("buffer_weight"), "scalar_bias": lambda: _BufferLayers("scalar_bias"),
    "buffer_table": lambda: _BufferLayers("table"), "gqa_heads": _GroupedAttention,
    "add_": lambda: _InPlace("add_"), "sigmoid_": lambda: _InPlace("sigmoid_"), "view_add_": lambda: _InPlace("view"),
    "centred_weight": _CentredWeight,
}


@pytest.mark.parametrize("name", list(ZERO_PROBES))
def test_zero_proof_probes_match_their_dead_twin_without_verify(name):
    torch.manual_seed(0)
    model = ZERO_PROBES[name]().eval()
    x = torch.randn(2, 6, 8 if name != "gqa_heads" else 32)
    small = graphprune.compile(model, (x,), ratio=0.5, verify=False)
    twin = dead_twin(model, small)
    for y in (x, torch.randn(3, *x.shape[1:])):
        torch.testing.assert_close(small(y), reference(twin, y), rtol=1e-5, atol=1e-5)


def test_batch_norm_over_a_non_channel_dim_stays_in_training_mode():
    """BatchNorm1d(T) over (N, T, D): traced in eval mode it normalizes by running statistics, so pruning D
    was exact; in training mode (to fine-tune) it normalized each T over N x D' and updated its buffers from
    fewer entries than the twin (survey 12). D stays now."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(6), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(4, 6, 8)
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert small[0].out_features == 16
    twin = dead_twin(model, small).train()
    torch.testing.assert_close(small.train()(x), twin(x), rtol=1e-5, atol=1e-5)


class _PadShift(torch.nn.Module):
    """``F.pad`` with amounts that cancel moves every entry by one and keeps the size; padding the
    height and width alone leaves the channels where they were."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        self.c, self.o = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.o(F.pad(torch.relu(self.c(x)), self.pad))


@pytest.mark.parametrize("pad,prunes", [((0, 0, 0, 0, 1, -1), False), ((1, 1, 1, 1), True), ((1, -1, 0, 0, 0, 0), True)])
def test_a_pad_that_keeps_the_size_still_moves_its_dim(pad, prunes):
    """A padded dim of unchanged size was coupled index for index: a channel shift by ``(1, -1)`` was
    0.34 off the twin with verify=False (survey 14). Spatial padding leaves the channels prunable."""
    torch.manual_seed(0)
    small = _exact_without_verify(_PadShift(pad).eval(), torch.randn(2, 3, 12, 10), torch.randn(3, 3, 9, 14))
    assert (small.c.out_channels < 16) == prunes


class _PadToChannels(torch.nn.Module):
    """A one-channel map padded out to the conv's width: channel 0 is the map, the others zeros."""

    def __init__(self):
        super().__init__()
        self.c, self.o = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.o(torch.relu(self.c(x)) + F.pad(x.mean(1, keepdim=True), (0, 0, 0, 0, 0, 15)))


def test_a_size_one_dim_padded_out_is_not_a_broadcast():
    """F.pad of a size-1 dim to the channel width was taken for a broadcast copy, so the channels around it
    were pruned, the pad amounts were not, and compile raised with no model (survey 12). The width stays."""
    model = _PadToChannels().eval()
    x = torch.randn(2, 3, 12, 10)
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert small.c.out_channels == 16
    torch.testing.assert_close(small(x), reference(model, x))


class _CellLoop(torch.nn.Module):
    """A recurrent cell unrolled over 5 steps from a zero state made as torch.zeros(B, 16), sizes one by one."""

    def __init__(self):
        super().__init__()
        self.inp, self.cell, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(32, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.zeros(x.size(0), 16)
        e = torch.relu(self.inp(x))
        for t in range(5):
            h = torch.tanh(self.cell(torch.cat([e[:, t], h], -1)))
        return self.head(h * torch.ones(x.size(0), h.size(1)))


def test_a_zero_state_made_with_sizes_one_by_one_traces_and_its_width_goes():
    """torch.zeros(x.size(0), 16) fails in torch.fx itself (sizes one by one, one a proxy), and this model was
    refused outright (torch.export failed too). While tracing the sizes are packed into one tuple; the zero
    state's literal width is a constant fill, so it shrinks with the hidden units it feeds."""
    torch.manual_seed(0)
    model = _CellLoop().eval()
    x = torch.randn(2, 5, 8)
    assert graphprune.analyze(model, (x,)).method == "symbolic_trace"
    small = graphprune.compile(model, (x,), ratio=0.5, verify=False)
    hidden, inputs = small.cell.weight.shape
    assert hidden < 16 and inputs == small.inp.out_features + hidden  # the state's width went with the units
    twin = dead_twin(model, small)
    for y in (x, torch.randn(3, 5, 8)):
        torch.testing.assert_close(small(y), reference(twin, y), rtol=1e-5, atol=1e-5)


class _Gated(torch.nn.Module):
    """GLU over the features (``nn.GLU``) or over a conv's channels (``F.glu(h, 1)``), then a LayerNorm."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        if how == "module":
            self.a, self.glu, self.norm, self.b = torch.nn.Linear(8, 32), torch.nn.GLU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
        else:
            self.a, self.b = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        if self.how == "module":
            return self.b(self.norm(self.glu(self.a(x))))
        return self.b(F.glu(self.a(x), 1))


@pytest.mark.parametrize("how,shape", [("module", (4, 8)), ("functional", (2, 3, 8, 6))])
def test_glu_prunes_a_channel_with_its_gate(how, shape):
    """GLU had no rule and kept both halves whole (survey 14): output channel i reads channels i and
    i + half, one unit."""
    torch.manual_seed(0)
    small = _exact_without_verify(_Gated(how).eval(), torch.randn(*shape), torch.randn(3, *shape[1:]))
    assert small.a.weight.shape[0] == 16 and small.b.weight.shape[1] == 8


class _TensorSplit(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.c = torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        p, q = torch.tensor_split(h, [8], dim=1) if self.how == "function" else h.tensor_split((8,), 1)
        return self.b(p) + self.c(q)


@pytest.mark.parametrize("how", ["function", "method"])
def test_tensor_split_at_indices_is_a_split(how):
    """``tensor_split`` at an index list had no rule and kept the conv before it whole (survey 14)."""
    torch.manual_seed(0)
    small = _exact_without_verify(_TensorSplit(how).eval(), torch.randn(2, 3, 8, 8), torch.randn(3, 3, 9, 7))
    assert small.a.out_channels == 12


class _Spectral(torch.nn.Module):
    """A filter in the frequency domain along time: the channels stay independent (survey 25: the
    transform had no rule and held the conv before it whole); or a transform over the channels."""

    def __init__(self, over_channels=False):
        super().__init__()
        self.over_channels = over_channels
        self.a, self.b, self.fc = torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.Conv1d(8, 8, 1), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if self.over_channels:
            h = torch.fft.fft(h, dim=1).abs()  # mixes the channels: they stay whole
        else:
            h = torch.fft.irfft(torch.fft.rfft(h, dim=-1) * 0.5, n=x.shape[-1], dim=-1)
        return self.fc(self.b(h).mean(-1))


def test_a_fourier_transform_along_time_keeps_channels_apart():
    from graphprune.groups import analyze_graph
    from graphprune.trace import trace

    torch.manual_seed(0)
    x, other = torch.randn(2, 4, 16), torch.randn(3, 4, 16)
    small = _exact_without_verify(_Spectral().eval(), x, other)
    assert small.a.out_channels == 4
    exported = trace(_Spectral().eval(), (x,), method="export")  # aten._fft_r2c / _fft_c2r
    groups = analyze_graph(exported.gm, exported.method, ()).groups
    assert any(("a.weight", 0) in g.dims for g in groups)
    mixed = graphprune.compile(_Spectral(over_channels=True).eval(), (x,), ratio=0.5, importance="l2")
    assert dict(mixed.named_parameters())["a.weight"].shape[0] == 8


class _Bilinear(torch.nn.Module):
    """Two conv branches pooled into an ``nn.Bilinear``, and a functional ``F.bilinear`` with a
    parameter of this module (survey 25: no rule, every channel touching them stayed)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(3, 12, 3, padding=1)
        self.bil, self.head = torch.nn.Bilinear(16, 12, 10), torch.nn.Linear(10, 3)
        self.w = torch.nn.Parameter(torch.randn(6, 10, 10) * 0.1)

    def forward(self, x):
        h1, h2 = torch.relu(self.a(x)).mean((2, 3)), torch.relu(self.b(x)).amax((2, 3))
        y = torch.relu(self.bil(h1, h2))
        return self.head(y) + F.bilinear(y, y, self.w).sum(-1, keepdim=True)


def test_a_bilinear_layer_prunes_both_inputs_and_its_outputs():
    torch.manual_seed(0)
    model, x, other = _Bilinear().eval(), torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    small = _exact_without_verify(model, x, other)
    assert (small.bil.in1_features, small.bil.in2_features, small.bil.out_features) == (8, 6, 5)
    assert tuple(small.bil.weight.shape) == (5, 8, 6) and tuple(small.w.shape) == (3, 5, 5)
    # its FLOPs are counted (torch's counter has no formula for aten._trilinear): 2 x batch x out x in1 x in2
    assert graphprune.count_flops(model.bil, (torch.randn(4, 16), torch.randn(4, 12))) == 2 * 4 * 10 * 16 * 12
    budget = graphprune.compile(model, (x,), target_flops=0.5, importance="l2")
    assert budget.report.flops <= 0.5 and budget.bil.out_features < 10


class _GroupedUp(torch.nn.Module):
    """A depthwise ConvTranspose upsampling (whole groups go), one with two wide groups (channel
    positions go), and a functional grouped transposed conv on a parameter (no rule before:
    every channel touching one stayed). ``checked`` routes the trace through torch.export."""

    def __init__(self, functional=True, checked=False):
        super().__init__()
        self.functional, self.checked = functional, checked
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1, groups=16)
        self.b = torch.nn.Conv2d(32, 8, 1)
        self.wide = torch.nn.ConvTranspose2d(8, 12, 3, padding=1, groups=2)
        self.w = torch.nn.Parameter(torch.randn(12, 3, 3, 3) * 0.1)
        self.head = torch.nn.Conv2d(12, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.checked:
            h = _tensor_checked(h)
        h = torch.relu(self.wide(torch.relu(self.b(torch.relu(self.up(h))))))
        if self.functional:
            h = torch.relu(F.conv_transpose2d(h, self.w, padding=1, groups=4))
        return self.head(h)


def _tensor_checked(h):
    if not isinstance(h, torch.Tensor):  # a question symbolic tracing answers wrong: traced with torch.export
        raise TypeError(type(h))
    return h


@pytest.mark.parametrize("checked", [False, True])
def test_a_grouped_conv_transpose_prunes_whole_groups_or_positions(checked):
    torch.manual_seed(0)
    x, other = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)
    model = _GroupedUp(functional=False, checked=checked).eval()
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2")
    assert small.report.form == "module"
    assert (small.up.in_channels, small.up.out_channels, small.up.groups) == (8, 16, 8)  # whole groups: groups shrink
    assert (small.wide.in_channels, small.wide.out_channels, small.wide.groups) == (4, 6, 2)  # positions: groups stay
    for o in (x, other):
        torch.testing.assert_close(small(o), dead_twin(model, small)(o), rtol=1e-5, atol=1e-5)
    model = _GroupedUp(checked=checked).eval()
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", verify=False, output="graph")
    assert dict(small.named_parameters())["w"].shape[0] == 6  # the functional one: 2 of its 4 groups
    for o in (x, other):
        torch.testing.assert_close(small(o), dead_twin(model, small)(o), rtol=1e-5, atol=1e-5)


class _WideGroups(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.h = torch.nn.Conv2d(8, 12, 3, padding=1, groups=2), torch.nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.h(torch.relu(_tensor_checked(self.c(x))))


def test_a_conv_of_wide_groups_traced_by_export_keeps_its_groups():
    """Traced with torch.export, the module form's widths are read off the weights; a grouped conv
    that lost output positions (its input, the model's, stays) looked as if it had lost a whole
    group: groups=1, and the module form failed to run (the graph came back instead)."""
    torch.manual_seed(0)
    model, x = _WideGroups().eval(), torch.randn(2, 8, 6, 6)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l2")
    assert small.report.form == "module", small.report.form_why
    assert (small.c.in_channels, small.c.out_channels, small.c.groups) == (8, 6, 2)
    torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-5)
