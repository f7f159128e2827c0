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
        defaults = _defaults(model)
        graph.graph._codegen = ExactInputs(codegen.pytree_info, [n.name for n in nones if defaults.get(n.name, 0) is None],
                                           [k for k in defaults if k not in {n.name for n in nones}])
    graph.recompile()
    return [n.name for n in nones]


def _defaults(model) -> dict:
    """{name: default} of ``model.forward``'s parameters that have one."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values() if model is not None else ()
    except (TypeError, ValueError):
        return {}
    return {q.name: q.default for q in params if q.default is not inspect.Parameter.empty}


class Missing:
    """The default the generated forward gives an input the example gave and the model's forward
    may go without: a call without it is refused by name (survey 36 F05: Python's bare TypeError)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"graphprune_graph_inputs.Missing({self.name!r})"


def guard_given(graph: torch.fx.GraphModule) -> list[str]:
    """Make ``graph`` (an fx graph: its forward keeps the model's defaults) refuse None for each
    input its example gave a tensor where the forward defaults it to None: the graph computes the
    path with the tensor, and went on with None into ``None[..., None]`` (survey 36 F05). Returns
    those inputs' names."""
    holders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    given = [n for n in holders if n.args == (None,) and isinstance(n.meta.get(VAL), torch.Tensor)]
    if given and not any(n.target is traced_as_given for n in graph.graph.nodes):
        with graph.graph.inserting_after(holders[-1]):
            for n in reversed(given):
                graph.graph.call_function(traced_as_given, (n, n.name))
        graph.recompile()
    return [n.name for n in given]


@torch.fx.node.has_side_effect  # no dead-code pass drops it: it has no users
def traced_as_given(value, name: str) -> None:
    """The check ``guard_given`` puts in a graph for an input its example gave."""
    if value is None:
        raise GraphpruneError(
            f"this graph was traced from an example that gave {name}, and computes that path only: give {name} as "
            f"the example did{_ones(name)}, or compile with an example without it, to trace the path the model "
            "takes then")


def _ones(name: str) -> str:
    return " (a mask of ones where nothing is masked)" if "mask" in name else ""


@torch.fx.node.has_side_effect  # no dead-code pass drops it: it has no users
def traced_as_none(value, name: str) -> None:
    """The check ``guard`` puts in a graph for an input traced as None."""
    if value is not None:
        raise GraphpruneError(
            f"this graph was traced with {name}=None and computes that path only (torch.export held it as a "
            f"constant): compile with an example that gives {name}, to prune with that path traced and checked")


def flatten_exactly(inputs, spec) -> list:
    """``inputs`` flattened by the example's tree ``spec``, refusing another tree: a dict with
    keys the example lacked, a sequence of another length. A list, tuple or namedtuple may stand
    for one another, as they do for the forward that indexes them (survey 35 F4)."""
    out: list = []
    left = [v.name for v in _top_values(inputs) if isinstance(v, Missing)]
    if left:
        raise GraphpruneError(
            f"this graph was traced from an example that gave {', '.join(left)}, and computes that path only "
            f"(torch.export): give {'them' if len(left) > 1 else 'it'} as the example did{_ones(' '.join(left))}, or "
            "compile with an example without, to trace the path the model takes then")
    try:
        _flatten(inputs, spec, out)
    except ValueError as e:
        raise GraphpruneError(
            f"this graph takes inputs shaped as its example, and these differ: {e}. "
            "torch.export traced the example's keys and items only, and the graph would drop the others unseen. "
            "Compile with an example that gives every key and item the calls give, or keep the model's own classes "
            "(output='module')") from None
    return out


def _top_values(inputs) -> list:
    """The generated code's ``([args], {kwargs})`` as one list of values."""
    if isinstance(inputs, (list, tuple)) and len(inputs) == 2 and isinstance(inputs[1], Mapping):
        return [*inputs[0], *inputs[1].values()]
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _children(spec) -> list:
    """A TreeSpec's child specs (``children()``; ``children_specs`` before torch 2.14, now deprecated)."""
    return spec.children() if hasattr(spec, "children") else spec.children_specs


def _flatten(value, spec, out: list, where: str = "") -> None:
    """``value``'s leaves onto ``out`` by ``spec``; a ValueError saying where ``value`` departs from it.
    ``where`` names ``value`` ("" for the generated code's ``([args], {kwargs})``)."""
    if spec.is_leaf():
        out.append(value)
    elif _sequence(spec) and isinstance(value, (list, tuple)):
        if len(value) != spec.num_children:
            raise ValueError(f"{where or 'the inputs'} has {len(value)} items where the example had {spec.num_children}")
        pair = not where and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping)
        for i, (v, c) in enumerate(zip(value, _children(spec))):
            _flatten(v, c, out, "" if pair else f"{where}[{i}]" if where else f"input {i}")
    elif _mapping(spec) and isinstance(value, Mapping):  # a tokenizer's BatchEncoding for a dict
        keys = list(spec.context)
        extra, missing = [k for k in value if k not in keys], [k for k in keys if k not in value]
        if extra or missing:
            said = f"{', '.join(map(repr, extra))} the example did not" if extra else f"no {', '.join(map(repr, missing))}"
            raise ValueError(f"{where or 'the inputs'} give{'s' if where else ''} {said}")
        for k, c in zip(keys, _children(spec)):
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
    """torch.export's pytree code, flattening with ``flatten_exactly``, and with a default for the
    trailing inputs the model's forward defaults: None for those traced as None, a ``Missing``
    that ``flatten_exactly`` refuses by name for the others."""

    def __init__(self, pytree_info, nones: list[str], optional: list[str] = ()):
        super().__init__(pytree_info)
        self.nones = list(nones)
        self.optional = list(optional)

    def gen_var_bindings(self, fn_args, free_vars, expanded_def) -> str:
        code = super().gen_var_bindings(fn_args, free_vars, expanded_def)
        return code.replace("fx_pytree.tree_flatten_spec(", "graphprune_graph_inputs.flatten_exactly(")

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def: bool = False) -> str:
        code = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        head = re.match(r"def forward\(self((?:, \w+)*)\)", code)
        optional = getattr(self, "optional", [])  # a codegen pickled before optional inputs were defaulted
        if head is None or not (self.nones or optional):
            return code
        names = [a.strip() for a in head.group(1).split(",") if a.strip()]
        tail = len(names)
        while tail > 1 and (names[tail - 1] in self.nones or names[tail - 1] in optional):  # a trailing run can default
            tail -= 1
        args = names[:tail] + [f"{n}=None" if n in self.nones else f"{n}=graphprune_graph_inputs.Missing({n!r})"
                               for n in names[tail:]]
        return code.replace(head.group(0), f"def forward({', '.join(['self', *args])})", 1)
