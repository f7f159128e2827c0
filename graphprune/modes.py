"""Train/eval modes and running state, module by module.

``model.train(flag)`` sets one mode on every submodule, but users mix them: a
model fine-tuned with frozen BatchNorms is in training mode with its
BatchNorms in eval mode, and ``nn.DataParallel(model.eval())`` is a wrapper in
training mode around a model in eval mode. A copy that takes the top-level
mode everywhere computes something else (the BatchNorms switch to batch
statistics), so every copy graphprune hands back takes each module's own mode
(``copy_modes``), and functions that switch modes to run a model put back the
modes each module had (``kept_modes``).

A model in training mode also changes its own buffers as it runs (BatchNorm
running statistics, ``spectral_norm``'s power iteration): ``Snapshot`` keeps the
values a traced copy started with, so that calibration batches run through it
leave no trace in the model built from it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def modes_of(model: torch.nn.Module) -> dict[str, bool]:
    """{qualified name: training} for every submodule ("" is the model itself)."""
    return {name: mod.training for name, mod in model.named_modules(remove_duplicate=False)}


def set_modes(model: torch.nn.Module, modes: dict[str, bool], default: bool) -> None:
    """Each submodule of ``model`` in the mode ``modes`` gives its name; a module without an
    entry (one a rewrite added) in the mode of its nearest named ancestor, else ``default``.
    Sets the flag only: a module's ``train()`` override would set its children again."""
    for name, mod in model.named_modules(remove_duplicate=False):
        key = name
        while key not in modes and key:
            key = key.rpartition(".")[0]
        mod.training = modes.get(key, default)


def copy_modes(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst`` (a copy or a pruned version of ``src``) with every module in the mode of the module
    of ``src`` at the same name."""
    set_modes(dst, modes_of(src), src.training)


def mixed(model: torch.nn.Module) -> dict[str, bool]:
    """The modules whose mode differs from the model's own: what ``model.train(model.training)``
    would lose (a manifest records them)."""
    return {n: t for n, t in modes_of(model).items() if t != model.training}


@contextmanager
def kept_modes(*models: torch.nn.Module):
    """Put back every module's mode on exit, whatever ran in between switched. A module whose class overrides
    ``train`` is put back by calling it, outermost first, so that what it does beside the flag is undone too
    (LeViT's attention deletes its cached bias table ``ab`` in ``train(True)`` and builds it in ``train(False)``:
    set back by the flag alone, a result came back in eval mode without it, and failed when called); then every
    flag is set, as an override sets its children's too."""
    saved = [(mod, mod.training) for m in models for mod in m.modules()]
    # where an override may run, the tensors' values too: one that edits a weight as it switches (a merge that
    # is not undone exactly, a bias nudged on every switch) left the result 2.0 off its twin (survey 69 F3)
    overridden = any(type(mod).train is not torch.nn.Module.train for mod, _ in saved)
    values = {id(t): (t, t.detach().clone()) for m in models for t in (*m.parameters(), *m.buffers())
              if not t.is_meta} if overridden else {}
    try:
        yield
    finally:
        for mod, was in saved:
            if type(mod).train is not torch.nn.Module.train and mod.training != was:
                mod.train(was)
        for mod, was in saved:
            mod.training = was
        with torch.no_grad():
            for t, before in values.values():
                if t.shape == before.shape and not torch.equal(t, before):
                    t.copy_(before)


class Snapshot:
    """The buffers of a traced copy as they were before anything ran through it, for a copy with a
    module in training mode (only those move their buffers as they run); None-like otherwise."""

    def __init__(self, model: torch.nn.Module):
        training = any(m.training for m in model.modules())
        self.saved = {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)
                      if not b.is_meta} if training else {}
        self.model = model

    @torch.no_grad()
    def restore(self) -> None:
        """Every buffer back to its first value, in place (tensors keep their identity)."""
        if not self.saved:
            return
        for n, b in self.model.named_buffers(remove_duplicate=False):
            first = self.saved.get(n)
            if first is not None and first.shape == b.shape and not b.is_meta:
                b.copy_(first)
