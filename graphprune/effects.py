"""Which graph nodes write to their operands instead of (or as well as) returning a value.

torch.fx keeps in-place calls (``h.relu_()``, ``nn.ReLU(inplace=True)``,
``torch.relu_(h)``, ``x[:, :4] = y``) as ordinary nodes whose result is often
unused: the effect lives in the operand. Dead-code elimination and any
other pass that drops or reorders nodes must keep them, so every rule that
decides "does this node mutate?" lives here, one table per node kind.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

# functions that write into their first operand whatever their name says
_MUTATING_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}


def _is_inplace_name(name: str) -> bool:
    """PyTorch's convention: ``relu_``, ``add_``, ``copy_`` mutate; dunders (``__add__``) do not."""
    return name.endswith("_") and not name.endswith("__")


def mutates(node: Node) -> bool:
    """Whether running ``node`` can change a tensor it was given (or module state)."""
    if node.op in ("call_function", "call_method") and isinstance(node.kwargs.get("out"), Node):
        return True  # torch.sigmoid(h, out=h): its result is written into ``out``
    if node.op == "call_method":
        return _is_inplace_name(node.target) or node.target in ("__setitem__", "copy_", "resize_")
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module is not None else None
        return bool(getattr(mod, "inplace", False)) or bool(getattr(mod, "_is_impure", False))
    if node.op != "call_function":
        return False
    t = node.target
    if t in _MUTATING_FUNCTIONS:
        return True
    if node.kwargs.get("inplace") is True:
        return True
    schema = getattr(t, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = getattr(t, "__name__", "")
    return _is_inplace_name(name) and getattr(t, "__module__", "") in ("torch", "torch._C._VariableFunctions", "torch.nn.functional", "torch._C._nn")


# modules whose functions compute a value and write nothing unless their name or schema says so
_PURE_MODULES = ("torch", "_operator", "operator", "builtins", "math", "graphprune")


def opaque(node: Node) -> bool:
    """A call of a Python function from outside torch (kept whole by ``torch.fx.wrap`` or a leaf
    rule): what it writes cannot be read off its name. torchvision's MViT-v2 calls
    ``_add_shortcut(x, shortcut)``, which adds into ``x`` in place, and ignores its result."""
    if node.op != "call_function":
        return False
    module = getattr(node.target, "__module__", None) or ""
    return module.split(".")[0] not in _PURE_MODULES


def has_effect(node: Node) -> bool:
    """Kept by dead-code elimination: fx's own notion of impure, a mutation, or an unused
    call of an opaque function (called for what it does, then)."""
    return node.is_impure() or mutates(node) or opaque(node)
