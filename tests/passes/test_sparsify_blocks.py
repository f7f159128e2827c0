"""The sparsify-blocks pass: converts Linear and 1x1 Conv2d layers of traced models
and keeps their outputs equal to the dense model with the same blocks masked."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # run the real kernels on the CPU; must precede importing triton

import copy  # noqa: E402

import pytest  # noqa: E402
from torch import fx, nn  # noqa: E402

from graphprune.errors import GraphpruneError  # noqa: E402
from graphprune.pass_manager import run_pipeline  # noqa: E402

from graphprune.passes import sparsify_blocks as sparsify_module  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)  # 10 outputs: not divisible by any block size

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 64, 1)
        self.reduce = nn.Conv2d(64, 32, 1, stride=2)

    def forward(self, x):
        return self.reduce(torch.relu(self.expand(torch.relu(self.stem(x)))))


def masked_dense(model, sparse_gm):
    """The original model with every converted layer's dropped blocks zeroed."""
    dense = copy.deepcopy(model)
    for name in sparse_gm.meta["sparsify_blocks"]["converted"]:
        module = sparse_gm.get_submodule(name)
        linear = module.linear if hasattr(module, "linear") else module
        layer = dense.get_submodule(name)
        layer.weight.data = linear.weight.to_dense().to(layer.weight.dtype).reshape(layer.weight.shape)
    return dense


def assert_same_outputs(model, sparse_gm, x, rtol=1e-4, atol=1e-4):
    reference = masked_dense(model, sparse_gm).to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse_gm.to(DEVICE)(x.to(DEVICE)), reference(x.to(DEVICE)), rtol=rtol, atol=atol)


def test_mlp_end_to_end():
    torch.manual_seed(0)
    model = MLP().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(33, 64)
    with torch.no_grad():
        before = gm(x)
    counts = dict(sparsify_module.REWRITES)

    result, modified = run_pipeline(gm, "sparsify-blocks{density=0.5,block_size=32}")

    assert modified == {"sparsify-blocks": True}
    report = result.meta["sparsify_blocks"]
    assert report["converted"] == {"fc1": "linear", "fc2": "linear"}
    assert "not divisible" in report["skipped"]["head"]
    assert sparsify_module.REWRITES["linear"] == counts.get("linear", 0) + 2
    assert type(result.fc1).__name__ == "BlockSparseLinear" and result.fc1.weight.density == 0.5
    assert isinstance(gm.fc1, nn.Linear), "the input module must not be modified"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before)
    assert_same_outputs(model, result, x)


def test_graph_checks_pass_after_graphprune_trace():
    """graphprune's trace records example inputs; the pipeline then re-runs the
    new graph on meta tensors, which BlockSparseLinear must support."""
    from graphprune.trace import trace

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(6, 64)
    result, modified = run_pipeline(trace(model, (x,)).gm, "sparsify-blocks{density=0.5,block_size=32}")
    assert modified["sparsify-blocks"]
    assert_same_outputs(model, result, x)


def test_convnet_converts_only_1x1_linear_convs():
    torch.manual_seed(0)
    model = ConvNet().eval()
    result, _ = run_pipeline(fx.symbolic_trace(model), "sparsify-blocks{density=0.25,block_size=16}")
    report = result.meta["sparsify_blocks"]
    assert report["converted"] == {"expand": "conv1x1"}
    assert set(report["skipped"]) == {"stem", "reduce"}
    assert_same_outputs(model, result, torch.randn(2, 3, 6, 5))


def test_module_patterns_choose_layers():
    model = MLP().eval()
    result, _ = run_pipeline(fx.symbolic_trace(model), [("sparsify-blocks", {"modules": ["fc2"], "block_size": (16, 32)})])
    assert result.meta["sparsify_blocks"] == {"converted": {"fc2": "linear"}, "skipped": {}}
    assert result.fc2.weight.block_size == (16, 32)
    assert_same_outputs(model, result, torch.randn(4, 64))


@pytest.mark.parametrize(
    "options",
    [{"modules": "nothing*"}, {"modules": 3}, {"density": 1.5}, {"density": "half"}, {"block_size": 48}],
    ids=["no-match", "modules-int", "density>1", "density-str", "block-48"],
)
def test_bad_options_raise(options):
    with pytest.raises(GraphpruneError):
        sparsify_module.sparsify_blocks(fx.symbolic_trace(MLP()), **options)


@pytest.mark.parametrize("pipeline", ["sparsify-blocks{block_size=(16,32)}", "sparsify-blocks{bogus=1}",
                                      "sparsify-blocks{block_size=16.0}", "sparsify-blocks{block_size=[16]}"])
def test_malformed_pipeline_options_are_refused_by_name(pipeline):
    """An option the pass does not take, or a block size that is not an int or a pair, raised a bare
    TypeError or ValueError from inside the pass (survey 27)."""
    with pytest.raises(GraphpruneError, match="options|block size"):
        run_pipeline(fx.symbolic_trace(MLP()), pipeline)


def test_vit_mlp_blocks_end_to_end():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    gm = fx.symbolic_trace(model)
    result, modified = run_pipeline(gm, "sparsify-blocks{density=0.25,block_size=64,modules='blocks.*.mlp.fc*'}")
    converted = result.meta["sparsify_blocks"]["converted"]
    assert modified["sparsify-blocks"] and len(converted) == 2 * len(model.blocks)
    assert all(name.startswith("blocks.") and ".mlp.fc" in name for name in converted)
    # 3 images x 5 tokens = 15 tokens (decode kernel); 4 images = 20 tokens (large-M kernel)
    for batch in (3, 4):
        assert_same_outputs(model, result, torch.randn(batch, 3, 32, 32), rtol=1e-3, atol=1e-3)


class _Held(nn.Module):
    """Three layers the pass must leave: one with a forward hook, one whose weight the graph reads,
    one called with a keyword argument; and a 1x1 conv whose output is viewed (survey 27)."""

    def __init__(self):
        super().__init__()
        self.hooked, self.read, self.keyword = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.hooked.register_forward_hook(lambda mod, args, out: out * 3)
        self.conv = nn.Conv2d(32, 32, 1)

    def forward(self, x):
        h = self.keyword(input=self.hooked(x) + self.read(x) + x @ self.read.weight.t())
        img = self.conv(h.reshape(h.shape[0], 32, 1, 1).expand(-1, -1, 2, 2))
        return img.view(img.shape[0], -1)


def test_layers_held_by_hooks_direct_reads_or_keywords_are_skipped():
    torch.manual_seed(0)
    model, x = _Held().eval(), torch.randn(3, 32)
    gm = fx.symbolic_trace(model)
    out, _ = run_pipeline(gm, "sparsify-blocks{density=1.0;block_size=16}")
    info = out.meta["sparsify_blocks"]
    assert set(info["skipped"]) == {"hooked", "read", "keyword"} and set(info["converted"]) == {"conv"}
    assert "hooks" in info["skipped"]["hooked"] and "weight" in info["skipped"]["read"]
    with torch.no_grad():
        torch.testing.assert_close(out.to(DEVICE)(x.to(DEVICE)).cpu(), model(x), rtol=1e-4, atol=1e-4)
        unbatched = out.conv(torch.randn(32, 2, 2).to(DEVICE))
    assert unbatched.shape == (32, 2, 2)
