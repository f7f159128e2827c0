"""drop-identity: nn.Identity and eval-mode dropouts leave the deploy graph, so that a conv meets its
activation (timm's BatchNormAct2d puts an Identity between them); train-mode dropouts stay."""
import pytest
import torch
import torch.nn as nn

import graphprune
from graphprune.pass_manager import run_pipeline


class Drops(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.id1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.ReLU()
        self.c2, self.drop, self.act2 = nn.Conv2d(8, 8, 1), nn.Dropout(0.5), nn.SiLU()
        self.c4, self.trained = nn.Conv2d(8, 8, 1), nn.Dropout2d(0.5)

    def forward(self, x):
        h = self.act1(self.id1(self.c1(x)))
        h = self.act2(self.drop(self.c2(h)))
        return self.trained(self.c4(h))


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_drop_identity_removes_exact_identities_and_eval_dropouts_only():
    torch.manual_seed(0)
    model = Drops().eval()
    model.trained.train()  # a dropout the user keeps in train mode
    gm = torch.fx.symbolic_trace(model)
    out, changed = run_pipeline(gm, "drop-identity", check=False)
    assert changed["drop-identity"]
    assert _calls(out) == ["c1", "act1", "c2", "act2", "c4", "trained"]
    x = torch.randn(2, 3, 8, 8)
    model.trained.eval()
    out.get_submodule("trained").eval()
    torch.testing.assert_close(out(x), model(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_timm_convs_fuse_their_activations_in_the_deploy_graph():
    """timm's EfficientNet: BatchNormAct2d (F.batch_norm traced through, an ``x.ndim`` assert, an
    Identity, then SiLU). After the deploy passes and onednn-fuse, every conv followed by an
    activation carries it as a post-op, and the graph equals the trainable one."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    small = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", pipeline="deploy")
    fused, _ = run_pipeline(small, "onednn-fuse", check=False)
    ops = [m.post_op[0] for _, m in fused.named_modules() if hasattr(m, "post_op")]
    assert ops.count("swish") == 49 and ops.count("sigmoid") == 16  # stem, head, every block's acts, SE gates
    ref = graphprune.compile(model, (x[:1],), ratio=0.5, importance="l1", output="graph")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
