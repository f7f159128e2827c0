"""Calibration batches in the shapes users have them.

A batch may be a tuple (or list) of positional inputs, a single tensor, or a
mapping of keyword inputs: a dict or a tokenizer's output (``BatchEncoding``
is a ``UserDict``, not a ``dict``). ``example_kwargs`` given to ``compile``
apply to every batch too (``use_cache=False`` for a language model), the
batch's own keywords winning.

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

from .errors import GraphpruneError, GraphpruneWarning, first_line

CALIBRATION_CAP = 256  # batches read from a stream or loader; a list is taken whole


def read_batches(calibration) -> list:
    """The calibration batches as a list, read once: criteria, the judge and the refit each go
    over them. A list or tuple is the user's own choice of batches and is taken whole. A generator,
    a DataLoader or a stream gives its first ``CALIBRATION_CAP``: an endless generator hung compile
    while memory grew (survey 18), and a training loader would have been read to its end."""
    if isinstance(calibration, (list, tuple)):
        return list(calibration)
    it = iter(calibration)
    out = list(itertools.islice(it, CALIBRATION_CAP))
    if next(it, _END) is not _END:
        warnings.warn(GraphpruneWarning(
            f"calibration is a stream or loader with more than {CALIBRATION_CAP} batches: compile read the first "
            f"{CALIBRATION_CAP}. Pass a list of batches to choose how many"), stacklevel=3)
    return out


_END = object()


def as_call(batch, example_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) for one calibration batch."""
    base = dict(example_kwargs or {})
    if isinstance(batch, Mapping) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__") and not isinstance(batch, torch.Tensor)):
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
