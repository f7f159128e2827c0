"""``graphprune prune torchvision:resnet50 --ratio 0.5``: prune a zoo model and print before/after."""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from .errors import GraphpruneError


def load_model(spec: str) -> torch.nn.Module:
    """``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``, with random weights."""
    source, _, name = spec.partition(":")
    if not name:
        raise GraphpruneError(f"model spec {spec!r} should look like torchvision:resnet50, timm:resnet18 or package.module:factory")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    return getattr(importlib.import_module(source), name)()


def main(argv=None) -> int:
    import graphprune
    from graphprune.flops import count_flops, count_params, latency_ms, latency_ratio
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and print parameters, FLOPs and CPU latency before and after")
    p.add_argument("model", nargs="?", default="torchvision:resnet50")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--importance", default="l2")
    p.add_argument("--input-shape", default="1,3,224,224", help="comma-separated example input shape")
    p.add_argument("--ignore", action="append", default=[], help="module whose output width must stay (repeatable)")
    args = ap.parse_args(argv)
    console = Console()
    try:
        model = load_model(args.model).eval()
        x = torch.randn(*map(int, args.input_shape.split(",")))
        t = time.perf_counter()
        small = graphprune.compile(model, (x,), ratio=args.ratio, importance=args.importance, ignore=args.ignore)
        took = time.perf_counter() - t
    except GraphpruneError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    before_ms = latency_ms(model, (x,))
    rows = [
        ("parameters", count_params(model), count_params(small), lambda v: f"{v / 1e6:.2f} M"),
        ("FLOPs", count_flops(model, (x,)), count_flops(small, (x,)), lambda v: f"{v / 1e9:.2f} G"),
        # the ratio is measured side by side (the models alternate); "after" is derived from it
        ("CPU latency", before_ms, before_ms * latency_ratio(small, model, (x,)), lambda v: f"{v:.1f} ms"),
    ]
    table = Table(title=f"{args.model} at ratio {args.ratio} (compiled in {took:.2f} s, {small.meta['graphprune']['method']})")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for name, before, after, fmt in rows:
        table.add_row(name, fmt(before), fmt(after), f"{after / before:.3f}")
    console.print(table)
    with torch.no_grad():
        console.print(f"output shape {tuple(model(x).shape)} -> {tuple(small(x).shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
