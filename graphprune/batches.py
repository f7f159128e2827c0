"""Calibration batches in the shapes users have them.

A batch may be a tuple (or list) of positional inputs, a single tensor, or a
mapping of keyword inputs: a dict or a tokenizer's output (``BatchEncoding``
is a ``UserDict``, not a ``dict``). A tuple with more items than the model's
forward takes positionally is inputs then targets (``(x, y)`` from a
DataLoader, ``with_targets``): the model gets the inputs, ``loss_fn`` the
whole batch. ``example_kwargs`` given to ``compile`` apply to every batch too
(``use_cache=False`` for a language model), the batch's own keywords winning.

Criteria run batches through the traced graph, whose placeholders are flat:
``flat_inputs`` orders (args, kwargs) the way the graph wants them, or says
which input the graph has no place for.
"""
from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Mapping

import torch

from .errors import GraphpruneError, GraphpruneWarning, first_line, user_level

CALIBRATION_CAP = 256  # batches read from a stream or loader; a list is taken whole


def in_signature_order(model: torch.nn.Module, kwargs: dict) -> dict:
    """``kwargs`` in the order the forward declares them (any it gathers in ``**kwargs`` after, as given).
    torch.export flattens keyword inputs in the order the dict has them, and a graph form whose forward
    re-flattens its inputs by a pytree spec (what compile returns from a torch.export trace) then takes
    them by position: ``{"scale": s, "mask": m}`` reached the program as mask=s (survey 27 f13)."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    return {**{k: kwargs[k] for k in names if k in kwargs}, **{k: v for k, v in kwargs.items() if k not in names}}


def example_batch(args: tuple, kwargs: dict, model: torch.nn.Module | None = None) -> int | None:
    """The example's batch: dim 0 of its first tensor of the most dims, keyword inputs in the forward's
    order (None without a tensor of a dim). Not simply the first tensor: ``(1, T)`` position ids given
    before a ``(B, T, D)`` batch, or a ``(T, T)`` mask, are broadcast over it. Read by ``export``
    (which example to trace at batch 2) and ``source.tested_batches`` (which inputs to resize), one
    rule for both: the checks had resized the position ids as the batch, and skipped what they meant
    to check (survey 30 f01)."""
    from torch.utils._pytree import tree_leaves

    ordered = in_signature_order(model, dict(kwargs)) if model is not None else dict(kwargs)
    leaves = [t for t in tree_leaves((tuple(args), ordered)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    return int(max(leaves, key=lambda t: t.dim()).shape[0]) if leaves else None  # max: the first of the most dims


def read_batches(calibration) -> list:
    """The calibration batches as a list, read once: criteria, the judge and the refit each go
    over them. A list or tuple is the user's own choice of batches and is taken whole. A generator,
    a DataLoader or a stream gives its first ``CALIBRATION_CAP``: an endless generator hung compile
    while memory grew (survey 18), and a training loader would have been read to its end.
    One batch given bare is refused (``not_batches``)."""
    wrong = not_batches(calibration)
    if wrong:
        raise GraphpruneError(wrong)
    if isinstance(calibration, (list, tuple)):
        return list(calibration)
    it = iter(calibration)
    out = list(itertools.islice(it, CALIBRATION_CAP))
    if next(it, _END) is not _END:
        warnings.warn(GraphpruneWarning(
            f"calibration is a stream or loader with more than {CALIBRATION_CAP} batches: compile read the first "
            f"{CALIBRATION_CAP}. Pass a list of batches to choose how many"), stacklevel=user_level())
    return out


_END = object()


def keyword_batch(batch) -> bool:
    """Whether ``batch`` is one batch of keyword inputs: a dict, or a mapping that is not one (a
    tokenizer's ``BatchEncoding``)."""
    return isinstance(batch, Mapping) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")
                                          and not isinstance(batch, torch.Tensor))


def not_batches(calibration) -> str | None:
    """Why ``calibration`` is not an iterable of batches, or None. One batch given bare iterated as
    something else: a dict of keyword inputs gave its keys (the strings "input_ids", ...) as batches,
    a tensor its rows."""
    if isinstance(calibration, torch.Tensor) or keyword_batch(calibration):
        return (f"calibration must be an iterable of batches, got one {type(calibration).__name__}: pass a list of "
                "batches, [batch] for this one alone")
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        return (f"calibration must be an iterable of batches (a list of input tuples or dicts), "
                f"got {type(calibration).__name__}")
    return None


class Labelled(tuple):
    """A calibration batch whose last items are targets: the model is called with the first
    ``n_inputs`` items (``as_call``), ``loss_fn(output, batch)`` gets them all (``batch[1]`` is
    a DataLoader's labels)."""

    def __new__(cls, items, n_inputs: int | None = None):
        self = super().__new__(cls, items)
        self.n_inputs = len(self) if n_inputs is None else n_inputs
        self.given = items  # what loss_fn gets: the batch as the user made it (a namedtuple keeps its fields)
        return self


def positional_capacity(model) -> int | None:
    """How many positional inputs ``model`` (a module, or its forward) takes; None where it takes
    any number (``*args``) or has no signature to read. Wrappers are looked through:
    ``torch.compile``'s module, ``DataParallel``, a decorator that keeps ``__wrapped__``."""
    while isinstance(model, torch.nn.Module):
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            model = model.forward
            break
        model = inner
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(q.kind is inspect.Parameter.VAR_POSITIONAL for q in params):
        return None
    return sum(q.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for q in params)


def split_targets(batch, takes: int | None, n_inputs: int | None = None):
    """``batch`` marked as inputs then targets where it is a tuple or list holding more items than
    the forward takes positionally (``takes``): its first ``n_inputs`` items (as many as the example
    inputs; without them, as many as the forward takes) are the inputs. A tuple the forward can take
    whole stays inputs only, as it would be called: ``forward(x, mask=None)`` given ``(x, y)`` reads
    ``y`` as the mask, so a loader for such a model must give dicts or the inputs alone."""
    if takes is None or isinstance(batch, Labelled) or not isinstance(batch, (tuple, list)) or len(batch) <= takes:
        return batch
    n = takes if n_inputs is None else min(n_inputs, takes)
    return Labelled(batch, n) if n >= 1 else batch


def with_targets(model, batches: list, n_inputs: int | None = None) -> list:
    """``batches`` (a list) with ``split_targets`` applied to each, for ``model``'s forward. A
    forward that takes ``*args`` takes, once traced, as many inputs as the example has
    (``n_inputs``): an item past those is a target there too."""
    takes = positional_capacity(model)
    return [split_targets(b, n_inputs if takes is None else takes, n_inputs) for b in batches]


def as_call(batch, example_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) for one calibration batch."""
    base = dict(example_kwargs or {})
    if isinstance(batch, Labelled):
        return tuple(batch[:batch.n_inputs]), base
    if keyword_batch(batch):
        return (), {**base, **{k: batch[k] for k in batch.keys()}}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), base
    return (batch,), base


def regroup(gm, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) as an exported graph was traced: keyword inputs that name its
    positional parameters (a tokenizer's ``input_ids``) become positional."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return tuple(args), dict(kwargs)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise GraphpruneError(f"a calibration batch does not fit the traced model's inputs ({e}): give batches with the "
                              "same positional and keyword inputs as example_inputs/example_kwargs") from e
    n_pos = (spec.child(0) if hasattr(spec, "child") else spec.children_specs[0]).num_children
    names = list(bound)
    return tuple(bound[n] for n in names[:n_pos]), {n: bound[n] for n in names[n_pos:]}


def flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:  # an exported module: inputs are flattened by its pytree spec
        from torch.fx._pytree import tree_flatten_spec

        args, kwargs = regroup(gm, args, kwargs)
        try:
            return list(tree_flatten_spec((tuple(args), dict(kwargs)), spec))
        except Exception as e:  # noqa: BLE001 - a batch shaped unlike the example
            raise GraphpruneError(
                f"a calibration batch does not have the structure of the example inputs the model was traced with "
                f"({type(e).__name__}: {first_line(e)[:200]}): give batches with the same positional and keyword "
                "inputs as example_inputs/example_kwargs") from e
    # a symbolic trace: placeholders are the forward's parameters, by name, with their defaults
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals, rest = list(args), dict(kwargs)
    for n in places[len(vals):]:
        name = str(n.target).lstrip("*")
        if name in rest:
            vals.append(rest.pop(name))
        elif n.args:
            vals.append(n.args[0])
        else:
            raise GraphpruneError(f"a calibration batch has no input {name!r}, which the model takes: give batches with "
                                  "the same inputs as example_inputs")
    if len(vals) > len(places) or rest:
        extra = sorted(rest) or [f"{len(vals)} positional inputs"]
        raise GraphpruneError(f"a calibration batch has inputs the traced model does not take ({', '.join(map(str, extra))}): "
                              "give batches with the same inputs as example_inputs")
    return vals
