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

import operator

import torch
import torch.nn as nn
from torch.fx import Node

from .canon import INDEXED, COp, arg
from .meta_keys import VAL
from .rules import REDUCE_OVER_ZEROS

# elementwise ops by their zero behaviour; names as _ewise_name gives them
_KEEPS_ZERO = {  # f(0) == 0, one tensor operand that matters
    "relu", "relu6", "gelu", "silu", "tanh", "neg", "abs", "sqrt", "square", "sin", "erf", "hardswish",
    "leaky_relu", "elu", "mish", "selu", "celu", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "identity", "contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type_as",
    "detach", "alias", "_to_copy", "lift_fresh_copy", "stochastic_depth",
}
_PRODUCT = {"mul", "multiply", "imul", "__mul__", "__rmul__"}  # zero if any operand is
_QUOTIENT = {"div", "divide", "true_divide", "truediv", "itruediv"}  # zero if the numerator is
_ADD_PRODUCT = {"addcmul"}  # input + value * t1 * t2: zero if the input is and either factor is
_OVERWRITTEN = {"copy"}  # dst.copy_(src): zero if the source is (dst is all overwritten)
_SUM = {"add", "sub", "subtract", "iadd", "isub", "__add__", "__radd__", "__sub__", "where", "maximum", "minimum"}  # zero if all are
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
        self.steps: set = set()  # dims whose removed entries repeat their predecessor (cumsum of zeros)

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
    if c.attrs.get("gate") is not None:  # a routing softmax: its twin input is -inf there (canon.mark_gates)
        return zs.set(node, [c.attrs["gate"]])
    out_shape = zs.b.shape(node)
    name = _ewise_name(node, zs.b.gm)
    operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, (Node, int, float))]
    if name == "where":
        operands = operands[1:]  # the condition selects; it adds nothing
    if name in ("clamp", "clip"):
        operands = operands[:1] if _bounds_hold_zero(node, zs.b.gm) else []
    axes = []
    for od, size in enumerate(out_shape):
        z = [_operand_zero(zs, a, od, len(out_shape), size) for a in operands]
        if name in _KEEPS_ZERO or name in ("clamp", "clip") or name == "pow" and len(node.args) > 1 and isinstance(node.args[1], (int, float)) and node.args[1] > 0:
            ok = bool(z) and z[0]
        elif name in _PRODUCT:
            ok = any(z)
        elif name in _QUOTIENT:
            ok = bool(z) and z[0]
        elif name in _SUM:
            ok = bool(z) and all(z)
        elif name in _OVERWRITTEN:
            ok = len(z) > 1 and z[1]
        elif name in _ADD_PRODUCT:
            ok = len(z) >= 3 and z[0] and (z[1] or z[2])
        else:
            ok = False
        if ok:
            axes.append(od)
    zs.set(node, axes)


def _bounds_hold_zero(node: Node, gm) -> bool:
    """``clamp(x, lo, hi)`` keeps a zero where ``lo <= 0 <= hi``: bounds that are numbers,
    None, or one-element tensors the graph reads (Gemma4's clamp buffers, which the twin keeps)."""
    def value(a):
        if a is None or isinstance(a, (int, float)):
            return a
        if isinstance(a, Node) and a.op == "get_attr":
            t = operator.attrgetter(a.target)(gm)
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_meta:
                return float(t)
        raise ValueError("a bound not known at compile time")

    try:
        lo, hi = value(arg(node, 1, "min")), value(arg(node, 2, "max"))
    except ValueError:
        return False
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def producer(axis_of_rows):
    """Layers whose output channels are weight rows (zero in the twin); the other dims follow the input
    where no bias is added.
    A weight computed in the graph (``F.conv2d(x, standardize(w))``) is only what its own zeros say:
    its rows zero the output where it is zero, and the input dim it contracts needs zeros on one side."""
    def rule(zs: Zeros, c: COp) -> None:
        out = c.node if c.op not in ("mha", "rnn") else (c.node, 0)
        nd = zs.ndim(out)
        rows = axis_of_rows(nd)
        x = c.inputs[0]
        rows_zero = _computed_weight(zs, c, x)
        # a bias is added at every position of the other dims: a zero input there comes out as the bias
        # (MLP-Mixer's token MLP, a Linear over time: a removed channel's row becomes the bias, which the
        # LayerNorm over channels after it then counts)
        biased = any("bias" in role for role in c.params)
        zs.set(out, [k for k in range(nd) if (k == rows and rows_zero) or (not biased and x is not None and k < zs.ndim(x)
                                                                            and zs.zero(x, k) and k != rows)])
    return rule


def _computed_weight(zs: Zeros, c: COp, x) -> bool:
    """For linear and conv layers: need the contracted input dim zero where the weight's
    column is not (a computed weight, or a buffer: the twin zeroes parameters alone);
    whether the output rows are zero (a parameter's are, the twin zeroes their slices;
    a bias must have the output's width)."""
    w, bias = c.params.get("weight"), c.params.get("bias")
    if c.op == "embedding":  # a table held as a buffer (sinusoids) keeps its columns in the twin
        return w is None or zs.zero(w, 1)
    if c.op == "bilinear":  # x1 W[o] x2 contracts x1 over the weight's dim 1 and x2 over its dim 2
        for k, inp in ((1, x), (2, c.inputs[1])):
            if not zs.zero(w, k):
                zs.need(inp, zs.ndim(inp) - 1, f"{c.node.name}: bilinear with a computed weight contracts this dim; "
                        "its removed entries must be zero on one side")
        return zs.zero(w, 0) and (bias is None or zs.zero(bias, 0))
    if c.op not in ("linear", "conv", "conv_transpose"):
        return True
    w_out, w_in = {"linear": (1, 0) if c.attrs.get("weight_t") else (0, 1), "conv": (0, 1), "conv_transpose": (1, 0)}[c.op]
    x_in = zs.ndim(x) - 1 if c.op == "linear" else 1
    if not zs.zero(w, w_in):  # a buffer or a computed weight: the twin leaves its columns as they are
        zs.need(x, x_in, f"{c.node.name}: {c.op} with a computed weight contracts this dim; its removed entries must be zero on one side")
    width = zs.b.shape(w)[w_out]
    # a bias that broadcasts over the output channels (one value for all) puts it on removed rows too
    return zs.zero(w, w_out) and (bias is None or (zs.b.shape(bias)[-1] == width and zs.zero(bias, zs.ndim(bias) - 1)))


def norm(zs: Zeros, c: COp) -> None:
    """Affine norms zero their removed channels (weight and bias are zero in the twin).
    Without a weight only RMSNorm keeps zeros; BatchNorm subtracts its running mean
    (a buffer, which the twin keeps), LayerNorm and GroupNorm their own means.
    LayerNorm and RMSNorm statistics need zeros: the rewrite counts the removed
    entries as zero. So do batch statistics (``F.batch_norm`` in training mode or
    without running buffers) over every dim but the channel: weight standardization
    normalizes a conv's weight over its input channels this way. Its output is
    not zero there (the removed entries sit at ``-mean / std``)."""
    x = c.inputs[0]
    out = (c.node, 0) if c.op == "batch_norm_tuple" else c.node
    nd = zs.ndim(x)
    normalized = set()
    if c.op in ("layer_norm", "rms_norm"):
        n_norm = _normalized_ndim(c, nd)
        normalized = set(range(nd - n_norm, nd))
    elif c.attrs.get("batch_stats"):
        normalized = set(range(nd)) - {1}
    for k in normalized:
        zs.need(x, k, f"{c.node.name}: {c.op} statistics over this dim need its removed entries to be zero")
    channel = {1} if c.op in ("batch_norm", "batch_norm_tuple", "group_norm") else normalized
    keeps = c.op == "rms_norm"
    # a zero slice along a dim it does not normalize: RMSNorm keeps it zero, LayerNorm and GroupNorm
    # turn it into their bias, BatchNorm into (0 - running mean) / std * w + b (survey 12)
    slices_stay_zero = keeps or (c.op in ("layer_norm", "group_norm") and "bias" not in c.params)
    w = c.params.get("weight")
    axes = []
    for k in range(nd):
        if k in channel:
            w_zero = w is not None and zs.zero(w, zs.ndim(w) - nd + k if c.op in ("layer_norm", "rms_norm") else 0)
            if w_zero or (keeps and zs.zero(x, k)):
                axes.append(k)
        elif k not in normalized and slices_stay_zero and zs.zero(x, k):
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
    """``F.pad(x, p, "constant", value)`` (``aten.pad``, ``aten.constant_pad_nd``) with a value other than zero."""
    if node.target is torch.ops.aten.constant_pad_nd.default:
        return arg(node, 2, "value", 0) not in (0, 0.0)
    if node.target not in (torch.nn.functional.pad, torch.ops.aten.pad.default):
        return False
    return arg(node, 2, "mode", "constant") == "constant" and arg(node, 3, "value", None) not in (None, 0, 0.0)


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
    if c.attrs.get("kind") in REDUCE_OVER_ZEROS:
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


def grouped_mm(zs: Zeros, c: COp) -> None:
    """Like matmul: K contracted, N zero where every expert's weight is. A removed expert
    must get no rows: its offset must repeat the one before (``cumsum`` of zero counts)."""
    x, w, offs = c.inputs
    if not zs.zero(x, 1) and not zs.zero(w, 1):
        zs.need(x, 1, f"{c.node.name}: grouped_mm contracts this dim; its removed entries must be zero on one side")
    if (offs, 0) not in zs.steps:
        zs.b.block((w, 0), f"{c.node.name}: a removed expert must get no rows, and offs is not proven to give it none")
    zs.set(c.node, [1] if zs.zero(w, 2) else [])


def histc(zs: Zeros, c: COp) -> None:
    """Counts per expert id: zero for a removed expert, which the twin never chooses."""
    zs.set(c.node, [0])


def cumsum(zs: Zeros, c: COp) -> None:
    """Exact after removal where the removed entries are zero; then they repeat their
    predecessor (``steps``: an offset that opens an empty range), and other dims keep zeros."""
    x, d = c.inputs[0], c.attrs["dim"]
    zs.need(x, d, f"{c.node.name}: cumsum over this dim needs its removed entries to be zero")
    if zs.zero(x, d):
        zs.steps.add((c.node, d))
    zs.set(c.node, [k for k in range(zs.ndim(x)) if k != d and zs.zero(x, k)])


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
    so, sv = zs.b.shape(c.node), zs.b.shape(v)
    # a head dim with more query heads than v has (enable_gqa): a removed query head over a kept
    # key/value head reads live values, so only dims as wide as v's follow its zeros
    zs.set(c.node, [d for d in range(no) if d != no - 2 and nv - no + d >= 0 and sv[nv - no + d] == so[d]
                    and zs.zero(v, nv - no + d)])


def like(zs: Zeros, c: COp) -> None:
    """``zeros_like`` and ``torch.zeros(...)`` are zero everywhere, unless an in-place op writes into
    them (``index_add_``: their readers then see what was added, which the value itself does not say)."""
    if c.attrs["zeros"] and not _written_in_place(c.node):
        zs.set(c.node, range(zs.ndim(c.node)))


def _written_in_place(node: Node) -> bool:
    return any(_written_in_place_by(u, node) for u in node.users)


def _written_in_place_by(u: Node, node: Node) -> bool:
    from .effects import mutates

    return bool(u.args) and u.args[0] is node and mutates(u)


def indexed(zs: Zeros, c: COp) -> None:
    """A dim other than ``dim`` is zero where the tensors it is read from are: the input for
    ``index_select``/``gather``, the input and what is added for ``index_add``/``scatter_add``."""
    x, _index, *source = c.inputs
    d, out = c.attrs["dim"], c.node
    fresh = _fresh_zeros(x, out)
    zs.set(out, [k for k in range(zs.ndim(out)) if k != d and (fresh or zs.zero(x, k)) and all(zs.zero(s, k) for s in source)
                 and zs.b.shape(x)[k] == zs.b.shape(out)[k]])


def _fresh_zeros(x, writer: Node) -> bool:
    """``torch.zeros_like(h).index_add_(...)``: ``x`` is a tensor of zeros this op alone writes into,
    so its own value is zero (readers of ``x`` itself are left unproven, ``like``)."""
    from .meta_keys import CANON

    c = x.meta.get(CANON) if isinstance(x, Node) else None
    writers = [u for u in x.users if _written_in_place_by(u, x)] if c is not None else []
    return c is not None and c.op in ("like", "factory") and c.attrs.get("zeros") and writers == [writer]


def normalize(zs: Zeros, c: COp) -> None:
    """The norm along ``dim`` needs the removed entries zero; a zero entry stays zero (0 / norm),
    so every dim zero in the input is zero in the output."""
    x, d = c.inputs[0], c.attrs["dim"]
    zs.need(x, d, f"{c.node.name}: normalize over this dim needs its removed entries to be zero")
    zs.set(c.node, [k for k in range(zs.ndim(x)) if zs.zero(x, k)])


def nothing(zs: Zeros, c: COp) -> None:
    """No dim of the result is known to be zero."""


RULES = {
    "ewise": ewise,
    "linear": producer(lambda nd: nd - 1),
    "bilinear": producer(lambda nd: nd - 1),
    "conv": producer(lambda nd: 1),
    "conv_transpose": producer(lambda nd: 1),
    "embedding": producer(lambda nd: nd - 1),
    "mha": producer(lambda nd: nd - 1),
    "rnn": producer(lambda nd: nd - 1),
    "window_attention": producer(lambda nd: nd - 1),
    "batch_norm": norm, "batch_norm_tuple": norm, "layer_norm": norm, "rms_norm": norm, "group_norm": norm,
    **{op: linked for op in ("permute", "split", "tuple_get", "cat", "reshape", "expand", "index", "slice", "pool", "stack", "prelu", "glu",
                             "repeat_interleave", "channel_permute", "patch_merge", "rel_pos_bias", "flip")},
    "reduce": reduce,
    "matmul": matmul,
    "grouped_mm": grouped_mm,
    "histc": histc,
    "cumsum": cumsum,
    "normalize": normalize,
    "einsum": einsum,
    "sdpa": sdpa,
    "like": like,
    "factory": like,
    **{op: indexed for op in INDEXED},
}


def block_unproven_reductions(b, cops: list[COp]) -> None:
    """Run the zero rules over the graph; ops that need zeros block the dims where none are proven."""
    zs = Zeros(b)
    for c in cops:
        if c.op in ("placeholder", "output", "get_attr", "python", "shape", "unknown"):
            continue
        try:
            RULES.get(c.op, nothing)(zs, c)
            _written(zs, c.node)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            if c.op in _NEEDS:  # cannot prove what this op needs: its operands keep their widths
                for t in c.inputs:
                    for k in range(zs.ndim(t)) if t is not None else ():
                        b.block((t, k), f"{c.node.name}: cannot prove removed entries are zero ({type(e).__name__})")


_VIEWS = {"reshape", "permute", "index", "slice", "expand", "split", "tuple_get", "channel_permute"}


def _written(zs: Zeros, node: Node) -> None:
    """An op that writes into its first operand (``h.add_(1)``, ``h.sigmoid_()``, ``y += b``, an
    in-place ReLU) changes what every later reader of that operand sees: from here on it is zero
    only where the result is too. Zero-ness is followed per node, so a write through a view of
    another tensor leaves that tensor's unknown: it and what it is a view of lose their zeros."""
    from .canon import vkey
    from .effects import mutates
    from .meta_keys import CANON

    if not mutates(node):
        return
    out = node.kwargs.get("out")
    target = out if isinstance(out, Node) else node.args[0] if node.args and isinstance(node.args[0], Node) else None
    key = vkey(target) if target is not None else None
    if key is None:
        return
    if key in zs.z:
        same = zs.b.shape(key) == zs.b.shape(node)
        kept = frozenset(k for k in zs.z[key] if same and zs.zero(node, k))
        if kept:
            zs.z[key] = kept
        else:
            zs.z.pop(key)
    root = target
    while _aliased(root) is not None:  # up through the views it may be of
        root = _aliased(root)
    todo = [root]  # ... and down to every other view of that storage made before the write
    while todo:
        n = todo.pop()
        if n is not target and n is not node:
            zs.z.pop(vkey(n), None)
        todo += [u for u in n.users if u is not node and _aliased(u) is n]


_ALIASES = {"detach", "alias", "contiguous", "view_as", "to", "type_as", "as_strided", "requires_grad_"}


def _aliased(n: Node) -> Node | None:
    """The tensor ``n`` may share storage with (a view, a slice, ``detach``, a ``to`` that changes
    nothing), or None. Wider than torch's own view relation: a copy taken for a view only loses zeros."""
    from .meta_keys import CANON

    c = n.meta.get(CANON)
    if c is not None and c.op in _VIEWS and c.inputs:
        src = c.inputs[0]
        if isinstance(src, tuple) and src and isinstance(src[0], Node):
            src = src[0]  # a part of a chunk or split, keyed (node, i): a view of what that node split
        if isinstance(src, Node):
            return src
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if n.op in ("call_method", "call_function") and name in _ALIASES and n.args and isinstance(n.args[0], Node):
        return n.args[0]
    return None


_NEEDS = {"reduce", "matmul", "grouped_mm", "einsum", "sdpa", "layer_norm", "rms_norm", "cumsum", "normalize"}
