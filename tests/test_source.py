"""graphprune.source.getsource: a class's source as inspect gives it, its file parsed once."""
import ast
import dataclasses
import importlib
import inspect
import sys

import pytest
import torch
import torchvision

from graphprune import source


class Outer(torch.nn.Module):
    class Inner(torch.nn.Module):
        def forward(self, x):
            return x * 2

    def forward(self, x):
        return x + 1


@dataclasses.dataclass
class Decorated:
    width: int = 3


def _made_in_a_function():
    class Local(torch.nn.Module):
        def forward(self, x):
            return x.relu()
    return Local


def _another_of_the_same_name():
    class Local(torch.nn.Module):
        def forward(self, x):
            return x.sigmoid()
    return Local


def _classes():
    here = [Outer, Outer.Inner, Decorated, _made_in_a_function(), _another_of_the_same_name()]
    theirs = [c for mod in (torchvision.models.resnet, torchvision.models.densenet, torchvision.models.swin_transformer)
              for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]
    return here + theirs


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__qualname__)
def test_a_class_reads_as_inspect_reads_it(cls):
    assert source.getsource(cls) == inspect.getsource(cls)


def test_a_file_is_parsed_once_for_all_its_classes(monkeypatch):
    parsed = []
    real = ast.parse
    monkeypatch.setattr(source.ast, "parse", lambda text, *a, **k: parsed.append(len(text)) or real(text, *a, **k))
    mod = torchvision.models.swin_transformer
    classes = [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]
    source._CLASSES.pop(inspect.getsourcefile(mod), None)
    for cls in classes * 2:
        source.getsource(cls)
    assert len(classes) > 3 and len(parsed) == 1


def test_an_edited_file_is_read_again(tmp_path, monkeypatch):
    path = tmp_path / "edited_model.py"
    path.write_text("class Block:\n    def forward(self, x):\n        return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("edited_model")
    try:
        assert "return x\n" in source.getsource(mod.Block)
        path.write_text("class Block:\n    def forward(self, x):\n        return x + self.training\n")
        mod = importlib.reload(mod)
        assert "self.training" in source.getsource(mod.Block)
    finally:
        sys.modules.pop("edited_model", None)


def test_a_class_without_a_file_raises_as_inspect_does():
    made = type("Made", (torch.nn.Module,), {})
    made.__module__ = "__main__"  # a class made in a session: inspect finds no file, or no definition in it
    with pytest.raises((OSError, TypeError)):
        inspect.getsource(made)
    with pytest.raises((OSError, TypeError)):
        source.getsource(made)
