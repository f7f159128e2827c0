"""One op vocabulary for every way a graph can say the same thing.

``x + y``, ``torch.add(x, y)``, ``x.add(y)`` and ``aten.add.Tensor`` all
become ``COp("ewise", ...)``; ``nn.Conv2d`` modules, ``F.conv2d`` calls and
``aten.conv2d`` all become ``COp("conv", ...)`` with the weight named by its
qualified parameter name. The coupling rules (``rules.py``) and the rewrite
(``passes/shrink_params.py``) only ever see canonical ops.

Values are named by *value keys*: an fx ``Node`` for an activation, a
``(Node, i)`` pair for the i-th element of a tuple-valued node, and a string
(the qualified attribute name) for a parameter, buffer or constant, whether a
module owns it or the graph reads it with ``get_attr``.
"""
from __future__ import annotations

import copy

import builtins
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .meta_keys import CANON, VAL
from . import contractions, modules as _full
from .shuffle import permute_channels

aten = torch.ops.aten


@dataclass
class COp:
    """A node in canonical form.

    ``inputs`` are the tensor operands in the op's own order (value keys);
    ``params`` maps a role (``weight``, ``bias``, ``running_mean``...) to a
    parameter key; ``attrs`` holds everything else the rules need.
    """

    op: str
    node: Node
    inputs: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        """The same description, of the same nodes: it describes a graph and owns none of it.
        Copied deeply, every COp walked the node list through its node, and
        ``copy.deepcopy`` of a pruned GraphModule (LRASPP, DaViT) hit the recursion limit."""
        return copy.copy(self)


def vkey(arg) -> Any:
    """The value key of an fx argument, or None if it is not a tensor value."""
    if isinstance(arg, Node) and isinstance(arg.meta.get(VAL), torch.Tensor):
        return arg.target if arg.op == "get_attr" else arg
    return None


def arg(node: Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _tensors(node: Node, elements: bool = False) -> list:
    """The value keys of ``node``'s tensor arguments; with ``elements``, those of a tuple-valued one too:
    ``torch.stack(x.chunk(2, -1))`` takes the chunk's tuple whole, and an op without a rule that
    held no dim of it left the chunked channels prunable, the output's width with them (survey 41 F3)."""
    flat = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        for item in items:
            flat.extend(_elements(item) if elements and _tuple_valued(item) else [k for k in [vkey(item)] if k is not None])
    return flat


def _tuple_valued(a) -> bool:
    return isinstance(a, Node) and isinstance(a.meta.get(VAL), (tuple, list)) and any(
        isinstance(v, torch.Tensor) for v in a.meta[VAL])


def _elements(a: Node) -> list:
    """The value keys of a tuple-valued node's tensors."""
    return [_tuple_element(a, i) for i, v in enumerate(a.meta[VAL]) if isinstance(v, torch.Tensor)]


def _ndim(node: Node) -> int:
    return node.meta[VAL].dim()


def _dim(d, ndim: int) -> int:
    return d % ndim if ndim else 0


# ---------------------------------------------------------------- extractors
# Each takes the node (and the module for call_module) and returns a COp.

def _ewise(node, mod=None):
    return COp("ewise", node, _tensors(node))


def _cast(node, mod=None):
    """``x.type_as(h)``, ``x.to(h)``: x's values in h's dtype (and device). ``h`` gives no values, so
    its dims relate to nothing: a (T, T) mask cast with ``.type_as(h)`` tied h's channels to the mask's
    positions and held the whole hidden width (Meta's Llama reference; survey 46 F1)."""
    return COp("ewise", node, [vkey(node.args[0])] if node.args and isinstance(node.args[0], Node) else _tensors(node))


def _softmax(node, mod=None):
    dim = mod.dim if mod is not None else arg(node, 1, "dim")
    return COp("ewise", node, _tensors(node), attrs={"block_dims": [_dim(dim, _ndim(node))]})


def _glu(node, mod=None):
    """``F.glu(x, dim)`` / ``nn.GLU``: the first half of ``dim`` gated by the second."""
    dim = mod.dim if mod is not None else arg(node, 1, "dim", -1)
    return COp("glu", node, [vkey(node.args[0])], attrs={"dim": _dim(dim, _ndim(node.args[0]))})


def _sizes_positional(node: Node, name: str) -> None:
    """``torch.reshape(x, shape=s)``, ``x.expand(size=s)``: the sizes moved to args[1]."""
    if name in node.kwargs and len(node.args) == 1:
        kwargs = dict(node.kwargs)
        node.args, node.kwargs = (node.args[0], kwargs.pop(name)), kwargs


def size_args(node: Node, at) -> tuple[list | None, int, object]:
    """The literal sizes of a view/reshape/expand/unflatten (``COp.attrs["sizes_at"]``) as
    ``(sizes, first output dim they size, where they sit in node.args)``: ``"varargs"``
    (``x.view(a, b)``), an index (``x.view((a, b))``), or ``("unflatten", d)``, whose sizes
    in ``args[2]`` are the output's dims ``d, d + 1, ...``. ``(None, 0, None)`` where none are."""
    if at == "varargs":
        return list(node.args[1:]), 0, "varargs"
    pos, first = (2, at[1]) if isinstance(at, tuple) else (at, 0)
    sizes = node.args[pos] if isinstance(pos, int) and pos < len(node.args) else None
    return (list(sizes), first, pos) if isinstance(sizes, (list, tuple)) else (None, 0, None)


def _reshape(node, mod=None):
    """view / reshape / flatten / squeeze / unsqueeze: the rule reads shapes only."""
    _sizes_positional(node, "shape")
    sizes_at = None
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes_at = "varargs" if not isinstance(arg(node, 1, "shape"), (list, tuple)) else 1
    elif node.target in (torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        sizes_at = 1
    elif node.target in ("unflatten", torch.unflatten, aten.unflatten.int):
        # x.unflatten(dim, sizes): the sizes are output dims dim, dim + 1, ... (nn.Unflatten's literal
        # sizes; the rewrite left them at the original width and the pruned graph failed to run)
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        if isinstance(dim, int) and isinstance(sizes, (list, tuple)):
            node.args, node.kwargs = (node.args[0], dim, sizes), {}
            sizes_at = ("unflatten", _dim(dim, node.args[0].meta[VAL].dim()))
    return COp("reshape", node, [vkey(node.args[0])], attrs={"sizes_at": sizes_at})


def _reshape_as(node, mod=None):
    """``x.reshape_as(y)``, ``x.view_as(y)``: a reshape to y's sizes as they are at run time
    (timm's weight-standardized convs reshape their standardized weight back with it)."""
    return COp("reshape", node, [vkey(node.args[0]), vkey(arg(node, 1, "other"))], attrs={"sizes_at": None})


def _permute(node, mod=None):
    nd = _ndim(node)
    t = node.target
    if t in ("permute",) or t in (torch.permute, aten.permute.default):
        dims = node.args[1:] if node.op == "call_method" and not isinstance(arg(node, 1, "dims"), (list, tuple)) else arg(node, 1, "dims")
        perm = [_dim(d, nd) for d in dims]
    elif t in ("t",) or t in (torch.t, aten.t.default):
        perm = [1, 0] if nd == 2 else list(range(nd))
    elif t is getattr(aten, "numpy_T", None) or t is getattr(getattr(aten, "numpy_T", None), "default", None):
        perm = list(range(nd))[::-1]  # x.T: every dim reversed
    else:  # transpose / swapaxes / movedim
        a, b = _dim(arg(node, 1, "dim0"), nd), _dim(arg(node, 2, "dim1"), nd)
        perm = list(range(nd))
        if t in ("movedim",) or t in (torch.movedim, aten.movedim.int):
            perm.remove(a)
            perm.insert(b, a)
        else:
            perm[a], perm[b] = perm[b], perm[a]
    return COp("permute", node, [vkey(node.args[0])], attrs={"perm": perm})


def _expand(node, mod=None):
    _sizes_positional(node, "size")
    sizes_at = None
    if node.op == "call_method" and node.target == "expand":
        sizes_at = "varargs" if not isinstance(arg(node, 1, "size"), (list, tuple)) else 1
    elif node.target == aten.expand.default:
        sizes_at = 1
    like = arg(node, 1, "other") if node.op == "call_method" and node.target == "expand_as" else None
    return COp("expand", node, [vkey(node.args[0])] + ([vkey(like)] if vkey(like) is not None else []),
               attrs={"sizes_at": sizes_at})


def _repeat_interleave(node, mod=None):
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        return COp("unknown", node, _tensors(node), attrs={"why": "repeat_interleave with tensor repeats or no dim"})
    return COp("repeat_interleave", node, [vkey(node.args[0])], attrs={"repeats": repeats, "dim": _dim(dim, _ndim(node))})


def _repeat(node, mod=None):
    """``x.repeat(*counts)``, ``torch.tile(x, dims)``: every dim holds its input's entries ``count`` times
    over, one whole copy after another (``[a, b, a, b]``, where ``repeat_interleave`` gives
    ``[a, a, b, b]``); counts past the input's dims add new dims in front. ``counts`` lines them up with
    the output's dims from the right, as tile does with a shorter ``dims``."""
    return COp("repeat", node, [vkey(node.args[0])], attrs={"counts": repeat_counts(node)})


def repeat_counts(node: Node) -> list | None:
    """The counts a repeat/tile node gives, as a list (``x.repeat(2, 1)``, ``x.repeat((2, 1))``, ``torch.tile(x, 2)``)."""
    counts = list(node.args[1:]) if node.op == "call_method" and len(node.args) > 2 else arg(node, 1, "repeats", arg(node, 1, "dims"))
    if isinstance(counts, (int, Node)):
        counts = [counts]
    return list(counts) if isinstance(counts, (list, tuple)) else None


def _cat(node, mod=None):
    given = arg(node, 0, "tensors")  # a list, or a tuple-valued node passed whole (torch.stack(x.chunk(2)))
    tensors = _elements(given) if _tuple_valued(given) else [vkey(t) for t in given]
    dim = arg(node, 1, "dim", 0)
    op = "stack" if node.target in (torch.stack, aten.stack.default) else "cat"
    nd = _ndim(node)
    return COp(op, node, tensors, attrs={"dim": _dim(dim, nd)})


def _split(node, mod=None):
    """split / chunk / unbind, all rewritten later as split with explicit sizes."""
    t = node.target
    x = node.args[0]
    nd = x.meta[VAL].dim()
    if t in ("unbind",) or t in (torch.unbind, aten.unbind.int):
        dim, kind = arg(node, 1, "dim", 0), "unbind"
    elif t in ("chunk",) or t in (torch.chunk, aten.chunk.default):
        dim, kind = arg(node, 2, "dim", 0), "chunk"
    else:
        dim, kind = arg(node, 2, "dim", 0), "split"
    return COp("split", node, [vkey(x)], attrs={"dim": _dim(dim, nd), "kind": kind})


def _slice(node, mod=None):
    """narrow / aten.slice: an index range along one dim."""
    x = node.args[0]
    size = x.meta[VAL].shape
    if node.target in (aten.slice.Tensor,):
        dim = _dim(arg(node, 1, "dim", 0), len(size))
        start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
        start, end = slice(start, end).indices(size[dim])[:2] if all(isinstance(v, (int, type(None))) for v in (start, end)) else (None, None)
    else:  # narrow(x, dim, start, length)
        dim = _dim(arg(node, 1, "dim"), len(size))
        start, length, step = arg(node, 2, "start"), arg(node, 3, "length"), 1
        if isinstance(start, int) and start < 0 and isinstance(size[dim], int):
            start += size[dim]  # narrow(x, 1, -6, 6): the last six (start + length was a range past the end)
        end = start + length if isinstance(start, int) and isinstance(length, int) else None
    if start is None or end is None:  # x[..., :T] at a length T read at run time (Mamba's causal conv): its other dims
        return COp("slice", node, [vkey(x)], attrs={"dim": dim})  # map through, the sliced one stays (rules.slice_)
    if not isinstance(step, int):
        return COp("unknown", node, _tensors(node), attrs={"why": "slice with a step computed at run time"})
    # a step (interleaved rotary embeddings' x[..., ::2]): the index rule holds the sliced dim and maps
    # the others through, as for the same slice written as x[..., ::2] in a symbolic trace
    index = tuple([slice(None)] * dim + [slice(start, end, step if step != 1 else None)])
    return COp("index", node, [vkey(x)], attrs={"index": index, "form": "slice_op"})


def _select(node, mod=None):
    x = node.args[0]
    nd = x.meta[VAL].dim()
    dim, idx = _dim(arg(node, 1, "dim"), nd), arg(node, 2, "index")
    return COp("index", node, [vkey(x)], attrs={"index": tuple([slice(None)] * dim + [idx]), "form": "select"})


def _tuple_element(src: Node, i: int) -> tuple:
    """The value key of ``src[i]``: negative positions counted from the end
    (``split(...)[-1]``), and slices of a tuple (``parts[1:]``) followed back
    to the tuple they slice."""
    i = range(len(src.meta[VAL]))[i]
    while (src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[1], slice)
           and isinstance(src.args[0], Node) and isinstance(src.args[0].meta.get(VAL), (tuple, list))):
        src, i = src.args[0], range(len(src.args[0].meta[VAL]))[src.args[1]][i]
    return (src, i)


def _lstm(node: Node) -> bool:
    gm = node.graph.owning_module
    return node.op == "call_module" and gm is not None and isinstance(gm.get_submodule(node.target), nn.LSTM)


def _getitem(node, mod=None):
    src = node.args[0]
    if isinstance(src, Node) and isinstance(src.meta.get(VAL), (tuple, list)):
        if isinstance(node.meta.get(VAL), torch.Tensor) and isinstance(node.args[1], int):
            return COp("tuple_get", node, [_tuple_element(src, node.args[1])])
        if _lstm(src) and node.args[1] in (1, -1):
            return COp("rnn_states", node, [])  # (h_n, c_n): the LSTM's rule couples both
        return COp("python", node)
    if vkey(src) is None:
        return COp("python", node)
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return COp("index", node, [vkey(src)], attrs={"index": index, "form": "getitem"})


def _aten_index(node, mod=None):
    """``aten.index.Tensor(x, [idx])``: ``x[idx]`` as export writes it; more index tensors
    (or None placeholders) have no rule."""
    x, idx = node.args[0], node.args[1]
    if len(idx) == 1 and vkey(idx[0]) is not None and idx[0].meta[VAL].dtype in (torch.int64, torch.int32):
        return COp("index", node, [vkey(x)], attrs={"index": (idx[0],), "form": "aten_index"})
    return COp("unknown", node, _tensors(node), attrs={"why": "aten.index with more than one index tensor"})


def _reduce(node, mod=None):
    x = node.args[0]
    nd = x.meta[VAL].dim()
    dims = arg(node, 1, "dim")
    if dims is None:
        dims = list(range(nd))
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = arg(node, 2, "keepdim", False)
    kind = _REDUCE_KIND.get(node.target if node.op != "call_method" else f"Tensor.{node.target}")
    return COp("reduce", node, [vkey(x)], attrs={"dims": sorted(_dim(d, nd) for d in dims), "keepdim": bool(keepdim), "kind": kind})


_REDUCE_KIND = {
    torch.mean: "mean", aten.mean.dim: "mean", "Tensor.mean": "mean",
    torch.sum: "sum", aten.sum.dim_IntList: "sum", "Tensor.sum": "sum",
    torch.amax: "amax", aten.amax.default: "amax", "Tensor.amax": "amax",
    torch.amin: "amin", aten.amin.default: "amin", "Tensor.amin": "amin",
}


def _p_norm(node, mod=None):
    """``x.norm(p, dim, keepdim)`` / ``torch.norm``: a reduction. For p > 0 (and 'fro')
    zero entries add nothing, so a reduced dim may shrink where they are zero, as for sum."""
    x = node.args[0]
    nd = x.meta[VAL].dim()
    p, dims = arg(node, 1, "p", "fro"), arg(node, 2, "dim")
    dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    kind = "norm" if p == "fro" or (isinstance(p, (int, float)) and p > 0) else None
    return COp("reduce", node, [vkey(x)], attrs={"dims": sorted(_dim(d, nd) for d in dims),
                                                 "keepdim": bool(arg(node, 3, "keepdim", False)), "kind": kind})


def _pool_rank(name: str) -> int:
    """How many trailing dims a pooling op pools over, from its name (max_pool3d -> 3)."""
    return next((int(ch) for ch in ("1", "2", "3") if f"{ch}d" in name.lower()), 2)


def _pool(node, mod=None):
    """Pooling keeps the leading (batch, channel) dims; the trailing ``rank`` dims change.
    An unbatched input (``max_pool3d`` on a 4-D tensor) has only one leading dim."""
    if not isinstance(node.meta.get(VAL), torch.Tensor):  # return_indices=True: (values, indices)
        return COp("unknown", node, _tensors(node), attrs={"why": "pooling that also returns indices"})
    name = type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
    return COp("pool", node, [vkey(node.args[0])], attrs={"rank": _pool_rank(name)})


def _interpolate(node, mod=None):
    """Resampling (``F.interpolate``, ``nn.Upsample``, ``aten.upsample_*``) maps every channel
    of a sample on its own, like pooling: batch and channels kept, the trailing dims
    resized, a zero channel still zero. An FPN's top-down path and a U-Net's decoder were
    held whole: no rule."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if vkey(x) is None or not isinstance(node.meta.get(VAL), torch.Tensor):
        return COp("unknown", node, _tensors(node), attrs={"why": "resampling of a non-tensor"})
    return COp("pool", node, [vkey(x)], attrs={"rank": x.meta[VAL].dim() - 2})


def _matmul(node, mod=None):
    return COp("matmul", node, [vkey(node.args[0]), vkey(node.args[1])])


def _sdpa(node, mod=None):
    q, k, v = (vkey(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    return COp("sdpa", node, [q, k, v], attrs={"mask": vkey(mask), "scale": arg(node, 6, "scale"), "enable_gqa": node.kwargs.get("enable_gqa", False)})


def _einsum(node, mod=None):
    """An einsum, its equation written out (``contractions.explicit``: an ellipsis in letters, the output named)."""
    eq = node.args[0]
    ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    ranks = [_rank(o) for o in ops]
    if isinstance(eq, str) and None not in ranks:
        eq = contractions.explicit(eq, ranks) or eq
    return COp("einsum", node, [vkey(o) for o in ops], attrs={"equation": eq})


def _rank(x) -> int | None:
    val = x.meta.get(VAL) if isinstance(x, Node) else None
    return val.dim() if isinstance(val, torch.Tensor) and not val.is_complex() else None


def _contraction(name: str, spell: Callable, operands: tuple, params: tuple, counted: bool = True):
    """A product einsum spells another way (``tensordot``, ``inner``, ``linalg.vecdot``, ``dot``, ``outer``):
    its equation from ``spell(ranks..., *settings)``, the operands read by their names in ``operands``, the
    settings by ``params`` (name, default).
    ``counted``: whether torch's FLOP counter counts it (a vecdot is a product and a sum to it)."""
    def extract(node, mod=None):
        a, b = arg(node, 0, operands[0]), arg(node, 1, operands[1])
        settings = [arg(node, 2 + i, n, d) for i, (n, d) in enumerate(params)]
        ranks = [_rank(a), _rank(b)]
        eq = spell(*ranks, *settings) if None not in ranks and vkey(a) is not None and vkey(b) is not None else None
        if eq is None or arg(node, 2 + len(params), "out") is not None:
            return COp("unknown", node, _tensors(node), attrs={"why": f"{name} of this form"})
        return COp("einsum", node, [vkey(a), vkey(b)], attrs={"equation": eq, "counted": counted})
    return extract


_CONTRACTIONS = {
    "tensordot": _contraction("tensordot", contractions.tensordot, ("a", "b"), (("dims", 2),)),
    "inner": _contraction("inner", contractions.inner, ("input", "other"), ()),
    "vecdot": _contraction("vecdot", contractions.vecdot, ("x", "y"), (("dim", -1),), counted=False),
    "dot": _contraction("dot", contractions.dot, ("input", "tensor"), (), counted=False),
    "outer": _contraction("outer", contractions.outer, ("input", "vec2"), (), counted=False),
}


def _grouped_mm(node, mod=None):
    """``transformers::grouped_mm_fallback(x (S, K), w (E, K, N), offs (E,)) -> (S, N)``: rows
    ``offs[e-1]:offs[e]`` of x times expert e's ``w[e]`` (Hugging Face's fused MoE experts, as
    ``torch.export`` traces them). ``aten._grouped_mm`` (the same product in bf16 on GPUs) has no
    rule yet: its meta kernel takes only bf16, so no CPU test can check one."""
    x, w, offs = (arg(node, i, n) for i, n in enumerate(("input", "weight", "offs")))
    if [a.meta[VAL].dim() if vkey(a) is not None else None for a in (x, w, offs)] != [2, 3, 1]:
        return COp("unknown", node, _tensors(node), attrs={"why": "grouped_mm other than (S, K) x (E, K, N) by offsets"})
    return COp("grouped_mm", node, [vkey(x), vkey(w), vkey(offs)])


def _topk(node, mod=None):
    """``topk(x, k, dim=-1, largest=True)`` -> (values, indices). The indices are values that
    address ``dim`` (an expert id); ``rules.topk`` follows them (see ``mark_gates``)."""
    x = node.args[0]
    return COp("topk", node, [vkey(x)], attrs={"k": arg(node, 1, "k"), "dim": _dim(arg(node, 2, "dim", -1), _ndim(x)),
                                               "largest": bool(arg(node, 3, "largest", True))})


def _sort(node, mod=None):
    """``sort(x, dim=-1)`` -> (values, indices); ``aten.sort.stable`` takes ``dim`` by keyword only."""
    x = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 and not isinstance(node.args[1], bool) else -1)
    return COp("sort", node, [vkey(x)], attrs={"dim": _dim(dim, _ndim(x))})


def _prelu(node, mod=None):
    """``F.prelu(x, weight)``: one learned slope per channel (dim 1; dim 0 of a 1-D input),
    or one for all. The slopes go with their channels."""
    w = vkey(arg(node, 1, "weight"))
    if w is None:
        return COp("unknown", node, _tensors(node), attrs={"why": "prelu with a computed weight"})
    return COp("prelu", node, [vkey(node.args[0])], params={"weight": w})


def _histc(node, mod=None):
    """``histc(x, bins, min, max)``: counts of x's values; with integer ids, counts per id."""
    return COp("histc", node, [vkey(node.args[0])], attrs={"bins": arg(node, 1, "bins", 100), "min": arg(node, 2, "min", 0),
                                                             "max": arg(node, 3, "max", 0)})


def _like(node, mod=None):
    """``zeros_like(x)`` and kin: a new tensor of x's shape (``kind`` says whether it holds zeros)."""
    x = node.args[0]
    name = getattr(node.target, "__name__", None) or str(node.target)
    return COp("like", node, [vkey(x)], attrs={"zeros": "zeros_like" in name})


def size_source(a):
    """If ``a`` is a size read straight off a tensor (``x.size(1)``, ``x.shape[1]``,
    ``b, c, h, w = x.size()``), the ``(value_key, axis)`` it reads."""
    if not isinstance(a, Node):
        return None
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2:
        x, d = a.args
    elif a.target == torch.ops.aten.sym_size.int:
        x, d = a.args
    elif a.target is operator.getitem and isinstance(a.args[0], Node) and isinstance(a.args[1], int):
        src = a.args[0]
        is_size = (src.op == "call_method" and src.target == "size" and len(src.args) == 1) or (
            src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        if not is_size:
            return None
        x, d = src.args[0], a.args[1]
    else:
        return None
    key = vkey(x)
    if key is None or not isinstance(d, int):
        return None
    return key, d % x.meta[VAL].dim()


def _factory(node, mod=None):
    """``torch.zeros(n, x.size(1))``, ``x.new_zeros(...)`` and kin: an output dim sized by a dim read
    off a tensor is that dim (it follows the new width at run time); a literal size stays."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "").split(".")[0]
    start = 1 if node.op == "call_method" or name.startswith("new_") else 0  # x.new_zeros(sizes): x gives dtype, device
    if len(node.args) > start and isinstance(node.args[start], (list, tuple)):
        sizes, positions = list(node.args[start]), [start]
    elif name in ("full", "new_full"):  # full(size, fill_value): the size is one sequence
        sizes, positions = [], []
    else:
        sizes, positions = list(node.args[start:]), list(range(start, len(node.args)))
    val = node.meta.get(VAL)
    if not isinstance(val, torch.Tensor) or len(sizes) != val.dim():
        return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: {name} with sizes it cannot read"})
    dims = {j: r for j, r in enumerate(map(size_source, sizes)) if r is not None}
    # no inputs: the tensors whose sizes it reads are not operands, and their other dims stay free.
    # A constant fill (zeros, ones, full) holds the same value at every index of a literal size, so that
    # dim may shrink like a broadcast one, its literal rewritten (``sizes_at``, as for a view)
    constant = name in ("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")
    at = None
    if constant and positions:
        at = positions[0] if len(positions) == 1 and isinstance(node.args[positions[0]], (list, tuple)) else (
            "varargs" if node.op == "call_method" else None)
    return COp("factory", node, [], attrs={"dims": dims, "zeros": name in ("zeros", "new_zeros"),
                                           "size_positions": positions, "constant": constant, "sizes_at": at})


def _new_tensor(node, mod=None):
    """``x.new_tensor(2.0)``: a constant from Python data, of its own shape (x gives dtype and device)."""
    def traced(v) -> bool:
        return isinstance(v, Node) or (isinstance(v, (list, tuple)) and any(map(traced, v)))

    if traced(arg(node, 1, "data")):
        return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: new_tensor of a traced value"})
    return COp("factory", node, [], attrs={"dims": {}, "zeros": False, "size_positions": [], "constant": False,
                                           "sizes_at": None})


def _indexed(kind: str, positions: tuple):
    """Ops that move rows along one ``dim`` by an index tensor (message passing over an edge list):
    ``index_select``/``gather`` read them, ``index_add``/``scatter_add`` add them into ``self``,
    ``index_copy`` writes them over its rows (a KV cache: ``k_cache.index_copy_(2, pos, k)``).
    ``positions``: where self (or input), index and source sit in the call, None where absent."""
    names = {"self": ("input", "self"), "index": ("index",), "source": ("source", "src")}

    def make(node, mod=None):
        def at(role):
            pos = positions[("self", "index", "source").index(role)]
            if pos is None:
                return None
            if len(node.args) > pos:
                return node.args[pos]
            return next((node.kwargs[n] for n in names[role] if n in node.kwargs), None)

        x, index, source = at("self"), at("index"), at("source")
        dim = arg(node, 1, "dim")
        if not isinstance(dim, int) or vkey(x) is None or vkey(index) is None:
            return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: {kind} by a computed dim"})
        return COp(kind, node, [vkey(x), vkey(index)] + ([vkey(source)] if source is not None else []),
                   attrs={"dim": _dim(dim, _ndim(x))})
    return make


_INDEX_SELECT, _GATHER = _indexed("index_select", (0, 2, None)), _indexed("gather", (0, 2, None))
_INDEX_ADD, _SCATTER_ADD = _indexed("index_add", (0, 2, 3)), _indexed("scatter_add", (0, 2, 3))
_INDEX_COPY = _indexed("index_copy", (0, 2, 3))
INDEXED = ("index_select", "gather", "index_add", "scatter_add", "index_copy")  # the ops ``_indexed`` makes


def _index_put(node, mod=None):
    """``x[:, :, pos] = k`` as torch.export writes it, ``index_put_(x, [None, None, pos], k)``: one 1-D integer
    index at dim d and full slices elsewhere is ``index_copy`` (``accumulate``: ``index_add``) along d, where the
    values have x's rank (broadcast values, masks and several indices have no rule here)."""
    x, indices, values = node.args[0], arg(node, 1, "indices"), arg(node, 2, "values")
    accumulate = arg(node, 3, "accumulate", False)
    at = [d for d, i in enumerate(indices or ()) if i is not None]
    index = indices[at[0]] if len(at) == 1 else None
    val = index.meta.get(VAL) if isinstance(index, Node) else None
    if (not isinstance(val, torch.Tensor) or val.dim() != 1 or val.dtype.is_floating_point or val.dtype == torch.bool
            or vkey(x) is None or vkey(values) is None or _ndim(values) != _ndim(x)):
        return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: index_put other than one 1-D index"})
    return COp("index_add" if accumulate else "index_copy", node, [vkey(x), vkey(index), vkey(values)],
               attrs={"dim": at[0]})


def _normalize(node, mod=None):
    """``F.normalize(x, p, dim, eps)``: ``x`` over its p-norm along ``dim``. For p > 0 a zero entry adds
    nothing to the norm and stays zero, so a dim it normalizes over may shrink where those are zero."""
    x, p, d = node.args[0], arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0 or not isinstance(d, int) or arg(node, 4, "out"):
        return COp("unknown", node, _tensors(node), attrs={"why": "F.normalize with p <= 0, several dims or out="})
    return COp("normalize", node, [vkey(x)], attrs={"dim": _dim(d, _ndim(x))})


def _cumsum(node, mod=None):
    x = node.args[0]
    return COp("cumsum", node, [vkey(x)], attrs={"dim": _dim(arg(node, 1, "dim"), _ndim(x))})


def _shape_query(node, mod=None):
    return COp("shape", node, _tensors(node))


def _getattr(node, mod=None):
    """``x.shape``/``x.dtype`` read metadata; ``max(...).values``, ``sort(...).indices``,
    ``x.T`` and ``x.mT`` are tensors and must be followed like any other op."""
    val = node.meta.get(VAL)
    if not isinstance(val, torch.Tensor):
        return COp("shape", node, _tensors(node))
    src, attr = node.args[0], node.args[1]
    src_val = src.meta.get(VAL) if isinstance(src, Node) else None
    if isinstance(src_val, (tuple, list)):  # a named field of a tuple-valued op
        i = next((i for i, v in enumerate(src_val) if v is val), None)
        if i is not None:
            return COp("tuple_get", node, [_tuple_element(src, i)])
    if isinstance(src_val, torch.Tensor) and attr in ("T", "mT"):
        nd = src_val.dim()
        perm = list(range(nd))[::-1] if attr == "T" else [*range(nd - 2), nd - 1, nd - 2]
        return COp("permute", node, [vkey(src)], attrs={"perm": perm})
    return COp("unknown", node, _tensors(node) + ([vkey(src)] if vkey(src) is not None else []),
               attrs={"why": f"tensor attribute .{attr}"})


def _noop(node, mod=None):
    return COp("python", node)


# Functional forms of parametrised layers: the weight is a get_attr operand.

def _f_linear(node, mod=None):
    return COp("linear", node, [vkey(node.args[0])], params=_roles(node, {"weight": (1, "weight"), "bias": (2, "bias")}))


def _f_bilinear(node, mod=None):
    # F.bilinear(x1, x2, weight (out, in1, in2), bias): out[..., o] = x1 W[o] x2 + b[o]
    return COp("bilinear", node, [vkey(node.args[0]), vkey(node.args[1])],
               params=_roles(node, {"weight": (2, "weight"), "bias": (3, "bias")}))


def _m_bilinear(node, mod):
    return COp("bilinear", node, [vkey(node.args[0]), vkey(node.args[1])], params=_m_params(node, mod))


def _f_addmm(node, mod=None):
    # addmm(bias, x, w) with w laid out (in, out): GPT-2's Conv1D (torch.addmm, Tensor.addmm, ATen).
    return COp("linear", node, [vkey(node.args[1])], params=_roles(node, {"weight": (2, "mat2"), "bias": (0, "input")}), attrs={"weight_t": True})


_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               *(getattr(op, o) for op in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
                 for o in op.overloads() if o in ("default", "input")))  # what torch.export records


def _f_conv(node, mod=None):
    t = node.target
    groups_pos = 8 if t == aten.convolution.default else 6
    transposed = t in _TRANSPOSED or (t == aten.convolution.default and node.args[6])
    groups = arg(node, groups_pos, "groups", 1)
    if isinstance(groups, Node):  # read at run time (groups=x.shape[1]): its value on the example
        groups = groups.meta.get(VAL)
    if not isinstance(groups, int):
        return COp("unknown", node, _tensors(node), attrs={"why": "convolution with an unknown number of groups"})
    return COp("conv_transpose" if transposed else "conv", node, [vkey(node.args[0])],
               params=_roles(node, {"weight": (1, "weight"), "bias": (2, "bias")}), attrs={"groups": groups})


def _f_norm(kind: str, roles: dict):
    def extract(node, mod=None):
        attrs = {}
        if kind == "group_norm":
            groups = arg(node, 1, "num_groups")
            if isinstance(groups, Node):  # computed at run time (x.shape[1] // 4): its value on the example
                groups = groups.meta.get(VAL)
            if not isinstance(groups, int):
                return COp("unknown", node, _tensors(node), attrs={"why": "group_norm with an unknown number of groups"})
            attrs["num_groups"] = groups
        if kind == "batch_norm":
            attrs["batch_stats"] = _batch_stats(node)
        return COp(kind, node, [vkey(node.args[0])], params=_roles(node, roles), attrs=attrs)
    return extract


def _batch_stats(node: Node) -> bool:
    """Whether a functional batch_norm normalizes by the statistics of its own input
    (training, or no running buffers) rather than by its running buffers."""
    if node.target is _full.batch_norm_full:
        return True
    at = 1 if node.target is F.batch_norm else 3
    return arg(node, 5, "training", False) is not False or arg(node, at, "running_mean") is None


def _instance_norm(node: Node, x, stats: bool, roles: dict, buffers_updated: bool) -> COp:
    """InstanceNorm is GroupNorm with one channel per group when it normalizes by its
    own statistics, and an eval-mode BatchNorm when it reads running buffers; either
    way channels go one at a time, and its affine parameters and buffers with them."""
    val = x.meta.get(VAL) if isinstance(x, Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 3:
        return COp("unknown", node, _tensors(node), attrs={"why": "instance_norm on an unbatched input"})
    if stats and buffers_updated:
        return COp("unknown", node, _tensors(node), attrs={"why": "instance_norm updating its running buffers"})
    if stats:
        return COp("group_norm", node, [vkey(x)], params={r: k for r, k in roles.items() if r in ("weight", "bias")},
                   attrs={"num_groups": val.shape[1], "what": "instance_norm"})
    return COp("batch_norm", node, [vkey(x)], params=roles, attrs={"batch_stats": False, "what": "instance_norm"})


def _m_instance_norm(node, mod: nn.modules.instancenorm._InstanceNorm):
    stats = mod.training or not mod.track_running_stats
    return _instance_norm(node, node.args[0], stats, _m_params(node, mod, ("weight", "bias", "running_mean", "running_var")),
                          buffers_updated=mod.training and mod.track_running_stats)


def _f_instance_norm(spec: dict):
    """``F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, ...)``
    and ATen's ``instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, ...)``."""
    def extract(node, mod=None):
        roles = _roles(node, spec)
        stats = arg(node, 5, "use_input_stats", True) is not False
        return _instance_norm(node, node.args[0], stats, roles, buffers_updated=stats and "running_mean" in roles)
    return extract


def _f_embedding(node, mod=None):
    return COp("embedding", node, [vkey(arg(node, 0, "input"))], params=_roles(node, {"weight": (1, "weight")}))


def _f_embedding_bag(node, mod=None):
    """``F.embedding_bag(input, weight, offsets, ...)``: (bags, D), each bag a sum, mean or max of
    weight rows, so the output's D is the weight's. Bags are input rows (2-D input) or
    offsets (1-D): only the former map onto an input dim."""
    idx, w = arg(node, 0, "input"), vkey(arg(node, 1, "weight"))
    if w is None or not isinstance(idx, Node):
        return COp("unknown", node, _tensors(node), attrs={"why": "embedding_bag with a computed weight"})
    return COp("embedding", node, [vkey(idx)], params={"weight": w}, attrs={"bags": idx.meta[VAL].dim() == 1})


def _aten_embedding(node, mod=None):
    return COp("embedding", node, [vkey(node.args[1])], params=_roles(node, {"weight": (0, "weight")}))


def _roles(node, spec: dict) -> dict:
    out = {}
    for role, (pos, name) in spec.items():
        key = vkey(arg(node, pos, name))
        if key is not None:
            out[role] = key
    return out


# Module forms: parameters named by qualified path.

def _m_params(node, mod, roles=("weight", "bias")):
    return {r: f"{node.target}.{r}" for r in roles if getattr(mod, r, None) is not None}


def _m_conv(node, mod):
    op = "conv_transpose" if isinstance(mod, nn.modules.conv._ConvTransposeNd) else "conv"
    return COp(op, node, [vkey(node.args[0])], params=_m_params(node, mod), attrs={"groups": mod.groups})


def _m_linear(node, mod):
    return COp("linear", node, [vkey(node.args[0])], params=_m_params(node, mod))


def _m_bn(node, mod):
    return COp("batch_norm", node, [vkey(node.args[0])], params=_m_params(node, mod, ("weight", "bias", "running_mean", "running_var")),
               attrs={"batch_stats": mod.training or mod.running_mean is None})


def _m_ln(node, mod):
    return COp("layer_norm", node, [vkey(node.args[0])], params=_m_params(node, mod))


def _m_rms(node, mod):
    return COp("rms_norm", node, [vkey(node.args[0])], params=_m_params(node, mod, ("weight",)))


def _m_gn(node, mod):
    return COp("group_norm", node, [vkey(node.args[0])], params=_m_params(node, mod), attrs={"num_groups": mod.num_groups})


def _m_embedding(node, mod):
    return COp("embedding", node, [vkey(node.args[0])], params=_m_params(node, mod, ("weight",)))


def _m_rnn(node, mod: nn.RNNBase):
    """nn.LSTM / nn.GRU / nn.RNN called on one tensor (zero initial state), no LSTM projection."""
    if len(node.args) != 1 or node.kwargs or getattr(mod, "proj_size", 0):
        return COp("unknown", node, _tensors(node), attrs={"why": f"{type(mod).__name__} with an initial state or a projection"})
    gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    return COp("rnn", node, [vkey(node.args[0])], params={n: f"{node.target}.{n}" for n in mod._flat_weights_names},
               attrs={"gates": gates, "layers": mod.num_layers, "dirs": 2 if mod.bidirectional else 1, "hidden": mod.hidden_size,
                      "batch_first": mod.batch_first})


def _m_mha(node, mod: nn.MultiheadAttention):
    """nn.MultiheadAttention with its packed in-projection: self-attention, or query, key and value of
    the layer's width from other tensors (DETR's ``q = k = x + pos, v = x``, a decoder's cross-attention
    over the encoder's memory). Inputs: query, key, value (one tensor may be several of them)."""
    names = ("query", "key", "value")
    given = [arg(node, i, n) for i, n in enumerate(names)]
    keys = [vkey(t) for t in given]
    ok = mod._qkv_same_embed_dim and mod.in_proj_bias is not None and mod.bias_k is None and not mod.add_zero_attn
    if not ok or None in keys or any(getattr(t.meta.get(VAL), "ndim", None) != 3 for t in given):
        return COp("unknown", node, _tensors(node), attrs={"why": "MultiheadAttention supported only with packed "
                                                                  "in_proj and bias, on batched inputs"})
    params = {"in_weight": f"{node.target}.in_proj_weight", "in_bias": f"{node.target}.in_proj_bias",
              "out_weight": f"{node.target}.out_proj.weight", "out_bias": f"{node.target}.out_proj.bias"}
    need = arg(node, 4, "need_weights", True)
    weights_used = need is not False and any(
        not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, -2)) for u in node.users)
    mask = arg(node, 5, "attn_mask")
    per_head = isinstance(mask, Node) and getattr(mask.meta.get(VAL), "ndim", None) == 3  # (B * heads, T, S)
    return COp("mha", node, keys, params=params, attrs={"num_heads": mod.num_heads, "weights_used": weights_used,
                                                        "batch_first": mod.batch_first, "per_head_mask": per_head})


def _m_flatten(node, mod):
    return COp("reshape", node, [vkey(node.args[0])], attrs={"sizes_at": None})


def _roll(node, mod=None):
    """``roll(x, shifts, dims)``: the rolled dims' indices move, so those dims keep their width (on fewer
    channels the same shift is another permutation); the others map through. No dims: a roll of the
    flattened tensor, which moves everything."""
    dims = arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: roll of the flattened tensor"})
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: roll over computed dims"})
    return COp("roll", node, [vkey(node.args[0])], attrs={"dims": [_dim(d, _ndim(node)) for d in dims]})


def _flip(dims_at=None):
    """``flip(x, dims)`` (``fliplr``: dim 1, ``flipud``: dim 0): index i of a flipped dim goes to n - 1 - i,
    which on fewer kept indices is still their order reversed, so the dim maps through, reversed."""
    def make(node, mod=None):
        dims = arg(node, 1, "dims") if dims_at is None else dims_at
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims) or vkey(node.args[0]) is None:
            return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: flip over computed dims"})
        return COp("flip", node, [vkey(node.args[0])], attrs={"dims": sorted({_dim(d, _ndim(node)) for d in dims})})
    return make


def _fft(pos: int, default):
    """A Fourier transform along ``dim`` (``torch.fft.rfft(x, dim=-1)``; ``aten._fft_r2c(x, dims, ...)``):
    the transformed dims mix their entries and change size, so they keep their width, as a roll's do;
    every other dim maps through (a channel transformed along time stays that channel, and zeros stay
    zeros). Over every dim (``fftn`` without ``dim``) nothing maps through."""
    def make(node, mod=None):
        dims = arg(node, pos, "dim", default)
        if dims is None:
            return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: a transform over every dim"})
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: a transform over computed dims"})
        return COp("roll", node, [vkey(node.args[0])], attrs={"dims": [_dim(d, _ndim(node)) for d in dims]})
    return make


def _pixel_shuffle(inverse: bool):
    """``pixel_shuffle(x, r)`` (sub-pixel upsampling: C*r*r channels become C) and its inverse;
    the factor comes from the module or the call."""
    def make(node, mod=None):
        name = "downscale_factor" if inverse else "upscale_factor"
        r = getattr(mod, name) if mod is not None else arg(node, 1, name)
        if not isinstance(r, int):
            return COp("unknown", node, _tensors(node), attrs={"why": f"{node.name}: pixel shuffle by a computed factor"})
        return COp("pixel_shuffle", node, [vkey(node.args[0])], attrs={"factor": r, "inverse": inverse})
    return make


# ------------------------------------------------------------------- tables

EWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum, torch.sigmoid,
    torch.tanh, torch.relu, torch.relu_, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt, torch.pow,
    torch.clamp, torch.clip, torch.erf, torch.square, torch.reciprocal, torch.sin, torch.cos, torch.masked_fill,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.hardtanh, F.selu, F.logsigmoid, F.alpha_dropout,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout,  # a mask per element or channel
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self, aten.relu.default,
    aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.dropout.default,
    aten.neg.default, aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.exp.default,
    aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.contiguous.default, aten.hardswish.default, aten.hardsigmoid.default, aten.clamp.default,
    aten.masked_fill.Scalar, aten.detach.default, aten.lift_fresh_copy.default,
    aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.relu_.default, aten.hardtanh.default,
    aten.silu_.default, aten.add_.Tensor, aten.mul_.Tensor, aten.abs.default, aten.erf.default,
    torch.addcmul, aten.addcmul.default, torch.clamp_min, torch.clamp_max, aten.clamp.Tensor,
    # the long spellings torch.export keeps (RWKV's squared ReLU, ConvBERT's torch.multiply)
    aten.softplus.default, aten.square.default, aten.multiply.Tensor, aten.multiply.Scalar, aten.subtract.Tensor, aten.divide.Tensor,
    aten.true_divide.Tensor, torch.multiply, torch.subtract, torch.divide, torch.true_divide,
]
EWISE_METHODS = [
    "add", "sub", "mul", "div", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float",
    "half", "bfloat16", "double", "detach", "pow", "exp", "neg", "sqrt", "rsqrt", "abs", "clamp",
    "masked_fill", "add_", "mul_", "sub_", "div_", "__add__", "__mul__", "__radd__", "__rmul__", "sin", "cos", "square",
    "addcmul",
]

FUNCTION_TABLE: dict[Any, Callable] = {
    **{f: _ewise for f in EWISE_FUNCS},
    aten.type_as.default: _cast,  # casts: their other tensor gives a dtype, no values (METHOD_TABLE's to, type_as)
    F.softmax: _softmax, torch.softmax: _softmax, F.log_softmax: _softmax, aten._softmax.default: _softmax, aten.softmax.int: _softmax,
    torch.reshape: _reshape, torch.flatten: _reshape, torch.squeeze: _reshape, torch.unsqueeze: _reshape, torch.unflatten: _reshape,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.flatten.using_ints: _reshape, aten.unsqueeze.default: _reshape, aten.squeeze.dim: _reshape, aten.squeeze.dims: _reshape,
    aten.unflatten.int: _reshape,
    torch.permute: _permute, torch.transpose: _permute, torch.swapaxes: _permute, torch.t: _permute, torch.movedim: _permute,
    aten.permute.default: _permute, aten.transpose.int: _permute, aten.t.default: _permute, aten.movedim.int: _permute,
    **({aten.numpy_T.default: _permute} if hasattr(aten, "numpy_T") else {}),
    aten.expand.default: _expand,
    torch.repeat_interleave: _repeat_interleave, aten.repeat_interleave.self_int: _repeat_interleave,
    torch.tile: _repeat, aten.tile.default: _repeat, aten.repeat.default: _repeat,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat, torch.stack: _cat, aten.cat.default: _cat, aten.stack.default: _cat,
    torch.split: _split, torch.chunk: _split, torch.unbind: _split, aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split, aten.chunk.default: _split, aten.unbind.int: _split,
    torch.tensor_split: _split, aten.tensor_split.indices: _split, aten.tensor_split.sections: _split,
    aten.tensor_split.tensor_indices_or_sections: _split,
    torch.narrow: _slice, aten.slice.Tensor: _slice, aten.narrow.default: _slice, aten.select.int: _select,
    operator.getitem: _getitem, aten.index.Tensor: _aten_index,
    torch.mean: _reduce, torch.sum: _reduce, torch.amax: _reduce, aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce, aten.amax.default: _reduce,
    torch.amin: _reduce, aten.amin.default: _reduce, torch.norm: _p_norm,
    F.interpolate: _interpolate, F.upsample: _interpolate, F.upsample_nearest: _interpolate, F.upsample_bilinear: _interpolate,
    **{getattr(aten, n).vec: _interpolate for n in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                                                    "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                                                    "upsample_trilinear3d") if hasattr(aten, n)},
    F.adaptive_avg_pool1d: _pool, F.adaptive_avg_pool2d: _pool, F.adaptive_avg_pool3d: _pool, F.adaptive_max_pool2d: _pool,
    F.max_pool1d: _pool, F.max_pool2d: _pool, F.max_pool3d: _pool, F.avg_pool1d: _pool, F.avg_pool2d: _pool, F.avg_pool3d: _pool,
    torch._C._nn.avg_pool2d: _pool, torch._C._nn.adaptive_avg_pool2d: _pool,
    aten.adaptive_avg_pool2d.default: _pool, aten.avg_pool2d.default: _pool, aten.max_pool2d.default: _pool,
    aten.adaptive_avg_pool1d.default: _pool, aten._adaptive_avg_pool2d.default: _pool,
    torch.matmul: _matmul, operator.matmul: _matmul, torch.bmm: _matmul, aten.matmul.default: _matmul, aten.bmm.default: _matmul,
    torch.mm: _matmul, aten.mm.default: _matmul,
    torch.einsum: _einsum, torch.functional.einsum: _einsum, aten.einsum.default: _einsum,
    torch.tensordot: _CONTRACTIONS["tensordot"], torch.functional.tensordot: _CONTRACTIONS["tensordot"],
    torch.inner: _CONTRACTIONS["inner"], torch.linalg.vecdot: _CONTRACTIONS["vecdot"], torch.dot: _CONTRACTIONS["dot"],
    torch.outer: _CONTRACTIONS["outer"], torch.ger: _CONTRACTIONS["outer"],
    F.scaled_dot_product_attention: _sdpa, aten.scaled_dot_product_attention.default: _sdpa,
    F.linear: _f_linear, aten.linear.default: _f_linear, F.bilinear: _f_bilinear, torch.bilinear: _f_bilinear,
    aten.bilinear.default: _f_bilinear, aten.addmm.default: _f_addmm, torch.addmm: _f_addmm,
    F.conv1d: _f_conv, F.conv2d: _f_conv, F.conv3d: _f_conv, F.conv_transpose1d: _f_conv, F.conv_transpose2d: _f_conv,
    F.conv_transpose3d: _f_conv, aten.conv1d.default: _f_conv, aten.conv2d.default: _f_conv, aten.conv3d.default: _f_conv,
    aten.convolution.default: _f_conv, **{t: _f_conv for t in _TRANSPOSED},  # aten.conv_transpose2d.input: torch.export
    F.batch_norm: _f_norm("batch_norm", {"running_mean": (1, "running_mean"), "running_var": (2, "running_var"), "weight": (3, "weight"), "bias": (4, "bias")}),
    aten.batch_norm.default: _f_norm("batch_norm", {"weight": (1, "weight"), "bias": (2, "bias"), "running_mean": (3, "running_mean"), "running_var": (4, "running_var")}),
    aten._native_batch_norm_legit_no_training.default: _f_norm("batch_norm_tuple", {"weight": (1, "weight"), "bias": (2, "bias"), "running_mean": (3, "running_mean"), "running_var": (4, "running_var")}),
    F.layer_norm: _f_norm("layer_norm", {"weight": (2, "weight"), "bias": (3, "bias")}),
    aten.layer_norm.default: _f_norm("layer_norm", {"weight": (2, "weight"), "bias": (3, "bias")}),
    F.group_norm: _f_norm("group_norm", {"weight": (2, "weight"), "bias": (3, "bias")}),
    aten.group_norm.default: _f_norm("group_norm", {"weight": (2, "weight"), "bias": (3, "bias")}),
    F.rms_norm: _f_norm("rms_norm", {"weight": (2, "weight")}),
    F.instance_norm: _f_instance_norm({"running_mean": (1, "running_mean"), "running_var": (2, "running_var"), "weight": (3, "weight"), "bias": (4, "bias")}),
    aten.instance_norm.default: _f_instance_norm({"weight": (1, "weight"), "bias": (2, "bias"), "running_mean": (3, "running_mean"), "running_var": (4, "running_var")}),
    F.embedding: _f_embedding, aten.embedding.default: _aten_embedding, F.embedding_bag: _f_embedding_bag,
    torch.topk: _topk, aten.topk.default: _topk, torch.sort: _sort, aten.sort.default: _sort, aten.sort.stable: _sort,
    F.prelu: _prelu, torch.prelu: _prelu, aten.prelu.default: _prelu, aten._prelu_kernel.default: _prelu,
    torch.histc: _histc, aten.histc.default: _histc, torch.cumsum: _cumsum, aten.cumsum.default: _cumsum,
    F.normalize: _normalize,
    torch.roll: _roll, aten.roll.default: _roll,
    torch.flip: _flip(), aten.flip.default: _flip(), torch.fliplr: _flip(1), torch.flipud: _flip(0),
    aten.fliplr.default: _flip(1), aten.flipud.default: _flip(0),
    **{f: _fft(2, -1) for f in (torch.fft.fft, torch.fft.ifft, torch.fft.rfft, torch.fft.irfft, torch.fft.hfft,
                                torch.fft.ihfft)},
    **{f: _fft(2, (-2, -1)) for f in (torch.fft.fft2, torch.fft.ifft2, torch.fft.rfft2, torch.fft.irfft2)},
    **{f: _fft(2, None) for f in (torch.fft.fftn, torch.fft.ifftn, torch.fft.rfftn, torch.fft.irfftn)},
    **{getattr(aten, f"fft_{k}").default: _fft(2, -1) for k in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")},
    **{getattr(aten, f"fft_{k}").default: _fft(2, (-2, -1)) for k in ("fft2", "ifft2", "rfft2", "irfft2")},
    **{getattr(aten, f"fft_{k}").default: _fft(2, None) for k in ("fftn", "ifftn", "rfftn", "irfftn")},
    **{f: _fft(1, None) for f in (aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default)},
    torch.zeros: _factory, torch.ones: _factory, torch.empty: _factory, torch.full: _factory,
    aten.new_zeros.default: _factory, aten.new_ones.default: _factory, aten.new_empty.default: _factory,
    aten.zeros.default: _factory, aten.ones.default: _factory, aten.full.default: _factory,  # torch.export's spellings
    aten.new_full.default: _factory, aten.expand_as.default: _expand,
    torch.zeros_like: _like, torch.ones_like: _like, torch.empty_like: _like, torch.full_like: _like,
    torch.rand_like: _like, torch.randn_like: _like, aten.zeros_like.default: _like, aten.ones_like.default: _like,
    aten.empty_like.default: _like, aten.full_like.default: _like,
    torch.index_select: _INDEX_SELECT, aten.index_select.default: _INDEX_SELECT,
    torch.gather: _GATHER, aten.gather.default: _GATHER,
    torch.index_add: _INDEX_ADD, aten.index_add.default: _INDEX_ADD, aten.index_add_.default: _INDEX_ADD,
    torch.index_copy: _INDEX_COPY, aten.index_copy.default: _INDEX_COPY, aten.index_copy_.default: _INDEX_COPY,
    aten.index_put.default: _index_put, aten.index_put_.default: _index_put,
    aten.copy_.default: _ewise, aten.copy.default: _ewise,  # x[:, a:b] = k as export writes it: a slice, then copy_
    torch.scatter_add: _SCATTER_ADD, aten.scatter_add.default: _SCATTER_ADD, aten.scatter_add_.default: _SCATTER_ADD,
    F.pixel_shuffle: _pixel_shuffle(False), aten.pixel_shuffle.default: _pixel_shuffle(False),
    F.pixel_unshuffle: _pixel_shuffle(True), aten.pixel_unshuffle.default: _pixel_shuffle(True),
    builtins.getattr: _getattr, aten.sym_size.int: _shape_query, torch._assert: _noop,
    aten._assert_tensor_metadata.default: _noop,
}
def _same_size(node, mod=None):
    """pad-like ops: dims no padding touches map through; a padded dim keeps its width (its entries
    move by the padding, even where the amounts cancel, ``(1, -1)``, and a size-1 dim padded out is
    not a broadcast copy). ``padded``: the dims with a nonzero amount (every dim the pad list reaches
    where an amount is computed at run time)."""
    nd = node.args[0].meta[VAL].dim()
    pad = arg(node, 1, "pad", ())
    amounts = list(pad) if isinstance(pad, (list, tuple)) else None
    if amounts is None:
        padded = frozenset(range(nd))
    else:
        padded = frozenset(nd - 1 - i // 2 for i, v in enumerate(amounts) if not (isinstance(v, int) and v == 0))
    return COp("expand", node, [vkey(node.args[0])], attrs={"sizes_at": None, "pad": True, "padded": padded})


def _window_attention(node, mod=None):
    """torchvision's shifted_window_attention (Swin), a leaf function."""
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
             "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
    a = {n: arg(node, i, n) for i, n in enumerate(names)}
    params = {k: vkey(a[k]) for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "logit_scale") if vkey(a[k]) is not None}
    return COp("window_attention", node, [vkey(a["input"]), vkey(a["relative_position_bias"])], params=params,
               attrs={"num_heads": a["num_heads"], "window_size": a["window_size"]})


def _rel_pos_bias(node, mod=None):
    """Swin's _get_relative_position_bias(table (L, heads), index, window) -> (1, heads, N, N)."""
    return COp("rel_pos_bias", node, [vkey(node.args[0])])


FUNCTION_TABLE[F.glu] = FUNCTION_TABLE[aten.glu.default] = _glu
FUNCTION_TABLE[F.pad] = FUNCTION_TABLE[aten.pad.default] = FUNCTION_TABLE[aten.constant_pad_nd.default] = _same_size


def _permute_channels(node, mod=None):
    return COp("channel_permute", node, [vkey(node.args[0])], attrs={"perm": node.args[1], "dim": node.args[2]})


FUNCTION_TABLE[permute_channels] = _permute_channels
# custom ops registered by other libraries, by their schema name: present only once the library is imported
OP_NAME_TABLE: dict[str, Callable] = {"transformers::grouped_mm_fallback": _grouped_mm}
try:
    import torchvision.models.swin_transformer as _swin
    import torchvision.ops

    FUNCTION_TABLE[torchvision.ops.stochastic_depth] = _ewise
    FUNCTION_TABLE[_swin.shifted_window_attention] = _window_attention
    FUNCTION_TABLE[_swin._get_relative_position_bias] = _rel_pos_bias
    FUNCTION_TABLE[_swin._patch_merging_pad] = lambda node, mod=None: COp("patch_merge", node, [vkey(node.args[0])])
except ImportError:  # torchvision is optional
    pass
FUNCTION_TABLE[_full.layer_norm_full] = _f_norm("layer_norm", {"weight": (2, "weight"), "bias": (3, "bias")})
FUNCTION_TABLE[_full.batch_norm_full] = _f_norm("batch_norm", {"weight": (1, "weight"), "bias": (2, "bias")})
FUNCTION_TABLE[_full.rms_norm_full] = _f_norm("rms_norm", {"weight": (2, "weight")})
if hasattr(aten, "rms_norm"):
    FUNCTION_TABLE[aten.rms_norm.default] = _f_norm("rms_norm", {"weight": (2, "weight")})

METHOD_TABLE: dict[str, Callable] = {
    **{m: _ewise for m in EWISE_METHODS},
    "type_as": _cast, "to": _cast,
    "softmax": _softmax, "log_softmax": _softmax,
    "view": _reshape, "reshape": _reshape, "flatten": _reshape, "squeeze": _reshape, "unsqueeze": _reshape, "unflatten": _reshape,
    "reshape_as": _reshape_as, "view_as": _reshape_as,
    "permute": _permute, "transpose": _permute, "swapaxes": _permute, "t": _permute, "movedim": _permute,
    "expand": _expand, "expand_as": _expand, "repeat_interleave": _repeat_interleave, "repeat": _repeat, "tile": _repeat,
    "split": _split, "chunk": _split, "unbind": _split, "split_with_sizes": _split, "tensor_split": _split,
    "narrow": _slice, "mean": _reduce, "sum": _reduce, "amax": _reduce, "amin": _reduce, "norm": _p_norm, "matmul": _matmul, "mm": _matmul, "bmm": _matmul,
    "size": _shape_query, "dim": _shape_query,
    "topk": _topk, "sort": _sort, "histc": _histc, "cumsum": _cumsum, "roll": _roll, "flip": _flip(), "fliplr": _flip(1), "flipud": _flip(0), "addmm": _f_addmm,
    "inner": _CONTRACTIONS["inner"], "dot": _CONTRACTIONS["dot"], "outer": _CONTRACTIONS["outer"], "ger": _CONTRACTIONS["outer"],
    "new_zeros": _factory, "new_ones": _factory, "new_empty": _factory, "new_full": _factory, "new_tensor": _new_tensor,
    "index_select": _INDEX_SELECT, "gather": _GATHER, "index_add": _INDEX_ADD, "index_add_": _INDEX_ADD,
    "index_copy": _INDEX_COPY, "index_copy_": _INDEX_COPY, "copy_": _ewise,
    "scatter_add": _SCATTER_ADD, "scatter_add_": _SCATTER_ADD,
}

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.LogSigmoid,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
MODULE_TABLE: list[tuple[tuple[type, ...], Callable]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _m_conv),
    ((nn.Linear,), _m_linear),
    ((nn.Bilinear,), _m_bilinear),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _m_bn),
    ((nn.LayerNorm, _full.FullWidthLayerNorm), _m_ln),
    ((nn.GroupNorm,), _m_gn),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _m_instance_norm),
    ((nn.RMSNorm, _full.FullWidthRMSNorm), _m_rms),
    ((nn.Embedding,), _m_embedding),
    ((nn.MultiheadAttention,), _m_mha),
    ((nn.LSTM, nn.GRU, nn.RNN), _m_rnn),
    (_ACTIVATIONS, lambda node, mod: COp("ewise", node, _tensors(node))),
    (_POOLS, _pool),
    ((nn.Upsample,), _interpolate),  # UpsamplingNearest2d and UpsamplingBilinear2d are subclasses
    ((nn.Flatten,), _m_flatten),
    ((nn.PixelShuffle,), _pixel_shuffle(False)),
    ((nn.PixelUnshuffle,), _pixel_shuffle(True)),
    ((nn.Softmax, nn.LogSoftmax), _softmax),
    ((nn.GLU,), _glu),
]


def computes_unseen(mod: nn.Module) -> bool:
    """Whether ``mod`` computes more than its type's rule sees: a computed weight
    (weight_norm, orthogonal...), whose source no rule slices, or a hook (old-style
    weight_norm, a user's normalisation) that changes what it returns, or its gradients.
    A backward hook never shows in a forward check: one scaling a conv's input gradient by
    an 8-channel vector failed every backward() once the conv read 4, and one slicing its
    vector to the width gave gradients 0.46 off (survey 39 f02). Global module hooks
    (``register_module_forward_hook`` and kin) run on every module."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(mod) or bool(_hooks(mod))


def _hooks(mod: nn.Module, backward: bool = True) -> list:
    """The hooks that run around ``mod``'s calls: its own forward (and backward) ones, and the global ones."""
    from torch.nn.modules import module as _m

    kinds = ("forward_pre", "forward") + (("backward_pre", "backward") if backward else ())
    own = [getattr(mod, f"_{k}_hooks") for k in kinds]
    every = [getattr(_m, f"_global_{k}_hooks", {}) for k in kinds]
    return [h for d in (*own, *every) for h in d.values()]


def _unruled(mod: nn.Module) -> str:
    """Why a module call has no rule, in the user's terms: a TCN's weight-normed Conv1d was reported as
    'module type Conv1d', which reads as if convolutions were not supported."""
    from torch.nn.utils import parametrize

    name = type(mod).__qualname__
    if parametrize.is_parametrized(mod):
        what = ", ".join(f"{k} ({type(p[0]).__name__})" for k, p in mod.parametrizations.items())
        return (f"module type {name} with a computed weight: {what} is parametrized, and the parameters it is computed from "
                "have no rule (remove the parametrization before pruning, e.g. torch.nn.utils.parametrize."
                "remove_parametrizations, and apply it again after)")
    hooks = [getattr(h, "__name__", type(h).__name__) for h in _hooks(mod)]
    if hooks:
        return (f"module type {name} with hooks ({', '.join(hooks[:3])}) that may change what it computes or its gradients "
                "(old-style weight_norm is one: torch.nn.utils.remove_weight_norm before pruning; remove a hook "
                "before pruning and register it again on the result)")
    return f"module type {name}"


def table_rule(mod: nn.Module) -> Callable | None:
    """``MODULE_TABLE``'s rule for ``mod``'s exact type (a subclass may change forward)."""
    return next((fn for types, fn in MODULE_TABLE if type(mod) in types), None)


def _module_rule(mod) -> Callable | None:
    return None if computes_unseen(mod) else table_rule(mod)


def _positional(node: Node, fn: Callable) -> None:
    """Rewrite keyword inputs of a call (``self.conv(input=x)``) as positional
    ones, as far as ``fn``'s signature allows, so rules can read ``node.args``."""
    sig, bound = _bound(fn, node.args, node.kwargs)
    if sig is None:
        return
    args, kwargs = [], dict(node.kwargs)
    for name, p in sig.parameters.items():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or name not in bound:
            break
        args.append(bound[name])
        kwargs.pop(name, None)
    node.args, node.kwargs = tuple(args), kwargs


def _pointwise(target) -> Callable | None:
    """``_ewise`` for an ATen op its schema tags pointwise (each output element from the same element of each
    broadcast input), and for a function or method of torch's of the same name whose every tensor overload is
    (``torch.lerp``, ``h.lerp``): ``aten.leaky_relu``, ``aten.elu``, ``torch.lerp`` had no rule and held their
    channels. Which of them keep zeros is ``zeros``' table, by name; an op missing there keeps none."""
    if isinstance(target, torch._ops.OpOverload):
        return _ewise if torch.Tag.pointwise in target.tags else None
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    if not isinstance(name, str) or not (isinstance(target, str) or getattr(torch, name, None) is target
                                         or getattr(torch.nn.functional, name, None) is target):
        return None
    return _ewise if _pointwise_packet(name) else None


@functools.lru_cache(maxsize=None)
def _pointwise_packet(name: str) -> bool:
    """Every overload of ``aten.<name>`` that takes a tensor and writes no ``out=`` is tagged pointwise."""
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    tensor = [o for o in packet.overloads() if not o.endswith("out")
              and any(isinstance(a.type, torch.TensorType) for a in getattr(packet, o)._schema.arguments)]
    return bool(tensor) and all(torch.Tag.pointwise in getattr(packet, o).tags for o in tensor)


def _bound(fn: Callable, args: tuple, kwargs: dict):
    """(signature, bound arguments) of a call of ``fn``, or (None, None). A builtin such as ``F.linear`` has
    no Python signature: its TorchScript schemas are tried, the first that binds (``F.linear(input=x,
    weight=w, bias=b)``, as timm's SwinV2 calls it, left its keywords where the linear rule reads
    positions, and the layer was kept whole with "tuple index out of range", survey 60)."""
    import inspect

    try:
        sigs = [inspect.signature(fn)]
    except (TypeError, ValueError):
        from torch.fx.operator_schemas import get_signature_for_torch_op

        try:
            sigs = get_signature_for_torch_op(fn) or []
        except Exception:  # noqa: BLE001 - not a torch op
            sigs = []
    for sig in sigs:
        try:
            return sig, sig.bind(*args, **kwargs).arguments
        except TypeError:
            continue
    return None, None


# ops without a rule whose cause in the user's code is known, and what to do about it
UNRULED_HINTS = {
    "wrap_with_autocast": "torch.autocast inside forward, which torch.export keeps as one opaque region: call the "
                          "model under torch.autocast instead, or move the autocast out of forward, before pruning",
}


def canonicalize_node(gm: GraphModule, node: Node) -> COp:
    if node.op in ("placeholder", "output", "get_attr"):
        return COp(node.op, node)
    val = node.meta.get(VAL)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        fn = _module_rule(mod)
        if fn is None:
            return COp("unknown", node, _tensors(node), attrs={"why": _unruled(mod)})
        if node.kwargs:
            _positional(node, mod.forward)
        try:
            return fn(node, mod)
        except (TypeError, IndexError, KeyError, AttributeError) as e:
            return COp("unknown", node, _tensors(node), attrs={"why": f"cannot read the inputs of {type(mod).__qualname__}: {e}"})
    if node.op == "call_method":
        fn = METHOD_TABLE.get(node.target) or _pointwise(node.target)
        if node.target == "size" or node.target == "dim":
            return _shape_query(node)
    else:
        fn = FUNCTION_TABLE.get(node.target) or OP_NAME_TABLE.get(_op_name(node.target)) or _pointwise(node.target)
        if fn is not None and node.kwargs and not node.args and callable(node.target):
            _positional(node, node.target)  # F.linear(input=x, weight=w)
    tensor_out = isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val))
    if fn is None:
        if not tensor_out and not _tensors(node):  # len(x.chunk(2)) reads no channel
            return COp("python", node)
        name = _target_name(node)
        hint = next((h for k, h in UNRULED_HINTS.items() if k in name), None)
        return COp("unknown", node, _tensors(node, elements=True),
                   attrs={"why": f"no rule for {name}" + (f" ({hint})" if hint else "")})
    if fn is _ewise and not tensor_out:
        return COp("python", node)
    try:
        return fn(node)
    except (TypeError, IndexError, KeyError, AttributeError) as e:
        return COp("unknown", node, _tensors(node, elements=True),
                   attrs={"why": f"cannot read arguments of {_target_name(node)}: {e}"})


def tensor_names(gm: GraphModule) -> dict[str, str]:
    """Every name a parameter or buffer is reachable under -> its first name.
    A tensor tied across modules (``b.weight = a.weight``) is one value with
    one set of dims, whichever module reads it."""
    first: dict[int, str] = {}
    out = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


def _canonical_keys(cop: COp, names: dict) -> None:
    def key(k):
        return names.get(k, k) if isinstance(k, str) else k
    cop.inputs = [key(k) for k in cop.inputs]
    cop.params = {r: key(k) for r, k in cop.params.items()}
    if "mask" in cop.attrs:
        cop.attrs["mask"] = key(cop.attrs["mask"])


def canonicalize(gm: GraphModule) -> list[COp]:
    names = tensor_names(gm)
    out = []
    for node in gm.graph.nodes:
        cop = canonicalize_node(gm, node)
        _canonical_keys(cop, names)
        node.meta[CANON] = cop
        out.append(cop)
    mark_gates(out)
    return out


# dtypes that hold every expert id exactly (bf16 would round ids above 256)
EXACT_ID_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)
_CAST_TARGETS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                 aten.detach.default, aten.alias.default, aten.lift_fresh_copy.default}
_CAST_METHODS = {"to", "float", "double", "int", "long", "clone", "contiguous", "detach", "type_as"}


def exact_cast(node: Node) -> bool:
    """Whether ``node`` copies its first operand with the same shape into a dtype that
    holds small integers exactly (the values stay what they were)."""
    val, src = node.meta.get(VAL), node.args[0] if node.args else None
    if not isinstance(val, torch.Tensor) or not isinstance(src, Node) or not isinstance(src.meta.get(VAL), torch.Tensor):
        return False
    known = node.target in _CAST_TARGETS or (node.op == "call_method" and node.target in _CAST_METHODS)
    return known and val.dtype in EXACT_ID_DTYPES and tuple(val.shape) == tuple(src.meta[VAL].shape)


def mark_gates(cops: list[COp]) -> None:
    """A ``topk`` selects entries of a dim by rank (mixture-of-experts routing: which experts
    a token goes to). An entry removed from such a dim is one that is never selected, and
    its dead twin is a logit of minus infinity, not zero: a zero-weight expert would still
    be routed to. Where a softmax over the same dim feeds the topk (through dtype casts),
    the minus infinity goes into the softmax, so its output is exactly zero at removed
    entries and it normalizes over the kept ones, as the pruned softmax does. Records
    ``attrs["fill"] = (node, dim, value)``: the twin fills ``node``'s first operand
    with ``value`` at removed indices of ``dim`` (``verify``), and lets the softmax shrink."""
    for c in cops:
        if c.op != "topk" or not isinstance(c.inputs[0], Node):
            continue
        d, node = c.attrs["dim"], c.node
        src = node.args[0]
        while isinstance(src, Node) and exact_cast(src):
            src = src.args[0]
        sm = src.meta.get(CANON) if isinstance(src, Node) else None
        if sm is not None and sm.attrs.get("block_dims") == [d] and c.attrs["largest"] and _is_softmax(src):
            sm.attrs = {**sm.attrs, "block_dims": [], "gate": d}
            node = src
        c.attrs["fill"] = (node, d, float("-inf") if c.attrs["largest"] else float("inf"))


def _is_softmax(node: Node) -> bool:
    t = node.target
    return t in (F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int) or (node.op == "call_method" and t == "softmax")


def _op_name(target) -> str | None:
    """``"namespace::op"`` of a dispatcher op overload (``torch.ops.transformers.grouped_mm_fallback.default``)."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else None


def _target_name(node: Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    return getattr(t, "__qualname__", None) and f"{getattr(t, '__module__', '')}.{t.__qualname__}" or str(t)


