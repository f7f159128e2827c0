"""rotate_residual: the residual stream re-expressed in its principal directions, outputs unchanged,
so that pruning the hidden dim afterwards removes the directions the data hardly uses."""
import pytest
import torch
import torch.nn as nn

import graphprune

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 100, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: more threads only contend (a loaded 2-core runner made each forward 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llama(tie: bool, strong_directions: bool = False):
    """A tiny LLaMA with non-unit RMSNorm weights (so folding matters). With
    ``strong_directions`` the embedding's energy decays over 64 directions of a
    random basis, as a trained model's stream concentrates in a few directions
    that are not its coordinate axes."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   use_cache=False, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
        if strong_directions:
            basis = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN))[0]  # (d, d) orthogonal
            energy = torch.logspace(0, -2, HIDDEN)  # (d,)
            model.model.embed_tokens.weight.copy_(torch.randn(VOCAB, HIDDEN) * energy @ basis.T)  # (vocab, d)
    return model


def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (4, 16), generator=g),) for _ in range(n)]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_rotation_is_lossless_and_leaves_the_model_alone(tie):
    model = _llama(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 7))
    rotated = graphprune.rotate_residual(model, (ids,), _batches())

    assert type(rotated) is type(model) and rotated is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie  # the user's tie is intact
    mine = {id(p) for p in model.parameters()}
    assert not any(id(p) in mine for p in rotated.parameters())
    other = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        for x in (ids, other):
            assert _rel(model(x).logits, rotated(x).logits) < 1e-5
    rec = rotated._graphprune_rotation
    assert rec["width"] == HIDDEN and len(rec["folded_norms"]) == 5 and rec["lossless_rel_err"] < 1e-5
    energy = torch.tensor(rec["energy"])
    assert abs(energy.sum().item() - 1) < 1e-6 and (energy[:-1] >= energy[1:]).all()
    for norm in rec["folded_norms"]:  # folded into the readers: the norms scale by one
        assert torch.equal(rotated.get_parameter(norm), torch.ones(HIDDEN))
    # a tied head keeps its tie: the final norm's weight becomes a d x d map after the norm
    assert rec["extra_params"] == (HIDDEN * HIDDEN if tie else 0)
    assert (rotated.lm_head.weight is rotated.model.embed_tokens.weight) == tie
    assert isinstance(rotated.model.norm, graphprune.MixedNorm) == tie
    if tie:
        w = model.model.norm.weight.detach().double()
        mix = rotated.model.norm.mix.weight.detach().double()  # Q^T diag(w) Q: symmetric, w's eigenvalues
        assert torch.allclose(mix, mix.T, atol=1e-6)
        assert torch.allclose(torch.linalg.eigvalsh(mix), w.sort().values, atol=1e-5)


def test_a_tied_head_can_be_untied_or_refused_instead():
    model = _llama(tie=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    rotated = graphprune.rotate_residual(model, (ids,), _batches(), tied="untie")
    rec = rotated._graphprune_rotation
    assert rec["extra_params"] == VOCAB * HIDDEN and not rec["mixed"]
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert not rotated.config.tie_word_embeddings
    rotated.tie_weights()  # stays untied
    with torch.no_grad():
        assert _rel(model(ids).logits, rotated(ids).logits) < 1e-5
    with pytest.raises(graphprune.GraphpruneError, match="tied embeddings"):
        graphprune.rotate_residual(model, (ids,), _batches(), tied="refuse")


def test_a_tied_model_is_sliced_with_its_mixing_map():
    """tied="mix" keeps the embedding shared with the head through pruning: the hidden dim
    slices the embedding, every norm and the mixing map alike, and costs d'^2
    parameters where untying costs vocab x d'."""
    model = _llama(tie=True, strong_directions=True)
    ids, batches = torch.randint(0, VOCAB, (2, 7)), _batches(8)
    held_out = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
    sizes, errors = {}, {}
    for tied, m in (("mix", graphprune.rotate_residual(model, (ids,), batches)),
                    ("untie", graphprune.rotate_residual(model, (ids,), batches, tied="untie")), ("plain", model)):
        small = graphprune.compile(m, (ids,), ratio={"model.norm*": 0.25}, importance="activation", calibration=batches)
        assert small.model.embed_tokens.weight.shape == (VOCAB, 48)
        if tied == "mix":
            assert small.lm_head.weight is small.model.embed_tokens.weight
            assert small.model.norm.mix.weight.shape == (48, 48)
        sizes[tied] = graphprune.count_params(small)
        with torch.no_grad():
            ref, out = model(held_out).logits, small(held_out).logits
        errors[tied] = ((out - ref).norm() / ref.norm()).item()
    assert sizes["mix"] == sizes["plain"] + 48 * 48 < sizes["untie"]
    assert errors["mix"] < 0.5 * errors["plain"], errors


def test_pruning_the_rotated_stream_loses_less():
    """Same compile, same parameter count: slicing the rotated stream's last directions
    moves the logits much less than slicing the original stream's weakest channels."""
    model = _llama(tie=False, strong_directions=True)
    ids, batches = torch.randint(0, VOCAB, (2, 7)), _batches(8)
    rotated = graphprune.rotate_residual(model, (ids,), batches)
    held_out = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
    errors, sizes = {}, {}
    for name, m in (("plain", model), ("rotated", rotated)):
        small = graphprune.compile(m, (ids,), ratio={"model.norm": 0.25}, importance="activation", calibration=batches)
        assert small.model.embed_tokens.weight.shape == (VOCAB, 48)  # the hidden group, and only it, lost 16
        assert small.model.layers[0].mlp.up_proj.weight.shape == (128, 48)
        sizes[name] = graphprune.count_params(small)
        with torch.no_grad():
            ref, out = model(held_out).logits, small(held_out).logits
        errors[name] = ((out - ref).norm() / ref.norm()).item()
    assert sizes["plain"] == sizes["rotated"] < graphprune.count_params(model)
    assert errors["rotated"] < 0.5 * errors["plain"], errors


# ------------------------------------------------------------------ torch.nn models (symbolic trace)

class _Block(nn.Module):
    def __init__(self, norm, body=None):
        super().__init__()
        self.norm, self.up, self.down = norm, nn.Linear(HIDDEN, 96), nn.Linear(96, HIDDEN)
        self.body = body or (lambda x: x)

    def forward(self, x):
        return x + self.body(self.down(torch.relu(self.up(self.norm(x)))))


class _Tiny(nn.Module):
    """embedding -> 2 pre-norm residual blocks -> norm -> head."""

    def __init__(self, norm=lambda: nn.RMSNorm(HIDDEN), stream_fn=None, body=None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([_Block(norm(), body) for _ in range(2)])
        self.norm, self.head = norm(), nn.Linear(HIDDEN, VOCAB)
        self.stream_fn = stream_fn

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
            if self.stream_fn is not None:
                x = self.stream_fn(x)
        return self.head(self.norm(x))


def _randomise_norms(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model.eval()


def test_module_rmsnorm_model_is_rotated_losslessly():
    model = _randomise_norms(_Tiny())
    ids = torch.randint(0, VOCAB, (2, 7))
    rotated = graphprune.rotate_residual(model, (ids,), _batches(3))
    assert isinstance(rotated.norm, nn.RMSNorm) and torch.equal(rotated.norm.weight, torch.ones(HIDDEN))
    with torch.no_grad():
        assert _rel(model(ids), rotated(ids)) < 1e-5
    assert rotated._graphprune_rotation["extra_params"] == 0


class _Scale(nn.Module):
    """A per-channel scale on a block's output before the residual add (LayerScale)."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(HIDDEN) + 0.5)

    def forward(self, x):
        return x * self.gamma


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": lambda: nn.LayerNorm(HIDDEN)}, "LayerNorm"),
    ({"stream_fn": torch.tanh}, "tanh"),
    ({"body": _Scale()}, "per channel"),
], ids=["layernorm", "nonlinearity", "layerscale"])
def test_streams_that_do_not_commute_with_a_rotation_are_refused(kwargs, match):
    model = _Tiny(**kwargs).eval()
    with pytest.raises(graphprune.GraphpruneError, match=match):
        graphprune.rotate_residual(model, (torch.randint(0, VOCAB, (2, 7)),), _batches(1))


def test_a_sliced_mixed_model_saves_and_loads_onto_a_fresh_original(tmp_path):
    """The manifest records the MixedNorm that rotation put in; ``load`` wraps a fresh
    original the same way (on ``meta`` too) and leaves the user's original alone."""
    model = _llama(tie=True, strong_directions=True)
    ids, batches = torch.randint(0, VOCAB, (2, 7)), _batches(8)
    small = graphprune.compile(graphprune.rotate_residual(model, (ids,), batches), (ids,), ratio={"model.norm*": 0.25},
                               importance="activation", calibration=batches)
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        on_meta = type(model)(model.config).eval()
    for original in (_llama(tie=True), on_meta):
        back = graphprune.load(original, tmp_path)
        assert type(original.model.norm).__name__ == "LlamaRMSNorm"  # the original keeps its own norm
        assert back.lm_head.weight is back.model.embed_tokens.weight
        assert back.model.norm.mix.weight.shape == (48, 48)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, small(ids).logits)


def test_a_sliced_untied_model_saves_and_loads_onto_a_tied_original(tmp_path):
    """tied="untie" gives the head its own copy; load onto the tied original it came from was
    refused ("the manifest prunes lm_head.weight axis 1, which this model cannot prune the same
    way", survey 27): the rebuilt model unties the head as the saved one had it."""
    model = _llama(tie=True, strong_directions=True)
    ids, batches = torch.randint(0, VOCAB, (2, 7)), _batches(8)
    rotated = graphprune.rotate_residual(model, (ids,), batches, tied="untie")
    small = graphprune.compile(rotated, (ids,), ratio={"model.norm*": 0.25}, importance="activation", calibration=batches)
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        on_meta = type(model)(model.config).eval()
    for original in (_llama(tie=True), on_meta):
        back = graphprune.load(original, tmp_path)
        assert back.lm_head.weight is not back.model.embed_tokens.weight
        assert original.lm_head.weight is original.model.embed_tokens.weight  # the user's original stays tied
        with torch.no_grad():
            assert torch.equal(back(ids).logits, small(ids).logits)
