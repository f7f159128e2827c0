"""shrink-params: emit a new, physically smaller GraphModule.

Reads the plan that ``graphprune.compile`` leaves in ``gm.meta["gp_plan"]``:
for every tensor dim that shrinks, ``(value_key, axis) -> kept indices``.
It then

1. slices every planned parameter and buffer and clones the rest into a new
   module tree, so the input module (and the user's model behind it) is left
   untouched;
2. fixes the hyperparameters of modules whose shape they describe
   (``in_channels``, ``groups``, ``normalized_shape``...), one table row per
   module type, and swaps ``nn.MultiheadAttention`` for
   ``PrunedSelfAttention`` where its heads shrank;
3. rewrites every shape constant in the graph (view/reshape/expand sizes,
   split sizes, slice bounds, ``normalized_shape`` and ``groups`` arguments),
   one table row per canonical op; sizes computed from the input at run time
   (``x.size(0)``) are left symbolic, so other batch sizes still work.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from graphprune.canon import COp, arg, repeat_counts, size_args, tensor_names, vkey
from graphprune.meta_keys import ADDED, CACHED, CANON, FROZEN_WIDTHS, LITERAL_MOVES, NUMBERS, PLAN, VAL
from graphprune.sizes import at_original_widths, frozen_value
from graphprune.attrs import fresh_attrs, own_tensors
from graphprune.trace import _COPY_OF, rebind_hooks
from graphprune.modules import (FullWidthLayerNorm, FullWidthRMSNorm, PrunedSelfAttention, batch_norm_full, full_width,
                                layer_norm_full, rms_norm_full)
from graphprune.pass_manager import PassResult, register_pass

COUNTERS = {"params": 0, "modules": 0, "args": 0}


class _Plan:
    def __init__(self, plan: dict):
        self.plan = plan

    def kept(self, value, axis):
        return self.plan.get((value, axis))

    def size(self, value, old: int, axis: int) -> int:
        k = self.plan.get((value, axis))
        return old if k is None else len(k)

    def new_shape(self, value, shape) -> list[int]:
        return [self.size(value, s, i) for i, s in enumerate(shape)]


def _slice_tensors(gm: GraphModule, plan: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for (key, axis), keep in plan.items():
        if isinstance(key, str):
            t = out.get(key)
            if t is None:
                t = operator.attrgetter(key)(gm).detach()
            out[key] = t.index_select(axis, torch.as_tensor(keep, dtype=torch.long, device=t.device))
    return out


def _clone(m: nn.Module, new: dict, prefix: str, memo: dict) -> nn.Module:
    """Copy the module tree; tensors come from ``new`` (sliced, already fresh
    copies) or are cloned. Shared modules and tied tensors stay shared:
    ``memo`` maps id(original) to its copy, for modules and tensors alike."""
    if id(m) in memo:
        return memo[id(m)]
    c = object.__new__(type(m))  # not copy.copy (parametrized modules refuse it), not type(m).__new__ (a GraphModule's makes a class without forward)
    memo[id(m)] = c
    _COPY_OF[c] = m
    c.__dict__ = fresh_attrs(m.__dict__, memo)  # hook dicts, buffer sets and state containers of its own
    c._parameters = {k: (None if p is None else _copy_tensor(p, prefix + k, new, memo)) for k, p in m._parameters.items()}
    c._buffers = {k: (None if b is None else _copy_tensor(b, prefix + k, new, memo)) for k, b in m._buffers.items()}
    c._modules = {k: (None if s is None else _clone(s, new, f"{prefix}{k}.", memo)) for k, s in m._modules.items()}
    # plain tensor attributes and tensors in lists (after the parameters: ``memo`` maps an
    # RNN's _flat_weights to the new parameters)
    c.__dict__ = own_tensors(c.__dict__, lambda t, k: _copy_tensor(t, prefix + k, new, memo))
    return c


def _copy_tensor(t: torch.Tensor, name: str, new: dict, memo: dict) -> torch.Tensor:
    """The copy of ``t`` for the new tree: its slice if one was planned under
    any of its names (``new`` is also keyed by id for tied tensors), else a clone."""
    if id(t) in memo:
        return memo[id(t)]
    data = new.get(name)
    if data is None:
        data = new.get(id(t))
    if data is None:
        data = t.detach().clone()
    out = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    memo[id(t)] = out
    return out


# ------------------------------------------------------------- module fixes

def _fix_conv(mod, node, p: _Plan):
    """groups = in_channels // (weight's channels per group): right whether whole
    groups or positions within every group were removed."""
    new_in = p.size(vkey(node.args[0]), mod.in_channels, 1)
    new_out = p.size(node, mod.out_channels, 1)
    # a transposed conv's weight is (in, out / groups): its groups are read off the output side
    mod.groups = new_in // mod.weight.shape[1] if not mod.transposed else new_out // mod.weight.shape[1]
    mod.in_channels, mod.out_channels = new_in, new_out


def _fix_linear(mod, node, p):
    mod.out_features, mod.in_features = mod.weight.shape


def _fix_bilinear(mod, node, p):
    mod.out_features, mod.in1_features, mod.in2_features = mod.weight.shape


def _fix_bn(mod, node, p):
    mod.num_features = p.size(node, mod.num_features, 1)


def _fix_ln(mod, node, p):
    """A norm over dims that shrank keeps its statistics over the original width."""
    n = len(mod.normalized_shape)
    new = tuple(p.new_shape(node, node.meta[VAL].shape)[-n:])
    if new != tuple(mod.normalized_shape):
        mod.__class__ = full_width(type(mod))
        mod.full = getattr(mod, "full", int(np.prod(mod.normalized_shape)))
    mod.normalized_shape = new


def _fix_gn(mod, node, p):
    new_c = p.size(node, mod.num_channels, 1)
    mod.num_groups = mod.num_groups * new_c // mod.num_channels
    mod.num_channels = new_c


def _fix_embedding(mod, node, p):
    mod.embedding_dim = mod.weight.shape[1]


def _fix_rnn(mod, node, p):
    """Widths from the weights; the flat weight list cuDNN reads points at the new tensors.
    ``weight_hh`` is (gates x hidden, hidden), or (gates x hidden, proj_size) with an LSTM
    projection: the hidden size is read off its rows (its columns made a projected
    LSTM's hidden size its projection's, and it failed even with nothing removed)."""
    gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    mod.hidden_size, mod.input_size = mod.weight_hh_l0.shape[0] // gates, mod.weight_ih_l0.shape[1]
    if getattr(mod, "proj_size", 0):
        mod.proj_size = mod.weight_hr_l0.shape[0]
    mod._init_flat_weights()


MODULE_FIXES = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _fix_conv),
    ((nn.Linear,), _fix_linear),
    ((nn.Bilinear,), _fix_bilinear),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _fix_bn),
    ((nn.LayerNorm, nn.RMSNorm, FullWidthLayerNorm, FullWidthRMSNorm), _fix_ln),
    ((nn.GroupNorm,), _fix_gn),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _fix_bn),
    ((nn.Embedding,), _fix_embedding),
    ((nn.LSTM, nn.GRU, nn.RNN), _fix_rnn),
]


def _replace_mha(root: nn.Module, path: str, mod: nn.MultiheadAttention):
    n_heads = mod.in_proj_weight.shape[0] // 3 // mod.head_dim
    out = mod.out_proj
    out.out_features, out.in_features = out.weight.shape
    _set_submodule(root, path, PrunedSelfAttention(mod, mod.in_proj_weight, mod.in_proj_bias, out, n_heads))


def _set_submodule(root: nn.Module, path: str, new: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


# ---------------------------------------------------------------- arg fixes

def _sizes(node: Node, cop: COp, p: _Plan) -> bool:
    """view/reshape/expand: replace literal sizes of dims that shrank."""
    at = cop.attrs.get("sizes_at")
    if at is None:
        return False
    old = node.meta[VAL].shape
    new = p.new_shape(node, old)
    if list(new) == list(old):
        return False
    sizes, first, pos = size_args(node, at)
    if sizes is None:
        return False
    whole = sizes[0] if pos == "varargs" and len(sizes) == 1 and isinstance(sizes[0], Node) else None
    if whole is not None and isinstance(whole.meta.get(VAL), (tuple, list)) and len(whole.meta[VAL]) == len(old):
        # one shape computed whole (transformers' Conv1D: x.size()[:-1] + (self.nf,), a literal inside an add):
        # its elements, read off it where they stay, the new width where they shrank
        with node.graph.inserting_before(node):
            sizes = [new[i] if new[i] != old[i] else node.graph.call_function(operator.getitem, (whole, i))
                     for i in range(len(old))]
        for i, s in enumerate(sizes):
            if isinstance(s, Node):
                s.meta[VAL] = whole.meta[VAL][i]
    free = cop.attrs.get("free_reads", ())  # merged dims sized by a read of a width that stays (groups.py)
    reads = cop.attrs.get("read_sizes", {})
    for i, s in enumerate(sizes):
        if new[first + i] == old[first + i]:
            continue
        if isinstance(s, int) and s != -1:
            sizes[i] = new[first + i]
        elif first + i in free and isinstance(s, Node):
            sizes[i] = -1  # merged dims that shrank: inferred, lengths they hold included (groups._tie_merged_reads)
        elif first + i in reads and isinstance(s, Node):  # computed; read off a dim the plan keeps alike (groups._size_twin)
            m, k = reads[first + i]
            with node.graph.inserting_before(node):
                sizes[i] = node.graph.call_function(torch.ops.aten.sym_size.int, (m, k))
    node.args = (node.args[0], *sizes) if pos == "varargs" else (*node.args[:pos], type(node.args[pos])(sizes), *node.args[pos + 1:])
    return True


def _split(node: Node, cop: COp, p: _Plan) -> bool:
    """split/chunk -> torch.split with the new explicit sizes. A chunk whose parts stay equal
    (``Builder.even`` keeps them so) stays a chunk: it splits at whatever width it meets, where
    sizes written out would be the example's (a chunk over channels merged with the height)."""
    if cop.attrs["kind"] == "unbind":
        return False
    d = cop.attrs["dim"]
    old = [v.shape[d] for v in node.meta[VAL]]
    new = [p.size((node, i), s, d) for i, s in enumerate(old)]
    if new == old or (cop.attrs["kind"] == "chunk" and len(set(new)) == 1 and len(set(old)) == 1):
        return False
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], new, d), {}
    return True


def _index(node: Node, cop: COp, p: _Plan) -> bool:
    """slices along dims that shrank get bounds counted in kept channels."""
    x = cop.inputs[0]
    # a parameter sliced where it is read (``self.w[:, :16]``) has its name for a key: its shape is on the read
    read = x if isinstance(x, Node) else node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if read is None or not isinstance(read.meta.get(VAL), torch.Tensor):
        return False
    shape = read.meta[VAL].shape
    idx = list(cop.attrs["index"])
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx[e:e + 1] = [slice(None)] * (len(shape) - sum(1 for v in idx if v is not None and v is not Ellipsis))
    changed, i, new_idx = False, 0, []
    for e in idx:
        if isinstance(e, slice):
            kept = p.kept(x, i)
            if kept is not None and (e.start is not None or e.stop is not None):
                start, stop, _ = e.indices(shape[i])
                e = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
                changed = True
        new_idx.append(e)
        i += e is not None
    if not changed:
        return False
    form = cop.attrs["form"]
    d = next(k for k, e in enumerate(new_idx) if isinstance(e, slice) and (e.start or e.stop))
    if form == "getitem":
        node.args = (node.args[0], tuple(new_idx))
    elif node.target == torch.ops.aten.slice.Tensor:
        node.args = (node.args[0], d, new_idx[d].start, new_idx[d].stop, *node.args[4:])
    else:  # narrow
        node.args = (node.args[0], d, new_idx[d].start, new_idx[d].stop - new_idx[d].start)
    return True


# functional norms over dims that shrank -> the same norm with statistics over the original width
_FULL_WIDTH = {
    F.layer_norm: layer_norm_full, torch.ops.aten.layer_norm.default: layer_norm_full, F.rms_norm: rms_norm_full,
}
if hasattr(torch.ops.aten, "rms_norm"):
    _FULL_WIDTH[torch.ops.aten.rms_norm.default] = rms_norm_full
_FULL_WIDTH.update({layer_norm_full: layer_norm_full, rms_norm_full: rms_norm_full})
_PRIOR_FULL = {layer_norm_full: 5, rms_norm_full: 4}
_NORM_DEFAULTS = {layer_norm_full: {"eps": 1e-5}, rms_norm_full: {}}


def _norm_args(node: Node, cop: COp, p: _Plan) -> bool:
    """functional layer_norm's normalized_shape (statistics kept over the original
    width) and group_norm's num_groups."""
    if node.op != "call_function":
        return False
    old = node.meta[VAL].shape
    new = p.new_shape(node, old)
    if list(new) == list(old):
        return False
    args = list(node.args)
    if cop.op in ("layer_norm", "rms_norm"):
        shape = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        n = len(shape)
        fn = _FULL_WIDTH[node.target]
        names = ("input", "normalized_shape", "weight", "bias", "eps") if fn is layer_norm_full else ("input", "normalized_shape", "weight", "eps")
        vals = [args[i] if i < len(args) else node.kwargs.get(name, _NORM_DEFAULTS[fn].get(name)) for i, name in enumerate(names)]
        vals[1] = type(shape)(new[-n:])
        at = _PRIOR_FULL.get(node.target)  # pruned before: the original width is already recorded
        full = args[at] if at is not None and len(args) > at else int(np.prod(old[-n:]))
        node.target, node.args, node.kwargs = fn, (*vals, full), {}
        return True
    elif cop.op == "group_norm" and cop.attrs.get("what") != "instance_norm":  # one group per channel: nothing to rewrite
        args[1] = cop.attrs["num_groups"] * new[1] // old[1]
    node.args = tuple(args)
    return True


def _batch_norm_args(node: Node, cop: COp, p: _Plan) -> bool:
    """A functional batch_norm with batch statistics over dims that shrank besides the
    channel (a standardized weight's input channels) -> ``batch_norm_full``, its
    statistics over the original count per channel and sample."""
    if node.op != "call_function" or not cop.attrs.get("batch_stats"):
        return False
    old = node.meta[VAL].shape
    new = p.new_shape(node, old)
    if all(new[k] == old[k] for k in range(len(old)) if k != 1):
        return False
    if node.target is batch_norm_full:
        return False  # pruned before: the original count is already recorded
    roles = {F.batch_norm: (3, 4, 7), torch.ops.aten.batch_norm.default: (1, 2, 7)}[node.target]
    weight, bias, eps = (arg(node, at, name, default) for at, name, default in zip(roles, ("weight", "bias", "eps"), (None, None, 1e-5)))
    full = int(np.prod(old[2:]))
    node.target, node.args, node.kwargs = batch_norm_full, (node.args[0], weight, bias, eps, full), {}
    return True


def _conv_groups(node: Node, cop: COp, p: _Plan) -> bool:
    if node.op != "call_function" or cop.attrs.get("groups", 1) == 1:
        return False
    x, w = cop.inputs[0], cop.params["weight"]
    old_in = x.meta[VAL].shape[1]
    new_in = p.size(x, old_in, 1)
    if new_in == old_in:
        return False
    if cop.op == "conv_transpose":  # weight (in, out / groups): the groups are read off the output side
        old_out = node.meta[VAL].shape[1]
        groups = p.size(node, old_out, 1) // p.size(w, old_out // cop.attrs["groups"], 1)
    else:
        groups = new_in // p.size(w, old_in // cop.attrs["groups"], 1)
    pos = 8 if node.target == torch.ops.aten.convolution.default else 6
    if len(node.args) > pos:
        node.args = (*node.args[:pos], groups, *node.args[pos + 1:])
    else:
        node.kwargs = {**node.kwargs, "groups": groups}
    return True


def _window_heads(node: Node, cop: COp, p: _Plan) -> bool:
    """shifted_window_attention's num_heads follows its qkv rows."""
    w = cop.params["qkv_weight"]
    old_rows = node.args[1].meta[VAL].shape[0] if isinstance(node.args[1], Node) else None
    kept = p.kept(w, 0)
    if kept is None or old_rows is None:
        return False
    heads = cop.attrs["num_heads"]
    new_heads = heads * len(kept) // old_rows
    if len(node.args) > 5:
        node.args = (*node.args[:5], new_heads, *node.args[6:])
    else:
        node.kwargs = {**node.kwargs, "num_heads": new_heads}
    return True


def _repeats(node: Node, cop: COp, p: _Plan) -> bool:
    """repeat_interleave: every kept source keeps as many copies (``rules.repeat_interleave``
    shares them, and a removal keeps shares balanced), so ``repeats`` is the new output width
    over the new input width; an ``output_size`` given becomes the new output width."""
    x, d = cop.inputs[0], cop.attrs["dim"]
    read = x if isinstance(x, Node) else node.args[0]  # a buffer read directly (a KV cache) has its name for a key
    src = x[0].meta[VAL][x[1]] if isinstance(x, tuple) else read.meta[VAL]
    old_in, old_out = src.shape[d], node.meta[VAL].shape[d]
    new_in, new_out = p.size(x, old_in, d), p.size(node, old_out, d)
    if (new_in, new_out) == (old_in, old_out):
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 1:
        args[1] = new_out // new_in
    else:
        kwargs["repeats"] = new_out // new_in
    if len(args) > 3:
        args[3] = new_out
    elif kwargs.get("output_size") is not None:
        kwargs["output_size"] = new_out
    node.args, node.kwargs = tuple(args), kwargs
    return True


def _repeat_counts(node: Node, cop: COp, p: _Plan) -> bool:
    """repeat/tile: a size-1 dim repeated ``count`` times is a broadcast whose copies may go
    (``rules.repeat``), so its count becomes the new width; a tiled dim keeps its count."""
    old = node.meta[VAL].shape
    new = p.new_shape(node, old)
    counts = repeat_counts(node)  # read off this graph's node: the attrs hold the input graph's
    if counts is None or list(new) == list(old):
        return False
    for od in range(len(old)):
        k = len(counts) - len(old) + od
        if new[od] != old[od] and k >= 0 and isinstance(counts[k], int) and counts[k] == old[od]:
            counts[k] = new[od]
    if node.op == "call_method" and len(node.args) > 2:
        node.args = (node.args[0], *counts)
    elif len(node.args) > 1:
        node.args = (node.args[0], type(node.args[1])(counts) if isinstance(node.args[1], (list, tuple)) else counts[0], *node.args[2:])
    else:
        key = "repeats" if "repeats" in node.kwargs else "dims"
        node.kwargs = {**node.kwargs, key: counts}
    return True


def _reduce_full(node: Node, cop: COp, p: _Plan) -> bool:
    """A reduction over dims that shrank still counts the removed entries, which were
    zero: a mean is scaled by new count / old count, so it stays sum / (original
    count); a max takes the zeros in (``clamp_min(0)``), a min too (``clamp_max(0)``)."""
    x = cop.inputs[0]
    kind = cop.attrs.get("kind")
    # a parameter read directly (w - w.mean(...), weight centring) has its name for a key: its shape is on the read
    read = x if isinstance(x, Node) else node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if kind not in ("mean", "amax", "amin") or read is None or not isinstance(read.meta.get(VAL), torch.Tensor):
        return False
    shape = read.meta[VAL].shape
    old = int(np.prod([shape[k] for k in cop.attrs["dims"]]))
    new = int(np.prod([p.size(x, shape[k], k) for k in cop.attrs["dims"]]))
    if new == old:
        return False
    fn, arg2 = {"mean": (operator.mul, new / old), "amax": (torch.clamp_min, 0.0), "amin": (torch.clamp_max, 0.0)}[kind]
    with node.graph.inserting_after(node):
        scaled = node.graph.call_function(fn, (node, arg2))
    if kind != "mean":  # a mean's scale shows on any input (or the module form rescales it: hf._fold_rms); a clamp
        scaled.meta[ADDED] = f"the {kind} over the removed zeros too ({fn.__name__}(0))"  # only where all kept are < 0
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    return True


def _permutation(node: Node, cop: COp, p: _Plan) -> bool:
    """A channel permutation keeps the kept channels' order: perm restricted to them, renumbered."""
    x, d = cop.inputs[0], cop.attrs["dim"]
    kept_in, kept_out = p.kept(x, d), p.kept(node, d)
    if kept_in is None:
        return False
    rank = {int(v): i for i, v in enumerate(kept_in)}
    perm = tuple(rank[cop.attrs["perm"][j]] for j in kept_out)
    node.args = (node.args[0], perm, d)
    return True


def _histc_bins(node: Node, cop: COp, p: _Plan) -> bool:
    """One bin per expert id (``rules.histc``): ``bins`` and ``max`` follow the kept experts."""
    old = node.meta[VAL].shape[0]
    new = p.size(node, old, 0)
    if new == old:
        return False
    hi = cop.attrs["max"]
    node.args, node.kwargs = (node.args[0], new, cop.attrs["min"], new - 1 if hi == old - 1 else new), {}
    return True


ARG_FIXES = {
    "histc": _histc_bins,
    "reduce": _reduce_full,
    "channel_permute": _permutation,
    "reshape": _sizes,
    "expand": _sizes,
    "repeat_interleave": _repeats,
    "repeat": _repeat_counts,
    "factory": _sizes,
    "split": _split,
    "index": _index,
    "layer_norm": _norm_args,
    "rms_norm": _norm_args,
    "group_norm": _norm_args,
    "batch_norm": _batch_norm_args,
    "conv": _conv_groups,
    "conv_transpose": _conv_groups,
    "window_attention": _window_heads,
}


def _remap(key, env):
    """A value key of the input graph as the same value in the copy."""
    if isinstance(key, Node):
        return env[key]
    if isinstance(key, tuple) and key and isinstance(key[0], Node):
        return (env[key[0]], *key[1:])
    return key


def _remap_cop(cop: COp, node: Node, env) -> COp:
    attrs = cop.attrs
    if "read_sizes" in attrs:  # sizes read off another tensor's dim (groups._size_twin): that tensor in the copy
        attrs = {**attrs, "read_sizes": {i: (_remap(m, env), k) for i, (m, k) in attrs["read_sizes"].items()}}
    return COp(cop.op, node, [_remap(i, env) for i in cop.inputs], {r: _remap(v, env) for r, v in cop.params.items()}, attrs)


@register_pass("shrink-params")
def shrink_params(gm: GraphModule, plan: dict | None = None) -> PassResult:
    plan = gm.meta.get(PLAN) if plan is None else plan
    plan = plan or {}  # nothing to remove still gives a fresh copy: the result never shares the user's tensors
    new: dict = _slice_tensors(gm, plan)
    COUNTERS["params"] += len(new)
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name in new:
            new[id(t)] = new[name]  # a tied tensor takes the slice under every name
    root = nn.Module()
    memo: dict = {}
    for name, child in gm.named_children():
        root.add_module(name, _clone(child, new, name + ".", memo))
    rebind_hooks(memo)  # a hook that is a method of a cloned module calls the clone
    # a parameter stays one: on meta (a budget's candidate, reparametrized) it is a plain tensor, which
    # GraphModule() registers as a buffer, so candidates were counted without CaiT's pos_embed and
    # cls_token and a deploy-pipeline target_params=0.5 came back at 0.5012
    for name, t in gm._parameters.items():
        c = None if t is None else _copy_tensor(t, name, new, memo)
        root._parameters[name] = c if c is None or isinstance(c, nn.Parameter) else nn.Parameter(c, c.requires_grad)
    for name, t in gm._buffers.items():
        root._buffers[name] = None if t is None else _copy_tensor(t, name, new, memo)
    for k, v in gm.__dict__.items():
        if isinstance(v, torch.Tensor) and not hasattr(root, k):
            root.__dict__[k] = _copy_tensor(v, k, new, memo)
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # export graphs keep their pytree in/out specs here
    env: dict = {}
    out_val = graph.graph_copy(gm.graph, env)
    graph.output(out_val)
    p = _Plan({(_remap(k, env), a): v for (k, a), v in plan.items()})
    moves: list = []  # (module path, literal before, after) of each shape argument rewritten
    for old, node in env.items():
        cop: COp = old.meta.get(CANON)
        if cop is not None:
            cop = _remap_cop(cop, node, env)
        if node.op == "call_module":
            mod = root.get_submodule(node.target)
            if isinstance(mod, nn.MultiheadAttention):
                if any(isinstance(k, str) and k.startswith(node.target + ".") for k in new):
                    _replace_mha(root, node.target, mod)
                    COUNTERS["modules"] += 1
                continue
            for types, fix in MODULE_FIXES:
                if type(mod) in types:
                    fix(mod, node, p)
                    COUNTERS["modules"] += 1
        elif cop is not None and cop.op in ARG_FIXES:
            before = _literals(node)
            COUNTERS["args"] += bool(ARG_FIXES[cop.op](node, cop, p))
            moves += _moved(old, before, _literals(node))  # a literal that stayed counts too: 8 heads beside an 8 kept
    env_out = {**env, next(n for n in gm.graph.nodes if n.op == "output"): next(n for n in graph.nodes if n.op == "output")}
    frozen = _freeze_numbers(gm.meta.get(NUMBERS, ()), plan, env_out, tensor_names(gm))
    out = GraphModule(root, graph, class_name=type(gm).__name__)
    for name, child in root.named_children():  # whole subtrees, so Sequential and friends keep their types
        setattr(out, name, child)
    # not the plan, the number uses (read here, of the old graph's nodes) or the original's counts: stale here
    out.meta.update({k: v for k, v in gm.meta.items() if k not in (PLAN, NUMBERS) and k not in CACHED})
    out.training = gm.training  # set, not train(): exported modules refuse train()
    out.meta[LITERAL_MOVES] = moves
    out.meta[FROZEN_WIDTHS] = frozen
    return PassResult(out, bool(plan))


def _literals(node: Node) -> list:
    """The plain ints among ``node``'s arguments, in order (None where an argument is something else)."""
    from torch.utils._pytree import tree_leaves

    return [a if isinstance(a, int) and not isinstance(a, bool) else None for a in tree_leaves((node.args, node.kwargs))]


def _moved(node: Node, before: list, after: list) -> list:
    """(the module whose code ``node`` is in, old, new) for each literal of a shape argument, changed by the
    rewrite or left (old == new, also in an op it left whole: a value that stayed is what tells a head count
    of 8 from a head_dim or a max_len of 8). The module form sets an attribute of that module to what its
    value became (``module_form.follow_literals``)."""
    stack = node.meta.get("nn_module_stack") or {}  # none: the top module's own forward (torch.fx records none there)
    if len(before) != len(after):
        return []
    scope = list(stack.values())[-1][0] if stack else ""
    return [(scope, a, b) for a, b in zip(before, after) if a is not None and b is not None]


def _freeze_numbers(uses, plan: dict, env: dict, names: dict) -> list[int]:
    """A width read as a number (``h / h.shape[1]``) keeps its original value
    where that width shrank: the twin divides by the width it was trained with.
    Shape arguments (view sizes) are not number uses and stay symbolic.
    Returns the kept widths so read: the model's own code reads them live, where
    the graph holds the original (``module_form._farther`` runs it at lengths of
    each and one more)."""
    frozen: set = set()
    for use in uses:
        if not any(d in plan for d in use.deps):
            continue
        frozen.update(len(plan[d]) for d in use.deps if d in plan)
        user, value = env[use.user], env[use.value]
        # recomputed from the run-time sizes with the shrunk widths put back; frozen whole where that cannot be done
        number = at_original_widths(use.value, plan.__contains__, env, user.graph, user, names)
        number = frozen_value(use.number) if number is None else number
        user.args = map_arg(user.args, lambda m: number if m is value else m)
        user.kwargs = map_arg(user.kwargs, lambda m: number if m is value else m)
    return sorted(frozen)
