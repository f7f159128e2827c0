"""``save`` and ``load``: a pruned model as plain safetensors plus a readable manifest.

Nothing in the directory needs unpickling. The manifest records where the
model came from (class, tracer, example input shapes, ignored modules, the
pass pipeline) and, for every parameter that shrank, the indices it kept
along each axis. ``load`` traces a freshly built original (it may live on
the ``meta`` device, so no second copy of the weights is ever in memory),
finds the same channel groups, turns the kept indices back into a removal,
runs the same passes, and fills the result with the saved tensors, every
shape checked before anything is loaded.

    out/
      manifest.json       graphprune version, source, kept indices, tensor shapes
      model.safetensors   every parameter and buffer of the pruned model, tied ones once
"""
from __future__ import annotations

import copy
import enum
import json
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from .modes import mixed, modes_of, set_modes
from . import hf, module_form, none_inputs, settings, source
from .errors import GraphpruneError, GraphpruneWarning, first_line, user_level
from .attrs import at, attribute_tensors, put, tensor_name
from .trace import shadow, to_meta

FORMAT = "graphprune/1"
PRUNED_CONFIG = "pruned_config.json"  # a config from_pretrained would build another model from
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def _version() -> str:
    try:
        return version("graphprune")
    except PackageNotFoundError:
        return "unknown"


def _input_spec(x):
    if isinstance(x, torch.Tensor):
        return {"tensor": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, enum.Enum):  # a setting (Mode.FAST): its class by name, found again among the imported modules
        return {"enum": f"{type(x).__module__}:{type(x).__qualname__}", "name": x.name}
    if x is None or isinstance(x, (bool, int, float, str)):
        return {"value": x}
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):  # inputs given as [x, y] or (x, y)
        return {type(x).__name__: [_input_spec(v) for v in x]}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):  # {"image": x, "mask": m}
        return {"dict": {k: _input_spec(v) for k, v in x.items()}}
    raise GraphpruneError(f"cannot record an example input of type {type(x).__name__} in the manifest; "
                          "pass tensors, plain Python values, enum members, or lists, tuples and str-keyed dicts "
                          "of them")


def _float_dtypes(spec) -> set:
    """The dtypes of the floating tensors in a manifest's input specs (``_input_spec``), nested ones too."""
    if isinstance(spec, dict) and "tensor" in spec:
        return {spec["dtype"]} if getattr(torch, spec["dtype"]).is_floating_point else set()
    inner = spec.values() if isinstance(spec, dict) else spec if isinstance(spec, list) else ()
    return set().union(*(_float_dtypes(v) for v in inner)) if inner else set()


def _input_value(spec: dict, device):
    if "tensor" in spec:
        dtype = getattr(torch, spec["dtype"])
        return torch.zeros(spec["tensor"], dtype=dtype, device=device)
    if "list" in spec or "tuple" in spec:
        kind = list if "list" in spec else tuple
        return kind(_input_value(v, device) for v in spec[kind.__name__])
    if "dict" in spec:
        return {k: _input_value(v, device) for k, v in spec["dict"].items()}
    if "enum" in spec:
        return _enum_member(spec["enum"], spec["name"])
    return spec["value"]


def _enum_member(where: str, name: str):
    """``module:Qual.Name`` and a member name back to the member. Only modules already imported are
    looked in (the original's own, imported to build it): a manifest names no code to import."""
    module, _, qualname = where.partition(":")
    cls = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)) or name not in cls.__members__:
        raise GraphpruneError(f"the manifest's example input {where}.{name} is no enum member of an imported module: "
                              f"import {module} (the module that defines it) before load")
    return cls[name]


def _slots(model: torch.nn.Module):
    """(name, tensor) of every parameter and buffer, every name a tied tensor has."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _plain(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, list | None]]:
    """(name, tensor, keys) of the tensors modules hold as plain attributes (``self.gain = torch.rand(8)``,
    a fixed random projection), and inside their containers (``self.proj["w"]``, ``attrs.attribute_tensors``;
    keys: [module path, attribute, keys...], None for an attribute itself): not in the state dict, so a
    freshly built original has other values, or none but meta ones; one in a dict came back from the
    fresh original, 1.7 off what was saved. Aliases of a parameter or buffer are left to that slot."""
    slots = {id(t) for _, t in _slots(model)}
    states = {path: source.state_attributes(type(mod)) or () for path, mod in model.named_modules(remove_duplicate=False)}
    # a cache the forward fills (``self.cache["last"] = y``) is state: a fresh original's is empty
    return [(tensor_name(path, k, keys), t, [path, k, *keys] if keys else None) for path, k, keys, t in attribute_tensors(model)
            if not isinstance(t, torch.nn.Parameter) and id(t) not in slots and t.layout == torch.strided
            and not t.is_meta and not (keys and k in states[path])]


def _set_plain(out: torch.nn.Module, loaded: dict, names: list, keys: dict, aliases: dict) -> None:
    """The saved plain tensor attributes put back on the rebuilt model (``_plain``; ``keys``: where those
    inside a container sit; ``aliases``: a name to the name of the same tensor written)."""
    for name in names:
        written = aliases.get(name, name)
        if written not in loaded:
            raise GraphpruneError(f"{WEIGHTS} has no tensor {written!r}, which the manifest lists: the directory is damaged; "
                                  "save the model again")
        path, k, *inside = keys.get(name) or [*name.rpartition(".")[::2]]
        try:
            mod = out.get_submodule(path)
        except AttributeError:
            raise GraphpruneError(f"the saved model holds a tensor attribute {name!r}, and the rebuilt one has no module "
                                  f"{path!r}: load onto the architecture it was saved from") from None
        have = at(vars(mod).get(k), inside) if inside else vars(mod).get(k)
        if inside and have is not None and not isinstance(have, torch.Tensor):
            raise GraphpruneError(f"the saved model holds a tensor at {name!r}, and the rebuilt one holds "
                                  f"{type(have).__name__} there: load onto an original built as the one saved")
        if isinstance(have, torch.Tensor) and tuple(have.shape) != tuple(loaded[written].shape):
            raise GraphpruneError(f"tensor attribute {name!r} is {tuple(loaded[written].shape)} in {WEIGHTS} but "
                                  f"{tuple(have.shape)} in the rebuilt model; nothing was loaded")
        data = loaded[written]
        data = data.to(have.device) if isinstance(have, torch.Tensor) and not have.is_meta else data
        try:
            setattr(mod, k, put(vars(mod)[k], inside, data) if inside else data)
        except KeyError:
            raise GraphpruneError(f"the saved model holds a tensor at {name!r}, and the rebuilt one has no place for "
                                  "it: load onto an original built as the one saved") from None


def _write_stop_config(path: Path, config) -> None:
    """A ``config.json`` from which no model is built, where the pruned config does not rebuild the model.
    Without one, ``AutoModel*`` refused the directory, but a concrete class (``LlamaForCausalLM``)
    took the missing file for an empty config and began building the architecture's default size,
    a 7B Llama (survey 27 f14). Every integer of the config is the message instead: transformers'
    field validation refuses the file with it, and a config without validation fails on the first
    size it builds a layer from; so is ``model_type``, which AutoConfig quotes as it refuses, and
    AutoTokenizer, which reads a config and falls back on a plain one, still loads the tokenizer."""
    msg = (f"graphprune: {path} holds a pruned model its config alone does not rebuild (manifest.json, "
           "from_pretrained, says why): load it with graphprune.load(original_model, directory)")
    try:
        fields = config.to_dict()
    except Exception:  # noqa: BLE001 - a config transformers refused to write
        fields = {}
    stop = {k: msg for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool)}
    # model_type too: AutoConfig then refuses with a ValueError that quotes it, which AutoTokenizer catches and
    # reads a plain config instead (the integers alone stopped AutoTokenizer with the message, survey 30 f04)
    stop = {"graphprune": msg, "hidden_size": msg, **stop, "model_type": msg}
    (path / "config.json").write_text(json.dumps(stop, indent=2))


def save(model: torch.nn.Module, path, *, tokenizer=None) -> Path:
    """Write a model returned by ``graphprune.compile`` to directory ``path``.

    A Hugging Face model in module form is also written as a ``save_pretrained``
    directory: ``config.json`` (with the pruned widths), the generation config,
    and ``tokenizer`` when given, beside the one ``model.safetensors``. Where
    its config alone rebuilds the model (every tensor shape and every number
    its layers compute with), ``AutoModel*.from_pretrained(path)`` loads it;
    where not, the config is written as ``pruned_config.json`` instead, and the
    ``config.json`` beside it stops ``from_pretrained`` (Auto or concrete class)
    with a message that names ``graphprune.load``, rather than build another model.
    ``manifest.json`` says which (``from_pretrained``); ``graphprune.load``
    always rebuilds it.

    Written: every parameter and buffer, every tensor a module holds as a plain
    attribute (a fixed random projection), and the mode of every module whose
    train/eval mode differs from the model's. Not written: attributes that are
    not tensors (a float temperature set after construction); ``load`` takes
    them from the original it is given, and refuses one whose plain settings
    differ from those compile recorded (``settings.settings``)."""
    from safetensors.torch import save_file
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):  # torch.compile(small): the model it wraps, as load takes an original
        model = model._orig_mod
    info = module_form.info(model)
    if info is None or "kept" not in info:
        raise GraphpruneError("save expects a model returned by graphprune.compile (it records how it was pruned); "
                              f"got a {type(model).__name__} without that record")
    info = {**info, **info.get("first", {})}  # pruned in steps: the pruning as one, from the first original
    why = info.get("unsaveable") or (info.get("unsaveable_graph") if info.get("form", "graph") == "graph" else None)
    if why:
        raise GraphpruneError(f"this model cannot be saved to load onto its original: {why}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GraphpruneError(f"save writes a directory, and {path} is a file: give a directory path")
    _check_tree(model, info)
    _check_shapes(model, info)
    on_meta = [n for n, t in [*_slots(model), *((n, t) for n, t, _ in _plain(model))] if t.is_meta]
    if on_meta:  # nothing to write: it raised torch's "Cannot copy out of meta tensor" and left an empty directory
        raise GraphpruneError(f"the model's tensors are on the meta device ({', '.join(on_meta[:3])}"
                              f"{' ...' if len(on_meta) > 3 else ''}): they hold no values to save; save the model "
                              "before .to('meta'), or move real weights into it (to_empty and load_state_dict)")
    path.mkdir(parents=True, exist_ok=True)
    first: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, t in _slots(model):
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach().contiguous().cpu()
    plain = [(n, t, keys) for n, t, keys in _plain(model) if n not in tensors]
    held = {}  # a tensor held in two places is written once, and set again in both (safetensors refuses shared memory)
    plain_aliases = {n: held.setdefault(id(t), n) for n, t, _ in plain}
    plain_aliases = {n: first for n, first in plain_aliases.items() if n != first}
    tensors.update({n: t.detach().contiguous().cpu() for n, t, _ in plain if n not in plain_aliases})
    args, kwargs = info["example"]
    kept: dict = {}
    for (name, axis), idx in sorted(info["kept"].items(), key=lambda kv: (kv[0][0], kv[0][1])):
        kept.setdefault(name, {})[str(axis)] = [int(i) for i in idx]
    report = getattr(model, "report", None)
    manifest = {
        "format": FORMAT,
        "graphprune_version": _version(),
        "form": info.get("form", "graph"),
        "source": {"class": info["source"], "method": info["method"], **({"free_reads": True} if info.get("free_reads") else {})},
        "inputs": {"args": [_input_spec(a) for a in args], "kwargs": {k: _input_spec(v) for k, v in (kwargs or {}).items()}},
        "ignore": info["ignore"],
        "pipeline": info["pipeline"],
        # exported graphs run in the mode they were traced in, whatever their .training flag says
        "training": bool(model.training) if info["method"] == "symbolic_trace" or info.get("form") == "module"
        else bool(info.get("training", model.training)),
        # the mode compile built it in: passes decide by it (fold-bn folds eval-mode BatchNorms only), so load
        # rebuilds in it, then switches to "training" (a model compiled in train mode and saved after .eval())
        "built_training": bool(info.get("training", model.training)),
        "built_modes": info.get("built_modes", {}),  # ... each module's own (a frozen BatchNorm deploy folded)
        # modules in the other mode than the model (frozen BatchNorms in a model in training mode)
        "modes": mixed(model),
        "kept": kept,
        "original": info["original"],
        "original_modules": info.get("original_modules"),
        "original_settings": info.get("original_settings"),
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()},
        "aliases": aliases,
        # tensors held as plain attributes, not parameters or buffers: written too, set again by load
        "plain": [n for n, _, _ in plain],
        "plain_keys": {n: keys for n, _, keys in plain if keys is not None},  # ... those inside containers
        "plain_aliases": plain_aliases,  # ... and those held in two places, by the name written
        # plain settings changed on the result since compile (small.scale = 3.0): load sets them again
        "settings_after": _settings_after(model, info.get("settings")),
        "report": None if report is None else str(report),
        # modules graphprune put into the model before pruning it (rotate_residual's MixedNorm), by path
        "wrapped": _wrapped(model),
        # inputs the example gave as None, which the module form refuses a value for (none_inputs)
        "held_to_none": info.get("held_to_none", []),
    }
    if info.get("form") == "module" and hf.is_hf(model):
        why = hf.from_config_alone(model)
        try:
            model.config.save_pretrained(path)
        except Exception as e:  # noqa: BLE001 - transformers validates configs (hidden 45 over 4 heads is refused)
            (path / "config.json").unlink(missing_ok=True)
            why = (f"{hf.REFUSED} ({type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}); "
                   "graphprune.load rebuilds the model")
        if why is not None:
            # a config that does not rebuild this model must not sit where from_pretrained reads it: it loaded
            # a pruned Gemma without a word and computed other logits (its embedding scale follows hidden_size)
            if (path / "config.json").exists():
                os.replace(path / "config.json", path / PRUNED_CONFIG)
                why += f"; the pruned config is in {PRUNED_CONFIG}"
            _write_stop_config(path, model.config)
            why += ", and config.json stops from_pretrained with a message that names graphprune.load"
        manifest["from_pretrained"] = True if why is None else why
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    # "pt": what transformers expects of a model.safetensors; the manifest says the rest
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt", "graphprune": FORMAT})
    (path / MANIFEST).write_text(_dumps(manifest))
    return path


# not the computation, or held by the tensors themselves: a tie is the manifest's aliases (rotate_residual's
# tied="untie" saves an untied model that loads onto the tied original it came from)
_CONFIG_METADATA = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "tie_word_embeddings"}


def _check_config(out: torch.nn.Module, path: Path, training: bool = False) -> None:
    """The config of the model rebuilt onto the original is the one saved: tensor shapes alone let a Llama
    built with another ``rope_theta`` and ``rms_norm_eps`` load, 5.25x its logits' largest magnitude off
    the model saved (survey 30 f18)."""
    saved = path / PRUNED_CONFIG if (path / PRUNED_CONFIG).is_file() else path / "config.json"
    try:
        want = type(out.config).from_json_file(str(saved)).to_dict()
    except Exception:  # noqa: BLE001 - none written (transformers refused the pruned config), or a stop file
        return
    # a dropout rate changes nothing a model in eval mode computes: an original built for inference with dropout
    # off was refused (survey 55 F2); the layers' own rates are skipped so too (module_form.described)
    skip = lambda k: k in _CONFIG_METADATA or (not training and settings.TRAINING_ATTR.search(k))  # noqa: E731
    norm = lambda d: json.loads(json.dumps({k: v for k, v in d.items() if not skip(k)}, default=str))  # noqa: E731
    want, have = norm(want), norm(out.config.to_dict())
    differ = sorted(k for k in {*want, *have} if not settings.same(want.get(k), have.get(k)))
    if differ:
        shown = ", ".join(f"{k}: saved {want.get(k)!r}, this original {have.get(k)!r}" for k in differ[:4])
        raise GraphpruneError(f"the original's config differs from the one the model was saved from ({shown}"
                              f"{' ...' if len(differ) > 4 else ''}): build the original with the configuration it was "
                              "saved from; nothing was loaded")


def _check_tree(model: torch.nn.Module, info: dict) -> None:
    """The module tree is the one compile returned: ``load`` rebuilds it from the original's classes, so a
    module swapped or wrapped since would come back as it was (ReLU for a GELU put in after compile: 0.34
    off, survey 30 f10)."""
    was = info.get("tree")
    if was is None:
        return
    now = module_form.tree(model)
    changed = [(p, was.get(p), now.get(p)) for p in dict.fromkeys([*was, *now]) if was.get(p) != now.get(p)]
    if changed:
        path, before, after = changed[0]
        what = (f"module {path or '(the model)'!r} is {after.rpartition('.')[2]}, compile returned "
                f"{before.rpartition('.')[2]}" if before and after else
                f"module {path!r} was {'added' if after else 'removed'} since compile")
        raise GraphpruneError(f"the model was changed after compile ({what}; {len(changed)} module(s) differ), and load "
                              "rebuilds it from the original's classes: change the original the same way and compile it, "
                              "or save the state_dict yourself")


def _check_modules(original: torch.nn.Module, m: dict) -> None:
    """The original given to ``load`` has the classes and settings of the one compiled (``module_form.described``):
    the rebuild runs its modules, and one built with another activation or dilation has weights of the same shapes."""
    was = m.get("original_modules")
    if not was:
        return  # saved before they were recorded
    if not isinstance(was, dict):
        raise GraphpruneError("the manifest's original_modules is not a mapping of module paths: it was edited; save again")
    now = module_form.described(original)
    changed = [p for p in dict.fromkeys([*was, *now]) if was.get(p) != now.get(p)]
    if changed:
        p = changed[0]
        what = (f"module {p or '(the model)'!r} is {_short(now[p])} here, {_short(was[p])} in the model compiled"
                if p in was and p in now else f"module {p!r} is {'only in this one' if p in now else 'missing here'}")
        how = ("from the config it was saved from (config.json beside the weights)" if hf.is_hf(original) else
               "with the same classes and settings (activation, dilation, padding mode...)")
        raise GraphpruneError(f"the original given to load is not built as the one that was compiled ({what}; "
                              f"{len(changed)} module(s) differ): build it {how}; nothing was loaded")


class _Absent:
    def __repr__(self) -> str:
        return "not set"


_ABSENT = _Absent()  # an attribute the original given to load does not hold


def _attribute(name: str) -> bool:
    """A setting's name that is an attribute's, not a path into what one holds (``cfg.scale``, ``opts['eps']``)."""
    return "." not in name and "[" not in name


def _check_settings(original: torch.nn.Module, m: dict) -> None:
    """The original given to ``load`` holds the plain settings of the one compiled (``settings.settings``): the
    rebuild takes every attribute that is not a tensor from it, so ``MLP(scale=1.0)`` took a model saved from
    ``MLP(scale=2.0)`` 0.5 off (survey 55 F1). An attribute only one of them has is the structure's business
    (``_check_modules``)."""
    was = m.get("original_settings")
    if not was:
        return  # saved before they were recorded, or nothing to record
    now = json.loads(json.dumps(settings.settings(original)))
    # an original built with a setting the user changed on the result after compile is built as the one saved
    # (``settings_after``: where load cannot set it, inside a function, this is the only way to load)
    after = m.get("settings_after") or {}
    differ = [(p, k, v, here) for p, k, v, here in _pairs(original, was, now)
              if not settings.same(here, v) and not (settings.is_device(v) and settings.is_device(here))
              and not (k in after.get(p, {}) and settings.same(here, after[p][k]))]
    differ += _hooks_changed(was, now)  # a hook only one side has too: load runs the original's (survey 61)
    if differ:
        shown = ", ".join(f"{p + '.' if p else ''}{k} is {here!r} here, {saved!r} in the model compiled"
                          for p, k, saved, here in differ[:3])
        raise GraphpruneError(f"the original given to load is not built as the one that was compiled ({shown}"
                              f"{' ...' if len(differ) > 3 else ''}): build it with the same settings, or set them on it "
                              "before load; nothing was loaded")


def _pairs(model: torch.nn.Module, was: dict, now: dict) -> list:
    """(module path, name, value in ``was``, value in ``now``) of every setting to compare: those both record;
    an attribute one model's instance holds and the other's does not, against what its class gives
    (``settings.class_value``: ``self.scale = 2.0`` beside a class's ``scale = 0.5``) or ``_ABSENT`` (an
    attribute set on the model after it was built), where that is not one the forward assigns as it runs;
    inside a container, keys come and go with what its forward filled in. ``model``: the one ``now`` reads."""
    mods = dict(model.named_modules())
    out = []
    assigned: list = []  # read once, where an attribute is missing
    for p in sorted({*was, *now}):
        a, b, mod = was.get(p) or {}, now.get(p) or {}, mods.get(p)
        for k in sorted({*a, *b}):
            if settings.is_hook(k):
                continue
            if k in a and k in b:
                out.append((p, k, a[k], b[k]))
                continue
            if mod is None or not _attribute(k) or settings.is_library(mod):
                continue  # a library's layer: an attribute another version of it adds or drops is not the user's
            theirs = settings.class_value(mod, k)
            if k in a:
                if not assigned:
                    assigned.append((source.runtime_assigned(model, settings.from_library) or (frozenset(),))[0])
                if theirs is settings.MISSING and (p, k) in assigned[0]:
                    continue  # state the forward keeps, which a fresh original has not made yet (survey 68 F3)
                out.append((p, k, a[k], _ABSENT if theirs is settings.MISSING else theirs))
            elif theirs is not settings.MISSING:  # the model compiled read its class's value
                out.append((p, k, theirs, b[k]))
    return out


def _settings_after(model: torch.nn.Module, was: dict | None) -> dict:
    """{module path: {attribute: value}}: the plain settings of the result that differ from those it had when
    compile returned it. Load rebuilds onto the original, whose settings are the compiled ones: a scale set on
    the result after compile was lost, 0.565 off what was saved (survey 58 F3)."""
    if not was:
        return {}
    out: dict = {}
    now = json.loads(json.dumps(settings.settings(model)))
    for p, k, before, v in _pairs(model, was, now):
        if k in now.get(p, {}) and not settings.same(v, before):  # a class's scale set on the instance too
            if k == "code" and isinstance(model.get_submodule(p), torch.fx.GraphModule):
                raise GraphpruneError(f"the graph {p or 'of the model'} was edited after compile (its code differs from "
                                      "what compile returned): load rebuilds the pruning from the original and would "
                                      "lose the edit; save the model compile returned, before editing its graph")
            out.setdefault(p, {})[k] = v
    fixed = settings.unsettable(model, out)
    if fixed:
        warnings.warn(f"{', '.join(fixed[:3])}{' ...' if len(fixed) > 3 else ''} changed on the result after compile inside "
                      "a tuple or a function, which load cannot set: load it onto an original built with the new "
                      "value", GraphpruneWarning, stacklevel=user_level())
    hooks = [f"{p + '.' if p else ''}{k}" for p, k, _, _ in _hooks_changed(was, now)]
    if hooks:
        warnings.warn(f"the result's forward hooks differ from those it had when compile returned it ({', '.join(hooks[:3])}"
                      f"{' ...' if len(hooks) > 3 else ''}): save writes no hooks, and load takes those of the original "
                      "it is given; register them on the loaded model again", GraphpruneWarning, stacklevel=user_level())
    return out


def _hooks_changed(was: dict, now: dict) -> list:
    """(module path, name, before, now) of the hook settings (``settings.is_hook``) that differ, one side
    missing one too: a hook's closure, or a hook registered on one side only."""
    out = []
    for p in sorted({*was, *now}):
        a, b = was.get(p) or {}, now.get(p) or {}
        out += [(p, k, a.get(k), b.get(k)) for k in sorted({*a, *b})
                if settings.is_hook(k) and ((k in a) != (k in b) or not settings.same(a.get(k), b.get(k)))]
    return out


def _short(described: str) -> str:
    """``torch.nn.modules.activation.GELU(approximate='none')`` -> ``GELU(approximate='none')``."""
    name, paren, rest = described.partition("(")
    return f"{name.rpartition('.')[2]}{paren}{rest}"


def _check_shapes(model: torch.nn.Module, info: dict) -> None:
    """Every tensor the original had must have the shape its kept indices give it: a module replaced
    after compile (a new head for another task) would be written, and ``load`` could never rebuild it."""
    kept: dict = {}
    for (name, axis), idx in info["kept"].items():
        kept.setdefault(name, {})[int(axis)] = len(idx)
    names: dict = {}
    for name, t in _slots(model):
        names.setdefault(id(t), (t, []))[1].append(name)
    for t, tied in names.values():  # a tied tensor is recorded under one of its names
        wants = [[kept.get(n, {}).get(k, size) for k, size in enumerate(info["original"][n])] for n in tied
                 if n in info["original"] and len(info["original"][n]) == t.dim()]
        if not wants or list(t.shape) in wants:
            continue  # a tensor a pass made (a folded bias), or a layer folded into another shape
        path, _, k = tied[0].rpartition(".")
        if k in getattr(model.get_submodule(path), "_non_persistent_buffers_set", ()):
            why = ("a non-persistent buffer changed size since compile (a cache the forward grows on a longer input): "
                   "save before running such inputs, or compile the original after its cache has grown")
        else:
            why = "the model was changed after compile (a module replaced?), and load rebuilds it from the original"
        raise GraphpruneError(
            f"tensor {tied[0]!r} is {tuple(t.shape)}, but pruning {info['source']} left it {tuple(wants[0])}: {why}. "
            "Change the original the same way and compile it, or save the state_dict yourself")


def _dumps(manifest: dict) -> str:
    """Indented JSON with every list of numbers on one line (kept indices, shapes)."""
    import re

    text = json.dumps(manifest, indent=1)
    return re.sub(r"\[\s*([-\d.,\s]*?)\s*\]", lambda mt: "[" + re.sub(r"\s+", " ", mt.group(1)) + "]", text)


def read_manifest(path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise GraphpruneError(f"{path} has no {MANIFEST}: not a directory written by graphprune.save")
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise GraphpruneError(f"{file} is not valid JSON ({e}); it was corrupted or edited by hand: save the model again") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise GraphpruneError(f"{file} is not a {FORMAT} manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    need = {"source": dict, "inputs": dict, "ignore": list, "pipeline": str, "kept": dict, "tensors": dict, "aliases": dict}
    for key, kind in need.items():
        if not isinstance(m.get(key), kind):
            raise GraphpruneError(f"{file}: field {key!r} is missing or not a {kind.__name__}; the manifest was edited by hand or is damaged")
    for name, axes in m["kept"].items():
        if not isinstance(axes, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in axes.values()):
            raise GraphpruneError(f"{file}: kept indices of {name!r} are not lists of integers")
    return m


def _wrapped(model: torch.nn.Module) -> dict:
    from .rotate import MixedNorm

    return {name: type(mod).__name__ for name, mod in model.named_modules() if isinstance(mod, MixedNorm)}


def _untied(original: torch.nn.Module, m: dict) -> list[str]:
    """Parameter names that share one tensor in ``original`` but were saved as tensors of their own
    (neither an alias of the other): the pruned model had them untied (a tied head that
    ``rotate_residual(tied="untie")`` copied), and load refused it as another architecture's."""
    names: dict[int, list[str]] = {}
    for n, t in original.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    out = []
    for group in names.values():
        own = [n for n in group if n in m["tensors"] and n not in m["aliases"]]
        out += own[1:]
    return out


def _rewrapped(original: torch.nn.Module, m: dict) -> torch.nn.Module:
    """A shadow of ``original`` with the modules graphprune wrapped in before pruning
    wrapped in again (the user's model is not changed)."""
    from .rotate import MixedNorm

    wrapped = m.get("wrapped") or {}
    untie = _untied(original, m)
    if not wrapped and not untie:
        return original
    top = shadow(original)
    for name in untie:  # rotate_residual(tied="untie") gave the head its own copy: so does the rebuilt model
        owner, _, attr = name.rpartition(".")
        t = top.get_parameter(name)
        setattr(top.get_submodule(owner) if owner else top, attr, torch.nn.Parameter(t.detach().clone(), t.requires_grad))
    for path, kind in sorted(wrapped.items()):
        if kind != "MixedNorm":
            raise GraphpruneError(f"the manifest wraps {path} in a {kind}, which this graphprune does not know; "
                                  "load with the graphprune version it was saved with")
        width = m["original"].get(f"{path}.mix.weight", [None])[0]
        try:
            top.get_submodule(path)
        except AttributeError:
            raise GraphpruneError(f"the manifest wraps {path}, which this model does not have: build the original it was "
                                  "saved from") from None
        MixedNorm.wrap(top, path, width)
    return top


def _removal(p, kept: dict) -> dict:
    """Group id -> removed units, from the kept indices of each parameter (unit
    numbers are not stable across runs; parameter indices are)."""
    removed = {}
    claimed = set()
    for g in p.analysis.groups:
        gone: set = set()
        seen = []  # (slice, units it covers, units it keeps): a slice may cover only part of a group (a concat input)
        for s in g.params:
            idx = kept.get(s.name, {}).get(str(s.axis))
            if idx is None:
                continue
            claimed.add((s.name, str(s.axis)))
            if idx and (min(idx) < 0 or max(idx) >= len(s.unit_of)):
                raise GraphpruneError(f"the manifest keeps index {max(idx)} of {s.name} axis {s.axis}, which has {len(s.unit_of)}: "
                                      "it was saved from another architecture")
            covered, keeps = set(s.unit_of.tolist()), set(s.unit_of[idx].tolist())
            gone |= covered - keeps
            seen.append((s, covered, keeps))
        for s, covered, keeps in seen:
            if covered - gone != keeps:
                raise _Unmatched(f"the kept indices of {s.name} disagree with the rest of its channel group; "
                                      "the manifest was edited by hand or saved from another architecture")
        for s in g.shared_params:  # key/value heads: kept while any of their query heads is
            idx = kept.get(s.name, {}).get(str(s.axis))
            if idx is None:
                continue
            claimed.add((s.name, str(s.axis)))
            alive = set(g.part_of[sorted(set(range(g.n_units)) - gone)].tolist())
            if set(s.unit_of[idx].tolist()) != alive:
                raise _Unmatched(f"the kept indices of {s.name} disagree with the query heads kept in its group; "
                                      "the manifest was edited by hand or saved from another architecture")
        if gone:
            removed[g.id] = np.array(sorted(gone), dtype=np.int64)
    extra = [f"{n} axis {a}" for n, axes in kept.items() for a in axes if (n, a) not in claimed]
    if extra:
        raise _Unmatched(f"the manifest prunes {extra[0]}, which this model cannot prune the same way "
                              f"({len(extra)} such entries): load onto the architecture it was saved from")
    return removed


def load(original: torch.nn.Module, path, *, device=None) -> torch.nn.Module:
    """Rebuild the model saved at ``path`` onto ``original`` (a freshly built model
    of the same architecture, on ``meta`` or with any weights; it is not changed)."""
    from safetensors import safe_open

    from .trace import unwrapped

    path = Path(path)
    m = read_manifest(path)
    if not (path / WEIGHTS).is_file():
        raise GraphpruneError(f"{path} has no {WEIGHTS}")
    original = unwrapped(original)  # torch.compile(Net()): the module it wraps, as compile took it (survey 30 f19)
    got = f"{type(original).__module__}.{type(original).__qualname__}"
    if got != m["source"]["class"]:
        raise GraphpruneError(f"{path} holds a pruned {m['source']['class']}, not a {got}; build the original it was saved from")
    where = next((t.device for t in original.parameters()), torch.device("cpu"))  # tracing happens there
    if any(t.is_meta for t in original.parameters()):
        where = torch.device("meta")  # built on meta, though a parameter or two stayed on the CPU
    example_floats = _float_dtypes([*m["inputs"]["args"], *m["inputs"]["kwargs"].values()])
    saved_dtypes = {n: spec.get("dtype") for n, spec in m.get("tensors", {}).items()}
    for name, t in _slots(original):
        want = m.get("original", {}).get(name)
        if want is not None and list(t.shape) != want:
            raise GraphpruneError(f"tensor {name!r} of the original is {tuple(t.shape)}, but the saved model was pruned from one "
                                  f"where it is {tuple(want)}: build the original with the configuration it was saved from; nothing was loaded")
        dtype = saved_dtypes.get(name)
        if dtype in example_floats and t.is_floating_point() and getattr(torch, dtype) != t.dtype:
            # the rebuild traces the original on the saved example: a float32 original on a bfloat16 image
            # failed in the trace with advice about tracing (survey 30 f16); on integer ids it traces, and loads
            raise GraphpruneError(f"tensor {name!r} of the original is {str(t.dtype).removeprefix('torch.')}, but the model "
                                  f"was saved in {dtype}: build the original in {dtype} (original.to(torch.{dtype})); "
                                  "nothing was loaded")
    try:
        dev = torch.device(device) if device is not None else (torch.device("cpu") if where.type == "meta" else where)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # a typo ("gpu"), or cuda on a machine without one
        raise GraphpruneError(f"load cannot put weights on device {device!r} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160]}): pass a device this machine has, such as 'cpu'") from None
    if dev.type == "meta":
        raise GraphpruneError("load reads the saved weights onto a real device: pass device='cpu' (or 'cuda'); "
                              "for shapes alone, build the original on meta and compile it instead")
    original = _rewrapped(original, m)  # a rotated model's structure (rotate_residual(tied="mix"))
    _check_modules(original, m)
    _check_settings(original, m)
    args = tuple(_input_value(s, where) for s in m["inputs"]["args"])
    kwargs = {k: _input_value(s, where) for k, s in m["inputs"]["kwargs"].items()} or None
    try:
        p, removal = _rebuilt(original, m, args, kwargs, where)
    except _Unmatched as e:
        original, p, removal = _run_once(original, m, args, kwargs, where, e)
    out = p.prune(removal, check=False, fit=False)
    if where.type == "meta" and m["source"]["method"] != "symbolic_trace":
        _retarget(out, dev)
    if m.get("form") == "module":
        top, why = module_form.build(original, out)
        if top is None:
            raise GraphpruneError(f"the saved model is in module form, but {why}")
        top._graphprune = {**out.meta["graphprune"], "form": "module"}
        none_inputs.refuse(top, m.get("held_to_none") or [])
        out = top
    slots = _slots(out)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt", device=str(dev)) as f:
            loaded = _read(f, slots, m)
    except GraphpruneError:
        raise
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a safetensors file
        raise GraphpruneError(f"cannot read {path / WEIGHTS} ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}): "
                              "the file is missing, truncated or not written by graphprune.save; save the model again") from None
    _assign(out, loaded, m["aliases"])
    _set_plain(out, loaded, m.get("plain") or [], m.get("plain_keys") or {}, m.get("plain_aliases") or {})
    settings.set_settings(out, m.get("settings_after") or {})
    for mod in out.modules():  # an RNN's list of its weights still names the tensors the rebuild started from
        if isinstance(mod, torch.nn.RNNBase):
            mod._init_flat_weights()

    if where.type == "meta":
        _off_meta(out, dev)
    left = _meta_leftovers(out)
    if left:
        raise GraphpruneError(
            f"tensors the loaded model computes with are still on meta: {', '.join(left[:6])}. They are plain tensor "
            "attributes of the original (not parameters or buffers), so save does not write them and a meta-built "
            "original cannot give their values: build the original on a real device, or register them as buffers")
    if m["source"]["method"] == "symbolic_trace" or m.get("form") == "module":  # exported graphs keep the mode they were exported in
        out.train(bool(m.get("training", False)))
        modes = m.get("modes") or {}
        if modes:
            set_modes(out, {**modes_of(out), **modes}, out.training)
    if m.get("form") == "module" and hf.is_hf(out):
        _check_config(out, path, training=bool(m.get("training")))
    if (path / "generation_config.json").is_file() and getattr(out, "generation_config", None) is not None:
        # what save wrote, not the fresh original's: generate() ran 20 new tokens for the saved 4 (survey 30 f08)
        out.generation_config = type(out.generation_config).from_pretrained(path)
    if m.get("form", "graph") == "graph" and m["source"]["method"] == "export":
        from .graph_inputs import guard

        guard(out, original)  # as compile's graph does: the program ignores a value there, and keys the example lacked
    elif m.get("form", "graph") == "graph":
        from .graph_inputs import guard_given

        guard_given(out)  # as compile's graph does: an input the example gave, refused as None
    module_form.info(out)["loaded_from"] = str(path)
    out.report = _loaded_report(p, removal, m, path)
    return out


def _loaded_report(p, removal: dict, m: dict, path: Path):
    """``report`` of a loaded model: the widths of every group and the form, as compile's said; the rest
    of compile's report (budget, timings, the self-check) as the text save wrote (``form_why``). It had
    none, and ``small.report.form`` failed after a round trip (survey 48 F3)."""
    from .allocate import light_report

    rep = light_report(p, removal)
    rep.form = m.get("form", "graph")
    rep.form_why = f"loaded from {path} by graphprune.load" + (f"; compile's report: {m['report']}" if m.get("report") else "")
    return rep


def _built_training(m: dict) -> bool:
    """The mode compile built the saved model in (passes decide by it), which load rebuilds in."""
    return bool(m.get("built_training", m.get("training", False)))


class _Unmatched(GraphpruneError):
    """The manifest's pruning is not one the original's groups can make."""


def _rebuilt(original, m: dict, args, kwargs, where):
    """(Pruner, removal): the original traced as compile traced it, and the manifest's pruning in its groups."""
    from .pruner import Pruner

    # rebuilt in the mode it was compiled in (the passes decided by it), on a shadow copy so the user's
    # original keeps its own mode; switched to the mode it was saved in by load
    traced = shadow(original)
    traced.train(_built_training(m))
    if m.get("built_modes"):  # a frozen BatchNorm in a model in training mode: folded by deploy, so rebuilt folded
        set_modes(traced, {**modes_of(traced), **m["built_modes"]}, traced.training)
    if where.type == "meta":
        _all_on_meta(traced)
    try:
        p = Pruner(traced, args, kwargs, tuple(m["ignore"]), "random", pipeline=m["pipeline"], method=m["source"]["method"],
                   free_reads=bool(m["source"].get("free_reads")))
    except GraphpruneError as e:
        if not any(t.is_meta for t in original.parameters()):
            raise
        # Wav2Vec2 built under torch.device("meta") holds a parameter on the CPU (torch.Tensor(n) ignores the
        # device context), and the two meet in its forward
        raise GraphpruneError(
            f"the original was built on meta, and its forward does not run there ({first_line(e)[:300]}). Build the "
            "original on a real device (the CPU) and load onto that; compile traced it there") from None
    return p, _removal(p, m["kept"])


def _run_once(original, m: dict, args, kwargs, where, unmatched: _Unmatched):
    """(original, Pruner, removal) where the manifest's pruning fits the original only after one call of its
    forward: a forward that changes the model on its first call (RWKV rescales its weights in place and
    sets ``layers_are_rescaled``) traces otherwise on a fresh original than on the model compile was given,
    which had been run, and load refused it as another architecture (survey 45 F2). The call runs on a
    copy, in the mode compile traced in; that copy, whose state then matches the saved weights (rescaled
    too: on the fresh original, the loaded model would rescale them again on its first call), is what load
    builds on. Where the pruning still does not fit, the error stands."""
    if where.type == "meta":
        raise unmatched
    try:
        warm = copy.deepcopy(original)
        warm.train(_built_training(m))
        with torch.no_grad():
            warm(*args, **(kwargs or {}))
        p, removal = _rebuilt(warm, m, args, kwargs, where)
    except Exception:  # noqa: BLE001 - a copy, a call or a pruning that fails: the error load met stands
        raise unmatched from None
    warnings.warn(GraphpruneWarning(
        f"the saved pruning fits this {type(original).__name__} only after one call of its forward, which changes the "
        "model (a first-call initialisation, such as RWKV's rescaling of its weights): load ran it once on the saved "
        "example, on a copy, and built on that; the original you gave is unchanged"), stacklevel=user_level())
    return warm, p, removal


def _replays(before: str, now: str) -> bool:
    """Whether ``load``, pruning the first original once and running ``now``'s passes, rebuilds a
    model pruned under ``before`` and then again under ``now``: every pass of ``before`` runs in
    ``now`` too (the default pipeline's ``shrink-params,dce`` and then ``deploy``, which folds at the
    end what the earlier steps kept trainable). A fold in an earlier step is not replayed: the later
    step pruned the folded model, which load never builds."""
    names = lambda p: [x.strip() for x in p.split(",") if x.strip()]  # noqa: E731
    return before == now or set(names(before)) <= set(names(now))


def composed(now: dict, before: dict, *, folded: bool = False) -> dict:
    """The record of a model pruned from a graphprune result (``prune_iteratively``'s steps,
    ``compile(compile(m))``) with, under ``first``, what ``save`` writes: the pruning restated
    against the first original, so that ``load`` rebuilds it onto a freshly built one. Every
    kept index list is the earlier one read at the new one's positions; the original, its
    class, example and mode are the first step's. The record itself stays this step's (the
    module form reads the shapes this step pruned from). Where the steps cannot be stated as
    one pruning (other pipelines, tensors the earlier original did not have), ``unsaveable``
    says why."""
    before = {**before, **before.get("first", {})}
    first = {"original": before["original"], "constants": before.get("constants", []),
             "original_modules": before.get("original_modules"),
             "original_settings": before.get("original_settings"),
             "source": before["source"], "example": before["example"],
             "training": before["training"], "method": before["method"],
             "ignore": [i for i in now["ignore"] if i in before["ignore"]]}
    if not _replays(before["pipeline"], now["pipeline"]):
        first["unsaveable"] = (f"its steps ran different pipelines ({before['pipeline']!r}, then {now['pipeline']!r}); "
                               "prune every step with the same pipeline, or end with one that runs every pass of the "
                               "earlier steps (the default steps of prune_iteratively(pipeline='deploy'))")
    known = {*before["original"], *before.get("constants", ())}
    unknown = sorted({name for name, _ in now["kept"] if name not in known})
    if unknown:
        first["unsaveable"] = (f"the later step pruned tensors the first original does not have ({', '.join(unknown[:4])}); "
                               "save the state_dict yourself")
    if folded or before.get("unsaveable_graph"):  # a Hugging Face module form's RMSNorms carry their width (hf._fold_rms)
        first["unsaveable_graph"] = (
            "it was pruned as a graph from a Hugging Face model graphprune had pruned before, whose RMSNorm weights "
            "carry that first pruning's width; load rebuilds from the original and would apply it twice (16% off). "
            "Compile the original once to the final budget, or keep the module form (output='module')")
    kept = dict(before["kept"])
    for key, idx in now["kept"].items():
        kept[key] = np.asarray(before["kept"][key])[np.asarray(idx)] if key in before["kept"] else idx
    first["kept"] = kept
    return {**now, "first": first}


def _all_on_meta(model: torch.nn.Module) -> None:
    """A shadow of an original built on meta, with the tensors that stayed on a real device moved there
    too (Wav2Vec2's ``torch.Tensor(n)`` ignores the ``torch.device("meta")`` context): the two met in its
    forward and the trace failed. The saved weights replace them all."""
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is not None and not t.is_meta:
                    moved = to_meta(t.detach())
                    store[k] = torch.nn.Parameter(moved, t.requires_grad) if isinstance(t, torch.nn.Parameter) else moved


def _read(f, slots, m: dict) -> dict:
    """The tensors of an open safetensors file, checked against the slots of the rebuilt model."""
    stored = set(f.keys())
    for name, t in slots:
        key = m["aliases"].get(name, name)
        if key not in stored:
            raise GraphpruneError(f"{WEIGHTS} has no tensor {key!r}, which the rebuilt model needs: saved from another architecture?")
        shape = tuple(f.get_slice(key).get_shape())
        if shape != tuple(t.shape):
            raise GraphpruneError(f"tensor {key!r} is {shape} in {WEIGHTS} but {tuple(t.shape)} in the model rebuilt "
                                  "from the manifest; nothing was loaded")
    # fresh, aligned copies: tensors read straight from the file can sit at unaligned offsets, which
    # send some kernels down other paths (outputs then differ in the last bits)
    return {key: f.get_tensor(key).clone() for key in stored}


def _off_meta(model: torch.nn.Module, dev: torch.device) -> None:
    """Attributes of the user's modules that say where it was built (``self.device = weight.device``), built on
    meta, say the device the weights are loaded to: the forward made its tensors on meta (``arange(T,
    device=self.device)``) beside real weights, and failed."""
    for mod in model.modules():
        if settings.is_library(mod):
            continue
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.device) and v.type == "meta":
                setattr(mod, k, dev)
            elif v == "meta":
                setattr(mod, k, str(dev))


def _meta_leftovers(out: torch.nn.Module) -> list[str]:
    """Names of tensors on ``meta`` that the loaded model holds outside its parameters and
    buffers (``self.perm = torch.tensor(...)`` built under ``torch.device("meta")``): nothing
    loads them, and a model that indexes with one runs and returns garbage."""
    return list(dict.fromkeys(tensor_name(path, k) for path, k, _, t in attribute_tensors(out) if t.is_meta))


def _retarget(gm: torch.fx.GraphModule, dev: torch.device) -> None:
    """An exported graph states devices (``aten.to(device=...)``, tensor metadata
    asserts); traced from an original on ``meta``, they say meta: point them at
    the device the weights are loaded to."""
    from torch.fx.node import map_aggregate

    def fix(a):
        return dev if isinstance(a, torch.device) and a.type == "meta" else a

    for n in gm.graph.nodes:
        n.args, n.kwargs = map_aggregate(n.args, fix), map_aggregate(n.kwargs, fix)
    gm.recompile()


def _assign(out: torch.nn.Module, loaded: dict, aliases: dict) -> None:
    """Put the loaded tensors in every slot, tied slots sharing one tensor."""
    made: dict = {}
    for path, mod in out.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None:
                    continue
                key = aliases.get(prefix + k, prefix + k)
                if key not in made:
                    data = loaded[key]
                    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
                        data = data.contiguous(memory_format=torch.channels_last)  # the layout the pipeline chose
                    made[key] = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
                store[k] = made[key]
