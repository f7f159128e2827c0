"""What a graph traced with ``torch.export`` takes: inputs shaped as its example, and None
where the example gave None.

The program computes the path the example took. An input the example gave as None is a
constant to it, and a dict key or list item the example lacked is no input at all: the
generated forward flattens its inputs by the example's tree (``fx_pytree.tree_flatten_spec``),
which takes the keys it knows and drops the rest. Either way a call that gives more ran
without it, silently: a mask ignored, 0.36 off the model (survey 31 f08, survey 33 f01).
``guard`` makes the graph refuse both, in the graph itself and its code, not in a hook, so a
deep copy, ``load`` and a re-export given the value keep the refusal (a hook was lost there,
survey 32 f02). The graph takes a call without an input it traced as None where the model's
forward defaults it to None (``forward(x)`` for ``forward(x, mask=None)``).
"""
from __future__ import annotations

import re
import sys
from collections.abc import Mapping

import torch
from torch.fx.graph import _PyTreeCodeGen, _register_custom_builtin

from .errors import GraphpruneError
from .meta_keys import VAL


def guard(graph: torch.fx.GraphModule, model: torch.nn.Module | None = None) -> list[str]:
    """Make ``graph`` (a torch.export graph of ``model``) refuse a value other than None for each input
    traced as None, and inputs of another tree than its example's; return the names traced as None.
    Such an input defaults to None where ``model``'s forward defaults it to None: a forward whose
    default is another value (``mask="auto"``) computes something else without it (survey 35 F1)."""
    holders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    nones = [n for n in holders if VAL in n.meta and n.meta[VAL] is None]
    if nones and not any(n.target is traced_as_none for n in graph.graph.nodes):
        with graph.graph.inserting_after(holders[-1]):
            for n in reversed(nones):
                graph.graph.call_function(traced_as_none, (n, n.name))
    codegen = graph.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        graph.graph._codegen = ExactInputs(codegen.pytree_info, [n.name for n in nones if n.name in _none_defaults(model)])
    graph.recompile()
    return [n.name for n in nones]


def _none_defaults(model) -> set:
    """The names of ``model.forward``'s parameters that default to None."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values() if model is not None else ()
    except (TypeError, ValueError):
        return set()
    return {q.name for q in params if q.default is None}


@torch.fx.node.has_side_effect  # no dead-code pass drops it: it has no users
def traced_as_none(value, name: str) -> None:
    """The check ``guard`` puts in a graph for an input traced as None."""
    if value is not None:
        raise GraphpruneError(
            f"this graph was traced with {name}=None and computes that path only (torch.export held it as a "
            f"constant): compile with an example that gives {name}, or keep the model's own classes "
            "(output='module'), which take any value")


def flatten_exactly(inputs, spec) -> list:
    """``inputs`` flattened by the example's tree ``spec``, refusing another tree: a dict with
    keys the example lacked, a sequence of another length. A list, tuple or namedtuple may stand
    for one another, as they do for the forward that indexes them (survey 35 F4)."""
    out: list = []
    try:
        _flatten(inputs, spec, out)
    except ValueError as e:
        raise GraphpruneError(
            f"this graph takes inputs shaped as its example, and these differ: {e}. "
            "torch.export traced the example's keys and items only, and the graph would drop the others unseen. "
            "Compile with an example that gives every key and item the calls give, or keep the model's own classes "
            "(output='module')") from None
    return out


def _flatten(value, spec, out: list, where: str = "") -> None:
    """``value``'s leaves onto ``out`` by ``spec``; a ValueError saying where ``value`` departs from it.
    ``where`` names ``value`` ("" for the generated code's ``([args], {kwargs})``)."""
    if spec.is_leaf():
        out.append(value)
    elif _sequence(spec) and isinstance(value, (list, tuple)):
        if len(value) != spec.num_children:
            raise ValueError(f"{where or 'the inputs'} has {len(value)} items where the example had {spec.num_children}")
        pair = not where and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping)
        for i, (v, c) in enumerate(zip(value, spec.children_specs)):
            _flatten(v, c, out, "" if pair else f"{where}[{i}]" if where else f"input {i}")
    elif _mapping(spec) and isinstance(value, Mapping):  # a tokenizer's BatchEncoding for a dict
        keys = list(spec.context)
        extra, missing = [k for k in value if k not in keys], [k for k in keys if k not in value]
        if extra or missing:
            said = f"{', '.join(map(repr, extra))} the example did not" if extra else f"no {', '.join(map(repr, missing))}"
            raise ValueError(f"{where or 'the inputs'} give{'s' if where else ''} {said}")
        for k, c in zip(keys, spec.children_specs):
            _flatten(value[k], c, out, f"{where}[{k!r}]" if where else str(k))
    else:  # another registered type: exactly its tree
        try:
            out.extend(spec.flatten_up_to(value))
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{where or 'the inputs'} is a {type(value).__name__} where the example had a "
                             f"{getattr(spec.type, '__name__', spec.type)}") from None


def _sequence(spec) -> bool:
    return spec.type in (list, tuple) or (isinstance(spec.type, type) and issubclass(spec.type, tuple)) or \
        "namedtuple" in getattr(spec.type, "__name__", "")


def _mapping(spec) -> bool:
    return isinstance(spec.type, type) and issubclass(spec.type, dict)


_register_custom_builtin("graphprune_graph_inputs", "import graphprune.graph_inputs as graphprune_graph_inputs",
                         sys.modules[__name__])


class ExactInputs(_PyTreeCodeGen):
    """torch.export's pytree code, flattening with ``flatten_exactly``, and with a default of None
    for the trailing inputs traced as None."""

    def __init__(self, pytree_info, nones: list[str]):
        super().__init__(pytree_info)
        self.nones = list(nones)

    def gen_var_bindings(self, fn_args, free_vars, expanded_def) -> str:
        code = super().gen_var_bindings(fn_args, free_vars, expanded_def)
        return code.replace("fx_pytree.tree_flatten_spec(", "graphprune_graph_inputs.flatten_exactly(")

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def: bool = False) -> str:
        code = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        head = re.match(r"def forward\(self((?:, \w+)*)\)", code)
        if head is None or not self.nones:
            return code
        names = [a.strip() for a in head.group(1).split(",") if a.strip()]
        tail = len(names)
        while tail and names[tail - 1] in self.nones:  # only a trailing run can default
            tail -= 1
        args = names[:tail] + [f"{n}=None" for n in names[tail:]]
        return code.replace(head.group(0), f"def forward({', '.join(['self', *args])})", 1)
