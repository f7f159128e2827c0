"""Every torchvision classification model compiles at ratio 0.5 and is exact at ratio 0."""
import pytest
import torch
import torchvision

import graphprune

NAMES = torchvision.models.list_models(module=torchvision.models)
# the smallest input each family accepts (transformers with a fixed image size need theirs)
SIZE = {"inception_v3": 75, "googlenet": 32}
FIXED = ("vit_", "swin", "maxvit")
KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False}, "googlenet": {"aux_logits": False, "init_weights": False}}
HEAVY = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf", "efficientnet_b7", "efficientnet_v2_l"}


def _size(name):
    if name.startswith(FIXED):
        return 224
    return SIZE.get(name, 32 if name not in ("alexnet",) else 64)


def _classifier(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]


@pytest.mark.parametrize("name", NAMES)
def test_zoo(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    s = _size(name)
    x = torch.randn(1, 3, s, s)
    small = graphprune.compile(model, (x,), ratio=0.5, ignore=_classifier(model))
    with torch.no_grad():
        ref = model(x)
        y3 = small(torch.randn(3, 3, s, s))
    assert y3.shape == (3, *ref.shape[1:])
    ratio = graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,))
    assert ratio <= 0.35, f"{name}: FLOPs only dropped to {ratio:.3f}"
    same = graphprune.compile(model, (x,), ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
