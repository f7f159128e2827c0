"""fold-norm: a LayerNorm's or RMSNorm's affine folded into the linear (or self-attention) that
reads it, lossless, never in place, and only where that reader is all that sees the norm."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune
from graphprune.modules import FullWidthLayerNorm
from graphprune.pass_manager import run_pipeline


def _random_affine(model: nn.Module) -> nn.Module:
    """Norms start at weight 1, bias 0, where a wrong fold is invisible: give them values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(std=0.5)
    return model


class Normed(nn.Module):
    """Folds: LN -> linear (with and without bias), RMSNorm -> linear, LN -> self-attention (q = k = v).
    Stays: LN read twice, LN -> cross-attention (key is another tensor), a norm over two dims,
    a linear called twice, a norm without affine."""

    def __init__(self):
        super().__init__()
        self.ln1, self.fc1 = nn.LayerNorm(8), nn.Linear(8, 8)
        self.ln2, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 8, bias=False)
        self.rms, self.fc3 = nn.RMSNorm(8), nn.Linear(8, 8)
        self.ln_att, self.att = nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln_twice, self.fc4 = nn.LayerNorm(8), nn.Linear(8, 8)
        self.ln_cross, self.cross = nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln_2d, self.fc5 = nn.LayerNorm((4, 8)), nn.Linear(8, 8)
        self.ln_shared, self.shared = nn.LayerNorm(8), nn.Linear(8, 8)
        self.plain, self.fc6 = nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 8)

    def forward(self, x):                                        # x: (N, 4, 8)
        h = self.fc1(self.ln1(x)) + self.fc2(self.ln2(x)) + self.fc3(self.rms(x))
        a = self.ln_att(h)
        h = h + self.att(a, a, a, need_weights=False)[0]
        t = self.ln_twice(h)
        h = h + self.fc4(t) + t
        c = self.ln_cross(h)
        h = h + self.cross(c, x, x, need_weights=False)[0]
        h = self.fc5(self.ln_2d(h))
        h = self.shared(self.ln_shared(h)) + self.shared(h)
        return self.fc6(self.plain(h))


def _affine_left(gm) -> set:
    return {n for n, m in gm.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None}


def test_fold_norm_is_lossless_folds_only_sole_readers_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = _random_affine(Normed()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4, 8)
    ref = model(x)
    out, changed = run_pipeline(gm, "fold-norm", check=False)
    assert changed
    assert _affine_left(out) == {"ln_twice", "ln_cross", "ln_2d", "ln_shared"}
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.ln1.weight is not None and out.get_submodule("fc1") is not model.fc1
    assert out.get_submodule("att").in_proj_weight is not model.att.in_proj_weight
    assert out.get_submodule("cross") is model.cross and out.get_submodule("shared") is model.shared


def test_fold_norm_into_full_width_layer_norm_of_a_pruned_vit():
    """A ViT pruned along its residual stream normalises with graphprune's full-width LayerNorm; the
    deploy pipeline leaves every one that feeds attention or the MLP without its affine, equal to
    the trainable graph and passing the self-check."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    model = _random_affine(model).eval()
    x = torch.randn(2, 3, 32, 32)
    small = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", pipeline="deploy")
    assert small.report.verify.status == "passed"
    norms = {n: m for n, m in small.named_modules() if isinstance(m, nn.LayerNorm)}
    assert all(isinstance(m, FullWidthLayerNorm) for n, m in norms.items() if n != "encoder.ln")
    assert _affine_left(small) == {"encoder.ln"}  # the final norm feeds a slice, not a linear
    ref = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", output="graph")
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_fold_norm_keeps_dtype(dtype):
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).to(dtype)
    _random_affine(model)
    out, changed = run_pipeline(torch.fx.symbolic_trace(model), "fold-norm", check=False)
    assert changed and out.get_submodule("1").weight.dtype == dtype and out.get_submodule("1").bias.dtype == dtype


def test_a_head_tied_to_its_embedding_keeps_its_norm_affine():
    """GPT-2's final LayerNorm feeds an LM head that shares the embedding's weight: folding would
    give the head a weight of its own (untied, vocab x d more parameters), so the affine stays."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.ln, self.head = nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.ln(self.emb(ids)))

    model = _random_affine(Tied()).eval()
    ids = torch.randint(0, 20, (2, 5))
    out, changed = run_pipeline(torch.fx.symbolic_trace(model), "fold-norm", check=False)
    assert not changed["fold-norm"] and _affine_left(out) == {"ln"}
    assert out.get_submodule("head").weight is out.get_submodule("emb").weight
    assert graphprune.count_params(out) == graphprune.count_params(model)
    torch.testing.assert_close(out(ids), model(ids))


class OwnNorm(nn.LayerNorm):
    """A LayerNorm subclass outside torch.nn (as timm's): fx traces through it, so the graph holds
    ``F.layer_norm`` with ``get_attr`` reads of its weight and bias."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Functional(nn.Module):
    """Folds: an own-class norm read by separate q, k, v projections and by a shape read;
    F.rms_norm over a parameter of a plain module. Stays: a norm whose weight is read again
    (``self.n_reused.weight`` scales the output too), and a norm read by a linear and a GELU."""

    def __init__(self):
        super().__init__()
        self.n_qkv = OwnNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 8)
        self.holder = nn.Module()
        self.holder.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.fc_rms = nn.Linear(8, 8)
        self.n_reused, self.fc_reused = OwnNorm(8), nn.Linear(8, 8)
        self.n_gelu, self.fc_gelu = OwnNorm(8), nn.Linear(8, 8)

    def forward(self, x):                                        # x: (N, T, 8)
        h = self.n_qkv(x)
        n, t, _ = h.shape
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1) @ self.v(h)  # (N, T, 8)
        x = x + att.reshape(n, t, -1)
        x = x + self.fc_rms(F.rms_norm(x, (8,), self.holder.scale, 1e-6))
        x = x + self.fc_reused(self.n_reused(x)) * self.n_reused.weight
        g = self.n_gelu(x)
        return self.fc_gelu(g) + F.gelu(g)


def test_fold_norm_folds_functional_norms_into_every_reader():
    torch.manual_seed(0)
    model = _random_affine(Functional()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    assert not any(n.op == "call_module" and "n_" in n.target for n in gm.graph.nodes)  # traced through
    x = torch.randn(3, 4, 8)
    ref = model(x)
    out, changed = run_pipeline(gm, "fold-norm", check=False)
    assert changed["fold-norm"]
    read = {n.target for n in out.graph.nodes if n.op == "get_attr"}
    assert read == {"n_reused.weight", "n_reused.bias", "n_gelu.weight", "n_gelu.bias"}
    assert out.get_submodule("n_qkv").weight is None and out.get_submodule("holder").scale is None
    assert all(out.get_submodule(n) is not getattr(model, n) for n in ("q", "k", "v", "fc_rms"))
    assert out.get_submodule("fc_reused") is model.fc_reused and out.get_submodule("fc_gelu") is model.fc_gelu
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.n_qkv.weight is not None and model.holder.scale is not None


def test_deploy_folds_timm_vit_norms():
    """timm's ViT blocks normalise with its own LayerNorm class (traced through) and read the
    output's shape before the qkv projection: every block norm folds, the result equals the
    trainable graph."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _random_affine(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                             depth=2, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    small = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", pipeline="deploy")
    ref = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", output="graph")
    norms = [n for n in small.graph.nodes if n.op == "call_function" and "norm" in getattr(n.target, "__name__", "")]
    with_affine = [n for n in norms if any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args[2:4])]
    assert len(norms) == 5 and len(with_affine) == 1  # the final norm feeds the pooling, not a linear
    assert graphprune.count_params(small) < graphprune.count_params(ref)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-4)
