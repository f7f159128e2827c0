"""What one unit of a group costs in milliseconds, from a per-layer latency table.

A latency budget is spent where the device spends time, and that is not where the
FLOPs are: a depthwise convolution, a squeeze-excite scale or an activation does
little arithmetic per channel but streams every channel's activations through
memory. NetAdapt (Yang et al., ECCV 2018) prices a width change by each layer's
measured latency at that width, from a table built once per device. This module
builds that table for the model at hand, in place: the model is built, through
the pipeline it will ship with, at every group's full width and at 3/4, 1/2 and
1/4 of it, and each build is run node by node (``torch.fx.Interpreter``), every
node timed. A layer's row is its time at the four widths, in the context it runs
in (layout conversions, folded norms, fused kernels, caches, the allocator).

Timing each layer shape alone, as NetAdapt does, was tried first and ranked
random MobileNetV2 and EfficientNet-B0 allocations worse than FLOPs do (Spearman
0.67 and 0.39 against 0.83 and 0.72, ``bench/latency_table.py``): alone, a conv
runs with cold caches and none of its neighbours' memory traffic, and everything
that is not a conv or a linear needed a separate guess.

* A node's marginal cost is the least-squares slope of its row against the width
  fraction; it is shared equally by the groups whose channels it reads or writes
  (a conv: its input's group and its output's; a depthwise conv or an activation:
  one group), and within a group by the unit's share of the node's channels.
* A candidate's latency (``predict_ms``) is every node's row read at the fraction
  its groups keep (the geometric mean where two groups meet: a conv's work is
  their product).
* Rows are cached on disk per model graph, pipeline, input shapes, device, threads
  and torch version (``$GRAPHPRUNE_CACHE``, default ``~/.cache/graphprune``;
  ``GRAPHPRUNE_CACHE=off`` keeps nothing), so a second compile times nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx

from .meta_keys import VAL

FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # width fractions every group is built at
RUNS = 5  # timed forwards per build, after one warm-up; a node keeps its fastest
ELASTIC = 0.25  # a table is trusted where the builds at 1/4 of every width save at least this share of the time


def device_key() -> str:
    """What a timing depends on besides the model: the processor, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_dir() -> Path | None:
    where = os.environ.get("GRAPHPRUNE_CACHE", "")
    if where.lower() in ("off", "0", "none"):
        return None
    return Path(where) if where else Path.home() / ".cache" / "graphprune"


class _Clocked(torch.fx.Interpreter):
    """Runs a GraphModule node by node, keeping each node's fastest time over runs (ms)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.ms: dict[str, float] = {}

    def run_node(self, n):
        t = time.perf_counter()
        out = super().run_node(n)
        dt = 1e3 * (time.perf_counter() - t)
        self.ms[n.name] = min(self.ms.get(n.name, math.inf), dt)
        return out


def node_ms(gm, inputs: tuple, runs: int = RUNS) -> dict[str, float]:
    """{node name: fastest milliseconds over ``runs``} for one forward of ``gm`` on ``inputs``."""
    clock = _Clocked(gm)
    with torch.no_grad():
        clock.run(*inputs)  # warm-up: first-call allocations, weight reorders
        clock.ms.clear()
        for _ in range(runs):
            clock.run(*inputs)
    return clock.ms


class LatencyTable:
    """Per node of ``p.gm``, its time at each of ``FRACTIONS`` of every group's width.

    ``clock(gm, inputs) -> {node name: ms}`` times one build (``node_ms``; tests give
    their own). ``rows`` maps node names to their times; ``timed`` says whether this
    table timed them now or read them from ``path``."""

    def __init__(self, p, inputs: tuple | None = None, clock=None, path: Path | str | None = "default"):
        self.p = p
        self.inputs = tuple(inputs) if inputs else tuple(p.example_inputs)
        self.path = self._path() if path == "default" else (Path(path) if path else None)
        self.timed = False
        self.rows = self._read()
        if self.rows is None:
            clock = clock or node_ms
            builds = [clock(self._built(f), self.inputs) for f in FRACTIONS]
            self.rows = {n.name: [b.get(n.name, 0.0) for b in builds] for n in p.gm.graph.nodes}
            self.timed = True
            self._write()
        self.touch = _touching(p)

    def _built(self, fraction: float):
        removed = {} if fraction == 1.0 else self.p.removal_for_ratio(1.0 - fraction, "group")
        return self.p.prune(removed, check=False, fit=False)

    def _path(self) -> Path | None:
        root = cache_dir()
        if root is None:
            return None
        nodes = [(n.name, n.op, str(n.target), str(tuple(getattr(n.meta.get(VAL), "shape", ()))))
                 for n in self.p.gm.graph.nodes]
        shapes = [str(tuple(getattr(t, "shape", ()))) for t in self.inputs]
        key = json.dumps([device_key(), self.p.pipeline, shapes, nodes, FRACTIONS])
        return root / f"latency-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"

    def _read(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            return dict(json.loads(self.path.read_text())["rows"])
        except (OSError, ValueError, KeyError):
            return None  # unreadable: timed again, and rewritten

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"device": device_key(), "fractions": FRACTIONS, "rows": self.rows}))
        os.replace(tmp, self.path)  # whole or not at all, should two compiles write at once

    def elastic(self) -> float:
        """The share of the unpruned model's time that the narrowest build saved. Where widths
        barely move latency (a small model whose time is Python and kernel launches), the
        slopes are noise: ``ELASTIC`` is the least share a table is trusted at."""
        full, narrow = (sum(r[i] for r in self.rows.values()) for i in (0, len(FRACTIONS) - 1))
        return (full - narrow) / full if full > 0 else 0.0

    @property
    def trusted(self) -> bool:
        return self.elastic() >= ELASTIC

    def slope(self, name: str) -> float:
        """Milliseconds node ``name`` saves per unit of width fraction (least squares over the builds)."""
        return max(0.0, float(np.polyfit(FRACTIONS, self.rows.get(name, [0.0] * len(FRACTIONS)), 1)[0]))

    def at(self, name: str, fraction: float) -> float:
        """Node ``name``'s time at ``fraction`` of its groups' width, read off its row."""
        xs = FRACTIONS[::-1]
        ys = self.rows.get(name, [0.0] * len(FRACTIONS))[::-1]
        if fraction < xs[0]:  # below the narrowest build: towards the row's own fixed part
            return float(ys[0] - self.slope(name) * (xs[0] - fraction))
        return float(np.interp(fraction, xs, ys))


def _touching(p) -> dict[str, list]:
    """{node name: [(group, unit_of), ...]}: the groups whose channels a node writes or reads,
    with the unit of each of those channels (one entry per group)."""
    out: dict[str, dict] = {}
    for g in p.groups:
        for (vk, _axis), unit_of in g.dims.items():
            node = vk[0] if isinstance(vk, tuple) else vk
            if not isinstance(node, torch.fx.Node):
                continue
            for reader in [node, *node.users]:
                out.setdefault(reader.name, {}).setdefault(g.id, (g, unit_of))
    return {name: list(gs.values()) for name, gs in out.items()}


def applicable(p) -> bool:
    """Tables are built where the graph can be run node by node on positional inputs."""
    return not p.example_kwargs and all(isinstance(t, torch.Tensor) for t in p.example_inputs)


def table_for(p, inputs: tuple | None = None) -> LatencyTable | None:
    """The table of ``p`` in its current pipeline for ``inputs`` (built once, kept on ``p``),
    or None where the graph cannot be run node by node (keyword inputs)."""
    if not applicable(p):
        return None
    key = (p.pipeline, tuple(getattr(t, "shape", None) for t in (inputs or p.example_inputs)))
    if key not in p.latency_tables:
        p.latency_tables[key] = LatencyTable(p, inputs)
    table = p.latency_tables[key]
    _describe(p, table)
    return table


def unit_ms(p, inputs: tuple | None = None, table: LatencyTable | None = None) -> dict:
    """{group id: milliseconds removing each unit saves}, read off the table (built and timed
    where not cached). ``p.latency_table`` says what was read."""
    table = table or LatencyTable(p, inputs)
    out = {g.id: np.zeros(g.n_units) for g in p.groups}
    for name, groups in table.touch.items():
        share = table.slope(name) / len(groups)
        for g, unit_of in groups:
            out[g.id] += share * np.bincount(unit_of, minlength=g.n_units) / len(unit_of)
    _describe(p, table)
    return {gid: np.maximum(v, 1e-9) for gid, v in out.items()}


def _describe(p, table: LatencyTable) -> None:
    """``p.latency_table``, which ``compile`` puts in ``result.report.latency_table``."""
    p.latency_table = {"nodes": len(table.rows), "timed_now": table.timed,
                       "cache": str(table.path) if table.path else None,
                       "unpruned_ms": round(sum(r[0] for r in table.rows.values()), 3),
                       "elastic": round(table.elastic(), 3), "used": table.trusted}


def predict_ms(p, removed: dict, table: LatencyTable) -> float:
    """NetAdapt's estimate of a candidate's latency: every node's row read at the fraction
    of width its groups keep after ``removed``."""
    kept = {g.id: 1.0 - len(removed.get(g.id, ())) / g.n_units for g in p.groups}
    total = 0.0
    for name, row in table.rows.items():
        groups = table.touch.get(name)
        if not groups:
            total += row[0]
            continue
        f = float(np.prod([kept[g.id] for g, _ in groups])) ** (1.0 / len(groups))
        total += table.at(name, f)
    return total
