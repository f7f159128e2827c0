"""Channel-coupling rules: one function per canonical op, in one table.

A rule states, for one node, which tensor dims are the same channel space and
how their indices correspond ("channel i of the input is channel off+i of the
output"). It calls three methods of the builder (``groups.Builder``):

* ``couple(a, b, ia=None, ib=None)`` - index ``ia[k]`` of dim ``a`` is index
  ``ib[k]`` of dim ``b`` (identity when omitted);
* ``product(flat, factors)`` - dim ``flat`` is the row-major product of the
  ``factors`` dims (reshape splits and merges; decided later, see groups.py);
* ``block(a, why)`` - dim ``a`` must keep its width.

A dim is ``(value_key, axis)``. Any output dim a rule does not mention, and
any input dim it does not mention, is blocked afterwards: what a rule does
not explain is never pruned.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from .canon import INDEXED, COp, _tensors, exact_cast, vkey
from .meta_keys import VAL


def _out(c: COp):
    return c.node


def ewise(b, c: COp):
    """add/mul/where/activations: broadcast from the right; equal sizes share channels."""
    out = _out(c)
    so = b.shape(out)
    for t in c.inputs:
        st = b.shape(t)
        for j, size in enumerate(st):
            od = len(so) - len(st) + j
            if size == so[od]:
                b.couple((t, j), (out, od))
    for d in c.attrs.get("block_dims", ()):
        b.block((out, d), f"{c.node.name}: softmax-like op normalizes over this dim")


def permute(b, c: COp):
    """out dim i is input dim perm[i]."""
    for i, p in enumerate(c.attrs["perm"]):
        b.couple((c.inputs[0], p), (_out(c), i))


def reshape(b, c: COp):
    """view/reshape/flatten/squeeze: match dims by products; splits and merges become product relations.
    ``reshape_as(y)`` takes y's sizes at run time: each output dim is also y's dim."""
    x, out = c.inputs[0], _out(c)
    for like in c.inputs[1:]:
        for k in range(len(b.shape(like))):
            b.couple((like, k), (out, k))
    si, so = b.shape(x), b.shape(out)
    i = j = 0
    while i < len(si) or j < len(so):
        while i < len(si) and si[i] == 1:
            i += 1
        while j < len(so) and so[j] == 1:
            j += 1
        if i >= len(si) or j >= len(so):
            break
        ci, cj = [i], [j]
        pi, pj = si[i], so[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(si):
                    return
                ci.append(i)
                pi *= si[i]
            else:
                j += 1
                if j >= len(so):
                    return
                cj.append(j)
                pj *= so[j]
        ci = [d for d in ci if si[d] != 1]
        cj = [d for d in cj if so[d] != 1]
        if len(ci) == 1 and len(cj) == 1:
            b.couple((x, ci[0]), (out, cj[0]))
        elif len(ci) == 1:
            b.product((x, ci[0]), [(out, d) for d in cj])
        elif len(cj) == 1:
            b.product((out, cj[0]), [(x, d) for d in ci])
        else:
            for d in ci:
                b.block((x, d), f"{c.node.name}: reshape regroups several dims at once")
            for d in cj:
                b.block((out, d), f"{c.node.name}: reshape regroups several dims at once")
        i += 1
        j += 1


def expand(b, c: COp):
    """expand: dims that keep their size map through; broadcast dims (size 1 or
    new, grown) hold copies: any of their indices may go (see ``Builder.replica``).
    ``expand_as(y)`` also ties each dim to y's (survey 47 M1: a gather index expanded as its input)."""
    x, out = c.inputs[0], _out(c)
    for like in c.inputs[1:]:  # expand_as(y): the result has y's sizes, every dim of it, at run time
        for k in range(len(b.shape(like))):
            b.couple((like, k), (out, k))
    si, so = b.shape(x), b.shape(out)
    for od in range(len(so) - len(si)):
        if so[od] > 1:
            b.replica((out, od))
    for j, size in enumerate(si):
        od = len(so) - len(si) + j
        if j in c.attrs.get("padded", ()):
            continue  # a padded dim's entries move, whatever its size: it keeps its width
        if size == so[od]:
            b.couple((x, j), (out, od))
        elif size == 1 and not c.attrs.get("pad"):
            b.replica((out, od))


def repeat_interleave(b, c: COp):
    """out[j] is in[j // r] along dim: each input channel serves r output channels, its copies
    (gpt-fast and mistral-inference write grouped-query attention so, ``k.repeat_interleave(n_rep, 1)``).
    A copy is not its source: a query head reads a copy of its key/value head, and goes alone, the
    copies of every source kept alike (``Builder.share``, as for ``repeat_kv``'s expand and reshape);
    ``repeats`` is then rewritten (``shrink_params._repeats``). Coupled as one unit, the four query
    heads of a key/value head went only together, and a budget of 0.9 landed at 0.756 (survey 42 F3)."""
    x, out, d, r = c.inputs[0], _out(c), c.attrs["dim"], c.attrs["repeats"]
    for k in range(len(b.shape(x))):
        if k != d:
            b.couple((x, k), (out, k))
        elif r > 1:
            b.share((x, d), (out, d), r)
        else:
            b.couple((x, d), (out, d))


def repeat(b, c: COp):
    """``repeat``/``tile``: out[k * n + i] is in[i] along a dim repeated over ``n`` entries, so every copy of
    an entry goes with it, one unit (DeBERTa repeats its position heads over the batch, ``(H, P, d)`` to
    ``(B * H, P, d)``, beside queries viewed so). A size-1 dim repeated is a broadcast: its copies may go
    one by one where the count is a literal, which shrink-params rewrites (``_repeat_counts``); a count
    computed at run time keeps it, and so do new leading dims (copies too)."""
    x, out, counts = c.inputs[0], _out(c), c.attrs["counts"]
    si, so = b.shape(x), b.shape(out)
    lead = len(so) - len(si)
    for od in range(lead):  # a new dim of copies: pruned only where shrink-params can rewrite its literal count
        if so[od] > 1 and counts is not None and isinstance(counts[len(counts) - len(so) + od], int):
            b.replica((out, od))
    for j, n in enumerate(si):
        od = lead + j
        k = len(counts) - len(so) + od if counts is not None else -1
        count = counts[k] if k >= 0 else 1
        if so[od] == n:
            b.couple((x, j), (out, od))
        elif n == 1 and isinstance(count, int):
            b.replica((out, od))
        elif n > 1 and so[od] % n == 0:
            r = so[od] // n
            b.couple((x, j), (out, od), np.tile(np.arange(n), r), np.arange(n * r))


def cat(b, c: COp):
    """out[off_k + i] is input_k[i] along the cat dim."""
    out, d = _out(c), c.attrs["dim"]
    off = 0
    for t in c.inputs:
        st = b.shape(t)
        for k in range(len(st)):
            if k == d:
                b.couple((t, d), (out, d), np.arange(st[d]), off + np.arange(st[d]))
            else:
                b.couple((t, k), (out, k))
        off += st[d]


def stack(b, c: COp):
    """stack adds a dim of size len(inputs): fixed; the others map through."""
    out, d = _out(c), c.attrs["dim"]
    for t in c.inputs:
        for k in range(len(b.shape(t))):
            b.couple((t, k), (out, k if k < d else k + 1))


def split(b, c: COp):
    """split/chunk/unbind: output i is input[off_i : off_i + size_i] along dim."""
    x, d, node = c.inputs[0], c.attrs["dim"], c.node
    nd = len(b.shape(x))
    if c.attrs["kind"] == "chunk" and len(node.meta[VAL]) > 1:
        parts = [v.shape[d] for v in node.meta[VAL]]  # symbolic where export left the dim dynamic (a batch)
        if all(isinstance(s, int) for s in parts) and len(set(parts)) == 1:
            b.even((x, d), len(parts))  # chunk(n) computes equal parts from the width: keep them equal
    off = 0
    for i, v in enumerate(node.meta[VAL]):
        part = (node, i)
        if c.attrs["kind"] == "unbind":
            b.block((x, d), f"{node.name}: unbind turns channels into separate tensors")
            for k in range(nd):
                if k != d:
                    b.couple((x, k), (part, k if k < d else k - 1))
            continue
        size = v.shape[d]
        for k in range(nd):
            if k == d:
                b.couple((x, d), (part, d), off + np.arange(size), np.arange(size))
            else:
                b.couple((x, k), (part, k))
        off += size


def tuple_get(b, c: COp):
    src = c.inputs[0]
    if not hasattr(c.node.meta.get(VAL), "shape"):
        return
    for k in range(len(b.shape(c.node))):
        b.couple((src, k), (c.node, k))


def slice_(b, c: COp):
    """x[..., a:b] with a bound read at run time: the other dims map through; the sliced dim, whose
    width is known only then, relates to nothing (``build`` holds it, a length such as Mamba's time)."""
    x, out, d = c.inputs[0], _out(c), c.attrs["dim"]
    for k in range(len(b.shape(x))):
        if k != d:
            b.couple((x, k), (out, k))


def index(b, c: COp):
    """x[..., a:b, None, 3]: slices map with an offset, ints fix their dim, None adds one."""
    x, out = c.inputs[0], _out(c)
    si = b.shape(x)
    idx = list(c.attrs["index"])
    if len(idx) == 1 and isinstance(idx[0], Node) and isinstance(idx[0].meta.get(VAL), torch.Tensor):
        return gather_rows(b, c, idx[0])
    if any(not isinstance(e, (slice, int, type(None), type(Ellipsis))) for e in idx):
        return b.unknown(c, "indexing with tensors or symbolic values")
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        fill = len(si) - sum(1 for v in idx if v is not None and v is not Ellipsis)
        idx[e:e + 1] = [slice(None)] * fill
    idx += [slice(None)] * (len(si) - sum(1 for v in idx if v is not None))
    i = j = 0
    for e in idx:
        if e is None:
            j += 1
        elif isinstance(e, int):
            b.block((x, i), f"{c.node.name}: selects one channel by position")
            i += 1
        else:
            if not all(isinstance(v, (int, type(None))) for v in (e.start, e.stop, e.step)):
                b.block((x, i), f"{c.node.name}: slice with bounds computed at run time")  # x[:, :H] crops a padded dim
                b.block((out, j), f"{c.node.name}: slice with bounds computed at run time")
                i += 1
                j += 1
                continue
            if e.step not in (None, 1):
                b.block((x, i), f"{c.node.name}: strided slice")
                b.block((out, j), f"{c.node.name}: strided slice")
                i += 1
                j += 1
                continue
            start, stop, _ = e.indices(si[i])
            n = max(stop - start, 0)
            b.couple((x, i), (out, j), start + np.arange(n), np.arange(n))
            i += 1
            j += 1


def einsum(b, c: COp):
    """Dims named by the same letter are the same dim, in every operand and the output."""
    eq = c.attrs["equation"].replace(" ", "")
    if "." in eq or any(t is None for t in c.inputs):
        return b.unknown(c, "einsum with an ellipsis or a non-tensor operand")
    lhs, _, rhs = eq.partition("->")
    specs = lhs.split(",")
    if not _:
        letters = "".join(specs)
        rhs = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    seen: dict = {}
    for value, spec in list(zip(c.inputs, specs)) + [(_out(c), rhs)]:
        shape = b.shape(value)
        for axis, ch in enumerate(spec):
            if shape[axis] == 1:
                continue
            if ch in seen:
                b.couple(seen[ch], (value, axis))
            else:
                seen[ch] = (value, axis)


def channel_permute(b, c: COp):
    """Output channel j is input channel perm[j] (a folded channel shuffle); the other dims map through."""
    x, out, d = c.inputs[0], _out(c), c.attrs["dim"]
    perm = np.asarray(c.attrs["perm"], dtype=np.int64)
    for k in range(len(b.shape(x))):
        if k == d:
            b.couple((x, k), (out, k), perm, np.arange(len(perm)))
        else:
            b.couple((x, k), (out, k))


def gather_rows(b, c: COp, index):
    """x[idx] with one index tensor: picks along dim 0; the other dims map through. Where
    ``idx`` holds expert ids (``topk`` below) and x has a row per expert (GPT-OSS's
    ``bias[expert_ids]``), row e is expert e's: it goes with the expert."""
    x, out = c.inputs[0], _out(c)
    k = index.meta[VAL].dim()
    ids = vkey(index)
    if has_ids(b, ids) and b.sizes[IDS(ids)] == b.shape(x)[0]:
        b.couple((x, 0), IDS(ids))
    else:
        b.block((x, 0), f"{c.node.name}: gathered by an index tensor")
    for d in range(1, len(b.shape(x))):
        b.couple((x, d), (out, k + d - 1))


def reduce(b, c: COp):
    """The kept dims map through. A dim that ``sum`` (or a p-norm) reduces may
    shrink: a removed channel adds nothing once it is gone, exactly as a dead one
    adds zero. So may one ``mean`` reduces: the rewrite scales the mean back to
    the original count (sum / C_orig), which is what a decomposed RMSNorm
    (``x.pow(2).mean(-1)``) needs to stay exact; and one ``amax`` / ``amin``
    reduces (CBAM's channel max): the rewrite takes the removed zeros into the
    max (``clamp_min(0)``) or min. zeros.py proves the removed entries zero."""
    x, out = c.inputs[0], _out(c)
    dims, keep = c.attrs["dims"], c.attrs["keepdim"]
    j = 0
    for k in range(len(b.shape(x))):
        if k in dims:
            if c.attrs.get("kind") in REDUCE_OVER_ZEROS:
                b.touch((x, k))
            else:
                b.block((x, k), f"{c.node.name}: reduction over this dim")
            j += 1 if keep else 0
        else:
            b.couple((x, k), (out, j))
            j += 1


REDUCE_OVER_ZEROS = ("sum", "mean", "norm", "amax", "amin")  # exact over a shrunk dim whose removed entries were zero


def pool(b, c: COp):
    """pooling keeps the leading dims (batch and channels, or channels alone when
    unbatched); the trailing ``rank`` dims are pooled."""
    x, out = c.inputs[0], _out(c)
    for k in range(max(len(b.shape(x)) - c.attrs.get("rank", 2), 0)):
        b.couple((x, k), (out, k))


def _broadcast_batch(b, pairs, out, lead_out):
    """Couple leading (batch/head) dims of several operands with the output's."""
    for t, lead in pairs:
        st = b.shape(t)
        for j in range(lead):
            od = lead_out - lead + j
            if st[j] == b.shape(out)[od]:
                b.couple((t, j), (out, od))


def matmul(b, c: COp):
    """(..., n, k) @ (..., k, m): k is contracted (shared), n and m map to the output."""
    a, w, out = c.inputs[0], c.inputs[1], _out(c)
    sa, sw, so = b.shape(a), b.shape(w), b.shape(out)
    if len(sa) < 2 or len(sw) < 2:
        return b.unknown(c, "matmul with a 1-D operand")
    b.couple((a, len(sa) - 1), (w, len(sw) - 2))
    b.couple((a, len(sa) - 2), (out, len(so) - 2))
    b.couple((w, len(sw) - 1), (out, len(so) - 1))
    _broadcast_batch(b, [(a, len(sa) - 2), (w, len(sw) - 2)], out, len(so) - 2)


def grouped_mm(b, c: COp):
    """x (S, K) @ w (E, K, N) -> (S, N), rows grouped by expert (``offs``): K is contracted
    (shared), N maps to the output; in every expert at once, since all of them are one tensor.
    Expert e is ``w[e]`` and ``offs[e]``: it can go with the routing that fills ``offs``
    (``topk`` below). The rows stay: their positions are what ``offs`` counts."""
    x, w, offs = c.inputs
    out = _out(c)
    b.couple((x, 1), (w, 1))
    b.couple((w, 2), (out, 1))
    b.couple((w, 0), (offs, 0))  # an expert may go where offs gives it no rows (zeros.grouped_mm)
    # torch's grouped_mm (the user's own forward on CPU and GPU) wants 16-byte row strides
    align = max(1, 16 // c.node.meta[VAL].element_size()) if isinstance(c.node.meta.get(VAL), torch.Tensor) else 1
    for d in ((x, 1), (w, 2)):
        b.multiple[d] = max(b.multiple.get(d, 1), align)
    for t in (x, out):
        b.block((t, 0), f"{c.node.name}: rows are assigned to experts by position (offs)")


# --- dims that live in index values: mixture-of-experts routing ----------------------
# ``topk`` turns a dim (experts) into values (the ids of the chosen experts); ``sort``,
# ``histc`` and ``cumsum`` turn the ids into per-expert row offsets for ``grouped_mm``.
# The ids of a value ``t`` are the virtual dim ``IDS(t)`` (``Builder.declare``): id ``i``
# is index ``i`` of the dim they came from, so removing experts renumbers the ids
# exactly as it renumbers the weights. Any op that reads ids without a rule here keeps
# the experts (``carry_ids``).

def IDS(key) -> tuple:
    return (("ids", key), 0)


def has_ids(b, key) -> bool:
    return key is not None and IDS(key) in b.sizes


def _give_ids(b, src, dst) -> None:
    b.declare(IDS(dst)[0], b.sizes[IDS(src)])
    b.couple(IDS(src), IDS(dst))


def topk(b, c: COp):
    """(values, indices) = topk(x, k, dim): the other dims map through; ``dim`` becomes k
    wide in both outputs, and its entries become the indices' values. A removed entry is
    one never chosen (its twin: minus infinity where canon.mark_gates says), so at least
    k must stay."""
    x, node = c.inputs[0], c.node
    d, k = c.attrs["dim"], c.attrs["k"]
    vals, idx = (node, 0), (node, 1)
    for j in range(len(b.shape(x))):
        if j != d:
            b.couple((x, j), (vals, j))
            b.couple((x, j), (idx, j))
    for t in (vals, idx):
        b.block((t, d), f"{node.name}: topk keeps k entries")
    fill = c.attrs.get("fill")
    filled = vkey(fill[0].args[0]) if fill is not None else None
    if not isinstance(k, int) or filled is None:
        return b.block((x, d), f"{node.name}: topk with a computed k, or over a value the twin cannot fill")
    b.declare(IDS(idx)[0], b.shape(x)[d])
    b.couple((x, d), IDS(idx))
    b.couple((x, d), (filled, d))  # the filled dim: the same entries
    b.fills[(filled, d)] = fill
    b.min_kept[(x, d)] = k


def sort(b, c: COp):
    """(values, indices) = sort(x, dim): ``dim`` is reordered (its positions stay); the
    other dims map through. Sorted ids are still ids."""
    x, node, d = c.inputs[0], c.node, c.attrs["dim"]
    for j in range(len(b.shape(x))):
        for t in ((node, 0), (node, 1)):
            if j == d:
                b.block((t, j), f"{node.name}: sort reorders this dim")
            else:
                b.couple((x, j), (t, j))
    b.block((x, d), f"{node.name}: sort reorders this dim")
    if has_ids(b, x):
        _give_ids(b, x, (node, 0))


def histc(b, c: COp):
    """``histc(ids, bins=E, min=0, max=E-1 or E)`` counts the rows of every expert: bin e is
    expert e (shrink-params rewrites ``bins`` and ``max``). Any other histogram mixes every
    entry of its input into fixed bins."""
    x, out = c.inputs[0], c.node
    for j in range(len(b.shape(x))):
        b.block((x, j), f"{out.name}: histc counts every entry")
    bins, lo, hi = c.attrs["bins"], c.attrs["min"], c.attrs["max"]
    n = b.sizes.get(IDS(x)) if has_ids(b, x) else None
    if n is not None and bins == n and lo == 0 and hi in (n - 1, n):
        b.routes.add((out, 0))
        return b.couple(IDS(x), (out, 0))
    b.block((out, 0), f"{out.name}: histc bins other than one per id")


def like(b, c: COp):
    """``zeros_like(x)``: every dim is x's."""
    x, out = c.inputs[0], c.node
    for j in range(len(b.shape(x))):
        b.couple((x, j), (out, j))


def factory(b, c: COp):
    """A new tensor's dims sized by dims read off other tensors are those dims; a constant fill's
    literal sizes hold the same value at every index (an RNN's zero initial state), so any may go."""
    for j, src in c.attrs["dims"].items():
        b.couple(src, (c.node, j))
    if c.attrs.get("constant") and c.attrs.get("sizes_at") is not None:
        for j in range(len(b.shape(c.node))):
            if j not in c.attrs["dims"]:
                b.replica((c.node, j))


_WRITES_INTO = ("index_add", "scatter_add", "index_copy")


def indexed(b, c: COp):
    """Rows moved along ``dim`` by an index: every other dim maps through, where the tensors that
    share it have its full size (a partial index leaves it whole). ``index_select``, ``index_add`` and
    ``index_copy`` take a 1-D index whose length is the rows read or added; ``gather`` and ``scatter_add`` an index
    of the moved tensor's shape, whose values address ``dim`` alone."""
    x, index, *source = c.inputs
    out, d = c.node, c.attrs["dim"]
    into = c.op in _WRITES_INTO  # the result is ``x`` with ``source``'s rows added or written at the index
    moved = (source[0] if source else None) if into else out  # the tensor indexed along d
    sx = b.shape(x)
    for k in range(len(sx)):
        if k == d:
            continue
        if into:
            b.couple((x, k), (out, k))
        if moved is not None and b.shape(moved)[k] == sx[k]:
            b.couple((x, k), (moved, k))
            if c.op in ("gather", "scatter_add"):
                b.couple((index, k), (moved, k))
    # ``dim`` itself stays: the index's values address it (index_add's and scatter_add's target too,
    # which shrunk would need its index renumbered). Blocked, not just left out: another path may relate it,
    # as ``gather(h, 1, perm.view(1, C, 1, 1).expand_as(h))`` ties h's channels to the index's (survey 47 M1)
    b.block((x, d), f"{c.node.name}: the index's values address this dim")
    if into:
        b.block((out, d), f"{c.node.name}: the index's values address this dim")
    if moved is not None:
        b.couple((index, d if c.op in ("gather", "scatter_add") else 0), (moved, d))


def normalize(b, c: COp):
    """``F.normalize`` along ``dim``: every dim maps to itself; the one normalized over is exact after
    removal where the removed entries are zero (zeros.normalize), as a p-norm's sum is."""
    x, out = c.inputs[0], c.node
    for j in range(len(b.shape(x))):
        b.couple((x, j), (out, j))


def cumsum(b, c: COp):
    """Running sum along ``dim``: exact after removal where the removed entries are zero
    (zeros.cumsum); the output's removed entries then repeat their predecessor."""
    x, out = c.inputs[0], c.node
    for j in range(len(b.shape(x))):
        b.couple((x, j), (out, j))


def _ids_through(b, c: COp, src) -> None:
    """Ops that copy ids: reshapes, tuple elements, casts that keep them exact (sorts: ``sort``)."""
    if c.op in ("reshape", "tuple_get") and src == c.inputs[0]:
        _give_ids(b, src, c.node)
    elif c.op == "ewise" and exact_cast(c.node) and vkey(c.node.args[0]) == src:
        _give_ids(b, src, c.node)


def carry_ids(b, c: COp) -> None:
    """Follow ids into ``c``; any reader no rule explains keeps the experts. Every tensor
    operand counts, not only ``c.inputs`` (an index tensor is an attribute of ``index``)."""
    srcs = list(dict.fromkeys(t for t in [*c.inputs, *_tensors(c.node)] if has_ids(b, t)))
    for t in srcs:
        _ids_through(b, c, t)
        if IDS(t) not in b.touched:
            b.block(IDS(t), f"{c.node.name}: {c.op} reads expert ids (topk indices) in a way no rule follows")


def sdpa(b, c: COp):
    """q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). Heads are leading dims."""
    q, k, v = c.inputs
    out = _out(c)
    sq, sk, sv, so = b.shape(q), b.shape(k), b.shape(v), b.shape(out)
    lead = len(so) - 2
    b.couple((q, len(sq) - 1), (k, len(sk) - 1))
    b.couple((q, len(sq) - 2), (out, lead))
    b.couple((k, len(sk) - 2), (v, len(sv) - 2))
    b.couple((v, len(sv) - 1), (out, lead + 1))
    if c.attrs["scale"] is None:
        b.block((q, len(sq) - 1), f"{c.node.name}: attention scale is computed from head_dim")
    if c.attrs["enable_gqa"] and lead >= 1 and sq[lead - 1] != sk[lead - 1]:
        r = sq[lead - 1] // sk[lead - 1]  # query head i reads key/value head i // r
        for t in (k, v):
            b.share((t, lead - 1), (out, lead - 1), r)
        _broadcast_batch(b, [(q, len(sq) - 2)], out, lead)
        _broadcast_batch(b, [(k, lead - 1), (v, lead - 1)], out, lead - 1)
    else:
        _broadcast_batch(b, [(q, len(sq) - 2), (k, len(sk) - 2), (v, len(sv) - 2)], out, lead)
    mask = c.attrs["mask"]
    if mask is not None:
        sm = b.shape(mask)
        for j, size in enumerate(sm):
            od = len(so) - len(sm) + j
            target = (k, len(sk) - 2) if j == len(sm) - 1 else (out, od)
            if size == b.shape(target[0])[target[1]] and size != 1:
                b.couple((mask, j), target)


def linear(b, c: COp):
    """weight (out, in): x[-1] is weight columns, y[-1] is weight rows and bias."""
    x, out = c.inputs[0], _out(c)
    w = c.params["weight"]
    w_out, w_in = (1, 0) if c.attrs.get("weight_t") else (0, 1)
    nd = len(b.shape(x))
    b.couple((x, nd - 1), (w, w_in))
    b.couple((out, nd - 1), (w, w_out))
    if "bias" in c.params:  # addmm's bias broadcasts: a row of its own per output row, or one value for all
        bias, so = c.params["bias"], b.shape(out)
        sb = b.shape(bias)
        for j, size in enumerate(sb):
            if size == so[len(so) - len(sb) + j]:
                b.couple((bias, j), (out, len(so) - len(sb) + j))
    for k in range(nd - 1):
        b.couple((x, k), (out, k))


def bilinear(b, c: COp):
    """weight (out, in1, in2): x1[-1] is the weight's dim 1, x2[-1] its dim 2, y[-1] its rows and
    the bias; the leading dims of both inputs are the output's (``nn.Bilinear`` takes them equal)."""
    x1, x2, out = c.inputs[0], c.inputs[1], _out(c)
    w = c.params["weight"]
    nd = len(b.shape(out))
    if len(b.shape(x1)) != nd or len(b.shape(x2)) != nd:
        return b.unknown(c, "bilinear over inputs of another rank than its output")
    b.couple((x1, nd - 1), (w, 1))
    b.couple((x2, nd - 1), (w, 2))
    b.couple((out, nd - 1), (w, 0))
    if "bias" in c.params:
        b.couple((c.params["bias"], 0), (out, nd - 1))
    for k in range(nd - 1):
        b.couple((x1, k), (out, k))
        b.couple((x2, k), (out, k))


def _unify_blocks(b, key, n: int, block: int):
    """Make every index of each length-`block` run of `key` one unit (whole groups, whole heads)."""
    if block > 1:
        i = np.arange(n)
        b.couple(key, key, i, (i // block) * block)


def conv(b, c: COp):
    """weight (Cout, Cin/g, *k). A grouped conv stays balanced one of two ways,
    whichever leaves more units:

    * whole groups (depthwise, ResNeXt's many narrow groups): an input group and
      its output group are one unit; ``groups`` shrinks;
    * positions (RegNet-X's few wide groups): channel p of every group is one
      unit, on each side; ``groups`` stays and FLOPs fall quadratically.
    """
    _grouped(b, c, transposed=False)


def conv_transpose(b, c: COp):
    """weight (Cin, Cout/g, *k): the layout is the transpose of conv's, and so is a grouped
    one's balance (a depthwise upsampling loses whole groups)."""
    _grouped(b, c, transposed=True)


def _grouped(b, c: COp, transposed: bool):
    """A conv's coupling: the weight's dim 0 is one side's full width (the output's, the input's
    when transposed), its dim 1 the other side's width per group."""
    x, out, w = c.inputs[0], _out(c), c.params["weight"]
    g = c.attrs["groups"]
    whole, per_group = ((x, 1), (out, 1)) if transposed else ((out, 1), (x, 1))  # (w, 0) and (w, 1)
    b.couple((x, 0), (out, 0))
    b.couple(whole, (w, 0))
    if "bias" in c.params:
        b.couple((c.params["bias"], 0), (out, 1))
    if g == 1:
        b.couple(per_group, (w, 1))
        return
    cin, cout = b.shape(x)[1], b.shape(out)[1]
    cin_g, cout_g = cin // g, cout // g
    if cin_g >= g:  # positions: channel p of every group, on each side
        (n_whole, g_whole), (n_per, g_per) = ((cin, cin_g), (cout, cout_g)) if transposed else ((cout, cout_g), (cin, cin_g))
        i, o = np.arange(n_per), np.arange(n_whole)
        b.couple(per_group, (w, 1), i, i % g_per)
        b.couple(whole, whole, o, o % g_whole)
        return
    i = np.arange(cin)  # whole groups: an input group and its output group
    b.couple((x, 1), (out, 1), i, (i // cin_g) * cout_g)
    _unify_blocks(b, (out, 1), cout, cout_g)
    b.block((w, 1), f"{c.node.name}: channels per group of a grouped {'ConvTranspose' if transposed else 'conv'} stay")


def batch_norm(b, c: COp):
    """per-channel affine and statistics on dim 1. With batch statistics the other
    dims may shrink too (a standardized weight's input channels: see zeros.py and
    ``modules.batch_norm_full``), unless running buffers are kept: then a model traced
    in eval mode normalizes by them, but once put in training mode to fine-tune it
    takes batch statistics over those dims and updates its buffers from them, over
    fewer entries than the dead twin (``BatchNorm1d(T)`` over (N, T, D) with D pruned)."""
    x = c.inputs[0]
    out = (c.node, 0) if c.op == "batch_norm_tuple" else _out(c)
    for k in range(len(b.shape(x))):
        b.couple((x, k), (out, k))
        if k != 1 and "running_mean" in c.params:
            b.block((x, k), f"{c.node.name}: batch statistics over this dim (in training mode) update running buffers")
        elif k != 1 and c.node.op == "call_module":  # only the functional form is rewritten to count the full width
            b.block((x, k), f"{c.node.name}: a BatchNorm module's batch statistics over this dim")
    for p in c.params.values():
        b.couple((p, 0), (x, 1))


def glu(b, c: COp):
    """``out[i] = x[i] * sigmoid(x[i + h])`` along ``dim``, h half its width: channel i of the output
    reads channels i and i + h, one unit, so the halves stay alike and the op splits them right."""
    x, out, d = c.inputs[0], _out(c), c.attrs["dim"]
    for k in range(len(b.shape(x))):
        if k != d:
            b.couple((x, k), (out, k))
    n = b.shape(x)[d]
    b.couple((x, d), (out, d), np.arange(n), np.arange(n) % (n // 2))


def prelu(b, c: COp):
    """elementwise, with a slope per channel (dim 1, or dim 0 of a 1-D input) unless one is shared."""
    x, out = c.inputs[0], _out(c)
    nd = len(b.shape(x))
    for k in range(nd):
        b.couple((x, k), (out, k))
    w = c.params["weight"]
    if b.shape(w)[0] > 1:
        b.couple((w, 0), (x, 1 if nd >= 2 else 0))


def layer_norm(b, c: COp):
    """normalizes the trailing dims; the affine parameters cover them. A normalized_shape
    of several dims computed at run time as one value (``F.layer_norm(y, y.shape[1:])``)
    holds the dims it covers: the rewrite took it for one dim and normalized the last
    alone (0.30 off where the outputs reach 0.27, under ``verify=False``; the self-check
    caught it and kept the group, while ``analyze`` listed it prunable)."""
    x, out = c.inputs[0], _out(c)
    nd = len(b.shape(x))
    for k in range(nd):
        b.couple((x, k), (out, k))
    shape = c.node.args[1] if c.node.op == "call_function" and len(c.node.args) > 1 else c.node.kwargs.get("normalized_shape")
    if isinstance(shape, Node):  # one value for the whole shape: the rewrite reads it as one dim (right for x.shape[-1:])
        val = shape.meta.get(VAL)
        n = len(val) if isinstance(val, (list, tuple)) else nd
        for k in range(nd - n, nd) if n > 1 else ():
            b.block((x, k), f"{c.node.name}: layer_norm over several dims whose shape is computed at run time")
    for p in c.params.values():
        pn = len(b.shape(p))
        for j in range(pn):
            b.couple((p, j), (x, nd - pn + j))


def group_norm(b, c: COp):
    """statistics per group of channels: remove whole groups only. The statistics also
    run over every dim after the channel; no rewrite counts removed entries there, so
    those dims stay (a GroupNorm over tokens whose features a linear makes was listed
    prunable and came back 0.37 off under ``verify=False``)."""
    x, out = c.inputs[0], _out(c)
    for k in range(len(b.shape(x))):
        b.couple((x, k), (out, k))
        if k >= 2:
            b.block((x, k), f"{c.node.name}: {c.attrs.get('what', 'group_norm')} statistics over this dim")
    n = b.shape(x)[1]
    _unify_blocks(b, (x, 1), n, n // c.attrs["num_groups"])
    for p in c.params.values():
        b.couple((p, 0), (x, 1))


def embedding(b, c: COp):
    """weight (V, D): the output's last dim is D; the vocabulary stays."""
    idx, out, w = c.inputs[0], _out(c), c.params["weight"]
    nd = len(b.shape(out))
    b.couple((out, nd - 1), (w, 1))
    for k in range(nd - 1) if not c.attrs.get("bags") else ():  # bags by offsets: rows are not input positions
        b.couple((idx, k), (out, k))


def mha(b, c: COp):
    """nn.MultiheadAttention (batched, batch first or second): whole heads go together.

    The attention width E' = heads * head_dim gets a dim of its own, ``("attn", node)``,
    independent of the residual width E, which query, key and value share through the
    packed in-projection's columns. The output has the query's positions; key and value
    share theirs (a cross-attention's memory)."""
    q, k, v = c.inputs
    node = c.node
    out = (node, 0)
    p = c.params
    e = b.shape(q)[-1]
    head = e // c.attrs["num_heads"]
    b.declare(("attn", node), e)
    inner = (("attn", node), 0)
    i = np.arange(e)
    for t in (q, k, v):
        b.couple((t, 2), (p["in_weight"], 1))
    b.couple((out, 2), (p["out_weight"], 0))
    b.couple((p["out_bias"], 0), (out, 2))
    for s in range(3):
        b.couple((p["in_weight"], 0), inner, s * e + i, i)
        b.couple((p["in_bias"], 0), inner, s * e + i, i)
    b.couple((p["out_weight"], 1), inner)
    _unify_blocks(b, inner, e, head)
    if c.attrs.get("weights_used"):
        b.block(inner, f"{node.name}: the attention weights it returns are averaged over heads")
    if c.attrs.get("per_head_mask"):
        b.block(inner, f"{node.name}: its attention mask has a slice per head")
    batch = 0 if c.attrs.get("batch_first", True) else 1
    for d in range(2):
        b.couple((q, d), (out, d))
        b.couple((k, d), (v, d))
    b.couple((q, batch), (k, batch))


def rnn(b, c: COp):
    """nn.LSTM / nn.GRU / nn.RNN: hidden unit i is row ``g * H + i`` of every gate of
    every ``weight_ih``, ``weight_hh`` and bias, column i of ``weight_hh``, and channel i
    of each direction's half of the output (and of the next layer's input). The module
    keeps one ``hidden_size`` for every layer and direction, so unit i is one across
    all of them. A removed unit whose rows are zero stays zero from a zero state."""
    x, node = c.inputs[0], c.node
    out = (node, 0)
    h, gates, dirs = c.attrs["hidden"], c.attrs["gates"], c.attrs["dirs"]
    b.declare(("rnn", node), h)
    inner = (("rnn", node), 0)
    rows, cols = np.arange(gates * h), np.arange(dirs * h)
    nd = len(b.shape(x))
    for layer in range(c.attrs["layers"]):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = c.params["weight_ih" + sfx], c.params["weight_hh" + sfx]
            for t in (w_ih, w_hh, c.params.get("bias_ih" + sfx), c.params.get("bias_hh" + sfx)):
                if t is not None:
                    b.couple((t, 0), inner, rows, rows % h)
            b.couple((w_hh, 1), inner)
            if layer == 0:
                b.couple((x, nd - 1), (w_ih, 1))
            else:
                b.couple((w_ih, 1), inner, cols, cols % h)
    b.couple((out, nd - 1), inner, cols, cols % h)
    for k in range(nd - 1):
        b.couple((x, k), (out, k))
    for state in _rnn_states(b, node):  # h_n (and an LSTM's c_n): (layers * dirs, [N,] H)
        b.couple((state, len(b.shape(state)) - 1), inner)
        if nd == 3:
            b.couple((state, 1), (x, 0 if c.attrs.get("batch_first") else 1))


def rnn_states(b, c: COp):
    """``getitem(lstm, 1)``: the pair (h_n, c_n), each coupled by the LSTM's own rule (``rnn``)."""
    for i, v in enumerate(c.node.meta[VAL]):
        for k in range(v.dim()):
            b._add(((c.node, i), k))


def _rnn_states(b, node) -> list:
    """The value keys of an RNN's final states: ``(node, 1)`` for a GRU or RNN; for an LSTM,
    whose second output is the pair (h_n, c_n), the elements of each ``getitem(node, 1)``.
    The pair read any other way (passed on whole) keeps the hidden width."""
    if isinstance(node.meta[VAL][1], torch.Tensor):
        return [(node, 1)]
    states = []
    for u in node.users:
        at = u.args[1] if u.op == "call_function" and u.target is operator.getitem else None
        if at in (1, -1):
            states += [(u, 0), (u, 1)]
        elif at not in (0, -2):
            b.block((("rnn", node), 0), f"{node.name}: its final states are read whole")
    return states


def window_attention(b, c: COp):
    """Swin's shifted_window_attention: whole heads go together.

    Inside, head_dim is computed as (input width) // num_heads, so the input
    (residual) width must stay heads x head_dim: it is coupled index for index
    with the attention width and moves in whole heads too.
    """
    x, bias = c.inputs
    out, p = _out(c), c.params
    inner_n = b.shape(p["qkv_weight"])[0] // 3
    head = inner_n // c.attrs["num_heads"]
    b.declare(("attn", c.node), inner_n)
    inner = (("attn", c.node), 0)
    i = np.arange(inner_n)
    for s in range(3):
        b.couple((p["qkv_weight"], 0), inner, s * inner_n + i, i)
        if "qkv_bias" in p:
            b.couple((p["qkv_bias"], 0), inner, s * inner_n + i, i)
    b.couple((p["proj_weight"], 1), inner)
    _unify_blocks(b, inner, inner_n, head)
    heads = np.arange(c.attrs["num_heads"])
    b.couple((bias, 1), inner, heads, heads * head)
    if "logit_scale" in p:
        b.couple((p["logit_scale"], 0), inner, heads, heads * head)
    nd = len(b.shape(x))
    b.couple((x, nd - 1), (p["qkv_weight"], 1))
    b.couple((x, nd - 1), inner)
    b.couple((out, nd - 1), (p["proj_weight"], 0))
    if "proj_bias" in p:
        b.couple((p["proj_bias"], 0), (out, nd - 1))
    for k in range(nd - 1):
        b.couple((x, k), (out, k))


def patch_merge(b, c: COp):
    """Swin's _patch_merging_pad: (B, H, W, C) -> (B, H/2, W/2, 4C), the four
    2x2 neighbours concatenated on channels: output channel k*C + c is input channel c."""
    x, out = c.inputs[0], _out(c)
    n = b.shape(x)[-1]
    copies = b.shape(out)[-1] // n
    b.couple((x, 3), (out, 3), np.tile(np.arange(n), copies), np.arange(n * copies))
    b.couple((x, 0), (out, 0))


def roll(b, c: COp):
    """The dims a roll does not move map through; the rolled ones, unmentioned, keep their width."""
    x, out = c.inputs[0], _out(c)
    for k in range(len(b.shape(x))):
        if k not in c.attrs["dims"]:
            b.couple((x, k), (out, k))


def flip(b, c: COp):
    """Every dim maps through; a flipped one reversed (index i of n is n - 1 - i)."""
    x, out = c.inputs[0], _out(c)
    for k, n in enumerate(b.shape(x)):
        if k in c.attrs["dims"]:
            b.couple((x, k), (out, k), np.arange(n), n - 1 - np.arange(n))
        else:
            b.couple((x, k), (out, k))


def pixel_shuffle(b, c: COp):
    """(*, C*r*r, H, W) -> (*, C, H*r, W*r): output channel j is input channels j*r*r .. j*r*r + r*r - 1,
    so those go with it, a block of the layer before (the inverse: the other way round)."""
    x, out = c.inputs[0], _out(c)
    d = len(b.shape(x)) - 3
    fine, coarse = (x, out) if not c.attrs["inverse"] else (out, x)
    n = b.shape(fine)[d]
    b.couple((fine, d), (coarse, d), np.arange(n), np.arange(n) // c.attrs["factor"] ** 2)
    for k in range(d):
        b.couple((x, k), (out, k))


def rel_pos_bias(b, c: COp):
    """table (L, heads) -> (1, heads, N, N): the heads dim maps through."""
    b.couple((c.inputs[0], 1), (_out(c), 1))


def unknown(b, c: COp):
    b.unknown(c, c.attrs.get("why", f"no rule for {c.op}"))


def nothing(b, c: COp):
    """python values, shape queries, asserts: no tensor dims to relate."""


RULES = {
    "ewise": ewise,
    "permute": permute,
    "reshape": reshape,
    "expand": expand,
    "repeat_interleave": repeat_interleave,
    "repeat": repeat,
    "cat": cat,
    "stack": stack,
    "split": split,
    "tuple_get": tuple_get,
    "rnn_states": rnn_states,
    "index": index,
    "slice": slice_,
    "reduce": reduce,
    "channel_permute": channel_permute,
    "einsum": einsum,
    "pool": pool,
    "matmul": matmul,
    "grouped_mm": grouped_mm,
    "topk": topk,
    "sort": sort,
    "histc": histc,
    "cumsum": cumsum,
    "normalize": normalize,
    "sdpa": sdpa,
    "linear": linear,
    "bilinear": bilinear,
    "conv": conv,
    "conv_transpose": conv_transpose,
    "batch_norm": batch_norm,
    "prelu": prelu,
    "glu": glu,
    "batch_norm_tuple": batch_norm,
    "layer_norm": layer_norm,
    "rms_norm": layer_norm,
    "group_norm": group_norm,
    "embedding": embedding,
    "mha": mha,
    "rnn": rnn,
    "window_attention": window_attention,
    "rel_pos_bias": rel_pos_bias,
    "pixel_shuffle": pixel_shuffle,
    "roll": roll,
    "flip": flip,
    "like": like,
    "factory": factory,
    **{op: indexed for op in INDEXED},
    "patch_merge": patch_merge,
    "unknown": unknown,
    "python": nothing,
    "shape": nothing,
    "get_attr": nothing,
}
