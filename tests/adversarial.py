"""Harness for the adversarial zoo (adversarial_models.py).

``classify(name)`` runs one model through the lossless protocol and returns
``(label, detail)``:

* ``lossless``: the compiled model reproduces the killed model exactly, at
  the example batch size and another one, and has fewer parameters;
* ``kept``: correct, but nothing was removed;
* ``refused``: graphprune raised ``GraphpruneError`` (an honest refusal);
* ``crash``: any other exception, from analyze, compile or the compiled model;
* ``wrong``: the compiled model runs but computes something else (or a
  ratio=0 compile of the untouched model already does);
* ``mutated``: compiling changed the user's model, or the result shares
  storage with it.

``PYTHONPATH=tests python tests/adversarial.py`` prints the table.
"""
from __future__ import annotations

import functools
import warnings

import copy
import dataclasses

import torch

import graphprune
from adversarial_models import ADVERSARIAL
from adversarial_models_more import RT

ADVERSARIAL = {**ADVERSARIAL, **RT}  # both red-team passes
from oracle import kill_units

LABELS = ("lossless", "kept", "refused", "crash", "wrong", "mutated")
RTOL = 1e-4
ATOL = 1e-5


class Verdict(Exception):
    def __init__(self, label: str, detail: str):
        super().__init__(detail)
        self.label, self.detail = label, detail


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


def _clone(x):
    """Fresh copies of the inputs for every call, so a model that writes into
    its inputs cannot change what the next call sees."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _run(model, inputs):
    with torch.no_grad():
        return model(*_clone(inputs))


def _flatten(out, path="out") -> list:
    """[(path, leaf)] for nested tuple/list/dict outputs; leaves are tensors or plain values."""
    if isinstance(out, dict):
        return [kv for k in out for kv in _flatten(out[k], f"{path}[{k!r}]")]
    if isinstance(out, (list, tuple)):
        return [kv for i, v in enumerate(out) for kv in _flatten(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [kv for f in dataclasses.fields(out) for kv in _flatten(getattr(out, f.name), f"{path}.{f.name}")]
    return [(path, out)]


def _compare(got, ref, where: str) -> str | None:
    """None when ``got`` matches ``ref``, else what differs."""
    g, r = _flatten(got), _flatten(ref)
    if [p for p, _ in g] != [p for p, _ in r]:
        return f"{where}: output structure {[p for p, _ in g]} != {[p for p, _ in r]}"
    for (path, a), (_, b) in zip(g, r):
        if isinstance(b, torch.Tensor) != isinstance(a, torch.Tensor):
            return f"{where}: {path} is {type(a).__name__}, expected {type(b).__name__}"
        if not isinstance(b, torch.Tensor):
            if a != b:
                return f"{where}: {path} = {a!r}, expected {b!r}"
            continue
        if a.shape != b.shape:
            return f"{where}: {path} shape {tuple(a.shape)} != {tuple(b.shape)}"
        if a.dtype != b.dtype:
            return f"{where}: {path} dtype {a.dtype} != {b.dtype}"
        if not b.is_floating_point() and not b.is_complex():
            if not torch.equal(a, b):
                return f"{where}: {path} differs"
            continue
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        if not torch.allclose(a, b, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
            diff = (a - b).abs().nan_to_num(float("inf")).max().item()
            return f"{where}: {path} max |diff| {diff:.3g} (max |ref| {scale:.3g})"
    return None


def _tensors(module) -> dict:
    """The state_dict plus non-persistent buffers (a rotary ``inv_freq`` cache)."""
    out = dict(module.state_dict())
    for name, b in module.named_buffers():
        out.setdefault(name, b)
    return out


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in _tensors(module).items()}


def _state_changed(model, snapshot: dict) -> str | None:
    now = _tensors(model)
    if now.keys() != snapshot.keys():
        return f"state_dict keys changed: {sorted(now.keys() ^ snapshot.keys())}"
    for k, v in now.items():
        if v.shape != snapshot[k].shape or not torch.equal(v, snapshot[k]):
            return f"user's {k} changed"
    return None


def _storage_ranges(module) -> list:
    out = []
    for t in list(_tensors(module).values()) + list(module.parameters()):
        if t.numel():
            s = t.untyped_storage()
            out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return out


def _mutation_check(model, small, snapshot: dict) -> str | None:
    """Does ``small`` share memory with ``model``? Bump every tensor of ``small`` and watch ``model``."""
    mine = _storage_ranges(model)
    theirs = _tensors(small)
    for name, t in theirs.items():
        if not t.numel():
            continue
        s = t.untyped_storage()
        lo, hi = s.data_ptr(), s.data_ptr() + s.nbytes()
        if any(lo < b and a < hi for a, b in mine):
            return f"result's {name} shares storage with the user's model"
    with torch.no_grad():
        for t in theirs.values():
            if t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(1)
    return _state_changed(model, snapshot)


def _compile(model, inputs, ratio):
    try:
        return graphprune.compile(model, _clone(inputs), ratio=ratio, importance="l1")
    except graphprune.GraphpruneError as e:
        raise Verdict("refused", _first_line(e))
    except Exception as e:  # noqa: BLE001 - every other exception is the library's fault
        raise Verdict("crash", f"compile(ratio={ratio}): {_describe(e)}")


def _fresh_run(model, inputs):
    """Run a copy: a forward that updates its own state (counters, renormalised
    embeddings, streaming offsets) then always starts from the same snapshot, on
    the reference side as on the compiled side."""
    try:
        model = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - parametrized modules refuse deepcopy; they keep no call state
        pass
    return _run(model, inputs)


def _call(model, inputs, what: str):
    try:
        return _fresh_run(model, inputs)
    except Exception as e:  # noqa: BLE001
        raise Verdict("crash", f"{what}: {_describe(e)}")


def _protocol(name: str) -> tuple[str, str]:
    factory, make_inputs = ADVERSARIAL[name]

    # 1-2: build, kill 25% of every group's units
    torch.manual_seed(0)
    model = factory().eval()
    x = make_inputs(2)
    try:
        n_groups = kill_units(model, x, 0.25, seed=0)
    except graphprune.GraphpruneError as e:
        return "refused", f"analyze: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001
        return "crash", f"analyze: {_describe(e)}"

    # 3: the killed model's output is the reference
    ref = _fresh_run(model, x)
    snapshot = _snapshot(model)

    # 4: compile
    small = _compile(model, x, 0.25)

    # 5: the user's model must be untouched, and the result must own its memory
    why = _state_changed(model, snapshot)
    if why:
        return "mutated", f"compile changed the model: {why}"
    other = _compile(model, x, 0.25)
    why = _mutation_check(model, other, snapshot)
    if why:
        return "mutated", why
    del other

    # 6: numerics, at the example batch and another one
    out = _call(small, x, "compiled model at batch 2")
    why = _compare(out, ref, "batch 2")
    if why:
        return "wrong", why
    torch.manual_seed(1)
    x3 = make_inputs(3)
    ref3 = _fresh_run(model, x3)
    out3 = _call(small, x3, "compiled model at batch 3")
    why = _compare(out3, ref3, "batch 3")
    if why:
        return "wrong", why
    why = _state_changed(model, snapshot)
    if why:
        return "mutated", f"running the compiled model changed the user's: {why}"

    # 6b: ratio=0 on a fresh, unkilled model must reproduce it (tracing alone)
    torch.manual_seed(0)
    fresh = factory().eval()
    xf = make_inputs(2)
    ref0 = _fresh_run(fresh, xf)
    same = _compile(fresh, xf, 0.0)
    why = _compare(_call(same, xf, "ratio=0 result"), ref0, "ratio=0 on the unkilled model")
    if why:
        return "wrong", why

    # 7: did anything go?
    before, after = graphprune.count_params(model), graphprune.count_params(small)
    if after < before:
        return "lossless", f"{before} -> {after} params ({n_groups} groups killed)"
    return "kept", f"{before} params kept ({n_groups} groups killed)"


@functools.lru_cache(maxsize=None)
def classify(name: str) -> tuple[str, str]:
    """(label, detail) for ``ADVERSARIAL[name]``; see the module docstring.

    Runs on one intra-op thread: the models are tiny, and on a busy 2-core
    machine thread hand-offs cost several times the compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return _protocol(name)
            except Verdict as v:
                return v.label, v.detail
    finally:
        torch.set_num_threads(threads)


def run_all() -> dict:
    return {name: classify(name) for name in sorted(ADVERSARIAL)}


def main() -> None:
    results = run_all()
    width = max(map(len, results))
    for name, (label, detail) in results.items():
        print(f"{name:<{width}}  {label:<8}  {detail}")
    print()
    counts = {label: sum(1 for lab, _ in results.values() if lab == label) for label in LABELS}
    print("  ".join(f"{label}: {n}" for label, n in counts.items()) + f"  (total {len(results)})")


if __name__ == "__main__":
    main()
