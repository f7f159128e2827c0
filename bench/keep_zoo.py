"""Keep and ship on the torchvision zoo: output form, save/load in a fresh process, export.

For every torchvision classifier (test_zoo's sizes), compile at ratio 0.5 with
the classifier ignored, then:

1. record the form (``module``: the user's class; ``graph``: fx) and why;
2. ``graphprune.save`` it, and in ONE fresh Python process build every original
   on ``meta`` and ``graphprune.load`` it, comparing outputs with the saved ones
   (bitwise and to 1e-6);
3. ``torch.export`` the pruned model with a dynamic batch and run it at batch 3.

    python bench/keep_zoo.py                    # -> bench/results/keep_zoo.json
    python bench/keep_zoo.py --models resnet18 vit_b_16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
import torchvision

import graphprune

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_zoo import KWARGS, NAMES, _classifier, _size  # noqa: E402


def _export_ok(small, x) -> str:
    from torch.export import Dim, export

    try:
        x2 = torch.cat([x, x])  # export specializes a size-1 dim: trace at batch 2
        ep = export(small, (x2,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},), strict=False)
        x3 = torch.randn(3, *x.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x3), small(x3), rtol=1e-4, atol=1e-4)
        return "ok"
    except Exception as e:  # noqa: BLE001 - a failure is a result
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


LOADER = textwrap.dedent("""
    import json, sys, torch, torchvision, graphprune
    torch.set_num_threads(2)  # as the saving process: the same kernels, the same rounding
    sys.path.insert(0, {tests!r})
    from test_zoo import KWARGS
    out = {{}}
    for name in json.loads({names!r}):
        try:
            try:
                with torch.device("meta"):
                    original = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {{}}))
            except Exception:  # a constructor that computes with tensors (RegNet's widths) cannot run on meta
                original = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {{}}))
            small = graphprune.load(original, {root!r} + "/" + name)
            data = torch.load({root!r} + "/" + name + "/check.pt")
            with torch.no_grad():
                y = small(data["x"])
            out[name] = "identical" if torch.equal(y, data["y"]) else ("close" if torch.allclose(y, data["y"], atol=1e-6) else "differs")
        except Exception as e:
            out[name] = f"{{type(e).__name__}}: {{str(e).splitlines()[0][:160]}}"
    print(json.dumps(out))
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--out", default=str(HERE / "results" / "keep_zoo.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.models or NAMES
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name in names:
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
            s = _size(name)
            x = torch.randn(1, 3, s, s)
            small = graphprune.compile(model, (x,), ratio=0.5, ignore=_classifier(model))
            graphprune.save(small, f"{root}/{name}")
            with torch.no_grad():
                torch.save({"x": x, "y": small(x)}, f"{root}/{name}/check.pt")  # reference data for the check only
            rows[name] = {"model": name, "form": small.report.form, "why": small.report.form_why,
                          "verify": small.report.verify.status, "export_batch3": _export_ok(small, x)}
            print(json.dumps(rows[name]), flush=True)
        code = LOADER.format(tests=str(HERE.parent / "tests"), names=json.dumps(names), root=root)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        loaded = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        if proc.returncode:
            print(proc.stderr[-3000:])
    for name in names:
        rows[name]["load_fresh_process"] = loaded.get(name, "loader crashed")
    result = list(rows.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    n = len(result)
    count = lambda f: sum(1 for r in result if f(r))  # noqa: E731
    print(f"\n{n} models: module form {count(lambda r: r['form'] == 'module')}, graph {count(lambda r: r['form'] == 'graph')}; "
          f"loaded identical in a fresh process {count(lambda r: r['load_fresh_process'] == 'identical')}; "
          f"export at batch 3 ok {count(lambda r: r['export_batch3'] == 'ok')}")


if __name__ == "__main__":
    main()
