"""The pruned model in the user's own classes.

``shrink-params`` already rebuilds the user's module tree (each submodule a
copy of the user's, parameters sliced, shape attributes fixed); the graph on
top is fx code. The module form puts that tree under a copy of the user's top
module instead, so the result runs the user's own ``forward`` and is an
instance of the user's class. It is accepted only where it computes what the
pruned graph computes, on the example inputs and on a second input shape:
forward code that reads a width from an attribute (``self.hidden_dim``) or
writes one as a literal is fixed in the graph but not in the user's code,
and then the graph is returned, with the reason in ``result.report``.
"""
from __future__ import annotations

import torch

from .trace import fresh_attrs
from .verify import _run, evaluating, mismatch, on_copies, other_inputs


def build(model: torch.nn.Module, out: torch.fx.GraphModule) -> tuple[torch.nn.Module | None, str]:
    """(module form, "") or (None, why not)."""
    info = out.meta.get("graphprune", {})
    if info.get("method") != "symbolic_trace":
        return None, ("traced with torch.export: its graph is not the model's own code, so the module form is not "
                      "available yet for this model")
    top = type(model).__new__(type(model))
    top.__dict__ = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in fresh_attrs(model.__dict__).items()}
    top._modules = {k: (None if v is None else out.get_submodule(k)) for k, v in model._modules.items()}
    for store, theirs in ((top._parameters, model._parameters), (top._buffers, model._buffers)):
        store.clear()
        for k, t in theirs.items():
            mine = getattr(out, k, None) if k in out.__dict__ or k in out._parameters or k in out._buffers else None
            if t is None:
                store[k] = None
            elif isinstance(mine, torch.Tensor):
                store[k] = mine
            else:  # not read by the graph: an unchanged copy
                data = t.detach().clone()
                store[k] = torch.nn.Parameter(data, t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
    top.training = out.training
    return top, ""


def differs(top: torch.nn.Module, out: torch.nn.Module, args: tuple, kwargs: dict, *, params: bool = True) -> str | None:
    """None if the module form computes what the pruned graph computes on the
    example and on a second input shape the graph accepts."""
    with evaluating(top, out), on_copies(top, out, params=params):
        try:
            bad = mismatch(_run(top, args, kwargs), _run(out, args, kwargs))
        except Exception as e:  # noqa: BLE001 - the user's forward cannot run the pruned tree
            return f"the model's forward fails on the pruned modules: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if bad:
            return f"the model's forward gives other outputs than the pruned graph ({bad})"
        for other in other_inputs(tuple(args)):
            try:
                ref = _run(out, other, kwargs)
            except Exception:  # noqa: BLE001 - a shape the model does not take
                continue
            try:
                bad = mismatch(_run(top, other, kwargs), ref)
            except Exception as e:  # noqa: BLE001
                return f"the model's forward fails on the pruned modules at another input shape: {type(e).__name__}"
            return f"at another input shape the model's forward differs from the pruned graph ({bad})" if bad else None
    return None


def info(model: torch.nn.Module) -> dict | None:
    """What graphprune recorded about how ``model`` was pruned, in either form."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and "graphprune" in meta:
        return meta["graphprune"]
    return model.__dict__.get("_graphprune")
