"""The plain settings a model holds outside its tensors, which ``load`` holds a fresh original to.

``load`` rebuilds a saved result onto a freshly built original and takes every attribute that is not
a tensor from it; tensor shapes show none of them. ``settings`` records them at compile (the manifest's
``original_settings``), ``checkpoint`` compares them at load, and ``set_settings`` puts back those the
user changed on the result since (``settings_after``). A setting is a number, string, bool, None or
enum, or a short tuple or list of them, held by a module as an attribute (a private one too, in a
class of the user's, where the model's code reads it) or inside what one holds: a dict, list,
namespace, dataclass or plain object of the user's (``self.cfg.scale``, ``self.opts["eps"]``),
``attrs.ATTR_DEPTH`` levels down; or by its class (``scale = 0.5`` in the class body) where the code
reads it, or where one model's instance holds an attribute and the other's reads its class's
(``class_value``). Those inside were left out at first, and a
model built with ``Cfg(scale=2.0)`` loaded onto ``Cfg(scale=1.0)`` 0.5 off without a word. So are the
functions a module holds and its forward hooks, which ``load`` takes from the original as they are: by
name, and what their closures, defaults and code constants hold (tensors there by their sums).
"""
from __future__ import annotations

import argparse
import collections
import enum
import functools
import json
import math
import numbers
import re
import sys
import types
from collections.abc import Mapping

import torch

from . import hf, source
from .attrs import ATTR_DEPTH, items_of, key_name, slots_of, user_attributes
from .errors import GraphpruneError

# attribute and config names of settings that change training alone, not what eval mode computes
TRAINING_ATTR = re.compile(r"dropout|pdrop|drop_?path|layerdrop|drop_?rate|drop_?prob|momentum|inplace|initializer|init_std|"
                           r"checkpoint",
                           re.IGNORECASE)
# regularizers that are the identity in eval mode, by class name: torch's dropouts, timm's DropPath and
# DropBlock, torchvision's StochasticDepth, and nn.Identity, which a model built without them holds instead
EVAL_IDENTITY = re.compile(r"Identity|(Alpha|FeatureAlpha)?Dropout[123]?d?|Drop(Path|Block)\d*d?|StochasticDepth")
MAX_ITEMS = 64  # a container with more items holds data (a vocabulary), not settings: not walked
# libraries whose objects a module may hold (a logger, a Hugging Face config, which ``checkpoint._check_config``
# compares itself): not the user's settings objects, so not walked; argparse's namespace is
LIBRARIES = frozenset(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "timm", "torchvision", "tokenizers",
                                                  "safetensors", "huggingface_hub", "accelerate", "graphprune"}


def settings(model: torch.nn.Module, skip=()) -> dict:
    """{module path: {name: value}}: the plain settings of every module (see the module's doc), a name
    being an attribute's, or a path into what it holds (``cfg.scale``, ``opts['eps']``). A Hugging Face
    model's config says its own (``checkpoint._check_config``). Left out:
    state the forward keeps (``source.state_attributes``: a counter it adds to, in training alone too,
    which refused every fresh original, survey 56 F3; a container it changes in place), what its example
    call changed (``skip``, ``verify.plain_state_changed``: inside containers always, and attributes where no
    source says what it keeps), settings of training alone (dropout rates, momentum, gradient
    checkpointing) and private names (``_step``, caches). Everything else is compared, also what the
    forward reads through a property, ``getattr`` or a child, and all of a class with no source to read
    or a forward replaced on the instance: reading only what the forward names (``self.scale``) let all
    of those load 0.35 to 1.4 off (survey 58 F2). A value drawn at random when built is refused so; the
    message names it, to be set on the original before load."""
    if hf.is_hf(model):
        return {}  # its config says (``checkpoint._check_config``); inside a user's model, its layers' attributes
        # say (its own are where it was loaded from, ``name_or_path``, which refused a copy elsewhere, survey 64)
    skip = set(skip)
    out: dict = {}
    reads = model_reads(model)
    counters = (source.runtime_assigned(model, from_library) or ((), ()))[1]  # ``type(self).calls += 1``
    for path, m in model.named_modules():
        if EVAL_IDENTITY.fullmatch(type(m).__name__):
            continue  # a dropout's rate, DropPath's probability: nothing in eval mode
        state = source.state_attributes(type(m)) if "forward" not in vars(m) else None
        prefix = f"{path}." if path else ""
        # what the example call changed is state only where no source says (a setting the first call fills in,
        # ``if self.bias is None: self.bias = 0.5``, is compared at the value the user's model holds)
        mine: dict = {}
        library = is_library(m)
        for k, v in ([] if path and hf.is_hf(m) else _attributes(m, reads)):
            if (k != "training" and k not in (state or ())
                    and (state is not None or prefix + k not in skip)):
                # a library's layer states its settings as plain attributes; what its dicts hold is metadata (timm's
                # pretrained_cfg: the weights' url and tag, which refused a build with another tag, survey 64)
                deep = not library or isinstance(v, _FUNCTIONS)  # its activation function too (F.gelu for F.relu)
                _walk(v, k, ATTR_DEPTH if deep else 0, _Walk(mine, {id(m)}, skip, prefix, reads=reads))
        if not library:  # what its classes hold where the instance holds none, and the code reads (survey 69 F5:
            # ``Net.scale = 2.0`` set before building loaded onto a class at 0.5); a counter of instances is read by none
            for k, v in _class_settings(m).items():
                if (k not in vars(m) and k not in mine and k not in (state or ()) and k not in counters
                        and (_named(k) or _private(k)) and (reads is None or k in reads)):
                    mine[k] = _setting(v)
        _hooks(m, _Walk(mine, {id(m)}, skip, prefix))
        if isinstance(m, torch.fx.GraphModule):
            mine["code"] = _code(m)
        if mine:
            out[path] = mine
    return out


class _Walk:
    """Where one module's walk writes (``out``), what it has seen, the changed containers it skips, whether
    tensors are settings here (in a hook's closure, which no save writes: ``tensors``), and where each
    setting is written (``slots``, for ``set_settings``)."""

    def __init__(self, out: dict, seen: set, skip: set, prefix: str, slots: dict | None = None, tensors: bool = False,
                 reads: frozenset | None = None):
        self.out, self.seen, self.skip, self.prefix, self.slots, self.tensors = out, seen, skip, prefix, slots, tensors
        self.reads = reads  # the names the model's code reads (``source.model_reads``), None where unknown

    def with_tensors(self) -> "_Walk":
        return _Walk(self.out, self.seen, self.skip, self.prefix, self.slots, tensors=True, reads=self.reads)


def _walk(v, name: str, depth: int, w: _Walk, holder=None, key=None) -> None:
    """Record the settings ``v`` is or holds under ``name`` (``w.slots`` also gets where each is written:
    ``(holder, key)``, holder None where it cannot be: inside a tuple or a function)."""
    plain = _fingerprint(v) if w.tensors and isinstance(v, torch.Tensor) else _setting(v)
    if plain is not _NOT_A_SETTING:
        w.out[name] = plain
        if w.slots is not None:
            w.slots[name] = (holder, key)
        return
    if depth <= 0 or id(v) in w.seen:
        return
    if w.prefix + name in w.skip and ("." in name or "[" in name or slots_of(v) is not None):
        return  # a container the example call changed holds state (``self.stats["n"] += 1``)
    try:
        items, write, fields = _held(v)
    except Exception:  # noqa: BLE001 - an object that refuses to be read (its __dict__ or items raise) holds no setting
        return
    if items is None:
        return
    w.seen.add(id(v))
    if len(items) > MAX_ITEMS:  # data, or many settings: compared as one digest where every item is plain
        digest = _digest(items)
        if digest is not None:
            w.out[name] = digest
        return
    # a function's closure and a plain object of the user's are not saved: their tensors are settings there
    unsaved = (fields and write is None) or _plain_object(v)  # a function (named items, none written), an object
    inner = w.with_tensors() if unsaved and not w.tensors else w
    # private keys of a dict, a dataclass, a plain object are the user's settings as much as public ones where code
    # reads them (``cfg._gain`` loaded 0.9 off, survey 67 F5), else bookkeeping (a dataclass's ``_created`` stamp
    # refused every fresh original, survey 68 F5); a function's closure and defaults are read by the function
    read = None if isinstance(v, _FUNCTIONS) else _read_by(v, w.reads)
    for k, t in items:
        if isinstance(k, str) and not (_named(k) or (_private(k) and (read is None or k in read))):
            continue
        _walk(t, f"{name}.{k}" if fields else f"{name}[{key_name(k)}]", depth - 1, inner, write, k)


def _code(m: torch.fx.GraphModule) -> str:
    """A graph's code as a setting (its digest): the numbers the trace wrote into it (``mul = relu * 2.0``) are
    no attribute of anything, and a graph traced from a model built with another scale loaded 0.16 to 0.54
    off without a word (survey 68 F6)."""
    import hashlib

    code = re.sub(r" at 0x[0-9a-fA-F]+", "", m.code)
    return f"graph code, sha256 {hashlib.sha256(code.encode()).hexdigest()[:16]}"


def _digest(items: list) -> str | None:
    """One setting for a container of more than ``MAX_ITEMS`` plain items: their count and hash."""
    import hashlib
    import json

    values = [(key_name(k), _setting(t)) for k, t in items]
    if any(t is _NOT_A_SETTING for _, t in values):
        return None
    return f"{len(values)} items, sha256 {hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()[:16]}"


def _plain_object(v) -> bool:
    return not isinstance(v, (Mapping, list, tuple, types.SimpleNamespace)) and slots_of(v) is None


def _held(v):
    """([(key, item)], where they are written or None, whether keys are field names) of what ``v`` holds, or
    (None, None, False): a container (``attrs.items_of``: a dict, list or tuple, a namespace's or dataclass's
    fields), another mapping (read only), a plain object of the user's (its ``__dict__``, set by ``setattr``),
    or a function: its name, and the values its closure and defaults hold (``functools.partial(F.leaky_relu,
    negative_slope=0.2)`` built with another slope loaded 0.05 off, survey 61)."""
    if isinstance(v, (torch.Tensor, torch.nn.Module, type)):
        return None, None, False
    if isinstance(v, _FUNCTIONS):
        return _function(v), None, True
    mine = type(v) is argparse.Namespace or not from_library(type(v))
    if not (mine or isinstance(v, (dict, list, tuple, types.SimpleNamespace))):
        return None, None, False  # a library's object: a logger, a Hugging Face config, graphprune's report
    items = items_of(v)
    if items is not None:
        slots = slots_of(v)
        fields = not isinstance(v, (Mapping, list, tuple))
        factory = getattr(v, "default_factory", None)  # a defaultdict's: what a missing key reads
        items = items + [("default_factory", factory)] if factory is not None else items
        return items, (v if fields else slots) if slots is not None else None, fields
    if isinstance(v, Mapping):
        return list(v.items()), None, False
    own = getattr(v, "__dict__", None)
    if isinstance(own, dict):
        return list(own.items()), v, True
    names = [n for c in type(v).__mro__ for n in ([c.__slots__] if isinstance(getattr(c, "__slots__", ()), str)
                                                     else getattr(c, "__slots__", ()))]
    return ([(n, getattr(v, n)) for n in names if hasattr(v, n)], v, True) if names else (None, None, False)


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def _function(f) -> list:
    """[(key, item)] of a function, a bound method or a ``functools.partial``: what it is by name
    (``function``), and the values its closure cells and defaults hold, by the names its code gives them."""
    if isinstance(f, functools.partial):
        return [("function", _name(f.func)), *_function(f.func)[1:], ("args", list(f.args)), *f.keywords.items()]
    if isinstance(f, types.MethodType):  # a bound method: its object's settings are its own, its function's here
        return [("function", _name(f.__func__)), *_function(f.__func__)[1:]]
    out = [("function", _name(f))]
    code = getattr(f, "__code__", None)
    if code is None:
        return out
    # the numbers and strings its code holds (``lambda: 0.5`` against ``lambda: 1.0``)
    out.append(("constants", [c for c in code.co_consts if isinstance(c, (bool, int, float, str))][:16]))
    cells = [(n, c.cell_contents) for n, c in zip(code.co_freevars, f.__closure__ or ()) if _filled(c)]
    # a dict or list in a closure is what a hook fills (``acts[name] = out``): state, not a setting (survey 62)
    out += [(n, v) for n, v in cells if not isinstance(v, (dict, list, set, collections.deque))]
    defaults = f.__defaults__ or ()
    out += list(zip(code.co_varnames[code.co_argcount - len(defaults):code.co_argcount], defaults))
    return out + list((f.__kwdefaults__ or {}).items())


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _name(f) -> str:
    return f"{getattr(f, '__module__', None) or ''}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def _fingerprint(t: torch.Tensor) -> str:
    """A tensor in a hook's closure as a setting: its shape, dtype and sums (load rebuilds its hooks from the
    original it is given, whose tensor there may differ: a gain drawn when built loaded 0.45 off, survey 61)."""
    if t.is_meta:
        return f"tensor {list(t.shape)} {t.dtype} on meta"
    d = t.detach().double()
    return f"tensor {list(t.shape)} {t.dtype} sum {float(d.sum()):.9g} abs {float(d.abs().sum()):.9g}"


def _named(k: str) -> bool:
    """A public name that is not a training-only setting."""
    return not k.startswith("_") and not TRAINING_ATTR.search(k)


_DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu|hip|npu|xla|hpu|ipu|privateuseone)(:\d+)?")


def is_device(v) -> bool:
    """A setting that names a device (``self.device = weight.device``, as recorded): where a model was built says
    nothing of what it computes, and one compiled on a GPU loads onto an original built on the CPU."""
    return isinstance(v, str) and _DEVICE.fullmatch(v) is not None


def _private(k: str) -> bool:
    """A private name that is not Python's (``__dict__``) or a training-only setting's."""
    return k.startswith("_") and not k.startswith("__") and not TRAINING_ATTR.search(k)


def model_reads(model: torch.nn.Module) -> frozenset | None:
    """The attribute names the user's code of ``model`` reads once built (``source.model_reads``)."""
    return source.model_reads(model, from_library)


def _read_by(v, reads: frozenset | None) -> frozenset | None:
    """The names read of what ``v`` holds: by the model's code, or, for an object of another class of the
    user's, by its own file's code; None (all) where either has no source."""
    if reads is None or not _plain_object(v) or from_library(type(v)):
        return reads
    own = source.class_file_reads(type(v))
    return None if own is None else reads | own


def is_library(m: torch.nn.Module) -> bool:
    return from_library(type(m))


def from_library(obj) -> bool:
    """A class or function a library defines (``LIBRARIES``), not the user."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] in LIBRARIES


def _attributes(m: torch.nn.Module, reads: frozenset | None, classes: bool = False) -> list:
    """[(name, value)] of the attributes of ``m`` that may hold settings: the public ones, and for a class of
    the user's its private ones too where the model's code reads them once built (``self._scale``, set from an
    argument as often as ``self.scale``: left out, a model built with ``_scale=2.0`` loaded onto one built with
    1.0 0.36 off without a word; a run tag, a uuid, a pid nothing reads are bookkeeping, which refused every
    fresh original, survey 67 F1). A library's private attributes are its bookkeeping, derived from the public
    ones; dunder names are Python's. ``classes``: also the settings its classes hold that it does not
    (``_class_settings``), where ``set_settings`` may write them on the instance."""
    mine = not is_library(m)
    named = lambda k: _named(k) or (mine and _private(k) and (reads is None or k in reads))  # noqa: E731
    own = [(k, v) for k, v in user_attributes(m) if named(k)]
    return own + [(k, v) for k, v in _class_settings(m).items() if named(k) and k not in vars(m)] if classes else own


MISSING = object()  # ``class_value`` where the classes hold no such setting


def class_value(m: torch.nn.Module, k: str):
    """The setting ``m``'s classes of the user's hold at name ``k`` (``scale = 0.5`` in the class body), as the
    manifest records settings, or ``MISSING``: what an instance without an attribute of that name reads."""
    v = _class_settings(m).get(k, MISSING) if not is_library(m) else MISSING
    return v if v is MISSING else json.loads(json.dumps(_setting(v)))


def _class_settings(m: torch.nn.Module) -> dict:
    """{name: value} of the plain settings the user's classes of ``m`` hold as class attributes (``scale = 0.5``
    in the class body), nearest class first, but for a library's classes. An instance reads them where it
    holds none of that name: a model built with ``self.scale = 2.0`` loaded onto one built without, which reads
    the class's 0.5, and nothing compared them. ``settings`` records those the model's code reads (a counter
    of instances built, which differs between two builds in one process, is read by none: survey 68 F4); load
    also compares the one an instance reads where only the other model's instance holds that name
    (``class_value``)."""
    out: dict = {}
    for cls in type(m).__mro__:
        if from_library(cls) or cls is object:
            continue  # a mixin after ``nn.Module`` in the bases is the user's too (survey 70 F5)
        for k, v in vars(cls).items():
            if k not in out and not k.startswith("__") and _setting(v) is not _NOT_A_SETTING:
                out[k] = v
    return out


_NOT_A_SETTING = object()


def _setting(v, depth: int = ATTR_DEPTH):
    """``v`` as JSON where it is a plain setting, else ``_NOT_A_SETTING`` (a list that holds itself too)."""
    if isinstance(v, enum.Enum):  # Mode.FAST: by name, as JSON holds it
        return f"{type(v).__qualname__}.{v.name}"
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, numbers.Number):  # np.float32(2.0), Fraction(1, 3), Decimal("0.1"): as the number they are
        item = v.item() if callable(getattr(v, "item", None)) else None
        return item if isinstance(item, (bool, int, float)) else str(v)
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format)):
        return str(v)
    if isinstance(v, (tuple, list)) and len(v) <= 16 and depth > 0:
        items = [_setting(t, depth - 1) for t in v]
        return _NOT_A_SETTING if any(t is _NOT_A_SETTING for t in items) else items
    return _NOT_A_SETTING


HOOKS = ("_forward_pre_hooks", "_forward_hooks")  # the hooks a forward runs, whose values load takes from the original


def _hooks(m: torch.nn.Module, w: _Walk) -> None:
    """The forward hooks of ``m`` (graphprune's own aside) as settings, in order: ``forward_hooks[0].function``
    and what its closure holds, tensors too (load takes the hooks of the original it is given)."""
    hooks = w.with_tensors()
    for kind in HOOKS:
        mine = [h for h in getattr(m, kind, {}).values() if not _name(getattr(h, "__func__", h)).startswith("graphprune.")]
        for i, h in enumerate(mine):
            _walk(h, f"{kind[1:]}[{i}]", ATTR_DEPTH, hooks)


def is_hook(name: str) -> bool:
    """A setting ``_hooks`` recorded."""
    return name.startswith(tuple(f"{k[1:]}[" for k in HOOKS))


def same(a, b) -> bool:
    """Settings equal as JSON holds them, floats to rounding: an ``rms_norm_eps`` a model pruned in steps rescaled
    once per step, and ``load`` once for all, differs in its last digit, and the load was refused (survey 33 f08)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9) or (math.isnan(a) and math.isnan(b))  # a NaN pad value too
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def _slots(mod: torch.nn.Module, reads: frozenset | None) -> tuple[dict, dict]:
    """({name: value}, {name: (holder, key)}) of the settings ``mod`` holds itself (``settings``' names), and
    those its classes hold, which are written on the instance."""
    values: dict = {}
    where: dict = {}
    for k, v in _attributes(mod, reads, classes=True):
        _walk(v, k, ATTR_DEPTH, _Walk(values, {id(mod)}, set(), "", where, reads=reads), mod, k)
    return json.loads(json.dumps(values)), where


def unsettable(model: torch.nn.Module, after: dict) -> list[str]:
    """The settings of ``after`` (``{module path: {name: value}}``) that ``set_settings`` cannot write on ``model``:
    those inside a tuple or a function (``act.negative_slope`` of a ``functools.partial``)."""
    out = []
    reads = model_reads(model)
    for p, values in after.items():
        where = _slots(model.get_submodule(p), reads)[1]
        out += [f"{p + '.' if p else ''}{k}" for k in values if k in where and where[k][0] is None]
    return out


def set_settings(model: torch.nn.Module, after: dict) -> None:
    """Set the settings ``settings_after`` in a manifest recorded (``{module path: {name: value}}``), each as the
    type the rebuilt model holds there (a tuple, an enum), inside what a module holds too (``cfg.scale``).
    One the model holds already is left: the original was built with it (the only way, where it is held
    inside a tuple or a function, which cannot be written)."""
    reads = model_reads(model)
    for p, values in after.items():
        try:
            mod = model.get_submodule(p)
        except AttributeError:
            raise GraphpruneError(f"the manifest's settings_after names module {p!r}, which the rebuilt model lacks: it "
                                  "was edited; save again") from None
        held, where = _slots(mod, reads)
        for k, v in values.items():
            if k not in where:
                raise GraphpruneError(f"the manifest's settings_after names {p + '.' if p else ''}{k}, which the rebuilt "
                                      "model does not hold: it was edited, or the original given to load is built "
                                      "otherwise; save again")
            if same(held[k], v):
                continue
            holder, key = where[k]
            if holder is None:
                raise GraphpruneError(f"setting {p + '.' if p else ''}{k} was changed after compile inside a tuple or a "
                                      f"function, which load cannot set: build the original with {k} = {v!r} (save "
                                      "warned of this)")
            now = holder[key] if isinstance(holder, (Mapping, list)) else getattr(holder, key, None)
            if isinstance(now, enum.Enum) and isinstance(v, str):
                v = type(now)[v.rpartition(".")[2]]
            elif isinstance(now, tuple) and isinstance(v, list):
                v = tuple(v)
            elif isinstance(now, torch.dtype) and isinstance(v, str):
                v = getattr(torch, v.removeprefix("torch."))
            elif isinstance(now, torch.device) and isinstance(v, str):
                v = torch.device(v)
            elif isinstance(now, numbers.Number) and not isinstance(now, (bool, int, float)):
                v = type(now)(v)  # np.float32, Fraction, Decimal: from the number or string recorded
            if isinstance(holder, (Mapping, list)):
                holder[key] = v
            else:
                setattr(holder, key, v)
