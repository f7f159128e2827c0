"""What one unit of a group costs in milliseconds, from per-layer latency tables.

A latency budget is spent where the device spends time, and that is not where the
FLOPs are: a depthwise convolution, a squeeze-excite scale or an activation does
little arithmetic per channel but streams every channel's activations through
memory. NetAdapt (Yang et al., ECCV 2018) prices a width change by looking up
each layer's measured latency at that shape in a table built once per device;
this module does the same for graphprune's units.

* Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` call in the traced graph is a
  ``LayerShape`` (input shape, weight shape, stride, groups, layout). Its latency
  is timed at the full width and at 3/4, 1/2 and 1/4 of it along each axis a
  group can prune (output channels; input channels; a depthwise conv's both),
  and the least-squares slope is what one channel of that axis costs.
* Memory-bound ops on a group's values (elementwise, pooling, norms, concat; not
  BatchNorms that ``fold-bn`` removes) cost their elements per channel times the
  measured time of one elementwise pass per element.
* Weights the table cannot time (functional convs, grouped non-depthwise convs)
  cost their FLOPs at the tables' median milliseconds per FLOP.

Entries are keyed by shape, layout, dtype, thread count, torch version and device,
and kept on disk (``$GRAPHPRUNE_CACHE``, default ``~/.cache/graphprune``;
``GRAPHPRUNE_CACHE=off`` keeps them in memory), so a model's blocks of one shape
are timed once, and a second compile times nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .meta_keys import CANON, VAL

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # widths each pruned axis is timed at, of its full width
MIN_RUN_S = 0.02  # torch.utils.benchmark's least run time per timed shape
# canonical ops whose cost is moving their operand's elements, not arithmetic
MEMORY_BOUND = {"ewise", "pool", "reduce", "batch_norm", "batch_norm_tuple", "layer_norm", "rms_norm", "group_norm", "cat"}
_CONVS = {torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d, torch.nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class LayerShape:
    """One layer call as the device runs it; ``op`` is "conv", "linear" or "ewise" (one relu pass over ``x``)."""

    op: str
    x: tuple
    w: tuple = ()
    stride: tuple = ()
    padding: object = ()
    dilation: tuple = ()
    groups: int = 1
    channels_last: bool = False

    def key(self) -> str:
        return json.dumps([self.op, self.x, self.w, self.stride, self.padding, self.dilation, self.groups,
                           self.channels_last], default=str)

    def shrunk(self, axis: int, width: int) -> "LayerShape | None":
        """This layer with ``width`` indices left along weight axis ``axis``, or None
        where that is not one layer of the same kind (a grouped conv's groups split)."""
        out, inner = self.w[0], self.w[1]
        if self.op == "linear":
            if axis == 0:
                return replace(self, w=(width, inner))
            return replace(self, x=self.x[:-1] + (width,), w=(out, width))
        channels = self.x[1]
        if self.groups == 1:
            if axis == 0:
                return replace(self, w=(width,) + self.w[1:])
            return replace(self, x=(self.x[0], width) + self.x[2:], w=(out, width) + self.w[2:])
        if axis == 0 and inner == 1 and self.groups == channels == out:  # depthwise: a channel in, a channel out
            return replace(self, x=(self.x[0], width) + self.x[2:], w=(width,) + self.w[1:], groups=width)
        return None


def time_layer(shape: LayerShape) -> float:
    """Milliseconds of one call of ``shape`` on the CPU at the current thread count: the
    fastest block of ``torch.utils.benchmark`` (other processes only ever add time)."""
    from torch.utils.benchmark import Timer

    x = torch.randn(shape.x)
    if shape.op == "ewise":
        stmt, env = "torch.relu(x)", {"x": x}
    else:
        w = torch.randn(shape.w)
        if shape.channels_last and x.dim() == 4:
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        if shape.op == "linear":
            stmt, env = "f(x, w)", {"f": F.linear, "x": x, "w": w}
        else:
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
            stmt = "f(x, w, None, s, p, d, g)"
            env = {"f": conv, "x": x, "w": w, "s": shape.stride, "p": shape.padding, "d": shape.dilation, "g": shape.groups}
    with torch.no_grad():
        m = Timer(stmt, globals={"torch": torch, **env}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=MIN_RUN_S)
    return 1e3 * min(m.times)


def device_key() -> str:
    """What a timing depends on besides the shape: the processor, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_path() -> Path | None:
    where = os.environ.get("GRAPHPRUNE_CACHE", "")
    if where.lower() in ("off", "0", "none"):
        return None
    root = Path(where) if where else Path.home() / ".cache" / "graphprune"
    return root / f"latency-{hashlib.sha1(device_key().encode()).hexdigest()[:12]}.json"


class LatencyTable:
    """Measured milliseconds per ``LayerShape`` on this device, read from and written to
    ``path`` (None: memory only). ``clock`` times a shape (``time_layer``; tests give their own)."""

    def __init__(self, path: Path | None | str = "default", clock=None):
        self.path = cache_path() if path == "default" else (Path(path) if path else None)
        self.clock = clock or time_layer
        self.entries: dict[str, float] = {}
        self.timed = 0  # shapes timed by this table (the rest came from the file)
        if self.path is not None and self.path.exists():
            try:
                self.entries = dict(json.loads(self.path.read_text()).get("entries", {}))
            except (OSError, ValueError):
                self.entries = {}  # unreadable: timed again, and rewritten

    def ms(self, shape: LayerShape) -> float:
        k = shape.key()
        if k not in self.entries:
            self.entries[k] = float(self.clock(shape))
            self.timed += 1
        return self.entries[k]

    def slope(self, shape: LayerShape, axis: int) -> float | None:
        """Milliseconds one index of weight axis ``axis`` costs, fit through the widths
        ``FRACTIONS`` of the full one; None where the shrunk layer is not of its kind."""
        full = shape.w[axis]
        widths = sorted({max(1, int(round(f * full))) for f in FRACTIONS})
        if len(widths) < 2:
            return 0.0
        shapes = [shape.shrunk(axis, w) for w in widths]
        if any(s is None for s in shapes):
            return None
        ms = [self.ms(s) for s in shapes]
        return max(0.0, float(np.polyfit(widths, ms, 1)[0]))

    def save(self) -> None:
        if self.path is None or not self.timed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"device": device_key(), "entries": self.entries}, indent=0))
        os.replace(tmp, self.path)  # whole or not at all, should two compiles write at once


def _batch_scale(p, latency_inputs) -> float:
    """The latency inputs' batch over the traced example's (shapes on the graph are the example's)."""
    if not latency_inputs:
        return 1.0
    a, b = p.example_inputs[0], latency_inputs[0]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and a.shape[1:] == b.shape[1:]:
        return b.shape[0] / max(1, a.shape[0])
    return 1.0


def _scaled(shape: tuple, scale: float) -> tuple:
    return shape if scale == 1.0 or not shape else (max(1, int(round(shape[0] * scale))),) + tuple(shape[1:])


def layer_shapes(p, scale: float = 1.0) -> dict[str, list]:
    """{weight name: [(LayerShape, FLOPs of the call)]} for every conv and linear module call
    with a tensor input on the graph (a module called twice: two entries)."""
    channels_last = "channels-last" in (p.pipeline or "")
    out: dict[str, list] = {}
    for n in p.gm.graph.nodes:
        if n.op != "call_module" or not n.args:
            continue
        mod = p.gm.get_submodule(n.target)
        x, y = getattr(n.args[0], "meta", {}).get(VAL), n.meta.get(VAL)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        w = tuple(mod.weight.shape)
        if type(mod) is torch.nn.Linear:
            shape = LayerShape("linear", _scaled(tuple(x.shape), scale), w)
        elif type(mod) in _CONVS and x.dim() == len(w):
            pad = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
            if mod.padding_mode != "zeros":
                continue
            shape = LayerShape("conv", _scaled(tuple(x.shape), scale), w, tuple(mod.stride), pad, tuple(mod.dilation),
                               mod.groups, channels_last and x.dim() == 4)
        else:
            continue
        flops = 2.0 * y.numel() * scale * float(np.prod(w[1:]))
        out.setdefault(f"{n.target}.weight", []).append((shape, flops))
    return out


def _values(g) -> list:
    """(node, axis, unit_of) for the activations of ``g`` (value keys that are nodes or (node, i))."""
    out = []
    for (vk, axis), unit_of in g.dims.items():
        node = vk[0] if isinstance(vk, tuple) else vk
        if isinstance(node, torch.fx.Node):
            val = node.meta.get(VAL)
            val = val[vk[1]] if isinstance(vk, tuple) and isinstance(val, (tuple, list)) else val
            if isinstance(val, torch.Tensor) and val.dim() > axis:
                out.append((node, axis, unit_of, val))
    return out


def unit_ms(p, latency_inputs: tuple | None = None, table: LatencyTable | None = None) -> dict:
    """{group id: milliseconds removing each unit saves} for the pruner ``p``, read off the
    tables (timed where missing, then saved). ``p.latency_table`` says what was read."""
    import operator

    from .auto import _positions

    table = table or LatencyTable()
    scale = _batch_scale(p, latency_inputs)
    shapes = layer_shapes(p, scale)
    per_flop = [table.ms(s) / f for calls in shapes.values() for s, f in calls if f > 0]
    ms_per_flop = float(np.median(per_flop)) if per_flop else 0.0
    folded = "fold-bn" in (p.pipeline or "") or (p.pipeline or "").strip() == "deploy"
    skip = {"batch_norm", "batch_norm_tuple"} if folded else set()
    probe = 1 << 20  # one elementwise pass over a tensor of this many elements gives the time per element
    ms_per_elem = table.ms(LayerShape("ewise", (probe,))) / probe
    positions = _positions(p.gm)
    out = {}
    for g in p.groups:
        cost = np.zeros(g.n_units)
        for s in g.params:
            count = np.bincount(s.unit_of, minlength=g.n_units)
            slopes = [table.slope(shape, s.axis) for shape, _ in shapes.get(s.name, [])] if s.axis < 2 else [None]
            if slopes and all(v is not None for v in slopes):
                cost += count * sum(slopes)
                continue
            w = operator.attrgetter(s.name)(p.gm)
            if w.dim() >= 2:  # not tabled: its FLOPs at the tables' going rate
                per_index = float(np.prod([d for i, d in enumerate(w.shape) if i != s.axis]))
                cost += count * 2.0 * per_index * positions.get(s.name, 1.0) * scale * ms_per_flop
        for node, axis, unit_of, val in _values(g):
            c = node.meta.get(CANON)
            if c is None or c.op not in MEMORY_BOUND or c.op in skip:
                continue
            per_index = val.numel() * scale / max(1, val.shape[axis])
            cost += np.bincount(unit_of, minlength=g.n_units) * per_index * ms_per_elem
        out[g.id] = np.maximum(cost, 1e-9)
    table.save()
    p.latency_table = {"shapes": len(table.entries), "timed": table.timed, "cache": str(table.path) if table.path else None}
    return out


def predict_ms(p, removed: dict, latency_inputs: tuple | None = None, table: LatencyTable | None = None) -> float:
    """NetAdapt's estimate of a candidate's latency: every tabled layer looked up at the
    widths ``removed`` leaves it (both axes; timed where missing), plus one elementwise
    pass per memory-bound value at its kept size. Untimed layers and everything else
    are left out, so compare estimates with each other (``predict_ms(p, {})`` is the
    unpruned model's), not with a clock."""
    from .pruner import make_plan

    table = table or LatencyTable()
    scale = _batch_scale(p, latency_inputs)
    plan = make_plan(p.groups, removed)
    folded = "fold-bn" in (p.pipeline or "") or (p.pipeline or "").strip() == "deploy"
    probe = 1 << 20
    ms_per_elem = table.ms(LayerShape("ewise", (probe,))) / probe
    total = 0.0
    for name, calls in layer_shapes(p, scale).items():
        for shape, _ in calls:
            for axis in (0, 1):
                kept = plan.get((name, axis))
                if kept is not None and shape is not None:
                    shape = shape.shrunk(axis, len(kept))
            total += table.ms(shape) if shape is not None else 0.0
    for n in p.gm.graph.nodes:
        c, val = n.meta.get(CANON), n.meta.get(VAL)
        if c is None or c.op not in MEMORY_BOUND or (folded and c.op.startswith("batch_norm")):
            continue
        if isinstance(val, torch.Tensor) and val.dim():
            frac = 1.0
            for axis in range(val.dim()):
                kept = plan.get((n, axis))
                if kept is not None:
                    frac *= len(kept) / val.shape[axis]
            total += val.numel() * scale * frac * ms_per_elem
    table.save()
    return total
