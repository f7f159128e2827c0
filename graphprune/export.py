"""Ship a pruned model: ``torch.export`` with a dynamic batch, ONNX, and an onnxruntime check.

Works on what ``graphprune.compile`` returns in either form (an instance of the
user's class, or an fx ``GraphModule``), and on any other module.

>>> ep = graphprune.export(small, (x,))              # ExportedProgram; the batch dim is symbolic
>>> ep.module()(torch.randn(3, *x.shape[1:]))
>>> graphprune.to_onnx(small, (x,), "small.onnx")    # torch.onnx.export(..., dynamo=True), dynamic batch
>>> graphprune.check_onnx("small.onnx", small, (x,))  # max |ort - torch| / max |torch| over the outputs
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from .verify import retried_on_weight_writes
from .batches import example_batch, in_signature_order
from .errors import GraphpruneError, first_line

__all__ = ["export", "to_onnx", "check_onnx"]

_INSTALL = "pip install onnx onnxscript onnxruntime (or graphprune's dev extras: pip install -e '.[dev]')"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e).strip()[:300]}"


def _doubled(x):
    """A batch-1 tensor repeated to batch 2 (the same sample twice); anything else as it is."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
        return torch.cat([x, x], 0)
    return x


def doubled_batch(args: tuple, kwargs: dict, model: torch.nn.Module | None = None) -> tuple[tuple, dict]:
    """A batch-1 example at batch 2: every tensor whose dim 0 is 1 repeated (nested ones too).
    torch.export specializes every dim whose example size is 1, so a batch-1 example would
    give a program that takes batch 1 only. The example's batch is ``batches.example_batch``
    (the ``(B, T, D)`` input beside ``(1, T)`` position ids given first). Where that is 2 or more,
    a size-1 dim 0 elsewhere is an input broadcast over the batch (a ``(1, C)`` scale, Hugging
    Face's ``(1, T)`` position ids), and nothing is repeated: repeated, it was tied to the batch,
    and the program refused it at size 1 beside a larger batch, a call the model takes (survey
    27 f19, survey 28, survey 30 f01, f02, f06)."""
    if example_batch(args, kwargs, model) != 1:
        return args, kwargs
    return pytree.tree_map(_doubled, (tuple(args), dict(kwargs)))


def agrees_at_example(model: torch.nn.Module, traced: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``traced`` (a program traced at the doubled batch) computes what ``model`` does on the
    example as given, both in eval mode, on copies of their buffers (a model in training mode is taken
    at its word). torch.export assumes a symbolic
    size is never 1 and records no guard for ``if x.shape[0] == 1``: traced at batch 2, the program
    ran the other branch at the user's own batch-1 example, 0.5 off it (survey 30 f11)."""
    from .verify import _run, evaluating, mismatch, on_copies

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return True  # nothing to run: weights on meta (analyze of a model built on meta)
    if any(m.training for m in model.modules()):
        return True  # a program of the training-mode computation (dropout draws, batch statistics): not compared
    try:
        with evaluating(model, traced), torch.no_grad():
            with on_copies(model, params=False):  # buffers copied (a counter a forward bumps), weights shared
                ref = _run(model, args, kwargs)
            with on_copies(traced, params=False):
                got = _run(traced, args, kwargs)
    except Exception:  # noqa: BLE001 - the program refuses the example: not a program for it
        return False
    return mismatch(got, ref) is None


def _batch_spec(x):
    # a dim 0 of 1 left so by doubled_batch is an input broadcast over the batch: fixed, said so to torch.export
    # (Dim.AUTO on it logged a warning per input)
    return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != 1 else None


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, spec=_batch_spec):
    """dynamic_shapes for torch.export: ``spec(tensor)`` (dim 0 symbolic) for every tensor input,
    nested ones too, keyed by the forward's parameter names (``*args``/``**kwargs`` included)."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise GraphpruneError(f"the example inputs do not fit {type(model).__name__}.forward: {_first_line(e)}") from e
    specs = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            specs[name] = tuple(pytree.tree_map(spec, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            specs[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            specs[name] = pytree.tree_map(spec, value)
    return specs


def _symbolic_batches(ep) -> tuple[int, list]:
    """(number of tensor user inputs with a symbolic dim 0, the static sizes of the others)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    names = set(ep.graph_signature.user_inputs)
    dynamic, static = 0, []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 1:
            if not is_concrete_int(val.shape[0]):  # a SymInt specialized to a number is concrete
                dynamic += 1
            else:
                static.append((node.name, int(val.shape[0])))
    return dynamic, static


@retried_on_weight_writes
def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_batch: bool = True,
           dynamic_shapes=None):
    """``torch.export`` ``model`` (non-strict) with dim 0 of every tensor input symbolic.

    A batch-1 example is traced at batch 2 (the sample twice), since torch.export
    fixes every size-1 dim; if the model refuses that, the example as given is tried.
    Every tensor whose dim 0 is 1 is taken for a batched input then: one the model
    broadcasts over the batch (a ``(1, C)`` scale) is tied to the batch of the others
    and the program refuses it at size 1 beside a larger batch. Give an example whose
    batch is 2 or more (a size-1 dim beside it stays 1), or say which dims are dynamic
    with ``dynamic_shapes`` (torch.export's argument, used as given, with the example as given,
    where torch.export fixes every size-1 dim).
    With ``dynamic_batch=True`` a program whose batch came out fixed (the model's own
    code pins it) is refused with a GraphpruneError rather than returned. A Hugging Face
    model that would return a KV cache is exported as called with ``use_cache=False`` (on a
    copy of its module tree whose config says so: the program takes the inputs it was exported
    with, and nothing more) unless ``kwargs`` sets it. It had been a keyword input of the
    program, which torch refused to run without ("kwarg keyword mismatch", survey 48 F1).
    """
    if not isinstance(model, torch.nn.Module):
        raise GraphpruneError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    if getattr(getattr(model, "config", None), "use_cache", False) and "use_cache" not in kwargs:
        from .trace import shadow, without_cache

        model = without_cache(shadow(model))  # a KV cache is no output a program carries
    kwargs = in_signature_order(model, kwargs)
    if not dynamic_batch or dynamic_shapes is not None:
        try:
            return torch.export.export(model, args, kwargs=kwargs, strict=False,
                                       dynamic_shapes=dynamic_shapes if dynamic_batch else None)
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            raise GraphpruneError(f"torch.export failed on {type(model).__name__}: {_first_line(e)}") from e
    wide = doubled_batch(args, kwargs, model)
    grew = any(w is not a for w, a in zip(pytree.tree_leaves(wide), pytree.tree_leaves((args, kwargs))))
    attempts = [wide, (args, kwargs)] if grew else [(args, kwargs)]
    errors = []
    for a, k in attempts:
        try:
            ep = torch.export.export(model, a, kwargs=k, strict=False, dynamic_shapes=_dynamic_shapes(model, a, k))
        except GraphpruneError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(_first_line(e))
            continue
        if a is not args and not agrees_at_example(model, ep.module(), args, kwargs):
            errors.append("traced at batch 2, the program computes another path at the example's batch of 1 (the "
                          "code branches on it): torch.export puts no guard on a size of 1")
            continue
        dynamic, static = _symbolic_batches(ep)
        if dynamic or not static:
            return ep
        errors.append(f"the batch dim came out fixed ({', '.join(f'{n}: {s}' for n, s in static)}): "
                      "the model's code specializes it")
    raise GraphpruneError(f"torch.export with a dynamic batch failed on {type(model).__name__}: {errors[-1]}"
                          + (f" (at the doubled batch: {errors[0]})" if len(errors) > 1 else "")
                          + "; export(..., dynamic_batch=False) gives a program for the example's shapes only, "
                          "dynamic_shapes= (torch.export's) says which dims vary")


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GraphpruneError(f"{module} is not installed; ONNX export and its check need onnx, onnxscript and "
                              f"onnxruntime: {_INSTALL}") from e


def to_onnx(model: torch.nn.Module, args: tuple, path, kwargs: dict | None = None, *, dynamic_batch: bool = True,
            dynamic_shapes=None) -> Path:
    """Write ``model`` to the ONNX file ``path`` through ``torch.onnx.export(..., dynamo=True)``,
    from the program :func:`export` builds (so the batch dim is dynamic; ``dynamic_shapes`` as there).
    Returns the path."""
    _need("onnx")
    _need("onnxscript")
    from .api import _mode_dependent

    if _mode_dependent(model) or _reads_training(model):  # the exporter writes eval mode whatever the model runs
        raise GraphpruneError(
            f"{type(model).__name__} has BatchNorm or dropout (modules, or a forward reading self.training) in training "
            "mode, and ONNX records them in eval "
            "mode (a file that differs from the model as it runs): call model.eval() before to_onnx, or use export(), "
            "which follows the training-mode computation")
    ep = export(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, report=False, optimize=True)
    except Exception as e:  # noqa: BLE001
        raise GraphpruneError(f"torch.onnx.export failed on {type(model).__name__}: {_first_line(e)}") from e
    return path


def _reads_training(model: torch.nn.Module) -> bool:
    """Whether a module in training mode, of a class outside torch, reads ``self.training`` in its
    forward (``F.dropout(x, p, self.training)``, as timm heads and Hugging Face attention do):
    its ONNX file would be the eval-mode model (0.57 off it, survey 28)."""
    for mod in model.modules():
        if not mod.training or type(mod).__module__.startswith("torch."):
            continue
        try:
            if "training" in inspect.getsource(type(mod).forward):
                return True
        except (OSError, TypeError):
            continue
    return False


def _tensors(tree) -> list:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _by_name(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """{input name: tensor}, the names the exporter gives the inputs: a forward parameter's, and for a
    tensor inside a dict or a list, that name and its keys or places joined by ``_`` (``extra_scale``);
    a nested dict in another order than the export saw was fed by position (survey 30 f05). None
    where the forward's signature cannot be bound."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    out = {}
    for name, value in bound.arguments.items():
        for where, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in where]
                out["_".join([name, *keys])] = leaf
    return out


def check_onnx(path, model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> float:
    """Run the ONNX file at ``path`` in onnxruntime (CPUExecutionProvider) on ``args``
    and return the largest difference from ``model``'s outputs, per output relative to
    that output's largest absolute value (0 for outputs that are all zero and match)."""
    ort = _need("onnxruntime")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise GraphpruneError(f"onnxruntime cannot load {path}: {_first_line(e)}") from e
    inputs = _tensors((args, kwargs))
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise GraphpruneError(f"{path} takes {len(names)} inputs ({', '.join(names)}) but {len(inputs)} tensors were given")
    named = _by_name(model, args, kwargs)  # keyword inputs in another order than the export saw: fed by name
    feed = {n: named[n] for n in names} if named is not None and set(names) <= set(named) else dict(zip(names, inputs))
    try:
        got = sess.run(None, {n: t.detach().cpu().numpy() for n, t in feed.items()})
    except Exception as e:  # noqa: BLE001
        raise GraphpruneError(f"onnxruntime failed to run {path}: {_first_line(e)}") from e
    from .modes import Snapshot, kept_modes

    saved = Snapshot(model)  # a model in training mode moves its BatchNorm statistics as it runs: put them back
    with torch.no_grad(), kept_modes(model):
        want = _tensors(model(*args, **kwargs))
    saved.restore()
    if len(got) != len(want):
        raise GraphpruneError(f"{path} gives {len(got)} outputs, the model {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        g = torch.from_numpy(g)
        w = w.detach().cpu()
        if tuple(g.shape) != tuple(w.shape):
            raise GraphpruneError(f"an output of {path} has shape {tuple(g.shape)}, the model's {tuple(w.shape)}")
        if not w.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(g.to(w.dtype), w) else float("inf"))
            continue
        diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = w.double().abs().max().item() if w.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst
