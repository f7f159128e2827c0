"""Inputs the example gave as None, in the model's own classes: held to None.

The self-check holds the module form to its dead twin on the example, on other input
sizes and on the other values of the settings the code compares (``module_form.beyond``).
An input the example gave as None, or left out where the forward defaults it to None,
took part in none of it. Given a tensor later, the user's code runs a path nobody
checked, and the tensor may pick, mask or scale channels that pruning removed and
renumbered: ``h[:, pick]`` read two other hidden units, 0.61 off the twin (survey 33
f07). So the module form refuses a value there, as the graph form does
(``graph_inputs.guard``), and says how to have the path checked: give it in the example.
The same holds for a dict key the example's dict lacked (``batch.get("mask")``) and for a
keyword a ``**kwargs`` forward did not get.

A setting whose other values ``beyond`` tried (``norm: Optional[bool] = None``) is
checked and stays open. Hugging Face models are left out: ``generate()`` passes masks,
positions and caches the example leaves out, and their paths are exercised by the
Hugging Face tests; an input of theirs that states a width (``inputs_embeds``) fails
loudly at the pruned width.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping

import torch

from .errors import GraphpruneError

Path = list  # a forward parameter's name, then the keys and indices into its value


def unchecked(model: torch.nn.Module, example) -> list[list]:
    """Rules for the inputs of ``model.forward`` the example left None (``["none", path]``),
    the dicts whose other keys it never saw (``["keys", path, keys]``) and the ``*args`` past its
    count (``["items", path, count]``), where no check tried another value. [] for a Hugging
    Face model or a forward without a signature."""
    from . import hf, source
    from .module_form import _hints, _other_values

    if hf.is_hf(model):
        return []
    try:
        signature = inspect.signature(model.forward)
        params, bound = signature.parameters, signature.bind(*example[0], **dict(example[1] or {}))
    except (TypeError, ValueError):
        return []
    compared, hints = None, None
    rules: list[list] = []
    for name, prm in params.items():
        if prm.kind is prm.VAR_POSITIONAL:  # ``forward(self, x, *extra)``: more of them take another path
            given = bound.arguments.get(name, ())
            rules.append(["items", [name], len(given)])
            _walk(given, [name], rules)
            continue
        if prm.kind is prm.VAR_KEYWORD:
            _walk(bound.arguments.get(name, {}), [name], rules)
            continue
        value = bound.arguments.get(name, prm.default)
        if value is inspect.Parameter.empty:
            continue
        if value is None:
            if compared is None:
                compared, hints = source.compared_constants(model), _hints(model.forward)
            if _every_value(hints.get(name)) and _other_values(None, compared.get(name, []) + compared[None],
                                                                hints.get(name)):
                continue  # a flag or an enum, which beyond() ran at each of its values
        _walk(value, [name], rules)
    return rules


def _every_value(hint) -> bool:
    """Whether the checks try every value a None default's annotation allows: a bool's two, an
    enum's members. An ``Optional[int]`` tried at 1 let ``h[:, pick]`` at pick=2 through, 0.70 off
    (survey 38 f01)."""
    import enum
    import typing

    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return len(kinds) == 1 and isinstance(kinds[0], type) and (kinds[0] is bool or issubclass(kinds[0], enum.Enum))


def _walk(value, path: Path, rules: list) -> None:
    if value is None:
        rules.append(["none", path])
    elif isinstance(value, Mapping):
        keys = list(value)
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):  # what a manifest can write
            rules.append(["keys", path, keys])
        for k, v in value.items():
            _walk(v, [*path, k], rules)
    elif isinstance(value, (list, tuple)):
        before = len(rules)
        for i, v in enumerate(value):
            _walk(v, [*path, i], rules)
        if len(rules) > before and not any(r[0] == "items" and r[1] == path for r in rules):
            # an item past the example's holds what no rule names (a second dict whose None field is set, 0.71 off:
            # survey 38 f06); a list of tensors alone stays open to any length
            rules.append(["items", path, len(value)])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):  # a field as ".name", which no dict key of a manifest takes for one
            _walk(getattr(value, f.name), [*path, f".{f.name}"], rules)


def refuse(top: torch.nn.Module, rules: list) -> None:
    """Hold ``top`` (a module form) to ``rules`` (``unchecked``) with a forward pre-hook, in
    place of any a module form it was built from held; note them in its record, so that
    ``save`` writes them and ``load`` holds the loaded model to them."""
    from .module_form import info

    for key, hook in list(top._forward_pre_hooks.items()):
        if isinstance(hook, HeldToNone):
            del top._forward_pre_hooks[key]
            top._forward_pre_hooks_with_kwargs.pop(key, None)
    rec = info(top)
    if rec is not None:
        rec["held_to_none"] = [list(r) for r in rules]
    if rules:  # first: it judges what the caller gives, before a pre-hook of the user's fills it in (survey 39 f10)
        top.register_forward_pre_hook(HeldToNone(rules), with_kwargs=True, prepend=True)


def said(rules: list) -> str:
    """The rules for ``report.form_why``."""
    nones = [_name(r[1]) for r in rules if r[0] == "none"]
    dicts = [_name(r[1]) for r in rules if r[0] == "keys"]
    parts = [f"{', '.join(f'{n}=None' for n in nones[:6])}{' ...' if len(nones) > 6 else ''}"] if nones else []
    parts += [f"the keys it gave {', '.join(dicts[:4])}"] if dicts else []
    parts += [f"{r[2]} item(s) in {_name(r[1])}" for r in rules if r[0] == "items"]
    return (f". Pruned from an example with {' and '.join(parts)}: the model's code with another value there was not "
            "checked, so the returned model refuses a call that gives one (more items, a key or a value where the "
            "example had none); give it in the example to prune with that path checked")


class HeldToNone:
    """The forward pre-hook ``refuse`` registers: a plain object, so the model pickles and
    deep-copies with it."""

    def __init__(self, rules: list):
        self.rules = [list(r) for r in rules]

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        try:
            bound = _signature(type(module).forward).bind(module, *args, **kwargs).arguments
        except (TypeError, ValueError):
            return None  # the forward raises its own error
        for rule in self.rules:
            found, value = _at(bound, rule[1])
            if not found:
                continue
            if rule[0] == "none" and value is not None:
                raise GraphpruneError(
                    f"{type(module).__name__} was pruned from an example with {_name(rule[1])}=None, and graphprune "
                    f"checked the model's code on that path only: a value for {_name(rule[1])} may select, mask or scale "
                    "channels that pruning removed or renumbered, and nothing checked that it does not. Compile with "
                    f"an example that gives {_name(rule[1])} (its channels are then kept or pruned to match), or call "
                    "with it None")
            if rule[0] == "items" and isinstance(value, (list, tuple)) and len(value) > rule[2]:
                raise GraphpruneError(
                    f"{type(module).__name__} was pruned from an example with {rule[2]} item(s) in {_name(rule[1])}, and "
                    f"graphprune checked the model's code with those only: {len(value) - rule[2]} more may select, mask "
                    "or scale channels that pruning removed or renumbered, and nothing checked that they do not. "
                    "Compile with an example that gives them, or call without")
            if rule[0] == "keys" and isinstance(value, Mapping):
                extra = [k for k in value if k not in rule[2]]
                if extra:
                    raise GraphpruneError(
                        f"{type(module).__name__} was pruned from an example whose {_name(rule[1])} had the keys "
                        f"{rule[2]}, and graphprune checked the model's code with those only: "
                        f"{', '.join(map(repr, extra[:4]))} may select, mask or scale channels that pruning removed or "
                        "renumbered, and nothing checked that it does not. Compile with an example that gives "
                        f"{'them' if len(extra) > 1 else 'it'}, or call without")
        return None


@functools.lru_cache(maxsize=256)
def _signature(forward) -> inspect.Signature:
    """The signature of a class's ``forward`` (self first): read once, not at every call."""
    return inspect.signature(forward)


def _at(bound: dict, path: Path):
    """(found, the value at ``path``) in the bound arguments."""
    if path[0] not in bound:  # left at its default; for ``*args``, none
        return False, None
    value = bound[path[0]]
    for step in path[1:]:
        if isinstance(value, Mapping) and step in value:
            value = value[step]
        elif isinstance(step, str) and step.startswith(".") and hasattr(value, step[1:]):
            value = getattr(value, step[1:])
        elif isinstance(value, (list, tuple)) and isinstance(step, int) and step < len(value):
            value = value[step]
        else:
            return False, None
    return True, value


def _name(path: Path) -> str:
    return path[0] + "".join(k if isinstance(k, str) and k.startswith(".") else f"[{k!r}]" for k in path[1:])
