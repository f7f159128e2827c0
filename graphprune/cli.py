"""``graphprune prune torchvision:resnet50 --ratio 0.5 --save out/``: prune a model and print before/after;
``graphprune eval out/``: load a saved model onto a fresh original and measure it again."""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

from .errors import GraphpruneError


def load_model(spec: str) -> torch.nn.Module:
    """``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``, with random weights."""
    source, _, name = spec.partition(":")
    if not name:
        raise GraphpruneError(f"model spec {spec!r} should look like torchvision:resnet50, timm:resnet18 or package.module:factory")
    try:
        if source == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None)
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False)
        return getattr(importlib.import_module(source), name)()
    except (ImportError, AttributeError, ValueError, RuntimeError, KeyError) as e:
        raise GraphpruneError(f"cannot build model {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def main(argv=None) -> int:
    import graphprune
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and print parameters, FLOPs and CPU latency before and after")
    p.add_argument("model", nargs="?", default="torchvision:resnet50")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--importance", default="l2")
    p.add_argument("--input-shape", default="1,3,224,224", help="comma-separated example input shape")
    p.add_argument("--ignore", action="append", default=[], help="module whose output width must stay (repeatable)")
    p.add_argument("--save", metavar="DIR", help="write the pruned model (safetensors + manifest.json) to DIR")
    e = sub.add_parser("eval", help="load a model saved with --save onto a fresh original; print parameters, FLOPs, latency")
    e.add_argument("dir")
    args = ap.parse_args(argv)
    console = Console()
    if args.cmd == "eval":
        return _eval(args.dir, console)
    try:
        model = load_model(args.model).eval()
        x = torch.randn(*map(int, args.input_shape.split(",")))
        t = time.perf_counter()
        with console.status(f"pruning {args.model}..."):
            small = graphprune.compile(model, (x,), ratio=args.ratio, importance=args.importance, ignore=args.ignore)
        took = time.perf_counter() - t
        if args.save:
            graphprune.save(small, args.save)
            (Path(args.save) / "source.json").write_text(json.dumps({"model": args.model}))
    except GraphpruneError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    _table(console, f"{args.model} at ratio {args.ratio} (compiled in {took:.2f} s, {small.report.form} form)", model, small, x)
    if args.save:
        console.print(f"saved to {args.save}")
    return 0


def _eval(path: str, console) -> int:
    """Rebuild a saved model onto a freshly built original (on meta) and measure it against the original."""
    import graphprune
    from graphprune.checkpoint import read_manifest

    try:
        manifest = read_manifest(path)
        source = Path(path) / "source.json"
        if not source.is_file():
            raise GraphpruneError(f"{path} has no source.json: it was not written by 'graphprune prune --save'; "
                                  "load it in Python with graphprune.load(original, path)")
        spec = json.loads(source.read_text())["model"]
        model = load_model(spec).eval()
        with torch.device("meta"):
            original = load_model(spec)
        small = graphprune.load(original, path)
    except GraphpruneError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    shape = manifest["inputs"]["args"][0]["tensor"]
    _table(console, f"{spec} loaded from {path} ({manifest['form']} form)", model, small.eval(), torch.randn(*shape))
    return 0


def _table(console, title: str, model, small, x) -> None:
    from rich.table import Table

    from graphprune.flops import count_flops, count_params, latency_ms, latency_ratio

    with console.status("measuring latency..."):
        before_ms = latency_ms(model, (x,))
    rows = [
        ("parameters", count_params(model), count_params(small), lambda v: f"{v / 1e6:.2f} M"),
        ("FLOPs", count_flops(model, (x,)), count_flops(small, (x,)), lambda v: f"{v / 1e9:.2f} G"),
        # the ratio is measured side by side (the models alternate); "after" is derived from it
        ("CPU latency", before_ms, before_ms * latency_ratio(small, model, (x,)), lambda v: f"{v:.1f} ms"),
    ]
    table = Table(title=title)
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for name, before, after, fmt in rows:
        table.add_row(name, fmt(before), fmt(after), f"{after / before:.3f}")
    console.print(table)
    with torch.no_grad():
        console.print(f"output shape {tuple(model(x).shape)} -> {tuple(small(x).shape)}")


if __name__ == "__main__":
    raise SystemExit(main())
