"""Every torchvision classification model compiles at ratio 0.5; the smallest model of each kind is exact at ratio 0.

Models over 29M parameters that are not the smallest of their family (ViT-B/32, -L and -H, the larger RegNets,
ConvNeXt, Swin, EfficientNet-B5 to B7 and V2-M/L, ResNet-101 and -152, ResNeXt-101, Wide ResNets, VGG but VGG-11;
29M keeps ResNet-50, the README's model, and Swin-V2-T, the smallest Swin V2), and DenseNets but the
smallest (torch.export traces each layer: 13-16 s a model), run with ``GRAPHPRUNE_ZOO=all``: each is a larger member
of a family a smaller model here covers. The suite took 1190 s of its 20 minutes on the 2-core CI machine with the
50-100M models and the DenseNets in; the models over 100M had taken 145 s more, most of it filling and copying
0.5-2.5 GB of weights."""
import os

import pytest
import torch
import torchvision

import graphprune

# smallest first (the parameter counts torchvision's weight tables give, nothing downloaded): the first model of a
# kind is the one checked at ratio 0, and the largest run last, when the least else is held in memory
NAMES = sorted(torchvision.models.list_models(module=torchvision.models),
               key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"])
# a small input each family accepts; ViTs are built for it (torchvision's image_size argument)
SIZE = {"inception_v3": 75, "alexnet": 64, "maxvit_t": 224, "vit_h_14": 28}
SIZE.update({n: 64 for n in NAMES if n.startswith("swin")})
SIZE.update({n: 32 for n in NAMES if n.startswith("vit_") and n != "vit_h_14"})
KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False}, "googlenet": {"aux_logits": False, "init_weights": False}}
KWARGS.update({n: {"image_size": SIZE[n]} for n in NAMES if n.startswith("vit_")})


# Known gaps: these compile, run and are exact at ratio 0, but their FLOPs stay above 0.35 at ratio 0.5.
# strict=True: once one of them meets the goal, the suite says so.
GAPS: dict = {}  # none left: ShuffleNetV2 met the goal once shuffles were folded into permutations (graphprune/shuffle.py)


BIG = 29e6  # parameters: a model above it, not the smallest of its family, runs with GRAPHPRUNE_ZOO=all
EXPORTED = ("densenet",)  # families torch.export traces (their layers ask isinstance): only the smallest by default
ALL = os.environ.get("GRAPHPRUNE_ZOO") == "all"


def _params_of(name: str) -> int:
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


def _family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789")  # vit_h_14 -> vit, regnet_y_128gf -> regnet, resnet50 -> resnet


def _big(name: str) -> bool:
    """Over BIG (or of a family torch.export traces), and a smaller model of its family stays in the suite."""
    return (_params_of(name) > BIG or _family(name) in EXPORTED) and \
        any(_family(n) == _family(name) and _params_of(n) < _params_of(name) for n in NAMES)


def _params():
    for name in NAMES:
        why = next((w for k, w in GAPS.items() if name.startswith(k)), None)
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)] if why else []
        if _big(name) and not ALL:
            marks.append(pytest.mark.skip(reason=f"over {BIG / 1e6:.0f}M parameters or traced by torch.export, and not the "
                                                 "smallest of its family: GRAPHPRUNE_ZOO=all runs it"))
        yield pytest.param(name, marks=marks)


def _size(name):
    return SIZE.get(name, 32)


def _kinds(model) -> frozenset:
    """The kinds of layer a model is made of: its module classes, a grouped convolution told apart from a dense one.
    Two models of one kind differ only in depth and widths (resnet50 and resnet152, densenet121 and densenet201),
    which the ratio-0 check does not reach: its subject is each kind of layer traced and rewritten with nothing
    removed, and compile already checks every model it prunes against its twin. Checking the smallest of each kind
    kept the zoo's meaning at half its time (the ratio-0 compile of the 80 models was ~250 s of the suite)."""
    return frozenset((type(m).__name__, getattr(m, "groups", 1) > 1) for m in model.modules())


_EXACT_CHECKED: set = set()  # kinds already checked at ratio 0 in this run


def _classifier(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]


@pytest.mark.parametrize("name", list(_params()))
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
    # the measure: FLOPs of the ignored classifier aside (its output width stays by design)
    head = _classifier(model)
    ratio = graphprune.count_flops(small, (x,), exclude=head) / graphprune.count_flops(model, (x,), exclude=head)
    assert ratio <= 0.35, f"{name}: FLOPs only dropped to {ratio:.3f}"
    if _kinds(model) in _EXACT_CHECKED:
        return
    _EXACT_CHECKED.add(_kinds(model))
    same = graphprune.compile(model, (x,), ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
