"""The pruned model in the user's own classes.

``shrink-params`` already rebuilds the user's module tree (each submodule a
copy of the user's, parameters sliced, shape attributes fixed); the graph on
top is fx code. The module form puts that tree under a copy of the user's top
module instead, so the result runs the user's own ``forward`` and is an
instance of the user's class. It is accepted only where it computes what the
pruned graph computes, on the example inputs and on a second input shape:
forward code that reads a width from an attribute (``self.hidden_dim``) or
writes one as a literal is fixed in the graph but not in the user's code,
and then the graph is returned, with the reason in ``result.report``.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from . import hf, source
from .meta_keys import FROZEN_WIDTHS, LITERAL_MOVES
from .modes import copy_modes, kept_modes
from .modules import full_width
from .attrs import MODULE_STATE, fresh_attrs, own_tensors, tensor_slots
from .settings import EVAL_IDENTITY, settings
from .trace import HOOK_DICTS, rebind_hooks
from .verify import (HALF, _run, evaluating, flatten, mismatch, on_copies, other_inputs, rounding_noted, tolerance,
                     widened_on_rounding)
from .errors import first_line


def _cloned(memo: dict):
    """copy(tensor, name) for ``own_tensors``: one clone per tensor, ties kept."""
    return lambda t, _name: memo[id(t)] if id(t) in memo else memo.setdefault(id(t), t.detach().clone())


def build(model: torch.nn.Module, out: torch.fx.GraphModule) -> tuple[torch.nn.Module | None, str]:
    """(module form, "") or (None, why not)."""
    info = out.meta.get("graphprune", {})
    if info.get("method") != "symbolic_trace":
        return from_tensors(model, out, info), ""
    top = type(model).__new__(type(model))
    top.__dict__ = own_tensors(fresh_attrs(model.__dict__), _cloned(memo := {}))
    top._modules = {k: (None if v is None else _submodule(out, k)) for k, v in model._modules.items()}
    _restore_unrun(top, model)
    for store, theirs in ((top._parameters, model._parameters), (top._buffers, model._buffers)):
        store.clear()
        for k, t in theirs.items():
            mine = getattr(out, k, None) if k in out.__dict__ or k in out._parameters or k in out._buffers else None
            if t is None:
                store[k] = None
            elif isinstance(mine, torch.Tensor):
                store[k] = mine
            else:  # not read by the graph: an unchanged copy
                data = t.detach().clone()
                store[k] = torch.nn.Parameter(data, t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
    top.training = out.training
    _hooks_follow(top, model)
    original = info.get("original", {})
    for mod in top.modules():  # modules fx traced through, norm subclasses and Conv1D (leaf modules are fixed by shrink-params)
        for types, fix in TRACED_THROUGH_FIXES:
            if isinstance(mod, types):
                fix(mod, {})
        hf.fix_conv1d(mod)
    follow_widths(top, original)
    follow_literals(top, model, out.meta.get(LITERAL_MOVES, ()))
    _own_data(top, model)
    return top, ""


def _hooks_follow(top: torch.nn.Module, model: torch.nn.Module) -> None:
    """Hooks that are methods of a module of the user's model (or of a copy graphprune made of
    one while tracing and pruning) call the module of the same name in ``top``: the user's
    ``self.head.register_forward_hook(self._save)`` fills the pruned model's ``feats``, not the
    original's."""
    from .trace import copy_of

    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    mine = dict(top.named_modules(remove_duplicate=False))
    copies = {}
    for mod in list(mine.values()):
        for attr in HOOK_DICTS:
            for h in (mod.__dict__.get(attr) or {}).values():
                owner = getattr(h, "__self__", None) if inspect.ismethod(h) else None
                name = names.get(id(copy_of(owner))) if isinstance(owner, torch.nn.Module) else None
                if name is not None and name in mine and mine[name] is not owner:
                    copies[id(owner)] = mine[name]
    rebind_hooks(copies, mine.values())


def _submodule(out: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return out.get_submodule(name)
    except AttributeError:
        return None  # the graph never runs it: dce dropped it (put back by _restore_unrun)


def _restore_unrun(top: torch.nn.Module, model: torch.nn.Module) -> None:
    """Put back, as unchanged copies, the user's modules the pruned graph dropped because
    its forward never runs them (``dce``): the module form is the user's class, whose
    code may name them in another mode (``trains`` checks they take the pruned widths)."""
    import copy

    for name, mod in model.named_modules():
        if not name:
            continue
        owner, _, attr = name.rpartition(".")
        try:
            parent = top.get_submodule(owner) if owner else top
        except AttributeError:
            continue  # inside a module restored whole already
        if parent._modules.get(attr) is None:
            parent._modules[attr] = copy.deepcopy(mod)
            theirs = model.get_submodule(owner)._modules if owner else model._modules
            # in the user's order: an nn.Sequential runs its members in the order of its dict
            parent._modules = {k: parent._modules[k] for k in [*theirs, *parent._modules] if k in parent._modules}


@widened_on_rounding
def differs(top: torch.nn.Module, out: torch.nn.Module, args: tuple, kwargs: dict, *, params: bool = True,
            original: torch.nn.Module | None = None) -> str | None:
    """None if the module form computes what the pruned graph computes on the
    example and on a second input shape the graph accepts and ``original`` (the
    user's model, run on a shadow) takes: a graph can be more lenient than the code
    it was traced from (it read rows 0 and 1 of a GNN's (2, E) edge list, which
    grown to (3, E) no longer unpacks as ``src, dst = edge_index``)."""
    added = _added(out)
    if added:
        return f"the pruned graph computes {added}, which the model's forward does not: they agree only on some inputs"
    mine = hf.example_kwargs(top, kwargs) or {}  # the graph was traced without a KV cache: compare logits alone
    with evaluating(top, out), on_copies(top, out, params=params):
        try:
            with _layer_outputs(out) as theirs:
                ref = _run(out, args, kwargs)
            with _layer_outputs(top) as ours:
                bad = mismatch(_run(top, args, mine), ref)
        except Exception as e:  # noqa: BLE001 - the user's forward cannot run the pruned tree
            return f"the model's forward fails on the pruned modules: {type(e).__name__}: {first_line(e)[:200]}"
        bad = bad or _layer_mismatch(ours, theirs)
        if bad:
            return f"the model's forward gives other outputs than the pruned graph ({bad})"
        for other, other_kw in other_inputs(tuple(args), kwargs):
            try:
                ref = _run(out, other, other_kw)
            except Exception:  # noqa: BLE001 - a shape the model does not take
                continue
            if original is not None and not _takes(original, other, other_kw, params=params):
                continue
            try:
                bad = mismatch(_run(top, other, hf.example_kwargs(top, other_kw) or {}), ref)
            except Exception as e:  # noqa: BLE001
                shapes = [tuple(t.shape) for t in tree_leaves((other, other_kw)) if isinstance(t, torch.Tensor)]
                return (f"the model's forward fails on the pruned modules at another input shape {shapes}: "
                        f"{type(e).__name__}: {first_line(e)[:200]}")
            return f"at another input shape the model's forward differs from the pruned graph ({bad})" if bad else None
    return None


def _added(out: torch.nn.Module) -> str | None:
    """What an op ``shrink-params`` put in the pruned graph computes, where one is there: a max
    over channels clamped at 0 for the removed zeros agrees with the model's own ``amax`` on
    every input where a kept channel is positive, and on no other (survey 36 F01), so no
    comparison on random inputs may stand for it."""
    from .meta_keys import ADDED

    graph = getattr(out, "graph", None)
    for n in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
        if ADDED in n.meta:
            return f"{n.meta[ADDED]} at {n.name}"
    return None


def _takes(model: torch.nn.Module, args: tuple, kwargs: dict, *, params: bool = True) -> bool:
    """Whether the user's ``model`` runs on these inputs: on a shadow in eval mode, on copies of
    its buffers and (where its forward writes them, ``params``) its parameters, so no state of
    theirs moves (Glow's ActNorm initialises its parameters on its first call)."""
    from .trace import in_eval, shadow

    copy = in_eval(shadow(model, own_buffers=True))
    try:
        with torch.no_grad(), on_copies(copy, params=params):
            _run(copy, args, kwargs)
        return True
    except Exception:  # noqa: BLE001
        return False


@contextmanager
def _layer_outputs(model: torch.nn.Module):
    """{module path: [output of each call]} of every module that holds parameters of its own,
    filled while the block runs. A graph that calls the user's modules (a symbolic trace)
    and the user's forward on the same pruned modules must agree layer by layer, not just
    at the output: a literal head count left in the user's code (``view(b, t, 4, -1)``
    after heads went), or a mean over a pruned dim, was 4% off inside and 2e-6 at an
    output behind a 1e-4 layer scale, under the output's tolerance."""
    from torch.utils._pytree import tree_leaves

    seen: dict[str, list] = {}

    def keep(name):
        return lambda mod, inp, out: seen.setdefault(name, []).append(
            [(_digest(t), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()])

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()
               if n and any(t is not None for t in m._parameters.values())]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _digest(t: torch.Tensor) -> torch.Tensor:
    """(projection on a fixed random unit-variance direction, L2 norm) of a layer's output, in
    float64: two numbers per call instead of a copy of every activation (an LLM's would not
    fit twice). A difference of relative size d moves the projection by about d times the
    norm, whatever the size of the output, so both are held to 1e-4 of the norm."""
    t = t.detach().double()
    g = torch.Generator(device=t.device).manual_seed(t.numel())
    r = torch.randn(t.shape, generator=g, dtype=torch.float64, device=t.device)
    return torch.stack([(t * r).sum(), t.norm()]).cpu()


def _layer_mismatch(ours: dict, theirs: dict) -> str | None:
    """The first layer whose outputs differ, where both ran it equally often."""
    for name, calls in ours.items():
        ref = theirs.get(name)
        if ref is None or len(ref) != len(calls):
            continue  # the graph inlined it, or runs it otherwise: the outputs decide
        for got, want in zip(calls, ref):
            if len(got) != len(want):
                return f"inside {name}: {len(got)} outputs instead of {len(want)}"
            for (a, _), (b, dtype) in zip(got, want):
                tol = tolerance(dtype) * float(b[1]) + 1e-12
                if not (abs(float(a[0] - b[0])) <= tol and abs(float(a[1] - b[1])) <= tol):  # NaN fails too
                    return rounding_noted(f"inside {name}: its output differs (a random projection {float(a[0]):.4g} "
                                          f"instead of {float(b[0]):.4g})", dtype in HALF)
    return None


@widened_on_rounding
def trains(model: torch.nn.Module, top: torch.nn.Module, args: tuple, kwargs: dict, unseen: list[str], *,
           kept: dict | None = None, pruned: torch.nn.Module | None = None, params: bool = True) -> str | None:
    """Why the module form cannot be trusted in training mode, or None.

    The trace saw the forward in one mode; the user fine-tunes the result in
    training mode, where the user's forward can take paths the trace never saw:
    GoogLeNet's auxiliary heads read pruned activations with their old input
    widths, and a centring ``if self.training: h = h - h.mean(1)`` averages over
    pruned channels (0.045 off its dead twin, survey 18). So both run in training
    mode on the example and on one more sample (``_one_more``): the module form,
    and the original on a shadow (``trace.shadow``) holding the pruned graph's
    tensors (``pruned``, refit included) where ``kept`` names them and zeros
    elsewhere, its dead twin. Dropout is switched off (``_no_dropout``), batch
    norms keep their running statistics (``_stats_frozen``), both draw from one
    seed. Both run on copies of their tensors (parameters too where ``params``: the
    forward writes to them), so neither the user's model nor the result changes.
    Without ``kept`` (a twin zeroed weights cannot state: experts no token is
    routed to) the module form need only run where the original does. Where the
    original itself cannot run so (Inception-v3's auxiliary head at 160x160, a
    detector without targets; or it is too large to copy), nothing is compared,
    and modules the trace never ran (``unseen``) are refused: nothing shows they
    take the pruned widths."""
    from .trace import shadow
    from .verify import why_not

    if not unseen and not reads_mode(model):
        return None  # no code of the model's own asks which mode it is in: the paths are the traced ones
    cannot = why_not(model)
    if cannot is None:
        theirs = shadow(model, own_params=_overrides_train(model))
        dead = _dead(theirs, kept, pruned) if kept is not None else {}
        # the example and one more, different sample, as the eval checks take another batch (a branch
        # on the batch size that only training reaches); batch norms keep their running statistics
        ran = False
        for args, kwargs in [(tuple(args), kwargs), _one_more(args, kwargs)]:
            mine = hf.example_kwargs(top, kwargs) or {}
            try:
                checked = _trained_alike(theirs, top, dead, args, mine, kwargs, kept, params)
            except TrainSwitchFails as e:
                return str(e)
            if isinstance(checked, str):
                return checked
            if checked is None:
                cannot = cannot or "the original fails in training mode on the example"
                continue
            ran = True
        if ran:
            return None
    if cannot is None or not unseen:
        return None
    return (f"modules with weights that the traced forward never runs ({', '.join(unseen[:4])}"
            f"{', ...' if len(unseen) > 4 else ''}) could not be checked in training mode ({cannot}), and in the "
            "model's own classes they would run on pruned widths; delete them from the model to keep its classes")


def _trained_alike(theirs, top, dead: dict, args: tuple, mine: dict, kwargs, kept, params: bool):
    """One case of ``trains``: the reason the module form fails it (a str), True where it passes, None where
    the original itself does not run so. ``TrainSwitchFails`` where a ``train()`` raises."""
    from .verify import _shapes

    with _beside_twin(theirs, top, dead, train=True, params=params):
        try:
            ref = _run(theirs, args, mine if kept is not None else kwargs)
        except Exception:  # noqa: BLE001 - the original does not run so either: nothing to hold the result to
            return None
        try:
            got = _run(top, args, mine)
        except Exception as e:  # noqa: BLE001
            return (f"{TRAIN_FAILS} ({type(e).__name__}: {first_line(e)[:160]}): it takes a path the trace did "
                    "not see (modules that run only in training, such as auxiliary heads; delete them from the "
                    "model, e.g. model.aux1 = None, to keep its own classes)")
    bad = mismatch(got, ref, TRAIN_RTOL) if kept is not None else None
    if bad and _rounding(ref, theirs, top, dead, args, mine, params):
        return True  # batch statistics over a few values made rounding of it (``_rounding``): nothing to compare
    if bad:
        return (f"{TRAIN_PATH} on inputs {_shapes(args)} ({bad}): it takes a path in training mode that the "
                "trace (in eval mode) did not see, and that path reads the pruned channels")
    return True


def _overrides_train(model: torch.nn.Module) -> bool:
    """Whether a class of ``model`` overrides ``train()``: the checks switch the twin's mode, and such an
    override may edit a weight in place, which the twin shared with the user's model (a bias moved by 2.0,
    survey 69 F3); its twin then holds copies of the weights."""
    return any(type(m).train is not torch.nn.Module.train for m in model.modules())


def reads_mode(model: torch.nn.Module) -> bool:
    """Whether code of the model's own classes (not ``torch.nn``'s, whose training-mode work is
    dropout and batch statistics, one channel at a time), or a function their forward calls,
    mentions ``training``, or a class overrides ``train``: only such code can take another path
    in training mode. A class without source counts as reading it. Where
    none does, the training-mode comparison is skipped: on ViT-H/14 it copied 2.5 GB of weights
    for a twin, and the suite's largest models ran out of memory."""
    return any(_reads_mode(type(m)) for m in model.modules())


@functools.lru_cache(maxsize=None)
def _reads_mode(cls: type) -> bool:
    if cls.__module__.startswith("torch.nn.") or issubclass(cls, torch.fx.GraphModule):
        return False  # a trace baked the mode in (its generated class has no source, which counted as asking)
    own = [k for k in cls.__mro__ if k is not object and not k.__module__.startswith("torch.nn.")]
    if any("train" in vars(k) for k in own):  # train() overridden: it may set what forward reads (self.fast = not mode)
        return True
    try:
        if any("training" in source.getsource(k) for k in own):
            return True
    except (OSError, TypeError):
        return True
    # or a function forward calls reads it off the module (mode_of(self)): survey 20
    return any("training" in source.getsource(fn) for fn, _ in source.reached(cls))


def _fixed_dims(example, refused) -> list[tuple[list, int]]:
    """(dims, the example's size) of each size a refused input changed (``refused``: sizes torch.export
    fixed, which the graph refuses and the model takes). Dims that change together in a refused input
    (a mask with its sequence) go together."""
    base = [t.shape for t in tree_leaves((tuple(example[0]), dict(example[1] or {}))) if isinstance(t, torch.Tensor)]
    found: dict = {}
    for a, k in refused:
        shapes = [t.shape for t in tree_leaves((tuple(a), dict(k or {}))) if isinstance(t, torch.Tensor)]
        if len(shapes) != len(base) or any(len(x) != len(y) for x, y in zip(shapes, base)):
            continue
        changed: dict = {}
        for i, (x, y) in enumerate(zip(shapes, base)):
            for d, (m, n) in enumerate(zip(x, y)):
                if m != n and n > 0:
                    changed.setdefault((n, m), []).append((i, d))
        for (n, _), dims in changed.items():
            found.setdefault(tuple(dims), n)
    return [(list(dims), n) for dims, n in found.items()]


def _past_refused(example, refused) -> list[tuple]:
    """(args, kwargs, what): the example with each size torch.export fixed (``_fixed_dims``; only for
    an exported graph, one torch.fx traced fixes none) at twice the example's size. The self-check's other sizes are smaller than the example's, and a loop over
    a length (``for _ in range(T - 5)``, none at the example's 5 tokens and none at 4) ran a centring
    over pruned channels only above it: the module form came back 0.26 off its twin at 7 tokens
    (survey 51 F01)."""
    from .verify import _named, symbol_at

    return [(*symbol_at(example[0], example[1] or {}, dims, 2 * n),
             f"(twice the example's size in {_named(dims)}, which the traced graph fixed)")
            for dims, n in _fixed_dims(example, refused)]


LADDER = 4  # a length the module form is also run at, in multiples of the example's (twice: ``at_twice``)
CROSSINGS = 1  # kept widths above the example's length whose sizes (k and k + 1) a length is also tried at
LADDER_ELEMENTS = 1 << 18  # input elements a run on the ladder may hold: 1 MB of float32
# the longest length the ladder runs: what a run costs grows with the length (attention with its square), not
# with the input's elements (token ids): a 1024-token example ran 4096 tokens, and compile took 3x (survey 53 F04)
LADDER_LENGTH = 256


def _farther(example, symbolic, refused, bounded, kept: dict, model: torch.nn.Module, pruned=None) -> list[tuple]:
    """(args, kwargs, what): each length of the example that torch.export left symbolic or fixed (but
    the batch) at ``LADDER`` times its size, and at each of the ``CROSSINGS`` smallest widths the
    pruning kept above it, k and k + 1, where the bounds take them and the input stays under
    ``LADDER_ELEMENTS`` and ``LADDER_LENGTH``. A Python loop whose count grows slowly with a length
    (``range(int(log2(T)) - 4)``) first ran a centring over pruned channels at 32 tokens, an 8-token
    example's twice did not reach it, and the module form came back 0.75 off its twin there;
    a length compared with a width inside tensor ops (``arange(T) < h.shape[-1]``, ``T % h.shape[-1]``)
    turns at the kept width in the module form and at the original in its twin, and no guard names it
    (survey 52). Sizes other than these are not tried: a path that runs only at a length the ladder
    misses (``while n > 8: n //= 2`` landing on 5) is not seen (README, Known limits).
    Where the graph froze a kept width the code reads as a number (``FROZEN_WIDTHS``: a graph torch.fx
    traced, whose every dim takes any size), the model's own code reads the kept width live: each
    dim of each input but the batch is tried at those widths and one more."""
    from .verify import _named, _other_symbols, main_index, symbol_at

    args, kwargs = tuple(example[0]), dict(example[1] or {})
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    total = sum(t.numel() for t in tensors)
    highs = {tuple(dims): hi for _, hi, dims in bounded or [] if hi is not None}
    shapes = {name: tuple(t.shape) for name, t in model.named_parameters(remove_duplicate=False)}
    widths = sorted({len(idx) for (name, axis), idx in kept.items()
                     if name in shapes and axis < len(shapes[name]) and len(idx) < shapes[name][axis]})
    groups: dict = {tuple(dims): n for dims, n in _other_symbols(args, kwargs, symbolic)}
    for dims, n in _fixed_dims(example, refused) if symbolic is not None else ():  # an exported graph's fixed dims
        groups.setdefault(tuple(dims), n)
    read = (pruned.meta.get(FROZEN_WIDTHS) if pruned is not None else None) or []
    lengths = {((i, d),): t.shape[d] for i, t in enumerate(tensors) for d in range(1, t.dim())} if read else {}
    main = main_index(tensors)
    batch = {(main, 0)} if main is not None else set()
    cases = []
    for dims, n in [*groups.items(), *((dims, n) for dims, n in lengths.items() if dims not in groups)]:
        if n < 1 or batch & set(dims):  # an empty dim stays empty; the batch has checks of its own
            continue
        on_ladder = dims in groups
        crossing = [k for k in (widths if on_ladder else read) if k + 1 > n][:CROSSINGS]
        sizes = sorted({*([LADDER * n] if on_ladder else []), *crossing, *(k + 1 for k in crossing)} - {n, 2 * n})
        for size in sizes:
            if size > min(highs.get(dims, size), LADDER_LENGTH) or total * size / n > LADDER_ELEMENTS:
                continue
            what = "times the example's size" if size == LADDER * n else "a kept width, or one more"
            cases.append((*symbol_at(args, kwargs, list(dims), size),
                          f"({_named(list(dims))} at {size}: {LADDER if size == LADDER * n else ''}"
                          f"{' ' if size == LADDER * n else ''}{what})"))
    return cases


def _one_more(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with one more sample, unlike the first: a copy of it, as ``verify.other_inputs``
    grows a batch, is a batch BatchNorm normalises to zeros in training mode (its variance is 0),
    and a centring over channels then hid behind it (survey 19)."""
    from torch.utils._pytree import tree_map

    def grow(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return x
        other = x[:1] * 0.5 if x.is_floating_point() else (x[:1].roll(1, -1) if x.dim() >= 2 else x[:1])
        return torch.cat([x, other], 0)

    return tree_map(grow, (tuple(args), dict(kwargs or {})))


@widened_on_rounding
def beyond(model: torch.nn.Module, top: torch.nn.Module, example, bounded: list | None, *,
           kept: dict | None, pruned: torch.nn.Module, params: bool = True, refused=(), symbolic=None,
           traced=None, turns=()) -> str | None:
    """Why the module form cannot be trusted on inputs the trace did not cover, or None.

    The user's forward runs whatever it is called with; the trace saw one path.
    - torch.export bounds a symbolic dim the code branches on (``if x.shape[0] > 4`` at
      batch 2 gives batch in [2, 4]: ``trace._bounded_dims``). The graph refuses a batch of
      8; the user's forward takes it, down the other branch: a centring there over pruned
      channels was 0.04 off its dead twin (survey 18). So each bound is stepped past.
    - A keyword flag the example left at its default (``normalize=False``) is flipped: the
      exported graph fixed it, the user's forward branches on it (0.05 off).
    - Sizes the model takes and the traced graph refuses (``refused``: torch.export fixed a
      batch the code tests, ``>= 3`` at batch 2): the module form alone can take them.
    - Batch sizes either side of each size test in the code (``x.shape[0] > 4``): behind a
      question the tracer answered wrongly the test left no bound to step past.
    - Each size where an equality guard of the exported graph turns (``turns``: ``x.shape[1] == 64`` at 12
      is ``Ne(s1, 64)``, a guard and no bound; ``h.shape[-1] == T`` with h 32 wide turns at 32, and the
      module form, 16 wide, took that branch at 16 instead: 0.44 off, survey 44 F1).
    - Each other symbolic input dim at twice its size, where the bounds take it (``h / min(h.shape[-1], T)``
      agrees with its twin up to the pruned width, survey 44 F2).
    - Each other symbolic input dim of the exported graph (``symbolic``) at 1, which torch.export
      never guards (``if x.shape[1] == 1``: one token takes another branch).
    - Input sizes on the far side of each test of a size other than the batch (``h.shape[-1] > 8``
      at an 8-wide example: 9 wide; ``_tested_sizes``, scaled by the sizes ``traced`` holds):
      behind a question the tracer answered wrongly, or in a dim torch.export fixed, no bound says so.
    On each such input the module form is held to its dead twin (``_dead``: the original's
    own forward, removed slices zeroed) where the original takes it."""
    from .trace import shadow
    from .verify import _shapes, at_size_one, at_twice, why_not

    if kept is None or example is None or why_not(model) is not None:
        return None
    flags, batches = _other_settings(model, example), _tested_batches(model, example)
    cases = _past_bounds(example, bounded or [], turns or []) + flags + batches + (
        _other_layout(example) if source.reads_layout(model) else []) + _padded(model, example) + [
        (tuple(a), dict(k), "(a size the traced graph refuses)") for a, k in refused] + (
        _past_refused(example, refused) if symbolic is not None else []) + (
        _farther(example, symbolic, refused, bounded, kept, model, pruned)) + [
        (a, k, f"({what})") for what, a, k in at_size_one(example[0], example[1], symbolic)] + [
        (a, k, f"({what})") for what, a, k in at_twice(example[0], example[1], symbolic, bounded)] + (
        _tested_sizes(model, example, traced) if traced is not None else [])
    if flags and batches:  # `if not fast and x.shape[0] > 4`: the last setting case (all at once) at each tested batch
        cases += _tested_batches(model, flags[-1][:2], flags[-1][2])
    if not cases:
        return None
    theirs = shadow(model, own_params=_overrides_train(model))
    dead = _dead(theirs, kept, pruned)
    modes = (False, True) if reads_mode(model) else (False,)  # else training mode runs what eval mode does
    widths = _pruned_output_dims(theirs, top, dead, example, params)
    for (args, kwargs, what), train in ((case, train) for case in cases for train in modes):
        mine = hf.example_kwargs(top, kwargs) or {}
        try:
            with _beside_twin(theirs, top, dead, train=train, params=params):
                try:
                    ref = _run(theirs, args, mine)
                except Exception:  # noqa: BLE001 - the original does not take it either
                    continue
                try:
                    got = _run(top, args, mine)
                except Exception as e:  # noqa: BLE001
                    return (f"the model's forward fails on the pruned modules at inputs {_shapes(args)} {what}"
                            f"{' in training mode' if train else ''} ({type(e).__name__}: {first_line(e)[:160]})")
        except TrainSwitchFails as e:
            return str(e)
        bad = _alike_where_shaped_alike(got, ref, TRAIN_RTOL if train else 0.0, widths)
        if bad and train and _rounding(ref, theirs, top, dead, args, mine, params):
            continue  # batch statistics over a few values made rounding of it (``_rounding``): nothing to compare
        if bad:
            return (f"at inputs {_shapes(args)} {what}{' in training mode' if train else ''}, the model's forward on "
                    f"the pruned modules {TWIN_DIFFERS} ({bad}): the trace did not see the path its code takes there, "
                    "and that path reads pruned channels")
    return None


@contextmanager
def _beside_twin(twin: torch.nn.Module, top: torch.nn.Module, dead: dict, *, train: bool, params: bool):
    """The dead twin (``twin`` holding ``dead``) and the module form, ready to run side by side in
    one mode, on copies of their tensors: in training mode with dropout off and batch norms on
    their running statistics (``_no_dropout``, ``_stats_frozen``)."""
    from .verify import swapped

    mode = (training(twin, top), _stats_frozen(twin, top), _no_dropout()) if train else (evaluating(twin, top),)
    with contextlib.ExitStack() as stack:
        for ctx in (*mode, swapped(twin, dead), on_copies(twin, top, params=params)):
            stack.enter_context(ctx)
        yield


def _alike_where_shaped_alike(got, ref, rtol: float = 0.0, widths: tuple | None = None) -> str | None:
    """``mismatch`` over the outputs whose shapes agree: a flag that returns features
    (``return_features=True``) returns them at the pruned width, as it should. ``widths``: how many
    outputs the example gave, and the (output, dim) pairs that differ there (``_pruned_output_dims``),
    where a shape may differ; a dim that differs elsewhere is a mismatch (a sequence cut to 4 where the
    original cut it to 8 had been compared nowhere, survey 49 F1). Outputs of another structure than
    the example's (a flag that adds the features) are compared where shaped alike, as before."""
    from .verify import flatten

    a, b = flatten(got), flatten(ref)
    if len(a) != len(b):
        return mismatch(got, ref, rtol)
    same = []
    for i, (x, y) in enumerate(zip(a, b)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape != y.shape):
            same.append(i)
        elif widths is not None and widths[0] == len(a) and (x.dim() != y.dim() or any(
                p != q and (i, d) not in widths[1] for d, (p, q) in enumerate(zip(x.shape, y.shape)))):
            return f"output {i} is {tuple(x.shape)} where the original's is {tuple(y.shape)}"
    return mismatch([a[i] for i in same], [b[i] for i in same], rtol)


def _pruned_output_dims(theirs, top, dead: dict, example, params: bool) -> tuple | None:
    """(how many outputs, the (output, dim) pairs whose sizes the pruning changed): where the module form's
    outputs and its dead twin's differ in size at the example (None where either fails there, or an output
    differs in rank: every shape may differ)."""
    from .verify import flatten

    args, kwargs = tuple(example[0]), dict(example[1])
    mine = hf.example_kwargs(top, kwargs) or {}
    try:
        with _beside_twin(theirs, top, dead, train=False, params=params):
            ref, got = _run(theirs, args, mine), _run(top, args, mine)
    except Exception:  # noqa: BLE001
        return None
    pairs = [(x, y) for x, y in zip(flatten(got), flatten(ref))]
    if any(isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() != y.dim() for x, y in pairs):
        return None
    return len(pairs), {(i, d) for i, (x, y) in enumerate(pairs) if isinstance(x, torch.Tensor)
                        and isinstance(y, torch.Tensor) for d, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q}


def _other_layout(example) -> list:
    """The example's float tensors asking for gradients and laid out transposed in memory: a
    forward that branches on ``x.requires_grad`` or ``x.is_contiguous()`` took the other path
    when fine-tuned, or fed a permuted tensor, 0.09 off its twin (survey 20)."""
    from torch.utils._pytree import tree_map

    def other(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        t = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.detach().clone()
        return t.requires_grad_(True)

    args, kwargs = tree_map(other, (tuple(example[0]), dict(example[1])))
    return [(args, kwargs, "(its inputs asking for gradients, laid out transposed)")]


def _padded(model: torch.nn.Module, example) -> list:
    """(args, kwargs, what) with an attention mask that pads the first sequence's second half, for a
    Hugging Face model whose forward takes ``attention_mask`` and whose example masks nothing: a
    materialised mask sends attention down paths an unmasked SDPA call skips, which read the head
    counts the module form set (Qwen3-Next's ``num_key_value_groups``, 6 for 3, failed every masked
    call, survey 45 F1). Padding at the end leaves every query a key it may read."""
    if not hf.is_hf(model) or not example[0]:
        return []
    ids, kwargs = example[0][0], dict(example[1])
    try:
        takes = "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    given = kwargs.get("attention_mask")
    if (not takes or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] < 2
            or (given is not None and not (isinstance(given, torch.Tensor) and bool((given == 1).all())))):
        return []
    mask = torch.ones_like(ids)
    mask[0, ids.shape[1] // 2:] = 0
    return [(tuple(example[0]), {**kwargs, "attention_mask": mask}, "(an attention mask with padding)")]


def _tested_batches(model: torch.nn.Module, example, what: str = "") -> list:
    """(args, kwargs, what) at each batch size either side of a size test in the forward
    (``source.batch_sizes``): a test behind a question the tracer answered wrongly left no bound."""
    return [(a, k, f"{what} (batch {n}, a size the code tests)".lstrip())
            for n, a, k in source.tested_batches(model, tuple(example[0]), dict(example[1]))]


MAX_SIZES = 6  # input sizes tried past the code's tests of sizes other than the batch, nearest the example's first
SIZE_LIMIT = 4  # ... and none over this many times the example's


def _tested_sizes(model: torch.nn.Module, example, traced) -> list:
    """(args, kwargs, what) with dims of the example's main input (its first tensor of the most dims)
    moved to the far side of each integer the code compares a non-batch size with
    (``source.other_size_constants``): all its dims after dim 1 at once where they are equal (an
    image's height and width), then each dim alone, ``MAX_SIZES`` in all, each plan's nearest the
    example's in ratio first. A size in the graph that is not the input's scaled (a 4-channel
    width at a 32-wide input, taken for a scale of 8) adds sizes to try, which come before those
    of the real scale where they are nearer: 40 and 48 had taken the four tries, so 20 and 16, where
    ``h.shape[-1] < 5`` turns, went untried (survey 31 f12); the plans no longer share the tries
    ahead of sizes.

    The size tested is often an intermediate's, down-sampled from the input's by a power of two
    (``h.shape[-1] == 7`` at the end of a 224-pixel network), so each scale ``r`` that takes the
    input's size ``s`` to a size ``s / r`` some tensor of the traced graph has is tried: the input
    at ``r`` times the far side of the test. Other inputs' dims of size ``s`` follow (a mask its
    sequence). At an 8-wide example ``h.shape[-1] > 8`` ran the other branch from 9 wide, where the
    module form centred over its pruned channels: 0.004 off its twin, with nothing checking it."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from .meta_keys import VAL

    constants = source.other_size_constants(model)
    leaves, spec = tree_flatten((tuple(example[0]), dict(example[1])))
    tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    if not constants or not tensors:
        return []
    main = max(tensors, key=lambda i: leaves[i].dim())  # max keeps the first of the most dims
    shape = tuple(leaves[main].shape)
    held = {d for n in traced.graph.nodes if isinstance(n.meta.get(VAL), torch.Tensor)
            for d in n.meta[VAL].shape[1:] if isinstance(d, int) and d > 1}
    plans = ([tuple(range(2, len(shape)))] if len(shape) > 3 and len(set(shape[2:])) == 1 else [])
    plans += [(d,) for d in range(1, len(shape))]
    found = {}
    for k, dims in enumerate(plans):
        s = shape[dims[0]]
        scales = {s // m for m in held | {s} if m <= s and s % m == 0 and (s // m) & (s // m - 1) == 0}
        for c in constants:
            for r in scales:
                m = s // r
                for new in ((c, c - 1) if m > c else (c, c + 1) if m < c else (c - 1, c + 1)):
                    if 1 <= new * r <= SIZE_LIMIT * s and new * r != s:
                        found.setdefault((dims, new * r), (k, abs(math.log(new * r / s))))
    out = []
    for dims, size in sorted(found, key=lambda key: found[key])[:MAX_SIZES]:
        s, moved = shape[dims[0]], list(leaves)
        for i in tensors:
            t = moved[i]
            for d in (dims if i == main else [d for d in range(1, t.dim()) if t.shape[d] == s]):
                t = t.index_select(d, torch.arange(size, device=t.device) % s)
            moved[i] = t
        args, kwargs = tree_unflatten(moved, spec)
        where = "dims " + ", ".join(map(str, dims)) if len(dims) > 1 else f"dim {dims[0]}"
        out.append((args, kwargs, f"({where} of input {tensors.index(main)} at {size}, past a size the code tests)"))
    return out


def _past_bounds(example, bounded: list, turns: list = ()) -> list:
    """(args, kwargs, what) just past each bound torch.export put on a symbolic input dim, and at each
    size where one of its equality guards turns (``turns``: ``trace._turns``)."""
    from .verify import symbol_at

    args, kwargs = tuple(example[0]), dict(example[1])
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    def now(dims) -> int:
        return tensors[dims[0][0]].shape[dims[0][1]] if dims else 0

    plans = []  # (sizes, dims, what)
    for lo, hi, dims in bounded:
        far = _far(hi, now(dims), tensors)
        # both sides of each bound: past it the user's forward takes the other branch; at it a branch whose test
        # reads a pruned width (``h.shape[-1] * T > 150``) may turn elsewhere in the module form (survey 43 F1)
        plans.append((([hi, hi + 1] if hi is not None and not far else []) + ([lo, lo - 1] if lo > 2 else []), dims,
                      f"(the trace took that size only from {lo} to {hi if hi is not None else 'any'})"))
    for size, dims in turns:  # `x.shape[1] == 64` at 12: the other branch at 64 alone (as far out as a bound)
        if size <= max(source.BATCH_LIMIT, 4 * now(dims)):
            plans.append(([size], dims, "(a size where a test of sizes the trace recorded turns)"))
    # the example's own size is checked already; every input dim of one symbol moves together
    return [(*symbol_at(args, kwargs, dims, size), what) for sizes, dims, what in plans for size in sizes
            if size != now(dims)]


FAR_ELEMENTS = 1 << 21  # input elements a check past a bound may run (8 MB of float32)


def _far(hi: int | None, now: int, tensors: list) -> bool:
    """Whether the size just past an upper bound ``hi`` (on a dim now ``now``) is too far out to run: past
    ``source.BATCH_LIMIT`` and four times the example's size, and holding more than ``FAR_ELEMENTS`` input
    elements. Batch 10**6 took 90 s (survey 21); batch 65 of a (2, 5, 8) example is 2,600 elements, and
    left unchecked it hid a branch at ``x.shape[0] > 64`` that read the pruned width (survey 47 F1)."""
    if hi is None or hi + 1 <= max(source.BATCH_LIMIT, 4 * now):
        return False
    return sum(t.numel() for t in tensors) * (hi + 1) / max(now, 1) > FAR_ELEMENTS


def unchecked_bounds(example, bounded: list | None) -> list[str]:
    """The bounds ``beyond`` does not step past (``_far``), said as "input 0 dim 0 above 64"."""
    if not bounded or example is None:
        return []
    tensors = [t for t in tree_leaves((tuple(example[0]), dict(example[1]))) if isinstance(t, torch.Tensor)]
    return [f"input {dims[0][0]} dim {dims[0][1]} above {hi}" if dims else f"above {hi}" for lo, hi, dims in bounded
            if _far(hi, tensors[dims[0][0]].shape[dims[0][1]] if dims else 0, tensors)]


MAX_SETTINGS = 8  # other values tried per setting: each costs a run of the module form and its twin, in both modes
SETTING_SIZE = 64  # an int compared further out is not tried: `if n > 200_000: raise`, then x.repeat(n, 1), ran 200000 copies


def _other_settings(model: torch.nn.Module, example) -> list:
    """(args, kwargs, what) with each setting of ``forward`` (a keyword the example leaves at its
    default, or a plain value it gives) set to another value the code may branch on
    (``_other_values``), and, where there are several, all set at once (``if normalize and
    centred:`` takes neither flag alone). Not for Hugging Face models: their flags
    (``output_attentions``, ``return_dict``) choose what is returned, not how it is computed."""
    if hf.is_hf(model):
        return []
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    from .trace import is_setting

    args, kwargs = tuple(example[0]), dict(example[1])
    compared, hints = source.compared_constants(model), _hints(model.forward)
    out, firsts = [], {}
    for i, (k, prm) in enumerate(params.items()):
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        if i < len(args):  # a setting the example gives by position (compile(model, (x, Mode.FAST)))
            values = _other_values(args[i], compared.get(k, []) + compared[None]) if is_setting(args[i]) else []
            out += [(args[:i] + (v,) + args[i + 1:], kwargs, f"with {k}={v!r}") for v in values]
        else:
            now = kwargs.get(k, prm.default)
            if now is inspect.Parameter.empty or (k in kwargs and not is_setting(now)):
                continue
            values = _other_values(now, compared.get(k, []) + compared[None], hints.get(k))
            out += [(args, {**kwargs, k: v}, f"with {k}={v!r}") for v in values]
        if values:
            firsts[(i, k)] = values[0]
    if len(firsts) > 1:
        every, named = list(args), dict(kwargs)
        for (i, k), v in firsts.items():
            if i < len(args):
                every[i] = v
            else:
                named[k] = v
        said = ", ".join(f"{k}={v!r}" for (_, k), v in firsts.items())
        out.append((tuple(every), named, f"with {said}"))
    return out


def _hints(fn) -> dict:
    """``fn``'s annotations, resolved where they can be (a string annotation under
    ``from __future__ import annotations``); {} where they cannot."""
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation naming what its module cannot resolve
        return {}


def _other_values(default, compared, hint=None) -> list:
    """Values a setting at ``default`` may take that lead the forward elsewhere: a bool flipped,
    an enum's other members, and what the code compares that name to (``mode == 1``, ``act in
    ("gelu", "silu")``, ``steps > 2``: the constant and its neighbours; an int within
    ``SETTING_SIZE``; a float also midway between two), of the default's type; an int also as its
    truth flipped (``if mode:``); a float also at a half, a quarter, three quarters and twice
    itself, which it may size something by (``int(out * width)``: one fraction can take the
    same units by chance). A
    None default takes the values of the type its annotation names (``norm: Optional[bool] =
    None``: True and False). A string or None the code compares to nothing, unannotated, is left
    alone: there is no value to guess."""
    import enum
    import typing

    if default is None:
        kinds = [t for t in typing.get_args(hint) or (hint,) if isinstance(t, type) and t is not type(None)]
        if not kinds:
            return []
        kind = kinds[0]
        if kind is bool:
            return [True, False]
        if issubclass(kind, enum.Enum):
            return list(kind)[:MAX_SETTINGS]
        return _other_values(kind(), compared)[:MAX_SETTINGS] if kind in (int, float, str) else []
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, enum.Enum):
        return [m for m in type(default) if m is not default][:MAX_SETTINGS]
    numeric = isinstance(default, (int, float))
    seen = []
    for c in compared:
        if c is None or isinstance(c, bool) or (isinstance(c, str) != isinstance(default, str)):
            continue
        near = [c] if isinstance(c, str) else [c, c + 1, c - 1]  # either side of a bound
        if numeric:
            near = [type(default)(v) for v in near if isinstance(default, float) or isinstance(v, int)]
        seen += [v for v in near if v != default and v not in seen]
    if isinstance(default, float):  # between two bounds (0.0 < t < 0.5)
        bounds = sorted({float(c) for c in compared if isinstance(c, (int, float)) and not isinstance(c, bool)})
        seen += [m for m in ((a + b) / 2 for a, b in zip(bounds, bounds[1:])) if m != default and m not in seen]
        # compared or not, a float may size something: a slimmable layer's weight[:int(out * width)] at
        # width=0.5 took the first kept channels, not the first ones (survey 36 F07)
        seen += [m for m in ([default * f for f in (0.5, 0.25, 0.75, 2.0)] if default else (0.5, 1.0)) if m not in seen]
    if isinstance(default, int):
        seen += [v for v in (int(not default), default + 1) if v not in seen]
        seen = [v for v in seen if abs(v) <= max(SETTING_SIZE, 2 * abs(default))]
    return seen[:MAX_SETTINGS]


COLLAPSED = 1e-4  # a training-mode output this small beside the eval-mode one is rounding, not a path


def _collapsed(ref, theirs, top, dead, args, kwargs, params) -> bool:
    """Whether the twin's training-mode output ``ref`` is rounding noise: a norm that keeps batch
    statistics in training (timm's BatchNormAct2d) over one sample and one position makes its output
    zero, and what follows adds rounding (timm's MobileViTv2 at batch 1: 1.4e-8, against 1e-1 in eval
    mode); held to it relatively, every group was blamed and a reachable budget refused (survey 24)."""
    with _beside_twin(theirs, top, dead, train=False, params=params):
        try:
            ev = _run(theirs, args, kwargs)
        except Exception:  # noqa: BLE001 - not comparable: the mismatch stands
            return False
    scale = lambda out: max((float(t.detach().abs().max()) for t in flatten(out)  # noqa: E731
                             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()), default=0.0)
    return scale(ref) < COLLAPSED * scale(ev)


def _rounding(ref, theirs, top, dead, args, kwargs, params) -> bool:
    """Whether a training-mode difference between the module form and its dead twin is rounding:
    the output collapsed to rounding (``_collapsed``), or both agree when run again with every
    floating tensor (weights, buffers, inputs) in float64. Batch statistics over a map of a few
    values amplify a sum in another order without bound where a channel's values nearly agree:
    timm's DenseNet-121 at (1, 3, 32, 64), whose last norms see 1 x 2 maps, was 0.0056 off at
    magnitude 0.42 in float32, in one run and not the next, and the self-check's bisection then
    ran 100 more checks (10 minutes) and kept groups whole. In float64 rounding is 1e-16 and a
    path that reads pruned channels (a centring over them) is as far off as in float32, so that
    verdict stands; so does any difference where the model cannot run in float64 (a dtype its
    code sets) or float64 copies do not fit."""
    if _collapsed(ref, theirs, top, dead, args, kwargs, params):
        return True
    from .verify import _short_of_room, _widened, _widened_inputs

    floats = [t for m in (theirs, top) for t in (*m.parameters(), *m.buffers()) if t.dtype in FLOATS]
    if not floats or _short_of_room(sum(8 * t.numel() for t in floats), floats[0].device) is not None:
        return False
    wide_args, wide_kwargs = _widened_inputs(tuple(args), dict(kwargs or {}), torch.float64, FLOATS)
    runs = {}
    with _beside_twin(theirs, top, dead, train=True, params=params):
        try:
            for name, model in (("twin", theirs), ("top", top)):
                with _OpLog() as narrow:
                    _run(model, args, kwargs)
                with _widened(model, torch.float64, FLOATS), _OpLog() as double:
                    runs[name] = _run(model, wide_args, wide_kwargs)
                if narrow.ops != double.ops:  # code that reads the dtype took another path in float64
                    return False
        except Exception:  # noqa: BLE001 - it does not run in float64: the float32 verdict stands
            return False
    return mismatch(runs["top"], runs["twin"]) is None


FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what the rounding check runs in float64


class _OpLog(TorchDispatchMode):
    """The aten ops a run dispatches, by name: a run in float64 that dispatches other ops than the
    same run in float32 took another path (``if h.dtype == torch.float32: h = h - h.mean(1)``, a
    cast that is a no-op in one dtype only), and its agreement says nothing of the float32 one's
    (survey 53 F01: that centring over pruned channels was 0.38 off its twin, called rounding)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


# batch statistics amplify summing in another order: VGG-19-BN at batch 1 in training mode was 4.8e-6
# off its twin at magnitude 0.5, over the eval check's 1e-4 of scale; the paths it looks for are 1e-2 off
TRAIN_RTOL = 1e-3
TWIN_DIFFERS = "differs from the original with the removed channels zeroed"  # in every message of a twin mismatch
TRAIN_FAILS = "in training mode the model's forward fails on the pruned modules"
TRAIN_PATH = f"in training mode the model's forward on the pruned modules {TWIN_DIFFERS}"


def _dead(model: torch.nn.Module, kept: dict, pruned: torch.nn.Module | None = None) -> dict:
    """{id(parameter): its dead twin}: what ``pruned`` (the pruned graph, named as ``model``) holds,
    put back at the positions ``kept`` ({(name, axis): kept indices}) names, zeros elsewhere. So the
    twin carries what a refit (``reconstruct``) wrote into the kept columns; where ``pruned`` has
    no such tensor, or it does not fit, the original's own is zeroed at the removed positions."""
    theirs = dict(pruned.named_parameters(remove_duplicate=False)) if pruned is not None else {}
    axes: dict = {}
    for (name, axis), idx in kept.items():
        axes.setdefault(name, []).append((axis, torch.as_tensor(idx, dtype=torch.long)))
    state: dict = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        if id(t) in state or (name not in axes and name not in theirs):
            continue
        full = theirs[name].detach() if name in theirs else None
        for axis, idx in sorted(axes.get(name, []), key=lambda a: a[0]):
            if full is None or full.dim() != t.dim() or full.shape[axis] != len(idx):
                full = None
                break
            shape = list(full.shape)
            shape[axis] = t.shape[axis]
            full = full.new_zeros(shape).index_copy_(axis, idx.to(full.device), full)
        if full is None or full.shape != t.shape:  # the original's own, removed slices zeroed
            full = t.detach().clone()
            for axis, idx in axes.get(name, []):
                gone = torch.ones(t.shape[axis], dtype=torch.bool)
                gone[idx] = False
                full.index_fill_(axis, gone.nonzero().flatten().to(full.device), 0.0)
        state[id(t)] = full.to(t.dtype)  # an unpruned tensor is the graph's own: runs are on copies where they write
    return state


@contextmanager
def _stats_frozen(*roots):
    """Batch and instance norms back in eval mode inside a training-mode comparison (the
    enclosing ``training`` puts them back): they normalise each channel on its own, so they
    cannot read a pruned one, and batch statistics of 2 samples turn rounding into 2e-3
    (ResNet-18 at 32x32, whose last stage is 1x1), which read as a path that differs."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    for root in roots:
        for m in root.modules():  # a subclass with a forward of its own may do more in training: it stays
            if isinstance(m, (_BatchNorm, _InstanceNorm)) and type(m).forward.__module__.startswith("torch.nn."):
                m.training = False
    yield


def _dropouts() -> frozenset:
    F = torch.nn.functional
    names = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
    return frozenset([getattr(F, k) for k in names] + [getattr(torch, k) for k in (
        "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
        "feature_alpha_dropout", "feature_alpha_dropout_") if hasattr(torch, k)])


class _DropoutOff(torch.overrides.TorchFunctionMode):
    """Every dropout the forward calls returns its input, and attention drops nothing. As a
    function mode it sees the call however the code names it: ``F.dropout``, ``nn.Dropout``,
    a captured ``from torch.nn.functional import dropout``, ``torch.dropout``. Patching the
    names in ``torch.nn.functional`` missed the last two, and their masks, drawn over fewer
    channels in the pruned model, differed from the twin's (survey 19 F8). Calls that drop out
    inside (attention, recurrent layers) get a probability of 0 (survey 20: their groups stayed
    whole)."""

    def __init__(self):
        super().__init__()
        self.off = _dropouts()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.off:
            return args[0] if args else kwargs["input"]
        name = getattr(func, "__name__", None)  # F's and torch._C's functions of one name are two objects
        if name in _DROPOUT_ARG:
            at = _DROPOUT_ARG[name](args)
            if len(args) > at:
                args = (*args[:at], 0.0, *args[at + 1:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


# the position of the dropout probability in the calls that drop out inside themselves, where the
# mode cannot reach (it is off while a call it sees runs): nn.MultiheadAttention, nn.LSTM/GRU/RNN's
# _VF calls (packed input: one more argument in front, and a list where the unpacked call has its bias flag)
_DROPOUT_ARG = {
    "scaled_dot_product_attention": lambda a: 4,
    "multi_head_attention_forward": lambda a: 10,
    **{k: (lambda a: 5 if len(a) > 3 and isinstance(a[3], bool) else 6) for k in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}


@contextmanager
def _no_dropout():
    """Dropout off for a training-mode comparison: a pruned layer draws its mask over fewer
    channels than its twin, so the masks differ though the code is right (``_DropoutOff``).
    Noise the code draws itself, over channels, still differs, and keeps the group it touches."""
    with _DropoutOff():
        yield


def unreached(model: torch.nn.Module, traced: torch.fx.GraphModule) -> list[str]:
    """Names of the outermost modules with weights that ``traced`` (a trace of ``model``)
    never calls or reads, by name or, for a tied weight, by identity
    (``passes.dce.unrun_submodules``, what ``dce`` drops): code the trace did not see,
    such as heads that run only in training. The graph's names must be the module
    tree's (a symbolic trace, or ``torch.export``'s unflattened module, which names
    parameters by their paths)."""
    from .passes.dce import unrun_submodules

    return [name for name in unrun_submodules(traced) if any(True for _ in traced.get_submodule(name).parameters())]


@contextmanager
def training(*modules):
    """Training mode for the check, each submodule's own mode restored after. Where the first module's (the
    original's) ``train()`` raises, every module's flag is set instead; where a later one's does (the pruned
    classes cannot run it: a LoRA layer merging its low-rank update), ``TrainSwitchFails`` says why."""
    with kept_modes(*modules):
        for i, mod in enumerate(modules):
            try:
                mod.train()
            except Exception as e:  # noqa: BLE001 - the user's override: the checks say what it means
                if i > 0:
                    raise TrainSwitchFails(f"{TRAIN_FAILS}: its train() raises ({type(e).__name__}: "
                                           f"{first_line(e)[:160]})") from e
                # the original's own train() refuses (a frozen backbone's, or until it is unlocked): every module
                # in training mode by its flag, as the override would leave the rest, is what is checked; the
                # check was skipped, and a head's training path read pruned channels 1.5 off (survey 69 F1)
                for m in modules:
                    for sub in m.modules():
                        try:
                            sub.training = True
                        except Exception:  # noqa: BLE001 - a frozen module that refuses the flag stays as it is
                            pass
                break
        yield


class TrainSwitchFails(Exception):
    """The pruned classes' ``train()`` raised: they cannot be trained as the original is (the message says so,
    as a reason the module form is out)."""


def tree(model: torch.nn.Module) -> dict:
    """{module path: its class}, what ``save`` holds a result to: a module swapped after compile
    (ReLU for GELU, a layer wrapped in a Sequential) has no tensor of another shape to show it."""
    return {path: f"{type(m).__module__}.{type(m).__qualname__}" for path, m in model.named_modules()}


def described(model: torch.nn.Module) -> dict:
    """{module path: its class, and for torch.nn's own layers their settings (``extra_repr``)}: what
    ``load`` holds a fresh original to. Its tensors' shapes say nothing of a GELU where compile saw a
    ReLU, a dilation of 2 or a reflect padding of the same weights: a model built
    ``Net(act_layer=nn.GELU)`` loaded onto ``Net()`` without a word, 0.034 off (survey 31 f02).
    Other classes' ``extra_repr`` prints what no load should compare (a call counter, a buffer that
    prints otherwise on meta, a set in hash order, timm's ``drop_prob`` of a model trained with
    stochastic depth and rebuilt for inference: survey 32), and neither is a dropout's rate."""
    out = {}
    for path, m in model.named_modules():
        name = f"{type(m).__module__}.{type(m).__qualname__}"
        if EVAL_IDENTITY.fullmatch(type(m).__name__) and not any(True for _ in m.parameters()):
            out[path] = "the identity in eval mode"  # nn.Identity where training used DropPath (timm's drop_path_rate)
            continue
        if not type(m).__module__.startswith("torch.nn.") or isinstance(m, _PARAMETER_CONTAINERS):
            out[path] = name  # a ParameterDict prints its tensors' types, which name the device (survey 67 F7)
            continue
        try:
            settings = m.extra_repr()
        except Exception:  # noqa: BLE001 - a module whose repr needs state it lacks (on meta)
            settings = ""
        out[path] = f"{name}({_TRAINING_ONLY.sub('', _ADDRESS.sub('', settings))})"
    return out


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PARAMETER_CONTAINERS = (torch.nn.ParameterDict, torch.nn.ParameterList)  # their tensors' shapes are compared
# settings of torch.nn layers that change training, not what eval mode computes: a BatchNorm's momentum
# (0.01 for fine-tuning refused a stock original, survey 32 f04), an activation's inplace
_TRAINING_ONLY = re.compile(r",?\s*\b(momentum|inplace)=[^,]*")


def record_tree(model: torch.nn.Module) -> None:
    """Note ``tree(model)`` in the record compile leaves on its result, and its plain settings (``settings``),
    so ``save`` can tell those the user changed on the result since (``checkpoint``'s ``settings_after``)."""
    rec = info(model)
    if rec is not None:
        rec["tree"] = tree(model)
        rec["settings"] = settings(model)


def info(model: torch.nn.Module) -> dict | None:
    """What graphprune recorded about how ``model`` was pruned, in either form."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and "graphprune" in meta:
        return meta["graphprune"]
    return model.__dict__.get("_graphprune")


def from_tensors(model: torch.nn.Module, out: torch.nn.Module, info: dict) -> torch.nn.Module:
    """The module form of a model traced with ``torch.export``, whose graph is ATen
    code rather than the model's modules: a copy of the user's module tree holding
    the pruned graph's tensors under the same names, with every attribute that
    states a width fixed (``MODULE_FIXES``, then the Hugging Face table in
    ``hf.py``). ``differs`` then decides whether the user's forward agrees."""
    theirs = {n: t for n, t in [*out.named_parameters(remove_duplicate=False), *out.named_buffers(remove_duplicate=False)]}
    memo: dict = {}
    mine: dict = {}  # id of a user tensor -> what the copy holds in its place

    def tensor(t, name):
        src = theirs.get(name)
        key = id(src) if src is not None else id(t)
        if key not in memo:
            data = (src if src is not None else t).detach()
            data = data if src is not None else data.clone()
            memo[key] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        mine[id(t)] = memo[key]
        return memo[key]

    def copy(m, prefix):
        if id(m) in memo:
            return memo[id(m)]
        c = object.__new__(type(m))  # not type(m).__new__: a GraphModule's makes a fresh class without its forward
        memo[id(m)] = c
        c.__dict__ = fresh_attrs(m.__dict__, memo)
        c._parameters = {k: (None if t is None else tensor(t, prefix + k)) for k, t in m._parameters.items()}
        c._buffers = {k: (None if t is None else tensor(t, prefix + k)) for k, t in m._buffers.items()}
        c.__dict__ = own_tensors(c.__dict__, _cloned(mine))
        c._modules = {k: (None if v is None else copy(v, f"{prefix}{k}.")) for k, v in m._modules.items()}
        return c

    top = copy(model, "")
    rebind_hooks(memo)  # a hook that is a method of the user's module calls its copy
    original = info.get("original", {})
    for name, mod in top.named_modules():
        prefix = f"{name}." if name else ""
        local = {k: original.get(prefix + k) for k in mod._parameters}
        for types, fix in MODULE_FIXES:
            if isinstance(mod, types):
                fix(mod, local)
        hf.fix_module(mod, local)
    follow_widths(top, original)
    follow_literals(top, model, out.meta.get(LITERAL_MOVES, ()))
    if hf.is_hf(model):  # before _own_data: it finds the modules holding the user's config by identity
        hf.update_config(top, model.config, model)
    _own_data(top, model)
    copy_modes(top, model)  # each module's own (frozen BatchNorms, a DataParallel wrapper around an eval model)
    if hf.is_hf(model):
        hf.guard_save_pretrained(top)
    return top


_STATE = {"_parameters", "_buffers", "_modules", "training", *HOOK_DICTS}


def _rebound(fn, memo: dict):
    """``fn`` with every closure cell that holds one of the user's modules or tensors holding the
    result's instead (a lambda over ``self.head``); the same function where none does."""
    import types

    if not all(_filled(c) for c in fn.__closure__):
        return fn
    cells = [c.cell_contents for c in fn.__closure__]
    if not any(id(v) in memo and memo[id(v)] is not v for v in cells):
        return fn
    new = tuple(types.CellType(memo.get(id(v), v)) for v in cells)
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, new)
    out.__kwdefaults__, out.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    return out


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:  # a cell not yet assigned
        return False


def _own_data(top: torch.nn.Module, model: torch.nn.Module) -> None:
    """Plain data a module of ``top`` holds (a dataclass config, nested lists and dicts) copied deep,
    so that setting ``small.cfg.use_dropout`` for fine-tuning does not change how the user's model
    runs: the module tree was copied ``ATTR_DEPTH`` levels deep (``attrs.fresh_attrs``). Modules, tensors,
    classes and callables are not data: a memo maps each of the user's modules and tensors to the
    result's of the same name (a plain list of the user's layers then holds the pruned ones) and
    keeps the rest as they are; an object that cannot be deep-copied stays shared."""
    import copy
    import functools
    import types

    memo: dict = {}
    for tree in (model, top):
        for t in (*tree.modules(), *tree.parameters(), *tree.buffers()):
            memo[id(t)] = t
    for mod in top.modules():  # the result's own copies of plain tensors, held in two places: one tensor still
        for _, _, v in tensor_slots(mod.__dict__, skip=MODULE_STATE):
            for t in (v,) if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]:
                memo[id(t)] = t
    mine = {**dict(top.named_modules(remove_duplicate=False)), **dict(top.named_parameters(remove_duplicate=False)),
            **dict(top.named_buffers(remove_duplicate=False))}
    for name, t in [*model.named_modules(remove_duplicate=False), *model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:
        if name in mine and type(mine[name]) is type(t):  # a list of the user's layers: the result's own layers
            memo[id(t)] = mine[name]
    for mod in top.modules():
        for k, v in list(mod.__dict__.items()):
            if isinstance(v, types.MethodType) and id(v.__self__) in memo:  # self.head_fn = self.head.forward
                mod.__dict__[k] = types.MethodType(v.__func__, memo[id(v.__self__)])
                continue
            if isinstance(v, types.FunctionType) and v.__closure__:  # self.fn = lambda x: self.head(x)
                mod.__dict__[k] = _rebound(v, memo)
                continue
            if (k in _STATE or v is None or isinstance(v, (int, float, str, bytes, torch.nn.Module, torch.Tensor, type,
                                                             types.ModuleType, types.FunctionType, types.BuiltinFunctionType))
                    or (callable(v) and not isinstance(v, functools.partial))):
                continue
            try:
                mod.__dict__[k] = copy.deepcopy(v, memo)
            except Exception:  # noqa: BLE001 - a lock, a file, an object that refuses copies: shared, as before
                pass


# attributes that state a module's own channel width (torchvision's ViT reshapes with self.hidden_dim)
# or head count (Swin's relative position table is (positions, num_heads); MaxViT's is n_heads wide)
# or expert count (a router's weight rows, fused experts' leading dim)
WIDTH_ATTRS = ("hidden_dim", "hidden_size", "embed_dim", "d_model", "dim", "width",
               "num_heads", "n_heads", "n_head", "heads", "num_attention_heads",
               "num_experts", "num_local_experts", "n_routed_experts")


CHANNEL_ATTRS = ("in_channels", "out_channels", "channels", "num_channels", "in_features", "out_features",
                 "in_dim", "out_dim", "inplanes", "planes", "in_chs", "out_chs", "mid_chs", "dim_in", "dim_out",
                 "num_features")
"""Widths a user's own block states (RepVGG's ``self.in_channels``, timm MobileOne's ``self.out_chs``, read by
their reparameterization), followed only on classes outside torch: a torch module's are set by shrink-params
from its own weights (a norm subclass outside torch, timm's BatchNormAct2d, states ``num_features``)."""


def follow_widths(top: nn.Module, original: dict) -> None:
    """A width attribute follows the module's tensors: where it equals the original size
    of a dim of the module's parameters or buffers that shrank, and every such dim shrank
    alike, it takes the new size (where one of them stayed, the attribute stays). The module's own tensors decide; where none shrank, a
    user's block states its channels (``CHANNEL_ATTRS``) through its submodules' tensors,
    where every dim that had that size went to one new size (a Hugging Face attention's
    ``embed_dim`` names the stream, which stays, while its output projection's columns,
    as wide before, shrink with the heads), and a width of another name (timm RepMixer's
    ``dim``) through the channels its own blocks state, where those went to one count: a
    constant such as ``self.width = 2`` that a bottleneck of 2 shares is no width of its
    blocks, and stays (survey 35 F5). A block's ``groups`` follows its grouped convs where it
    was their count and they all went to one, else a channel count it equals. ``differs``
    still decides the forward; this keeps the user's other methods true to the new widths
    (timm's reparameterization reads them)."""
    moved: dict = {}  # module name -> {stated channel count before: after, or None where two went two ways}
    for name, mod in reversed(list(top.named_modules())):  # a block's own blocks first
        if isinstance(mod, nn.RNNBase):  # its widths are its weights' (_fix_rnn): a hidden size of 16 that was
            continue                     # the input's width once became the input's new width (survey 26)
        prefix = f"{name}." if name else ""
        user = not type(mod).__module__.startswith("torch.")
        mine: dict = {}
        stated = _merged([m for n, m in moved.items() if n.startswith(prefix) or not name])
        for attr in WIDTH_ATTRS + CHANNEL_ATTRS if user else WIDTH_ATTRS:
            v = mod.__dict__.get(attr)
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            own = _sizes_of(v, [*mod._parameters.items(), *mod._buffers.items()], prefix, original)
            if v in own and len(own) > 1:  # a dim of that size shrank and another stayed: which one it names, none
                continue                   # can tell (an image width of 16 beside 16 channels, survey 36 F06)
            new = own - {v}
            if not new and user and attr in CHANNEL_ATTRS:  # through its submodules: every dim that was v went alike
                new = _sizes_of(v, [*mod.named_parameters(), *mod.named_buffers()], prefix, original)
                new = new if v not in new else set()
            elif not new and stated.get(v):  # a width its own blocks state went to one count
                new = {stated[v]}
            if len(new) == 1:
                now = mod.__dict__[attr] = new.pop()
                if attr in CHANNEL_ATTRS:
                    mine[v] = now if mine.get(v, now) == now else None
        _follow_groups(mod, prefix, original, user, mine)
        if mine:
            moved[name] = mine


# classes whose attributes are set by their own rules (MODULE_FIXES, hf.fix_module, shrink-params' full-width
# norms), not read off literals: a Conv1D's ``nf`` and a full-width norm's ``full`` are not head counts
_FIXED_ELSEWHERE = ("torch.", "graphprune.", "transformers.")


def follow_literals(top: nn.Module, model: nn.Module, moves) -> None:
    """An attribute a user's module gives a shape call in its forward (``view(B, T, self.n_head, -1)``,
    ``source.shape_reads``) takes the value the literals it gave became: shrink-params rewrote
    ``view(B, T, 8, 64)`` to ``view(B, T, 6, 64)`` in that module's code (``LITERAL_MOVES``), and the
    module's own forward must ask for 6 heads too. Only where every literal of that value in the module's
    code went to one new value: a head count of 8 beside a head_dim of 8 that stayed is ambiguous, and
    stays (``differs`` then says the classes cannot run it). An attribute of the same value read elsewhere
    (a window of 8 in ``dist >= self.window``) is no shape: set to 4, it passed every check at sequences
    of 4 and was 0.46 off at 9 (survey 49 F1). The values are read off the user's ``model``: a module
    form built twice on one pruned graph shares its submodules, whose attributes the first build set."""
    seen: dict = {}
    for scope, before, after in moves:
        seen.setdefault(scope, {}).setdefault(before, set()).add(after)
    for scope, values in seen.items():
        mod, theirs = (_submodule(top, scope), _submodule(model, scope)) if scope else (top, model)
        if mod is None or theirs is None or type(mod).__module__.startswith(_FIXED_ELSEWHERE):
            continue
        reads = source.module_shape_reads(mod)
        for attr, v in list(theirs.__dict__.items()):
            if attr not in reads or not isinstance(v, int) or isinstance(v, bool) or attr not in mod.__dict__:
                continue
            new = values.get(v, set())
            if len(new) == 1 and v not in new:
                mod.__dict__[attr] = next(iter(new))


def _merged(maps: list) -> dict:
    out: dict = {}
    for m in maps:
        for k, v in m.items():
            out[k] = v if out.get(k, v) == v else None
    return out


def _follow_groups(mod: nn.Module, prefix: str, original: dict, user: bool, mine: dict) -> None:
    """A user block's ``groups`` takes its grouped convs' new count where it was their count before (a
    conv that lost whole groups, depthwise, had ``was_out * groups / out`` of them) and they all went to one;
    with no conv to say, a channel count it equals that moved. A ``groups`` that was something else (a
    branch count) stays (survey 35 F2)."""
    groups = mod.__dict__.get("groups")
    if not user or not isinstance(groups, int) or isinstance(groups, bool) or groups <= 1:
        return
    pairs = set()
    for n, c in mod.named_modules():
        if isinstance(c, nn.modules.conv._ConvNd) and c.groups > 1:
            was = original.get(f"{prefix}{n}.weight" if n else f"{prefix}weight")
            if was is None or (was[0] * c.groups) % c.weight.shape[0]:
                return
            pairs.add((was[0] * c.groups // c.weight.shape[0], c.groups))
    if pairs:
        if {before for before, _ in pairs} == {groups} and len({after for _, after in pairs}) == 1:
            mod.__dict__["groups"] = next(iter(pairs))[1]
    elif mine.get(groups):
        mod.__dict__["groups"] = mine[groups]


def _sizes_of(v: int, tensors: list, prefix: str, original: dict) -> set:
    """The sizes now of the dims among ``tensors`` that had size ``v``."""
    new = set()
    for k, t in tensors:
        was = original.get(prefix + k)
        if t is None or was is None or len(was) != t.dim():
            continue
        new |= {now for old, now in zip(was, t.shape) if old == v}
    return new


def _fix_linear(mod, orig):
    mod.out_features, mod.in_features = mod.weight.shape


def _fix_conv(mod, orig):
    """A grouped conv loses whole groups where its groups are narrower than their number
    (``rules.conv``, ``rules.conv_transpose``: depthwise), else channel positions within
    every group; the weights alone cannot tell these apart (one of two groups of 4 outputs,
    or 2 positions of each, leave the same weight), so the rule's choice is made again."""
    w, was = mod.weight, orig.get("weight")
    out_axis, in_axis = (1, 0) if mod.transposed else (0, 1)
    if was is not None and mod.groups > 1:
        cin_g = was[0] // mod.groups if mod.transposed else was[1]
        if cin_g < mod.groups:  # whole groups: the weight's first dim (out, or in when transposed) went by groups
            mod.groups = mod.groups * w.shape[0] // was[0]
    mod.out_channels = w.shape[out_axis] * (mod.groups if mod.transposed else 1)
    mod.in_channels = w.shape[in_axis] * (1 if mod.transposed else mod.groups)


def _fix_bn(mod, orig):
    t = mod.weight if mod.weight is not None else mod.running_mean
    if t is not None:
        mod.num_features = t.shape[0]


def _fix_ln(mod, orig):
    """A LayerNorm over channels that went keeps its statistics over the original width."""
    if mod.weight is None or tuple(mod.weight.shape) == tuple(mod.normalized_shape):
        return
    full = math.prod(mod.normalized_shape)
    mod.__class__ = full_width(type(mod))
    mod.full = getattr(mod, "full", full)
    mod.normalized_shape = tuple(mod.weight.shape)


def _fix_gn(mod, orig):
    if mod.weight is not None and mod.weight.shape[0] != mod.num_channels:
        mod.num_groups = mod.num_groups * mod.weight.shape[0] // mod.num_channels
        mod.num_channels = mod.weight.shape[0]


def _fix_embedding(mod, orig):
    mod.num_embeddings, mod.embedding_dim = mod.weight.shape


def _fix_rnn(mod, orig):
    from graphprune.passes.shrink_params import _fix_rnn as fix

    fix(mod, None, None)


def _fix_transformer(mod, orig):
    """nn.Transformer checks its inputs' width against ``d_model``: the residual stream's, which its first
    encoder layer's feed-forward reads (the attention's inner width, as wide before, may have gone elsewhere)."""
    mod.d_model = mod.encoder.layers[0].linear1.weight.shape[1]


def _fix_encoder(mod, orig):
    """nn.TransformerEncoder turns a padded batch into a nested tensor for its fused path when built with
    ``enable_nested_tensor``, and a pruned layer's attention cannot take one (survey 35 F6): off where a
    layer's attention was pruned."""
    from .modules import PrunedSelfAttention

    if any(isinstance(m, PrunedSelfAttention) for m in mod.modules()):
        mod.use_nested_tensor = False


def _fix_bilinear(mod, orig):
    mod.out_features, mod.in1_features, mod.in2_features = mod.weight.shape


# torch modules fx traces through, whose widths no leaf fix (shrink-params) sets
TRACED_THROUGH_FIXES = [
    ((nn.LayerNorm, nn.RMSNorm), _fix_ln),
    ((nn.Transformer,), _fix_transformer),
    ((nn.TransformerEncoder,), _fix_encoder),
]


MODULE_FIXES = [
    ((nn.Linear,), _fix_linear),
    ((nn.Bilinear,), _fix_bilinear),
    ((nn.RNNBase,), _fix_rnn),
    ((nn.modules.conv._ConvNd,), _fix_conv),
    ((nn.modules.batchnorm._BatchNorm,), _fix_bn),
    ((nn.LayerNorm, nn.RMSNorm), _fix_ln),
    ((nn.GroupNorm,), _fix_gn),
    ((nn.modules.instancenorm._InstanceNorm,), _fix_bn),
    ((nn.Embedding, nn.EmbeddingBag), _fix_embedding),
    ((nn.PReLU,), lambda mod, orig: setattr(mod, "num_parameters", mod.weight.numel())),
    ((nn.Transformer,), _fix_transformer),
    ((nn.TransformerEncoder,), _fix_encoder),
]
