"""Passes, their registry, and the manager that runs a pipeline of them.

A pass is a plain callable ``(GraphModule, **options) -> PassResult`` (the
``PassResult`` of ``torch.fx.passes.infra``). Passes register under a name so
that a pipeline can be written as a string, xDSL style::

    "shrink-params,dce"
    "sparsify-blocks{density=0.25,block_size=64}"

Between passes the manager checks the graph (``graph.lint()`` and parameter
shapes against the shapes recorded on nodes) and, when a check fails, names
the pass that broke it and the passes that ran before.
"""
from __future__ import annotations

import ast
import inspect
import re
from typing import Callable

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .errors import GraphpruneError
from .meta_keys import EXAMPLE
from .trace import output_shapes, propagate_shapes

__all__ = ["PassResult", "register_pass", "get_pass", "registered_passes", "parse_pipeline", "format_pipeline", "run_pipeline",
           "check_graph"]

PassFn = Callable[..., PassResult]
_REGISTRY: dict[str, PassFn] = {}


def register_pass(name: str, *, computes_weights: bool = False):
    """Decorator: make ``fn(gm, **options) -> PassResult`` nameable in pipelines.
    ``computes_weights``: the pass writes new weight values (a fold), rounded to the model's
    dtype, rather than slices of the given ones (``computes_weights``).

    >>> @register_pass("my-pass")
    ... def my_pass(gm):
    ...     return PassResult(gm, False)
    """

    def deco(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise GraphpruneError(f"a pass named {name!r} is already registered ({_REGISTRY[name].__module__}); pick another name")
        _REGISTRY[name] = fn
        fn.pass_name = name
        fn.computes_weights = computes_weights
        return fn

    return deco


def _load_builtin_passes() -> None:
    import graphprune.passes  # noqa: F401  (registers the built-in passes)


def get_pass(name: str) -> PassFn:
    _load_builtin_passes()
    if name not in _REGISTRY:
        raise GraphpruneError(f"no pass named {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def computes_weights(pipeline: str | list) -> bool:
    """Whether a pass of ``pipeline`` writes new weight values: in half precision their rounding
    is part of the result, which a check in float32 copies cannot take back (``verify.widened_on_rounding``)."""
    return any(getattr(get_pass(name), "computes_weights", False) for name, _ in parse_pipeline(pipeline))


def registered_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(_REGISTRY)


_STEP = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


# named pipelines: "default" keeps the model trainable as the user built it; "deploy" adds the
# lossless clean-ups that only serve inference speed
PIPELINES = {"default": "shrink-params,dce", "deploy": "shrink-params,drop-identity,fold-bn,fold-scale,fold-norm,dce"}


def parse_pipeline(pipeline: str | list) -> list[tuple[str, dict]]:
    """``"a,b{x=1,y='s'}"`` -> ``[("a", {}), ("b", {"x": 1, "y": "s"})]``; a name in ``PIPELINES`` stands for its passes."""
    if isinstance(pipeline, str) and pipeline.strip() in PIPELINES:
        pipeline = PIPELINES[pipeline.strip()]
    if not isinstance(pipeline, str):
        return [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in pipeline]
    steps, pos = [], 0
    while pos < len(pipeline):
        m = _STEP.match(pipeline, pos)
        if not m or m.end() == pos:
            raise GraphpruneError(f"cannot parse pipeline {pipeline!r} at character {pos}; write it as 'pass-a,pass-b{{opt=1}}'")
        opts = {}
        for item in filter(None, (s.strip() for s in (m.group(2) or "").split(";" if ";" in (m.group(2) or "") else ","))):
            key, _, val = item.partition("=")
            try:
                opts[key.strip()] = ast.literal_eval(val.strip())
            except (ValueError, SyntaxError):
                opts[key.strip()] = val.strip()
        steps.append((m.group(1), opts))
        pos = m.end()
    return steps


def format_pipeline(steps: list[tuple[str, dict]]) -> str:
    """The inverse of ``parse_pipeline``: ``[("b", {"x": 1})]`` -> ``"b{x=1}"``."""
    def opts(o: dict) -> str:
        return "{" + ",".join(f"{k}={v!r}" for k, v in o.items()) + "}" if o else ""
    return ",".join(f"{name}{opts(o)}" for name, o in steps)


def check_graph(gm: GraphModule, before: list | None = None) -> None:
    """Invariants every pass keeps: a well-formed graph; every parameter shape
    agreeing with the ``tensor_meta`` of the ``get_attr`` node reading it; and,
    when the example inputs are known, the graph still runs on them (on meta
    tensors) and gives outputs of the same shapes as ``before`` (the pipeline input's: read
    off the edited graph, a new output node has no shape yet, and a broken pass was said
    to have changed the outputs "from []")."""

    gm.graph.lint()
    if EXAMPLE in gm.meta:
        before = output_shapes(gm) if before is None else before
        propagate_shapes(gm, *gm.meta[EXAMPLE])
        after = output_shapes(gm)
        if before != after:
            raise AssertionError(f"model output shapes changed from {before} to {after}")
        return
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue
        try:
            value = _getattr_path(gm, node.target)
        except AttributeError as e:
            raise AssertionError(f"get_attr node {node.name} reads missing attribute {node.target!r}") from e
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(meta.shape):
            raise AssertionError(f"{node.target}: parameter shape {tuple(value.shape)} != node shape {tuple(meta.shape)}")


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _broken(name: str, before: list, error: Exception) -> GraphpruneError:
    return GraphpruneError(f"pass {name!r} left an invalid graph (passes before it: {', '.join(before) or 'nothing'}): {error}{_HINT}")


_HINT = ("\nNo model was returned. If the pass is graphprune's own, the model computes a shape the rewrite cannot "
         "follow (e.g. C // num_heads with a literal head count): keep that part's width with ignore=[<the module "
         "owning the node above>], and please report the model.")


def run_pipeline(gm: GraphModule, pipeline: str | list, *, check: bool = True) -> tuple[GraphModule, dict[str, bool]]:
    """Run the named passes in order; return the final module and which passes
    changed something.

    The graph is checked once, after the last pass, if any pass changed it
    (a check re-runs the graph on meta tensors: the costly part of a small
    compile). If that check fails, the pipeline is run again from the same
    input with a check after every changing pass, to name the pass that
    broke the graph. Passes emit new modules or edit the one they are given,
    never the pipeline's input, so the second run sees what the first did."""
    steps = parse_pipeline(pipeline)
    shapes = (output_shapes(gm) or None) if check else None
    out, modified = _run(gm, steps, check_each=False)
    if check and any(modified.values()):
        try:
            check_graph(out, shapes)
        except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
            if sum(modified.values()) > 1:
                _run(gm, steps, check_each=True, shapes=shapes)  # raises naming the pass, if it reproduces
            changed = [n for n, m in modified.items() if m]
            raise _broken(changed[-1], changed[:-1], e) from e
    return out, modified


def _run(gm: GraphModule, steps: list, *, check_each: bool, shapes: list | None = None) -> tuple[GraphModule, dict[str, bool]]:
    ran: list[str] = []
    modified: dict[str, bool] = {}
    for name, opts in steps:
        fn = get_pass(name)
        try:
            inspect.signature(fn).bind(gm, **opts)
        except TypeError as e:
            takes = [p for p in list(inspect.signature(fn).parameters)[1:]]
            raise GraphpruneError(f"pass {name!r} takes the options {takes or 'none'}; got {opts} ({e})") from None
        result = fn(gm, **opts)
        if not isinstance(result, PassResult):
            raise GraphpruneError(f"pass {name!r} returned {type(result).__name__}; a pass must return torch.fx.passes.infra.pass_base.PassResult")
        gm = result.graph_module
        modified[name] = bool(result.modified)
        if check_each and result.modified:
            try:
                check_graph(gm, shapes)
            except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
                raise _broken(name, ran, e) from e
        ran.append(name)
    return gm, modified
