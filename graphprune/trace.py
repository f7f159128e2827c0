"""Capture a model as a torch.fx graph with a shape on every node.

``symbolic_trace`` is tried first: it is fast and keeps ``torch.nn`` modules as
``call_module`` nodes. Models it cannot trace (data-dependent Python control
flow, Hugging Face models) go through ``torch.export`` in non-strict mode,
which gives an ATen graph. Both reach the analysis through ``canon``, which
maps them onto one op vocabulary.

Shapes are propagated on ``meta`` tensors (parameters swapped for meta copies
while the graph runs), so tracing needs neither real compute nor weight memory;
a model whose parameters already live on ``meta`` works the same way.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import functools
from contextlib import contextmanager
import inspect
import io
import logging
import operator
import re
import sys
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.nn.utils.stateless import _reparametrize_module

from . import source
from .attrs import fresh_attrs, own_tensors
from .errors import GraphpruneError
from .meta_keys import BOUNDED_DIMS, EXAMPLE, FIXED_DIMS, GUARD_SIZES, SYMBOLIC_DIMS, VAL
from .modes import copy_modes
from .shuffle import fold_channel_shuffles
from .standins import STANDINS


@dataclass
class Traced:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" or "export"
    symbolic_error: str | None = None  # why symbolic_trace was not used


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
_COPY_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a module copy -> the module it copies


def copy_of(mod: torch.nn.Module) -> torch.nn.Module:
    """The user's module that ``mod`` was copied from (through shadows and clones), or ``mod``."""
    seen = 0
    while mod in _COPY_OF and seen < 64:
        mod, seen = _COPY_OF[mod], seen + 1
    return mod


def rebind_hooks(copies: dict, where=None) -> None:
    """Hooks that are methods of a copied module call the copy ({id(original): copy}).

    A copied module's hook dicts are its own (``fresh_attrs``), but a hook
    registered as ``self.head.register_forward_hook(self._save)`` is a method
    bound to the user's module: run by the copy, it wrote its features into the
    user's model, during the self-check too, and the pruned model's own
    ``feats`` stayed empty. ``where``: the modules whose hooks to look at (the copies)."""
    mods = {k: c for k, c in copies.items() if isinstance(c, torch.nn.Module)}
    for c in {id(c): c for c in (mods.values() if where is None else where)}.values():
        for attr in HOOK_DICTS:
            hooks = c.__dict__.get(attr)
            for k, h in list((hooks or {}).items()):
                if inspect.ismethod(h) and id(h.__self__) in mods:
                    hooks[k] = types.MethodType(h.__func__, mods[id(h.__self__)])
        # a method held as an attribute calls the copy too: ``self.forward = self.forward_split_cat`` (FasterNet)
        # ran the user's module from the shadow, so the trace met weights outside it and took them for constants
        for k, v in list(c.__dict__.items()):
            if k not in HOOK_DICTS and inspect.ismethod(v) and id(v.__self__) in mods:
                c.__dict__[k] = types.MethodType(v.__func__, mods[id(v.__self__)])


def _odd_names(model: torch.nn.Module) -> list[str]:
    """Submodule names that cannot be written as attribute access in Python (a ModuleDict key
    ``"conv-1"``, ``"class"``, ``"my layer"``): fx's generated code has a SyntaxError there.
    Integer keys are fine (fx indexes them)."""
    import keyword

    return [name for name, _ in model.named_modules() if name and any(
        not part.isdigit() and (not part.isidentifier() or keyword.iskeyword(part)) for part in name.split("."))]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Python module graphprune works on: ``torch.compile(model)`` gives its
    ``_orig_mod`` (the pruned result is a plain module; compile it again), and a
    TorchScript or compiled module inside the tree is refused by name (a raw
    RuntimeError from copying a ScriptModule, or a missing attribute of a compiled
    block, were what users saw)."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.modules.lazy import LazyModuleMixin

    if isinstance(model, OptimizedModule):
        model = model._orig_mod
    if not isinstance(model, torch.nn.Module):
        raise GraphpruneError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for name, mod in model.named_modules():
        if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
            raise GraphpruneError(f"{name or 'the model'} ({type(mod).__name__}) has not made its parameters yet: run "
                                  "the model once on an input, then compile it")
        if isinstance(mod, torch.jit.ScriptModule):
            raise GraphpruneError(
                f"{name or 'the model'} is a TorchScript module ({type(mod).__name__}): graphprune reads and rewrites "
                "Python modules; pass the module as it was before torch.jit.script/trace, and script the pruned one")
        if isinstance(mod, OptimizedModule):
            raise GraphpruneError(
                f"{name} is wrapped by torch.compile: pass the model with the plain module ({name}._orig_mod) in its "
                "place, and compile the pruned model")
    return model


def in_eval(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after ``model.eval()``: a ``train()`` override may return None, as Python allows, and
    ``shadow(m).eval()`` then traced None ("cannot trace NoneType", survey 69)."""
    model.eval()
    return model


def shadow(model: torch.nn.Module, *, own_buffers: bool = False, own_params: bool = False) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter but no module object.
    Tracing runs ``forward``: code that assigns attributes (``self.offset +=
    n``, ``self.initialized = True``) then writes to the shadow, never to the
    user's model. With ``own_buffers`` the buffers are copies too: symbolic
    tracing proxies parameters but runs arithmetic on buffers (and tensors held
    as plain attributes) for real, so ``self.step += 1`` would count in the
    user's model. With ``own_params`` the parameters are copies too (as parameters: a ``train()``
    override that edits one in place runs on the copy). A module registered
    twice stays one object."""
    copies: dict = {}
    memo: dict = {}
    attrs: dict = {}  # the containers copied, shared ones once

    def copy(m):
        if id(m) in memo:
            return memo[id(m)]
        c = object.__new__(type(m))  # not type(m).__new__: a GraphModule's makes a fresh class without its forward
        memo[id(m)] = c
        _COPY_OF[c] = m
        c.__dict__ = fresh_attrs(m.__dict__, attrs)
        c._modules = {k: (None if v is None else copy(v)) for k, v in m._modules.items()}
        if own_params:
            c._parameters = {k: (None if p is None else copies.setdefault(
                id(p), torch.nn.Parameter(p.detach().clone(), p.requires_grad))) for k, p in m._parameters.items()}
        if own_buffers:
            c._buffers = {k: (None if t is None else copies.setdefault(id(t), t.clone())) for k, t in m._buffers.items()}
            # tensors held as plain attributes too (a step counter kept as ``self.calls``, not a buffer)
            c.__dict__ = own_tensors(c.__dict__, lambda t, _name: copies.setdefault(id(t), t.detach().clone()))
        return c

    top = copy(model)
    rebind_hooks(memo)
    return without_cache(top)


def without_cache(model: torch.nn.Module) -> torch.nn.Module:
    """A Hugging Face model whose config asks for a KV cache returns it, an object no
    graph output can carry; the shadow gets its own config without it, so the model
    is traced and checked as ``model(ids)`` computes its logits (the module form
    keeps the user's config, and ``generate`` its cache)."""
    mine: dict = {}  # every distinct config (T5's encoder and decoder stacks hold their own)
    for m in model.modules():
        config = m.__dict__.get("config")
        if getattr(config, "use_cache", False) and hasattr(config, "to_dict"):
            if id(config) not in mine:
                mine[id(config)] = copy_module.deepcopy(config)
                mine[id(config)].use_cache = False
            m.__dict__["config"] = mine[id(config)]
    return model


def on_meta(model: torch.nn.Module) -> bool:
    """Whether any weight or buffer of ``model`` is on the meta device (nothing can run it)."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: to_meta(v) for k, v in x.items()}
    return x


# Modules whose output has the input's shape and dtype. On meta tensors their
# kernels run through Python references (BatchNorm about 1.6 ms, ReLU 0.9 ms a
# call); the shape alone is all propagation needs. Convs, linears, adaptive
# pooling and same-dtype broadcasting arithmetic get their shapes from a formula
# too (_module_shape, _BROADCAST_FN); anything else runs its meta kernel.
_SAME_SHAPE = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.LayerNorm, torch.nn.GroupNorm,
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Sigmoid, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Tanh, torch.nn.LeakyReLU, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout2d,
)


_SAME_SHAPE_FN = {
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, torch.nn.functional.relu6,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid, torch.nn.functional.dropout, torch.nn.functional.layer_norm,
    torch.nn.functional.batch_norm,
}


_BROADCAST_FN = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}


def _conv_shape(mod: torch.nn.modules.conv._ConvNd, x: torch.Tensor):
    """The output shape of a (non-transposed) conv module, or None where the formula does not apply."""
    n = len(mod.kernel_size)
    if isinstance(mod.padding, str) or x.dim() != n + 2 or x.shape[1] != mod.in_channels:
        return None  # 'same'/'valid', or a wrong input: let the real meta kernel decide (and raise)
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, p, d, k, s in zip(x.shape[2:], mod.padding, mod.dilation, mod.kernel_size, mod.stride)]
    return (x.shape[0], mod.out_channels, *out)


def _module_shape(mod, x):
    """Output shapes computed from the module's hyperparameters for the layers
    a model is mostly made of (a meta kernel costs about 0.1 ms a call)."""
    t = type(mod)
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if weight is not None and weight.dtype != x.dtype:
        return None  # the real kernel raises the dtype error
    if t in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
        if tuple(weight.shape) != (mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size) or (
                bias is not None and tuple(bias.shape) != (mod.out_channels,)):
            return None  # parameters and hyperparameters disagree: the kernel says how
        return _conv_shape(mod, x)
    if t is torch.nn.Linear and x.dim() >= 1 and x.shape[-1] == mod.in_features:
        if tuple(weight.shape) != (mod.out_features, mod.in_features) or (bias is not None and tuple(bias.shape) != (mod.out_features,)):
            return None
        return (*x.shape[:-1], mod.out_features)
    if t is torch.nn.AdaptiveAvgPool2d and x.dim() in (3, 4):
        size = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size, mod.output_size)
        return (*x.shape[:-2], *(s if o is None else o for s, o in zip(x.shape[-2:], size)))
    return None


_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn, torch.randint,
              torch.eye, torch.linspace, torch.tril_indices, torch.triu_indices}


class _MetaProp(fx.Interpreter):
    def call_function(self, target, args, kwargs):
        if target in _FACTORIES and kwargs.get("device") is None:
            # a forward's own tensor (torch.zeros(n) for node degrees) made on the CPU beside meta inputs:
            # shapes are all this run is for, so it is made on meta too
            kwargs = {**kwargs, "device": "meta"}
        if target in _SAME_SHAPE_FN and args and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        if target in _BROADCAST_FN and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.is_floating_point():
                return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device="meta")
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            if type(mod) in _SAME_SHAPE:
                return torch.empty_like(args[0])
            shape = _module_shape(mod, args[0])
            if shape is not None:
                return torch.empty(shape, dtype=args[0].dtype, device="meta")
        return super().call_module(target, args, kwargs)

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            where = f" (module {n.target!r})" if n.op == "call_module" else ""
            raise GraphpruneError(f"shape propagation failed at node {n.name!r}{where}: {type(e).__name__}: {e}") from e
        n.meta[VAL] = out
        return out


def output_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [tuple(a.meta[VAL].shape) for a in out.all_input_nodes if isinstance(a.meta.get(VAL), torch.Tensor)]


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, example_kwargs: dict | None = None) -> None:
    """Run ``gm`` on meta tensors and leave each node's value in ``node.meta['val']``.

    Graphs that make tensors of their own on a real device (``torch.export``
    graphs build masks with ``arange``) cannot mix them with meta tensors;
    those are run under a ``FakeTensorMode`` instead, which is slower but
    keeps devices apart.
    """
    gm.meta[EXAMPLE] = (tuple(example_inputs), dict(example_kwargs or {}))
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if kwargs:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = args + tuple(kwargs[name] for name in names[len(args):] if name in kwargs)
    try:
        _meta_run(gm, args)
    except GraphpruneError as meta_error:
        try:
            with _quiet_fake_tensors():
                _fake_run(gm, args)
        except Exception:  # noqa: BLE001 - the meta error names the node
            raise meta_error from None


@contextmanager
def _quiet_fake_tensors():
    """torch's fake-tensor and symbolic-shape loggers at CRITICAL: a shape the model cannot take made
    the first log every failed meta kernel with its traceback (118 lines before the CLI's one-line
    message, survey 27), and a branch on a value made the second print the whole graph traced so far
    (40 lines ahead of the refusal, survey 31), as torch.export itself printed it to stderr; the
    failure is raised as a GraphpruneError that says why. Whatever else goes to stderr is passed on."""
    logs = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    said = io.StringIO()  # torch.export prints the graph it traced so far when it fails: kept from the user
    try:
        with contextlib.redirect_stderr(said):
            yield
    except BaseException as e:
        partial = getattr(e, "partial_fx_graph", None)
        sys.stderr.write(said.getvalue().replace(f"{partial}\n", "") if partial else said.getvalue())
        raise
    else:
        sys.stderr.write(said.getvalue())
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def meta_state(gm: fx.GraphModule, convert=None) -> dict:
    """Meta copies of every tensor the graph reads: parameters, buffers (persistent
    or not) and constants held as plain attributes (torch.export lifts these).

    One name per module attribute: a module registered under two paths (CoaT
    shares its position encoders) must be swapped once, or restoring it
    would put the meta copy back instead of the real tensor. Use with
    ``tie_weights=False``; tensors tied across modules get the same copy."""
    copies: dict = {}

    convert = convert or to_meta

    def meta(t):
        if id(t) not in copies:
            copies[id(t)] = convert(t)
        return copies[id(t)]

    state = {}
    for path, mod in gm.named_modules():  # each module object once
        prefix = f"{path}." if path else ""
        for k, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                state[prefix + k] = meta(t)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in state:
            t = operator.attrgetter(n.target)(gm)
            if isinstance(t, torch.Tensor) and not _registered(gm, n.target):
                state[n.target] = meta(t)
    return state


def _registered(gm, target: str) -> bool:
    """Whether ``target`` is a parameter or buffer of its module (so already in the
    state under the module's first path), not a plain tensor attribute."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return attr in owner._parameters or attr in owner._buffers


def _meta_run(gm: fx.GraphModule, args: tuple) -> None:
    state = meta_state(gm)
    with _reparametrize_module(gm, state, tie_weights=False), torch.no_grad():
        _MetaProp(gm).run(*to_meta(args))


def _fake_run(gm: fx.GraphModule, args: tuple) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    state = meta_state(gm, mode.from_tensor)  # fake copies: a graph that updates a buffer in place updates those
    with _reparametrize_module(gm, state, tie_weights=False), torch.no_grad():
        FakeTensorProp(gm, mode).propagate(*fake)
    _fill_missing_vals(gm)


def _export(model, example_inputs, example_kwargs) -> fx.GraphModule:
    from torch.export import export
    from torch.utils._pytree import tree_leaves

    from .export import agrees_at_example, doubled_batch

    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    # torch.export specializes every dim whose example size is 1, so a batch-1 example would give a
    # graph that takes batch 1 only: trace with the batch doubled, which keeps it symbolic
    wide = doubled_batch(args, kwargs, model)
    grew = any(w is not a for w, a in zip(tree_leaves(wide), tree_leaves((args, kwargs))))
    attempts = [wide, (args, kwargs)] if grew else [(args, kwargs)]
    for a, k in attempts:
        try:
            with _quiet_fake_tensors():
                ep = export(model, a, kwargs=k, strict=False, dynamic_shapes=_dynamic_shapes(model, a, k))
        except Exception:  # noqa: BLE001 - symbolic batch is a nicety; a static graph still prunes
            continue
        if a is args or agrees_at_example(model, ep.module(), args, kwargs):  # traced at batch 2, it may take
            break  # another branch at the example's batch of 1 (no guard on a size of 1): then as given
    else:
        a, k = args, kwargs
        with _quiet_fake_tensors():
            ep = export(model, args, kwargs=kwargs, strict=False)
    gm = ep.module()
    gm.meta[EXAMPLE] = (a, k)  # the inputs its shapes were recorded with: the between-pass check reruns them
    gm.meta[FIXED_DIMS] = _fixed_dims(gm)
    where = _dims_by_symbol(ep, a, k)
    guards, hints = _guards_and_hints(ep, where)
    gm.meta[BOUNDED_DIMS] = _bounded_dims(ep, where, guards, hints)
    gm.meta[GUARD_SIZES] = [(size, where[sym]) for sym, sizes in _turns(guards, hints).items() for size in sizes]
    gm.meta[SYMBOLIC_DIMS] = list(where.values())
    return gm


def _dims_by_symbol(ep, args: tuple, kwargs: dict) -> dict:
    """{symbol: [(tensor leaf of (args, kwargs), dim), ...]}: the input dims the exported program
    keeps symbolic. Leaves are matched to the graph's inputs in order; where they do not line up,
    nothing is said ({})."""
    import sympy
    from torch.utils._pytree import tree_leaves

    leaves = [t for t in tree_leaves((tuple(args), dict(kwargs))) if isinstance(t, torch.Tensor)]
    names = ep.graph_signature.user_inputs
    vals = [n.meta.get(VAL) for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    def hint(s) -> int | None:  # the example's size behind a symbolic one
        return int(s) if isinstance(s, int) else getattr(getattr(s, "node", None), "hint", None)

    if len(vals) != len(leaves) or any(not isinstance(v, torch.Tensor) or [hint(s) for s in v.shape] != list(t.shape)
                                       for v, t in zip(vals, leaves)):
        return {}
    where: dict = {}
    for i, v in enumerate(vals):
        for d, size in enumerate(v.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol):
                where.setdefault(expr, []).append((i, d))
    return where


def _bounded_dims(ep, where: dict, guards: list, hints: dict) -> list:
    """Symbolic input dims the code branched on, so torch.export bounded them (``if x.shape[0] > 4``
    at batch 2 gives batch in [2, 4]): [(lower, upper or None, [(tensor leaf of (args, kwargs), dim)])],
    from ``_dims_by_symbol``, its ranges narrowed by the program's other guards (``_narrowed``). The
    graph refuses sizes outside; the user's own forward takes them, down a path no trace saw, which
    ``module_form.beyond`` checks."""
    from torch.utils._sympy.numbers import int_oo

    spans = {}
    for sym in where:
        r = ep.range_constraints.get(sym)
        if r is not None:
            spans[sym] = (int(r.lower), None if r.upper is int_oo or not r.upper.is_finite else int(r.upper))
    spans = _narrowed(guards, hints, spans)
    # 2 is where every symbolic dim starts (sizes 0 and 1 are specialised)
    return [(lo, hi, where[sym]) for sym, (lo, hi) in spans.items() if lo > 2 or hi is not None]


GUARD_CAP = 1 << 20  # sizes a guard's bounds are looked for up to (bisection: about 20 evaluations a side)
TURN_REACH = 16  # sizes either side of the example an equality guard that holds there is tried at, for its turn


def _guards_and_hints(ep, where: dict) -> tuple[list, dict]:
    """The guard expressions of ``ep``'s shape env, and {symbol: the example's size} for the symbols of
    ``where`` ([], {} where the program has no symbolic input)."""
    env = next((s.node.shape_env for n in ep.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get(VAL), torch.Tensor)
                for s in n.meta[VAL].shape if getattr(getattr(s, "node", None), "shape_env", None) is not None), None)
    if env is None:
        return [], {}
    values = getattr(env, "backed_var_to_val", None) or env.var_to_val  # torch 2.14 renamed it
    return [guard.expr for guard in env.guards], {s: int(values[s]) for s in where if s in values}


def _each_symbol(guards: list, hints: dict, kinds: tuple):
    """(guard, guard at the example's other sizes, symbol, holds, the example's size) for each guard of
    ``kinds`` over the symbols of ``hints`` that holds at the example, and each of its symbols:
    ``holds(v)`` says whether it holds with that symbol at ``v`` and the others at the example's sizes.

    Symbols are told apart by equality, never identity: sympy keeps one object per symbol only while
    its bounded cache holds it, so after enough other work in one process the guard's ``s27`` and the
    placeholder's were two equal objects. An identity test then put the example's size in for the
    symbol itself, the guard read as always true, and the bound was lost: the module form came back
    unchecked after the suite's first two dozen files, and right when compiled alone."""
    import sympy

    for expr in guards:
        if not isinstance(expr, kinds) or not expr.free_symbols or not expr.free_symbols <= set(hints):
            continue
        for sym in expr.free_symbols:
            at = expr.xreplace({s: sympy.Integer(v) for s, v in hints.items() if s != sym})

            def holds(v: int, at=at, sym=sym) -> bool:
                return bool(at.xreplace({sym: sympy.Integer(v)}))

            if holds(hints[sym]):  # else the example is not on its true side: nothing to read off it
                yield expr, at, sym, holds, hints[sym]


def _narrowed(guards: list, hints: dict, spans: dict) -> dict:
    """``spans`` ({symbol: (lower, upper or None)}) narrowed by each inequality in ``guards`` over the
    symbols of ``hints`` ({symbol: the example's size}): the sizes of each of its symbols it holds at,
    the others at the example's, found by bisection either side of the example's (a guard taken to turn
    at most once a side). A branch on an expression of sizes (``if h.shape[-1] * h.shape[1] > 150``, h 32
    wide) bounds no symbol's range: it is a guard, ``32*s1 > 150``, that the graph checks on every call.
    Without it the module form was checked only at lengths on the example's side (11 and 10 for 12), and
    its own forward, which compares 16 pruned channels x the length, took the other branch from 5 to 9:
    0.2 off its twin, nothing said (survey 43 F1); the graph form refused lengths under 5 unwarned."""
    import sympy

    relations = (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan)
    spans = dict(spans)
    for _, _, sym, holds, n in _each_symbol(guards, hints, relations):
        lo = 1 if holds(1) else _turn(holds, 1, n)
        hi = None if holds(GUARD_CAP) else _turn(holds, GUARD_CAP, n)
        was_lo, was_hi = spans.get(sym, (1, None))
        spans[sym] = (max(was_lo, lo), hi if was_hi is None else was_hi if hi is None else min(was_hi, hi))
    return spans


def _turns(guards: list, hints: dict) -> dict:
    """{symbol: sorted sizes}: the sizes of each symbolic input dim at which an equality or inequality
    (``==``, ``!=``) guard over the symbols of ``hints`` turns, the others at the example's sizes: the
    roots of a ``!=`` (``Ne(32, s1)``: 32), and the nearest size either side of the example, within
    ``TURN_REACH``, where an ``==`` that holds there stops holding (``Eq(Mod(s1, 2), 0)``: 11 and 13 at 12).
    A branch on ``x.shape[1] == 64`` (or on a width and a length, ``h.shape[-1] == T``, h 32 wide) at a
    length of 12 is a guard ``Ne(s1, 64)``: it bounds no range, so the module form was checked nowhere
    near 64, and its own forward ran the other branch there, 0.19 off its twin, nothing said; the graph
    refused 64 unwarned (survey 44 F1, F6 to F9)."""
    import sympy

    out: dict = {}
    for expr, at, sym, holds, n in _each_symbol(guards, hints, (sympy.Eq, sympy.Ne)):
        sizes = set()
        if isinstance(expr, sympy.Ne):
            try:
                roots = sympy.solve(sympy.Eq(at.lhs, at.rhs), sym)
            except Exception:  # noqa: BLE001 - an equation sympy cannot solve: its nearest turns instead
                roots = []
            sizes |= {int(r) for r in roots if getattr(r, "is_integer", False) and int(r) >= 1 and not holds(int(r))}
        if not sizes:
            for side in (-1, 1):
                v = next((v for v in range(n + side, n + side * (TURN_REACH + 1), side) if v >= 1 and not holds(v)), None)
                if v is not None:
                    sizes.add(v)
        if sizes:
            out.setdefault(sym, set()).update(sizes)
    return {sym: sorted(v) for sym, v in out.items()}


def _turn(holds, out: int, inside: int) -> int:
    """The size nearest ``out`` at which ``holds`` is true, between ``out`` (false) and ``inside`` (true)."""
    while abs(out - inside) > 1:
        mid = (out + inside) // 2
        out, inside = (out, mid) if holds(mid) else (mid, inside)
    return inside


def _fixed_dims(gm: fx.GraphModule) -> list[str]:
    """The input dims torch.export specialized to the example's size (a layer reads them, or
    the code branches on them), read off the placeholders' symbolic shapes: what the
    exported graph, and so a graph-form result, will not take another size of."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    out = []
    for node in gm.graph.nodes:
        val = node.meta.get(VAL) if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            out += [f"{node.target} dim {i} ({int(d)})" for i, d in enumerate(val.shape) if is_concrete_int(d)]
    return out



def _dynamic_shapes(model, args, kwargs):
    """The batch symbolic, and dim 1 of 2-D and 3-D inputs (token ids, waveforms, (N, T, D)
    sequences), where the code allows (``Dim.AUTO``: torch.export fixes the dims a layer reads
    or a branch tests), nested inputs and ``*args`` included: a (N, T, D) sequence model's
    graph took its example's T only, and a ``forward(self, *xs)`` model (every
    ``nn.DataParallel``) its example's batch only. An image's height and width stay fixed:
    symbolic, the window arithmetic of padded windowed attention (TinyViT, SAM) read as
    computed sizes and held its residual stream."""
    from torch.export import Dim

    from .export import _dynamic_shapes as by_signature

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        # a dim of 1 stays 1 (torch.export fixes it, and logged a warning per input told otherwise): a dim 0 of
        # 1 beside a larger batch is an input broadcast over it (export.doubled_batch)
        return {i: Dim.AUTO for i in range(2 if x.dim() in (2, 3) else 1) if x.shape[i] != 1} or None

    return by_signature(model, args, kwargs, spec)


def trace(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None, *, method: str = "auto") -> Traced:
    """Trace ``model`` and propagate shapes; say which tracer was used and why.
    The traced module is in the model's train/eval mode."""
    with _data_kept(model):
        traced = _trace(model, example_inputs, example_kwargs, method)
    fold_channel_shuffles(traced.gm)
    _kept_folds(model, traced.gm)
    if traced.method == "symbolic_trace":  # exported modules refuse train()/eval(); they keep the mode they were exported in
        copy_modes(traced.gm, model)  # each module's own: frozen BatchNorms in a model in training mode stay in eval
    return traced


def _kept_folds(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """A deploy result traced again keeps the stand-ins of the BatchNorms it folded, and their guard
    (``fold_bn.refuse_training``): the tracer ran the guard once, as plain Python, and left it and them
    out, and the new model ran in training mode, where the folded layers are wrong (survey 63)."""
    from graphprune.passes.fold_bn import FoldedBatchNorm, stand_in

    for path, m in model.named_modules():
        if isinstance(m, FoldedBatchNorm) and path:
            stand_in(gm, path, m.training)


@contextlib.contextmanager
def _data_kept(model: torch.nn.Module):
    """Each parameter and buffer of ``model`` holds the data it held before, after: a forward that
    rebinds a weight's data (``w.data = w.data.clamp(-0.1, 0.1)``, WGAN's weight clipping) ran under
    torch.export on the user's own tensors, which the trace shares, and left them clipped
    (``analyze`` alone did it, survey 31 f09, f14). Only a tensor holding other data is touched."""
    held = [(t, t.data) for t in [*model.parameters(), *model.buffers()] if not isinstance(t, torch.nn.parameter.UninitializedTensorMixin)]
    try:
        yield
    finally:
        for t, data in held:
            now = t.data
            if type(now) is not type(data) or now.shape != data.shape or now.data_ptr() != data.data_ptr():
                t.data = data


def _trace(model, example_inputs, example_kwargs, method) -> Traced:
    if not isinstance(model, torch.nn.Module):
        raise GraphpruneError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise GraphpruneError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; wrap a single tensor as (x,)")
    clash = sorted(n for n in [*model._modules, *model._parameters, *model._buffers] if n in _GRAPH_MODULE_NAMES)
    if clash:  # the traced GraphModule cannot hold them under those names: both tracers failed obscurely
        raise GraphpruneError(f"{type(model).__name__} has top-level attributes named {clash}, which torch.fx's "
                              "GraphModule uses itself (its generated code and graph live there): rename them, or "
                              "wrap the model in a parent module (nn.Sequential(model)) and compile that")
    symbolic_error = None
    # traced in eval mode, whatever mode the model is in: the graph is checked in eval mode, and a
    # forward with an `if self.training:` branch traced in training was refused as differing from itself
    user_model, model = model, in_eval(shadow(model, own_buffers=True))
    if method in ("auto", "symbolic_trace") and not example_kwargs:
        try:
            return Traced(_symbolic(model, example_inputs), "symbolic_trace")
        except Exception as e:  # noqa: BLE001 - fall back to export, keep the reason
            symbolic_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if method == "symbolic_trace":
                raise GraphpruneError(f"torch.fx.symbolic_trace failed: {symbolic_error}. Use method='export' or make the model traceable (wrap the failing code in a leaf module or @torch.fx.wrap).") from e
    model = in_eval(shadow(user_model, own_buffers=True))  # a clean copy: the symbolic attempt may have left state behind
    try:
        gm = _export(model, example_inputs, example_kwargs)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        hint = f" symbolic_trace failed first with: {symbolic_error}." if symbolic_error else ""
        from .source import packs_sequences

        odd = _odd_names(user_model) if "SyntaxError" in msg + (symbolic_error or "") else []
        packer = packs_sequences(user_model)
        advice = (f"Rename the submodules whose names are not Python identifiers ({', '.join(map(repr, odd[:4]))}): "
                  "torch.fx writes them into generated code (a ModuleDict key such as 'conv_1' instead of 'conv-1')."
                  if odd else
                  f"{packer}'s forward packs sequences (pack_padded_sequence), whose lengths are data neither tracer "
                  "follows: compile the parts before and after the RNN as models of their own, or a copy of the model "
                  "whose forward runs the RNN on the padded tensors." if packer else
                  "Make the forward traceable (no data-dependent Python control flow), or pass example "
                  "inputs the model accepts.")
        raise GraphpruneError(
            f"cannot trace {type(model).__name__}: torch.export failed with {msg}.{hint} {advice}"
            f"{parts_hint(user_model, example_inputs, example_kwargs)}"
        ) from e
    _fill_missing_vals(gm)
    _drop_rebinding_writebacks(gm)
    return Traced(gm, "export", symbolic_error)


PART_SHARE = 0.2  # a submodule holding at least this share of the weights is worth pruning on its own
PART_DEPTH = 3  # ... looked for this many levels down


def parts_hint(model: torch.nn.Module, args: tuple, kwargs: dict | None) -> str:
    """For a model that cannot be traced whole (a detector: proposals filtered by score, a
    loop over a variable number of boxes): the submodules that hold a good share of its
    weights, trace, and what the example called them with, each a model of its own to
    prune (a detector's backbone; the box head inside its ROI heads). A part that does not
    trace either is looked into, down to ``PART_DEPTH``. Everything runs on shadows: the
    user's modules get no hooks and their buffers no updates. Empty where no part qualifies."""
    total = sum(p.numel() for p in model.parameters())
    if not total:
        return ""
    share = {n: sum(p.numel() for p in m.parameters()) / total for n, m in model.named_modules() if n}
    big = {n for n, s in share.items() if s >= PART_SHARE and n.count(".") < PART_DEPTH}
    seen: dict = {}
    try:
        copy = in_eval(shadow(model, own_buffers=True))
        handles = [copy.get_submodule(n).register_forward_pre_hook(
            lambda m, a, kw, n=n: seen.setdefault(n, (a, kw)) and None, with_kwargs=True) for n in big]
        try:
            with torch.no_grad():
                copy(*args, **(kwargs or {}))
        finally:
            for h in handles:
                h.remove()
    except Exception:  # noqa: BLE001 - a forward that fails on the example: nothing to call the parts with
        return ""
    found, queue = [], [n for n, _ in model.named_children() if n in big]
    while queue:
        n = queue.pop(0)
        if n not in seen:
            continue
        if _traces(model.get_submodule(n), *seen[n]):
            found.append((share[n], n))
        else:
            queue += [f"{n}.{c}" for c, _ in model.get_submodule(n).named_children() if f"{n}.{c}" in big]
    if not found:
        return ""
    found.sort(reverse=True)
    said = [f"model.{n} ({s:.0%} of the weights, called with {_shapes(seen[n])})" for s, n in found]
    first = found[0][1]
    return (f" These parts of it trace and can be pruned on their own: {'; '.join(said)}. Compile one with the "
            f"inputs it is called with (graphprune.compile(model.{first}, inputs, ...)) and put the result in its "
            f"place (model.{first} = small): the outputs it hands on keep their widths.")


def _traces(part: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``part`` traces on these inputs: torch.fx first where it takes no keywords, as ``trace`` tries."""
    tracers = ([] if kwargs else [lambda m: _symbolic(m, args)]) + [lambda m: _export(m, args, kwargs)]
    for tracer in tracers:
        try:
            tracer(in_eval(shadow(part, own_buffers=True)))
            return True
        except Exception:  # noqa: BLE001 - the next tracer, or none traces it
            continue
    return False


def _shapes(call) -> str:
    """What a module was called with, briefly: tensors by shape, containers by their first elements."""
    def one(v, depth=0):
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}"
        if isinstance(v, (list, tuple)) and depth < 2:
            inner = ", ".join(one(x, depth + 1) for x in v[:3]) + (", ..." if len(v) > 3 else "")
            return f"[{inner}]" if isinstance(v, list) else f"({inner})"
        if isinstance(v, dict) and depth < 2:
            inner = ", ".join(f"{k}: {one(x, depth + 1)}" for k, x in list(v.items())[:3]) + (", ..." if len(v) > 3 else "")
            return "{" + inner + "}"
        return type(v).__name__
    args, kwargs = call
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


_GRAPH_MODULE_NAMES = (set(dir(fx.GraphModule)) - set(dir(torch.nn.Module))) | {"meta", "graph", "code"}


class _RuledLeaves(fx.Tracer):
    """fx's tracer, except that a ``torch.nn`` module with no rule of its own is traced
    into rather than kept as one opaque node: its forward's ops may have rules
    (``nn.TransformerEncoder`` is linears, attention and norms; as one node it held every
    channel around it). Where its forward cannot be traced (the encoder's fast-path
    checks branch on tensors), the model goes to ``torch.export`` as any other
    untraceable code does. A hooked or parametrized module stays one node: tracing into
    it would drop its hooks, or expose the computation of its weight. The encoder's and decoder's
    fast-path checks branch on tensors: their plain path is traced in their place (``standins``)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        from .canon import computes_unseen, table_rule

        return super().is_leaf_module(m, qualname) and (computes_unseen(m) or table_rule(m) is not None)

    def call_module(self, m: torch.nn.Module, forward, args, kwargs):
        standin = STANDINS.get(type(m))
        if standin is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(standin, m)
        return super().call_module(m, forward, args, kwargs)


def _symbolic(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``model`` symbolically traced (``_RuledLeaves``) with shapes propagated; raises where it cannot be.

    Code that asks ``isinstance(v, torch.Tensor)`` goes to torch.export (``_asks_tensor_type``), which
    answers it as Python does. Traced here behind the checks (from 37d0e0d, for DenseNet's speed, until survey 31),
    a wrong answer skipped what no check meets: a branch on values (``bool((h > 3).any())``, 2.86 off),
    a size test the source reader does not see (``h.numel()``, a test four calls deep), a batch test where
    the first input of the most dims is no batch (survey 31 f02, f03, f16); torch.export refused those."""
    asker = _asks_tensor_type(model)
    if asker:
        raise fx.proxy.TraceError(f"{asker} asks isinstance(..., torch.Tensor), which a traced value answers False")
    gm = _fx_graph(model, example_inputs, buffers=False)
    if _constants_left(gm) and next(model.buffers(), None) is not None:
        # fx ran arithmetic on buffers while tracing ((self.rv + eps).sqrt()) and kept its result as a constant,
        # which the graph pruned and the user's buffer, whole, did not match: the module form was lost (survey
        # 36 F03). Traced again with buffers as graph values; where that fails, the constants stay
        try:
            gm = _fx_graph(model, example_inputs, buffers=True)
        except Exception:  # noqa: BLE001 - code that asks a buffer's value (if self.ready:), which a proxy cannot answer
            _check_state_untouched(model)
    propagate_shapes(gm, example_inputs)
    return gm


def _fx_graph(model: torch.nn.Module, example_inputs: tuple, *, buffers: bool) -> fx.GraphModule:
    """The fx graph of ``model`` (``_RuledLeaves``), settings baked in; with ``buffers``, buffers
    read as graph values (``proxy_buffer_attributes``) rather than run while tracing."""
    with _use_lazy_graph_module(True), _functions_kept(), _sizes_packed(), _no_tensor_test():  # code generated on first call
        tracer = _RuledLeaves()
        tracer.proxy_buffer_attributes = buffers
        baked = _settings_baked(model, example_inputs)
        with warnings.catch_warnings():  # fx's "could not add an assertion" for a baked enum: _bake writes it
            warnings.simplefilter("ignore", UserWarning)
            graph = tracer.trace(model, concrete_args=baked or None)
        _bake(graph, baked)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _check_state_untouched(model)
    for name, child in model.named_children():  # keep the user's containers (Sequential...) intact
        setattr(gm, name, child)
    _buffer_views(gm, model)
    return gm


def _constants_left(gm: fx.GraphModule) -> bool:
    """Whether the graph holds a tensor fx computed while tracing (``_tensor_constant``)."""
    return any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in gm.graph.nodes)


def _asks_tensor_type(model: torch.nn.Module) -> str | None:
    """The first class traced into whose code asks ``isinstance(v, torch.Tensor)`` (``source``), or None.

    A proxy is no tensor to ``isinstance``, and the check cannot be patched as ``torch.is_tensor``
    is (``_no_tensor_test``: the tensor metaclass is immutable), so symbolic tracing silently
    took the non-tensor side of ``if isinstance(h, torch.Tensor) and x.shape[0] > 4``. Such code
    goes to torch.export, which answers it. Modules fx keeps as one node (``_RuledLeaves``), and
    what they hold (a parametrization's own code), are not read."""
    tracer, queue = _RuledLeaves(), [("", model)]
    while queue:
        name, m = queue.pop()
        if name and tracer.is_leaf_module(m, name):
            continue
        if source.asks_tensor_type(type(m)):
            return type(m).__name__
        queue += [(f"{name}.{c}" if name else c, child) for c, child in m.named_children()]
    return None


def _settings_baked(model: torch.nn.Module, example_inputs: tuple) -> dict:
    """{parameter: value} for each named parameter of ``forward`` that takes a setting (a bool, a
    string, an enum: ``_baked``): the example's own where it gives one, else the default.

    fx hands such a parameter to the forward as a proxy, which is silently wrong wherever Python
    looks at it rather than computes with it: ``scale is Mode.SPREAD`` is False for a proxy, so the
    graph took one path for every value, 1.3 off the model at ``scale=SPREAD`` unpruned. Baked in
    as the example has it, as torch.export does, the graph refuses another value (``_bake``), and
    the module form, which takes any, is checked at others (``module_form.beyond``). None and
    containers stay proxies: an optional tensor (``mask=None``) used under ``is not None`` traces
    a path the checks then run, and fail, loudly; fx cannot write a container back as a default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = {p.name: v for p, v in zip(positional, example_inputs) if _baked(v)}
    taken = {p.name for p in positional[:len(example_inputs)]}
    return {**given, **{p.name: p.default for p in named if p.name not in taken and _baked(p.default)}}


def _baked(value) -> bool:
    """A setting fx must not proxy: a number stays a proxy, which computes right at any value
    (``logits / temperature``) and fails loudly where Python branches on it; a bool, a string or
    an enum is looked at (``flag is True``, ``isinstance(how, str)``, ``mode is Mode.A``)."""
    return is_setting(value) and not (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_setting(value) -> bool:
    """A plain value a forward may branch on, that a traced graph holds fixed."""
    import enum

    return isinstance(value, (bool, int, float, str, enum.Enum))


def _bake(graph: fx.Graph, baked: dict) -> None:
    """Each baked setting's placeholder back under its own name (fx renames it, ``mode_1``, so a
    keyword call passed it to nothing) and checked against the value traced: fx writes that check
    for a bool, a number or a string, and here it is written for an enum. The graph takes the
    setting where the model does, by position or keyword, and refuses another value."""
    for holder in [n for n in graph.nodes if n.op == "placeholder"]:
        name = holder.target if holder.target in baked else re.sub(r"_\d+$", "", holder.target)
        if name not in baked or holder.target.startswith("*"):
            continue
        holder.target = name
        if not holder.users:
            with graph.inserting_after(holder):
                same = graph.call_function(operator.eq, (holder, baked[name]))
            with graph.inserting_after(same):
                graph.call_function(torch._assert, (same, f"{name} was traced as {baked[name]!r}, and the graph "
                                                          "computes that value's path only"))


def _buffer_views(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Constants that are reshaped views of a buffer read as that buffer, reshaped in the graph.

    fx proxies parameters but not buffers, so ``self.shift.view(1, -1, 1, 1)`` runs while
    tracing and its result lands in the graph as an anonymous ``_tensor_constant0``. The
    graph prunes that copy, but the user's buffer stays whole, and the module form, which
    runs the user's code on the user's (pruned) buffers, failed on it. A constant that
    holds the same memory as a buffer, every element of it in the same order (a
    contiguous view: ``view``, ``reshape``, ``[None, :, None]``), becomes
    ``buffer.reshape(shape)``; any other constant stays as fx made it."""
    views = {}
    for name, buf in model.named_buffers():
        if buf.is_contiguous() and buf.numel() and not buf.is_meta:
            views.setdefault((buf.untyped_storage().data_ptr(), buf.storage_offset(), buf.numel(), buf.dtype), name)
    gone = set()
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not node.target.startswith("_tensor_constant"):
            continue
        t = getattr(gm, node.target, None)
        if not isinstance(t, torch.Tensor) or t.is_meta or not t.is_contiguous() or not t.numel():
            continue
        name = views.get((t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype))
        if name is None:
            continue
        if "." not in name and name not in gm._buffers:  # fx copied only the attributes the graph reads
            gm.register_buffer(name, model._buffers[name], persistent=name not in model._non_persistent_buffers_set)
        with gm.graph.inserting_before(node):
            buf = gm.graph.get_attr(name)
            view = gm.graph.call_method("reshape", (buf, *t.shape))
        node.replace_all_uses_with(view)
        gm.graph.erase_node(node)
        gone.add(node.target)
    for target in gone - {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
        delattr(gm, target)  # fx reads one constant through a get_attr node per use
    gm.recompile()


_APPLIERS: dict = {}


def applier(fn) -> object:
    """``fn.apply`` as a plain function, one per custom ``torch.autograd.Function`` (a graph
    node's argument cannot be a class): the Function as one graph node."""
    if fn not in _APPLIERS:
        def apply(*args, **kwargs):
            return fn.apply(*args, **kwargs)

        apply.__name__ = apply.__qualname__ = f"apply_{fn.__name__}"
        _APPLIERS[fn] = apply
    return _APPLIERS[fn]


@contextmanager
def _no_tensor_test():
    """``torch.is_tensor`` on a proxy answers False, so symbolic tracing went down the non-tensor
    branch of ``if torch.is_tensor(h) and x.shape[0] > 4`` and never met the size test behind it:
    the graph matched the model at the example, and the result was 0.43 off from batch 5 on
    (survey 19). Here it raises on a proxy, and the model is traced by torch.export, which
    answers it and bounds the batch. (``isinstance(h, torch.Tensor)`` cannot be caught so.)"""
    raw = torch.is_tensor

    def is_tensor(obj):
        if isinstance(obj, fx.Proxy):
            raise fx.proxy.TraceError("torch.is_tensor on a traced value: symbolic tracing cannot answer it")
        return raw(obj)

    torch.is_tensor = is_tensor
    try:
        yield
    finally:
        torch.is_tensor = raw


@contextmanager
def _functions_kept():
    """Symbolic tracing runs a custom ``autograd.Function``'s forward on proxies and keeps
    its ops, not the Function: a gradient-reversal layer (DANN) or a straight-through
    estimator in a graph-form result then got ordinary autograd, its outputs right and its
    gradients wrong. Here ``Function.apply`` on a proxy records one node (``applier``),
    which has no coupling rule: the channels it touches keep their width, and the
    Function, with its backward, stays in the graph."""
    from torch.autograd.function import Function
    from torch.utils._pytree import tree_leaves

    raw = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return raw.__func__(cls, *args, **kwargs)
        return proxy.tracer.create_proxy("call_function", applier(cls), args, kwargs)

    Function.apply = classmethod(apply)
    try:
        yield
    finally:
        Function.apply = raw


_VARARG_FACTORIES = ("zeros", "ones", "empty", "rand", "randn")


@contextmanager
def _sizes_packed():
    """``torch.zeros(x.size(0), 16)`` fails in torch.fx itself ("zeros() takes 1 positional argument
    but 2 were given": sizes given one by one, one of them a proxy), so a model that makes its RNN's
    initial state or a mask that way went to torch.export, where the widths are literals and dims
    fixed. While tracing, these factories get their sizes as one tuple, which fx records."""
    saved = {name: getattr(torch, name) for name in _VARARG_FACTORIES}

    def packing(fn):
        @functools.wraps(fn)
        def call(*size, **kwargs):
            if len(size) > 1 and any(isinstance(s, fx.Proxy) for s in size):
                return fn(tuple(size), **kwargs)
            return fn(*size, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(torch, name, packing(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _check_state_untouched(model: torch.nn.Module) -> None:
    """Symbolic tracing runs ``forward`` once with proxies; a forward that stores a
    result in its module (``self.offset += n``, a cache) leaves a proxy behind, and
    the graph does not replay that update. Such models go to ``torch.export``,
    which records buffer updates."""
    for name, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers, mod.__dict__):
            for k, v in list(store.items()):
                if isinstance(v, fx.Proxy):
                    raise GraphpruneError(f"forward assigns {name + '.' if name else ''}{k} while tracing (module state)")


def _fill_missing_vals(gm: fx.GraphModule) -> None:
    """torch.export leaves ``val`` on call nodes; get_attr nodes need it too."""
    for n in gm.graph.nodes:
        if VAL not in n.meta and n.op == "get_attr":
            t = operator.attrgetter(n.target)(gm)
            if isinstance(t, torch.Tensor):
                n.meta[VAL] = to_meta(t)


def _drop_rebinding_writebacks(gm: fx.GraphModule) -> None:
    """A forward that re-binds a buffer to a tensor of another shape (timm ConViT's
    ``self.rel_indices = self.get_rel_indices(N)`` over a ``(1, 1, 1, 3)``
    placeholder) is exported with the new tensor computed in the graph, which is
    specialized to the branch taken, so it is recomputed on every call. For a
    submodule's buffer torch.export drops the re-binding; for the root module's it
    writes the new value back with an in-place ``copy_`` at the end of the graph,
    which cannot run (the shapes differ) and feeds nothing. Such write-backs are
    dropped, as torch.export does for submodules; write-backs of a value that fits
    the buffer (counters, running statistics) stay."""
    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.copy_.default or n.users or len(n.args) < 2:
            continue
        dest, src = n.args[0], n.args[1]
        if not isinstance(dest, fx.Node) or dest.op != "get_attr" or not isinstance(src, fx.Node):
            continue
        owner_path, _, attr = dest.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        buf, val = owner._buffers.get(attr), src.meta.get(VAL)
        if not isinstance(buf, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        try:
            fits = bool(torch.broadcast_shapes(tuple(val.shape), tuple(buf.shape)) == tuple(buf.shape))
        except RuntimeError:
            fits = False  # not broadcastable: the copy raises
        except Exception:  # noqa: BLE001 - symbolic sizes that cannot be decided: keep the write-back
            continue
        if not fits:
            gm.graph.erase_node(n)
            changed = True
    if changed:
        gm.recompile()
