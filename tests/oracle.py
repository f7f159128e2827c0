"""The lossless oracle: kill 25% of every group's units, prune exactly those, compare.

The oracle is only an oracle if ``kill_units`` and ``compile`` find the same
groups, and they trace the model in the state it is in when called: a forward
that stores something in its module (timm ConViT's GPSA rebuilds its
``rel_indices`` buffer from a ``(1, 1, 1, 3)`` placeholder on its first call)
changes the graph, and with it the groups. So a reference output is computed
on a copy (``reference``), never by calling the killed model itself between
``kill_units`` and ``compile``; ``removed_alive`` says whether compile removed
anything the oracle did not kill (then the comparison tests nothing).
"""
import copy

import numpy as np
import torch

import graphprune
from graphprune.pruner import remove_lowest


def kill_units(model: torch.nn.Module, inputs: tuple, frac: float, seed: int = 0) -> int:
    """Zero every learnable slice (producer rows, bias, norm affine, loose
    parameters, consumer columns) of round(frac * n) units of every group.
    Returns the number of groups touched. The groups are those of the model in
    its current state: compile it in that same state (see the module docstring).
    Groups whose dead twin is not zeros (``Group.fills``: experts, which a removal
    routes no token to) are left alone: zeroed weights cannot say that; tests delete
    those by hand (tests/test_moe.py)."""
    analysis = graphprune.analyze(model, inputs)
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    touched = 0
    with torch.no_grad():
        for g in analysis.groups:
            k = min(int(round(frac * g.n_units)), g.n_units - 1)
            if k == 0 or g.fills:
                continue
            dead = np.zeros(g.n_units, dtype=bool)
            dead[remove_lowest(g, rng.random(g.n_units), k)] = True
            for s in g.params:
                if s.name in params:
                    idx = torch.as_tensor(np.flatnonzero(dead[s.unit_of]))
                    params[s.name].index_fill_(s.axis, idx, 0.0)
            touched += 1
    return touched


def reference(model: torch.nn.Module, *inputs):
    """``model(*inputs)`` run on a deep copy, without gradients: whatever the forward
    stores in its modules (a buffer built on the first call, a step counter) stays in
    the copy, so the model compile traces next is the one ``kill_units`` analyzed."""
    try:
        model = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - parametrized modules refuse deepcopy; they keep no call state
        pass
    with torch.no_grad():
        return model(*inputs)


def _removed(model: torch.nn.Module, small: torch.nn.Module):
    """(name, axis, removed indices) of every parameter of ``model`` that ``small`` shrank."""
    meta = getattr(small, "_graphprune", None) or small.meta["graphprune"]
    params = dict(model.named_parameters(remove_duplicate=False))
    for (name, axis), kept in sorted(meta["kept"].items()):
        if name in params:  # a buffer keeps its values, in kill_units as in the self-check's twin
            size = params[name].shape[axis]
            yield name, axis, np.setdiff1d(np.arange(size), np.asarray(kept, dtype=np.int64))


def removed_alive(model: torch.nn.Module, small: torch.nn.Module) -> list[str]:
    """The parameter slices ``small`` removed that are not zero in ``model``
    ("name axis [indices]"). After ``kill_units`` this must be empty, or compile
    found other groups than the oracle and removed live units (then a lossy result is
    expected, not an error). A key/value head removed with all its query heads keeps
    weights ``kill_units`` does not zero: expect it listed."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for name, axis, gone in _removed(model, small):
        t = params[name].detach()
        alive = [int(i) for i in gone if t.select(axis, int(i)).abs().max() > 0]
        if alive:
            out.append(f"{name} axis {axis} {alive}")
    return out


def dead_twin(model: torch.nn.Module, small: torch.nn.Module) -> torch.nn.Module:
    """A copy of the user's ``model`` (its own forward, not the traced graph) with every
    parameter slice that ``small`` removed zeroed: what ``small`` must compute, whatever
    units the oracle killed."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, axis, gone in _removed(model, small):
            params[name].index_fill_(axis, torch.as_tensor(gone, dtype=torch.long), 0.0)
    return twin


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def without_experts(model: torch.nn.Module, small: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with the experts ``small`` removed deleted by hand: in every
    module that states an expert count (a router, fused experts), the leading rows of its
    parameters that ``small`` dropped are cut and the count set. The model's own forward
    then routes over the kept experts only, which is what removing an expert means (no
    token goes to it); ``kill_units`` cannot say that with zeros."""
    ref = copy.deepcopy(model)
    meta = getattr(small, "_graphprune", None) or small.meta["graphprune"]
    kept = meta["kept"]
    with torch.no_grad():
        for name, mod in ref.named_modules():
            attr = next((a for a in EXPERT_COUNTS if isinstance(mod.__dict__.get(a), int)), None)
            if attr is None:
                continue
            prefix = f"{name}." if name else ""
            n = mod.__dict__[attr]
            for k, t in list(mod._parameters.items()):
                keep = kept.get((prefix + k, 0))
                if t is not None and t.shape[0] == n and keep is not None:
                    mod._parameters[k] = torch.nn.Parameter(t.detach()[torch.as_tensor(np.asarray(keep), dtype=torch.long)])
                    mod.__dict__[attr] = len(keep)
    return ref


def assert_lossless(model_fn, shape, frac=0.25, seed=0, **compile_kw):
    torch.manual_seed(seed)
    model = model_fn().eval()
    x = torch.randn(*shape)
    assert kill_units(model, (x,), frac, seed) > 0, "no prunable group found"
    ref = reference(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if compile_kw.get("calibration") == "random":
        compile_kw["calibration"] = [(torch.randn(*shape),) for _ in range(3)]
    small = graphprune.compile(model, (x,), ratio=frac, **{"importance": "l1", **compile_kw})
    with torch.no_grad():
        out = small(x)
    again = reference(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert graphprune.count_params(small) < graphprune.count_params(model)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(again, ref)
    return model, small
