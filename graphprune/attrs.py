"""What a module keeps in plain attributes, and the copies that own it.

A forward may keep tensors and Python state outside its parameters and buffers: a step counter in
``self.state["step"]``, an EMA in ``self.ema["mean"]``, features in ``self.feats.append(h)``, a
warm-up in a dataclass. Several walks go into those attributes: the copies graphprune runs and returns
own their containers (``fresh_attrs``) and tensors (``own_tensors``), the checks run on copies of
the tensors (``verify.swapped``) and put back the Python values a run changed (``verify.plain_state``),
``save`` writes the tensors (``held_tensors``, ``checkpoint._plain``) and ``load`` holds the settings
(``settings``).

They go into the same containers, ``ATTR_DEPTH`` levels down, as ``items_of`` says: a dict or a list
of any class (an ``OrderedDict``, a ``defaultdict``), a tuple of any class (a namedtuple), and the
fields of a ``SimpleNamespace`` or dataclass. Each walk had its own test for that at first, and an
``OrderedDict`` of tensors was copied by one walk and not swapped by another: compile refused the
model and left its EMA advanced in the user's model.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import types

import torch
import torch.fx

ATTR_DEPTH = 4  # levels of containers in a module attribute whose tensors are the model's state too
# what every nn.Module keeps in its __dict__ (its stores, hook dicts, flags): never a tensor or setting of the user's
MODULE_STATE = frozenset(torch.nn.Module().__dict__) | {"_parameters", "_buffers", "_modules"}


def user_attributes(mod: torch.nn.Module) -> list:
    """[(name, value)] of what ``mod`` holds in its ``__dict__`` for its own code: less what every module keeps
    (``MODULE_STATE``), graphprune's record (``RECORD``), and a graph module's ``meta``, the records of fx
    and graphprune (the example inputs, shapes), which ``save`` wrote as tensors of the model, twice, and
    safetensors refused."""
    graph = isinstance(mod, torch.fx.GraphModule)
    return [(k, v) for k, v in vars(mod).items() if k not in MODULE_STATE and k != RECORD and not (graph and k == "meta")]


RECORD = "_graphprune"  # the attribute a result keeps graphprune's record of its compile in (module_form.info)


def plain_fields(v):
    """The ``__dict__`` of a ``SimpleNamespace`` or a dataclass instance (state a forward may keep
    there, ``self.state.steps``), or for a dataclass with ``__slots__``, which has none, a mapping
    over its fields (``SlotFields``); else None."""
    plain = type(v) is types.SimpleNamespace or (dataclasses.is_dataclass(v) and not isinstance(v, type))
    if not plain:
        return None
    own = getattr(v, "__dict__", None)
    return own if isinstance(own, dict) else SlotFields(v)


class SlotFields(collections.abc.MutableMapping):
    """The fields of a ``@dataclass(slots=True)`` read and written as a dict's items: the walks that copy,
    swap and put back a forward's state go through it as through a ``__dict__``; left out, a warm-up step
    in one stayed shared with the user's model, and compile advanced it (survey 58 F1). Fields cannot be
    deleted: ``clear`` leaves them, and ``update`` writes them."""

    def __init__(self, obj):
        self.obj, self.names = obj, [f.name for f in dataclasses.fields(obj)]

    def __getitem__(self, k):
        if k not in self.names or not hasattr(self.obj, k):
            raise KeyError(k)
        return getattr(self.obj, k)

    def __setitem__(self, k, v):
        object.__setattr__(self.obj, k, v)  # a frozen dataclass too

    def __delitem__(self, k):
        pass

    def __iter__(self):
        return (k for k in self.names if hasattr(self.obj, k))

    def __len__(self):
        return sum(1 for _ in self)

    def __copy__(self):
        return dict(self.items())


def slots_of(v):
    """Where a container's items are written: the dict or list itself (any subclass), or the fields
    of a ``SimpleNamespace`` or dataclass (``plain_fields``); None for a tuple, which is rebuilt
    (``rebuilt``), and for anything that is no container."""
    if isinstance(v, (torch.Tensor, torch.nn.Module)):
        return None
    if isinstance(v, (dict, list)):
        return v
    return plain_fields(v)


def items_of(v) -> list | None:
    """[(key, item)] of a container the walks go into (``slots_of``, and tuples), else None (also for one
    whose items cannot be read: a dict subclass whose ``items`` raises)."""
    if isinstance(v, tuple):
        return list(enumerate(v))
    slots = slots_of(v)
    return None if slots is None else pairs(slots)


def pairs(slots) -> list:
    """[(key, item)] of a list or mapping (``slots_of``), or [] where reading its items raises."""
    try:
        return list(enumerate(slots) if isinstance(slots, list) else slots.items())
    except Exception:  # noqa: BLE001 - the user's container refuses: not walked
        return []


def key_name(k) -> str:
    """``repr(k)`` for a name (``st['ema']``), or its class's where its repr raises."""
    try:
        return repr(k)
    except Exception:  # noqa: BLE001 - the user's key class
        return f"<{type(k).__name__}>"


def rebuilt(t: tuple, items) -> tuple:
    """A tuple of ``t``'s own class around ``items``, made as ``tuple`` makes one, its own attributes copied: a
    subclass's constructor may take its items one by one (``Pair(a, b)``), and calling it failed (survey 63)."""
    if type(t) is tuple:
        return tuple(items)
    try:
        out = tuple.__new__(type(t), items)
    except TypeError:  # a class of C code (torch.Size, torch.return_types): its own constructor takes the items
        return type(t)(items)
    own = getattr(t, "__dict__", None)
    if own:
        out.__dict__.update(own)
    return out


def _shared(v) -> bool:
    """A Hugging Face config, a dataclass of settings that every copy shares: ``hf.update_config``
    finds the modules that hold one by identity. (A ``ModelOutput`` is a dict, and copied.)"""
    return not isinstance(v, (dict, list)) and type(v).__module__.startswith("transformers.")


def fresh_attrs(d: dict, memo: dict | None = None) -> dict:
    """A module's ``__dict__`` with its containers copied (hook dicts, the non-persistent buffer
    set, and the containers a forward keeps state in, ``items_of``, and sets, ``ATTR_DEPTH`` levels
    down; not a Hugging Face config): a copy of the module gets its own. One level was copied,
    and a forward's ``self.cfg["stats"]["n"] += 1`` counted in the user's model while the trace ran
    it (survey 54 F2). ``memo`` ({id: copy}, the caller's for the whole tree) keeps a container that
    several modules share one container in the copy. Tensors and modules stay: the callers give
    those their own (``own_tensors``, the module copies)."""
    memo = {} if memo is None else memo
    return {k: (copy.copy(v) if k in _STORES else _fresh(v, ATTR_DEPTH, memo)) for k, v in d.items()}


_STORES = ("_parameters", "_buffers", "_modules")  # a module's own stores: copied, each caller fills its own


def _fresh(v, depth: int, memo: dict):
    """``v`` with the containers in it copied (see ``fresh_attrs``)."""
    if isinstance(v, (torch.Tensor, torch.nn.Module)):
        return v
    if id(v) in memo:
        return memo[id(v)]
    if isinstance(v, tuple):
        items = [_fresh(t, depth - 1, memo) for t in v] if depth > 0 else v
        return rebuilt(v, items) if any(a is not b for a, b in zip(items, v)) else v
    if (not isinstance(v, set) and slots_of(v) is None) or _shared(v):
        return v
    try:
        out = copy.copy(v)  # copy, not type(v)(v): a defaultdict takes no dict
    except Exception:  # noqa: BLE001 - a container that refuses copies (its items raise): shared, as other objects are
        return v
    memo[id(v)] = out
    slots = slots_of(out)  # where its items are written (a set's: none)
    for k, item in (items_of(out) or ()) if depth > 0 else ():
        new = _fresh(item, depth - 1, memo)
        if new is not item:
            slots[k] = new
    return out


def own_tensors(d: dict, copy_tensor) -> dict:
    """A module ``__dict__`` (already through ``fresh_attrs``) whose plain tensor attributes, and the
    tensors in its containers (``items_of``: an RNN's ``_flat_weights``, a cache a user keeps as
    ``[tensor]``, an EMA in an ``OrderedDict``), are replaced by ``copy_tensor(tensor, name)``: a
    result tree must not hold the user's tensors, which its forward could write into. Parameters
    and buffers are not here: they live in ``_parameters`` / ``_buffers``."""
    return {k: (v if k in _STORES else _with_own_tensors(v, copy_tensor, k)) for k, v in d.items()}


def _with_own_tensors(v, copy_tensor, name: str, depth: int = ATTR_DEPTH):
    """``v`` with every tensor in it copied (``copy_tensor(tensor, name)``), its containers ``depth``
    levels down rebuilt around the copies; ``v`` itself where it holds none. A forward's
    ``self.hist[0][0] += 1`` counted in the user's model while the trace ran it, and the result
    shared the tensor (survey 53 F03)."""
    if isinstance(v, torch.Tensor):
        return copy_tensor(v, name)
    items = items_of(v) if depth > 0 else None
    if not items:
        return v
    new = {k: _with_own_tensors(t, copy_tensor, f"{name}.{k if isinstance(k, (int, str)) else type(k).__name__}",
                                depth - 1) for k, t in items}
    if all(new[k] is t for k, t in items):
        return v
    if isinstance(v, tuple):
        return rebuilt(v, [new[k] for k, _ in items])
    out = copy.copy(v)
    slots = slots_of(out)
    for k, t in items:
        if new[k] is not t:
            slots[k] = new[k]
    return out


def tensor_slots(store, depth: int = ATTR_DEPTH, skip=()) -> list:
    """[(slots, key, value)]: where ``store`` (a module's ``__dict__``, less the names in ``skip``) and the
    containers in it (``items_of``) hold tensors, ``depth`` levels down. ``value`` is a tensor, or a
    tuple that holds tensors (``slots[key]`` is then rebuilt, ``rebuilt``, not the tensors' own slots).
    Buffers alone were run on copies at first, then tensors one level into a list or dict; a forward
    that counted its calls in ``self.hist[0][0] += 1`` or ``self.state.steps += 1`` ran the checks on
    the user's own tensors and compile left them advanced (survey 53 F03)."""
    out = []
    for k, v in pairs(store):
        if k in skip:
            continue
        if isinstance(v, torch.Tensor):
            out.append((store, k, v))
        elif depth > 0:
            if isinstance(v, tuple) and any(isinstance(t, torch.Tensor) for t in v):
                out.append((store, k, v))
            for child in (v if isinstance(v, tuple) else (v,)):
                inner = slots_of(child)
                if inner is not None:
                    out += tensor_slots(inner, depth - 1)
    return out


def held_tensors(v, depth: int = ATTR_DEPTH) -> list:
    """[(keys, tensor)]: the tensors inside container ``v`` (``items_of``), ``depth`` levels down, each with the
    keys that reach it (``self.proj["w"]``: ``("w",)``); keys other than ints and strings are not followed."""
    out = []
    for k, item in items_of(v) or ():
        if not isinstance(k, (int, str)):
            continue
        if isinstance(item, torch.Tensor):
            out.append(((k,), item))
        elif depth > 1:
            out += [((k, *ks), t) for ks, t in held_tensors(item, depth - 1)]
    return out


def attribute_tensors(model: torch.nn.Module) -> list:
    """[(module path, attribute, keys, tensor)] of every tensor a module holds as a plain attribute (keys ``()``)
    or inside one's containers (``held_tensors``), every name a module has: what ``save`` writes, what the trace
    check counts as written, and where ``load`` looks for tensors left on meta."""
    out = []
    for path, mod in model.named_modules(remove_duplicate=False):
        for k, v in user_attributes(mod):
            out += [(path, k, (), v)] if isinstance(v, torch.Tensor) else [(path, k, keys, t) for keys, t in held_tensors(v)]
    return out


def tensor_name(path: str, attr: str, keys=()) -> str:
    """``proj['bias']``, ``block.cache[0]``: an ``attribute_tensors`` entry by name."""
    return (f"{path}." if path else "") + attr + "".join(f"[{key_name(k)}]" for k in keys)


def put(v, keys, value):
    """``v`` with ``value`` at ``keys`` (``held_tensors``): written into dicts, lists and fields in place; a
    tuple on the way is rebuilt, and what holds it is given the new one. Returns ``v``, or its rebuilt tuple."""
    k, rest = keys[0], keys[1:]
    items = items_of(v)
    if items is None or (k not in dict(items) and (rest or not isinstance(v, dict))):
        raise KeyError(k)  # a dict may take a key it lacks; nothing else
    new = value if not rest else put(dict(items)[k], rest, value)
    if isinstance(v, tuple):
        return rebuilt(v, [new if j == k else t for j, t in items])
    slots_of(v)[k] = new
    return v


def at(v, keys):
    """What ``v`` holds at ``keys``, or None."""
    for k in keys:
        items = dict(items_of(v) or ())
        if k not in items:
            return None
        v = items[k]
    return v
