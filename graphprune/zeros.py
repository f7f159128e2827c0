"""Which dims of which values are zero on removed units, and the ops that need them to be.

graphprune's promise is the dead twin: the original model with every removed
unit zeroed in every parameter slice of its group. Linear and conv layers
that read a removed channel are exact whatever it holds (their column is
zero in the twin). Ops that mix channels without weights are exact only
where the removed entries are zero: a ``sum`` or ``mean`` over channels, the
contraction of ``q @ k``, the statistics of a LayerNorm or RMSNorm (which
the rewrite computes over the original width). Parameters are zero along
every dim (the twin zeroes their slices); buffers are not (a position
encoding or a running mean keeps its values in the twin, as in the model). ``sigmoid(h).sum(1)`` would
silently lose the 0.5 every dead channel adds; weight standardization
subtracts a mean, so the removed entries of ``w - mean`` are not zero.

This pass follows zero-ness forward through the graph, one transfer rule per
canonical op, and blocks every dim an op reduces or normalizes over where
it cannot prove zeros. A dim is ``(value_key, axis)`` as in ``rules.py``;
parameters are zero along every dim (the twin zeroes their slices).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import Node

from .canon import COp
from .meta_keys import VAL

# elementwise ops by their zero behaviour; names as _ewise_name gives them
_KEEPS_ZERO = {  # f(0) == 0, one tensor operand that matters
    "relu", "relu6", "gelu", "silu", "tanh", "neg", "abs", "sqrt", "square", "sin", "erf", "hardswish",
    "leaky_relu", "elu", "mish", "selu", "celu", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "identity", "contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type_as",
    "detach", "alias", "_to_copy", "lift_fresh_copy", "stochastic_depth",
}
_PRODUCT = {"mul", "imul", "__mul__", "__rmul__"}  # zero if any operand is
_QUOTIENT = {"div", "truediv", "itruediv"}  # zero if the numerator is
_SUM = {"add", "sub", "iadd", "isub", "__add__", "__radd__", "__sub__", "where", "maximum", "minimum"}  # zero if all are
_MODULE_NAMES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
    nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Mish: "mish", nn.SELU: "selu", nn.CELU: "celu",
    nn.Identity: "identity", nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout",
    nn.Dropout3d: "dropout", nn.AlphaDropout: "alpha_dropout",
}


def _ewise_name(node: Node, gm) -> str:
    t = node.target
    if node.op == "call_module":
        return _MODULE_NAMES.get(type(gm.get_submodule(t)), "?")
    if node.op == "call_method":
        name = t
    elif hasattr(t, "_overloadpacket"):
        name = t._overloadpacket.__name__
    else:
        name = getattr(t, "__name__", "?")
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class Zeros:
    """Known-zero dims, filled in graph order."""

    def __init__(self, b):
        self.b = b
        self.z: dict = {}
        self.tensors = {n for n, _ in b.gm.named_parameters(remove_duplicate=False)}  # buffers are not zeroed in the twin

    def ndim(self, key) -> int:
        return len(self.b.shape(key))

    def zero(self, key, axis) -> bool:
        if key is None:
            return False
        if isinstance(key, str):
            return key in self.tensors
        return axis in self.z.get(key, ())

    def all_zero(self, key) -> bool:
        return all(self.zero(key, k) for k in range(self.ndim(key)))

    def set(self, key, axes) -> None:
        axes = frozenset(axes)
        if axes:
            self.z[key] = axes

    def need(self, key, axis, why: str) -> None:
        """``key`` must be zero on removed units along ``axis``, or that dim keeps its width."""
        if not self.zero(key, axis):
            self.b.block((key, axis), why)


def _operand_zero(zs: Zeros, a, od: int, n_out: int, size: int) -> bool:
    """Does operand ``a`` of an elementwise op contribute zero at removed indices of output dim ``od``?"""
    from .canon import vkey

    if isinstance(a, (int, float, bool)):
        return a == 0
    key = vkey(a) if isinstance(a, Node) else None
    if key is None:
        return not isinstance(a, Node)  # None and other non-numbers add nothing
    st = zs.b.shape(key)
    j = len(st) - n_out + od
    if j < 0 or st[j] != size:
        return False  # broadcast along od: the same value lands on removed indices too
    return zs.zero(key, j)


def ewise(zs: Zeros, c: COp) -> None:
    node = c.node
    out_shape = zs.b.shape(node)
    name = _ewise_name(node, zs.b.gm)
    operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, (Node, int, float))]
    if name == "where":
        operands = operands[1:]  # the condition selects; it adds nothing
    axes = []
    for od, size in enumerate(out_shape):
        z = [_operand_zero(zs, a, od, len(out_shape), size) for a in operands]
        if name in _KEEPS_ZERO or name == "pow" and len(node.args) > 1 and isinstance(node.args[1], (int, float)) and node.args[1] > 0:
            ok = bool(z) and z[0]
        elif name in _PRODUCT:
            ok = any(z)
        elif name in _QUOTIENT:
            ok = bool(z) and z[0]
        elif name in _SUM:
            ok = bool(z) and all(z)
        else:
            ok = False
        if ok:
            axes.append(od)
    zs.set(node, axes)


def producer(axis_of_rows):
    """Layers whose output channels are weight rows (zero in the twin); the other dims follow the input."""
    def rule(zs: Zeros, c: COp) -> None:
        out = c.node if c.op != "mha" else (c.node, 0)
        nd = zs.ndim(out)
        rows = axis_of_rows(nd)
        x = c.inputs[0]
        zs.set(out, [k for k in range(nd) if k == rows or (x is not None and k < zs.ndim(x) and zs.zero(x, k) and k != rows)])
    return rule


def norm(zs: Zeros, c: COp) -> None:
    """Affine norms zero their removed channels (weight and bias are zero in the twin).
    Without a weight only RMSNorm keeps zeros; BatchNorm subtracts its running mean
    (a buffer, which the twin keeps), LayerNorm and GroupNorm their own means.
    LayerNorm and RMSNorm statistics need zeros: the rewrite counts the removed
    entries as zero."""
    x = c.inputs[0]
    out = (c.node, 0) if c.op == "batch_norm_tuple" else c.node
    nd = zs.ndim(x)
    normalized = set()
    if c.op in ("layer_norm", "rms_norm"):
        n_norm = _normalized_ndim(c, nd)
        normalized = set(range(nd - n_norm, nd))
        for k in normalized:
            zs.need(x, k, f"{c.node.name}: {c.op} statistics over this dim need its removed entries to be zero")
    channel = {1} if c.op in ("batch_norm", "batch_norm_tuple", "group_norm") else normalized
    keeps = c.op == "rms_norm"
    axes = []
    for k in range(nd):
        if k in channel:
            if "weight" in c.params or (keeps and zs.zero(x, k)):
                axes.append(k)
        elif zs.zero(x, k):
            axes.append(k)
    zs.set(out, axes)


def _normalized_ndim(c: COp, nd: int) -> int:
    node = c.node
    if node.op == "call_module":
        return len(node.graph.owning_module.get_submodule(node.target).normalized_shape)
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if isinstance(shape, int):
        return 1
    return len(shape) if isinstance(shape, (list, tuple)) else nd


def _outputs(node: Node) -> set:
    val = node.meta.get(VAL)
    if isinstance(val, torch.Tensor):
        return {node}
    if isinstance(val, (tuple, list)):
        return {(node, i) for i, v in enumerate(val) if isinstance(v, torch.Tensor)}
    return set()


def _pads_nonzero(node: Node) -> bool:
    """``F.pad(x, p, "constant", value)`` with a value other than zero."""
    if node.target is not torch.nn.functional.pad:
        return False
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return mode == "constant" and value not in (None, 0, 0.0)


def linked(zs: Zeros, c: COp) -> None:
    """Ops that move entries without mixing them (permute, reshape, cat, split,
    slices, pooling, repeats...): an output dim is zero where every input dim
    its rule coupled it to is. A reshape's merged dim needs all its factors
    zero; a split-off factor inherits the dim it came from."""
    outs = _outputs(c.node)
    if _pads_nonzero(c.node):
        return  # the padding itself is not zero, removed channel or not
    zero: dict = {}
    for item in zs.b.links.get(c.node, ()):
        if item[0] == "share":
            continue  # a kept key/value head serves removed query heads too: not zero
        if item[0] == "product":
            _, flat, factors = item
            if flat[0] in outs:
                dims, ok = [flat], all(zs.zero(*f) for f in factors if f[0] not in outs)
            else:
                dims, ok = [f for f in factors if f[0] in outs], zs.zero(*flat)
        else:
            a, b = item
            if a[0] in outs and b[0] not in outs:
                dims, ok = [a], zs.zero(*b)
            elif b[0] in outs and a[0] not in outs:
                dims, ok = [b], zs.zero(*a)
            else:
                continue
        for d in dims:
            zero[d] = zero.get(d, True) and ok
    for key in outs:
        zs.set(key, [axis for (k, axis), ok in zero.items() if k == key and ok])


def reduce(zs: Zeros, c: COp) -> None:
    x = c.inputs[0]
    dims, keep = c.attrs["dims"], c.attrs["keepdim"]
    if c.attrs.get("kind") in ("sum", "mean"):
        for k in dims:
            zs.need(x, k, f"{c.node.name}: {c.attrs['kind']} over this dim needs its removed entries to be zero")
    axes, j = [], 0
    for k in range(zs.ndim(x)):
        if k in dims:
            j += 1 if keep else 0
            continue
        if zs.zero(x, k):
            axes.append(j)
        j += 1
    zs.set(c.node, axes)


def matmul(zs: Zeros, c: COp) -> None:
    a, w = c.inputs
    na, nw, no = zs.ndim(a), zs.ndim(w), zs.ndim(c.node)
    if not zs.zero(a, na - 1) and not zs.zero(w, nw - 2):
        zs.need(a, na - 1, f"{c.node.name}: matmul contracts this dim; its removed entries must be zero on one side")
    axes = [k for k, ok in ((no - 2, zs.zero(a, na - 2)), (no - 1, zs.zero(w, nw - 1))) if ok]
    for od in range(no - 2):
        ja, jw = na - no + od, nw - no + od
        if (ja >= 0 and zs.zero(a, ja)) or (jw >= 0 and zs.zero(w, jw)):
            axes.append(od)
    zs.set(c.node, axes)


def einsum(zs: Zeros, c: COp) -> None:
    eq = c.attrs["equation"].replace(" ", "")
    if "." in eq or any(t is None for t in c.inputs):
        return
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if not arrow:
        letters = "".join(specs)
        rhs = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    # an operand of size 1 along a letter is broadcast there: the same value at removed indices too
    zero_letter = {ch: any(zs.zero(t, s.index(ch)) for t, s in zip(c.inputs, specs)
                           if ch in s and zs.b.shape(t)[s.index(ch)] != 1) for ch in set(lhs) - {","}}
    for ch, z in zero_letter.items():
        if ch not in rhs and not z:
            t, s = next((t, s) for t, s in zip(c.inputs, specs) if ch in s)
            zs.need(t, s.index(ch), f"{c.node.name}: einsum contracts this dim; its removed entries must be zero on one side")
    zs.set(c.node, [i for i, ch in enumerate(rhs) if zero_letter.get(ch)])


def sdpa(zs: Zeros, c: COp) -> None:
    q, k, v = c.inputs
    nq, nk = zs.ndim(q), zs.ndim(k)
    if not zs.zero(q, nq - 1) and not zs.zero(k, nk - 1):
        zs.need(q, nq - 1, f"{c.node.name}: attention contracts q and k over this dim; its removed entries must be zero on one side")
    no = zs.ndim(c.node)
    nv = zs.ndim(v)
    zs.set(c.node, [d for d in range(no) if d != no - 2 and nv - no + d >= 0 and zs.zero(v, nv - no + d)])


def nothing(zs: Zeros, c: COp) -> None:
    """No dim of the result is known to be zero."""


RULES = {
    "ewise": ewise,
    "linear": producer(lambda nd: nd - 1),
    "conv": producer(lambda nd: 1),
    "conv_transpose": producer(lambda nd: 1),
    "embedding": producer(lambda nd: nd - 1),
    "mha": producer(lambda nd: nd - 1),
    "window_attention": producer(lambda nd: nd - 1),
    "batch_norm": norm, "batch_norm_tuple": norm, "layer_norm": norm, "rms_norm": norm, "group_norm": norm,
    **{op: linked for op in ("permute", "split", "tuple_get", "cat", "reshape", "expand", "index", "pool", "stack",
                             "repeat_interleave", "channel_permute", "patch_merge", "rel_pos_bias")},
    "reduce": reduce,
    "matmul": matmul,
    "einsum": einsum,
    "sdpa": sdpa,
}


def block_unproven_reductions(b, cops: list[COp]) -> None:
    """Run the zero rules over the graph; ops that need zeros block the dims where none are proven."""
    zs = Zeros(b)
    for c in cops:
        if c.op in ("placeholder", "output", "get_attr", "python", "shape", "unknown"):
            continue
        try:
            RULES.get(c.op, nothing)(zs, c)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            if c.op in _NEEDS:  # cannot prove what this op needs: its operands keep their widths
                for t in c.inputs:
                    for k in range(zs.ndim(t)) if t is not None else ():
                        b.block((t, k), f"{c.node.name}: cannot prove removed entries are zero ({type(e).__name__})")


_NEEDS = {"reduce", "matmul", "einsum", "sdpa", "layer_norm", "rms_norm"}
