"""Block-sparse linear: graphprune's Triton kernel against cuBLAS and PyTorch's BSR kernel.

For each dtype, N = K, token count M, block size and block sparsity s, it times
``y = x @ W.T`` three ways, after checking each against an fp32 product with
the same masked weight:

    dense_ms       F.linear(x, W)                     (cuBLAS; the same for every s)
    torch_bsr_ms   F.linear(x, W.to_sparse_bsr(...))  (null where PyTorch has no kernel)
    graphprune_ms  block_sparse_linear(x, weight)     (what users get, dense fallback included)

plus ``graphprune_kernel_ms``, the Triton kernel forced on, and
``graphprune_path`` ("kernel" or "dense": what the cost model chose). Blocks are
kept uniformly at random, so block rows are uneven. The ideal speed-up over
dense is 1 / (1 - s).

    python bench/kernels.py               # the full table, one GPU run (H100: ~5-8 min)
    python bench/kernels.py --quick       # a few points
    python bench/kernels.py --cpu-smoke   # tiny shapes under TRITON_INTERPRET=1: tests the harness only

Writes bench/results/kernels-<device>.json (a list of records), a plot
kernels-<device>.png (speed-up against sparsity per block size, with the ideal
line) and kernels-<device>.md (the issue's GPU goals, met or not). Results are
rewritten after every shape, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path


def _stand_aside() -> None:
    """``python bench/x.py`` puts bench/ first on ``sys.path``, so this file is what ``import
    kernels`` finds there, in place of the Hugging Face ``kernels`` package that transformers
    imports when it is installed (every model load then fails: "cannot import name
    'CUDAProperties' from 'kernels'"). Imported under that name, this file loads the package
    from the rest of the path and leaves it in ``sys.modules``, where the import takes it from."""
    import importlib.machinery
    import importlib.util

    here = Path(__file__).resolve().parent
    rest = [p for p in sys.path if Path(p or os.curdir).resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if spec is None:
        raise ImportError("no package named kernels besides bench/kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":  # imported in the package's place, not run
    _stand_aside()

FULL = dict(dtypes=("bfloat16", "float16"), sizes=(8192, 4096), tokens=(1, 16, 512, 4096), blocks=(16, 32, 64, 128),
            sparsities=(0.5, 0.75, 0.9, 0.95))
QUICK = dict(dtypes=("bfloat16",), sizes=(8192,), tokens=(1, 4096), blocks=(64, 128), sparsities=(0.5, 0.9))
CPU_SMOKE = dict(dtypes=("float16", "float32"), sizes=(128,), tokens=(1, 33), blocks=(16, 64), sparsities=(0.5, 0.9))
# Extra points for the break-even goal (64x64 blocks, M = 4096, dense and sparse equally fast at <= 30% sparsity).
BREAK_EVEN_PROBE = dict(block=64, tokens=4096, sparsities=(0.3,))

# do_bench budget per measurement (ms): enough for a stable median, small enough for one run under ~9 minutes.
WARMUP_MS, REP_MS = 10, 40


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a handful of points (bf16, N=K=8192, M=1 and 4096)")
    mode.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the harness)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --cpu-smoke to check the harness", file=sys.stderr)
        return 2
    grid = CPU_SMOKE if args.cpu_smoke else QUICK if args.quick else FULL
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    device_name = "cpu-interpreter" if args.cpu_smoke else torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {ext: args.out / f"kernels-{slug}.{ext}" for ext in ("json", "png", "md")}

    records, failures, started = [], 0, time.time()
    for dtype_name in grid["dtypes"]:
        for size in grid["sizes"]:
            for m in grid["tokens"]:
                points = [(block, s) for block in grid["blocks"] for s in grid["sparsities"]]
                if not args.cpu_smoke and m == BREAK_EVEN_PROBE["tokens"]:
                    points += [(BREAK_EVEN_PROBE["block"], s) for s in BREAK_EVEN_PROBE["sparsities"]]
                new = bench_shape(device, device_name, getattr(torch, dtype_name), m, size, points)
                failures += sum("error" in r for r in new)
                records += new
                paths["json"].write_text(json.dumps(records, indent=1))
                print(f"[{time.time() - started:6.1f}s] {dtype_name} N=K={size} M={m}: {len(new)} points", flush=True)
    plot(records, paths["png"], device_name)
    paths["md"].write_text(goals_report(records, device_name))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.time() - started:.0f}s")
    return 1 if failures else 0


def bench_shape(device, device_name, dtype, m, size, points) -> list[dict]:
    """Time every (block, sparsity) point for one (dtype, M, N = K)."""
    import torch
    import torch.nn.functional as F

    from graphprune.kernels import BlockSparseWeight, block_sparse_linear
    from graphprune.kernels import bsr_linear

    n = k = size
    gen = torch.Generator(device=device).manual_seed(m * 7919 + size)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)  # (M, K)
    w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)  # (N, K)
    dense_ms = measure(lambda: F.linear(x, w), device)
    records = []
    for block, sparsity in points:
        record = dict(device=device_name, dtype=str(dtype).removeprefix("torch."), M=m, N=n, K=k, block=block,
                      sparsity=sparsity, dense_ms=dense_ms, torch_bsr_ms=None, graphprune_ms=None)
        rows, cols = n // block, k // block
        keep = torch.randperm(rows * cols, device=device, generator=gen)[: round((1 - sparsity) * rows * cols)]
        mask = torch.zeros(rows * cols, dtype=torch.bool, device=device)
        mask[keep] = True
        mask = mask.view(rows, cols)
        masked = w * mask.repeat_interleave(block, 0).repeat_interleave(block, 1)  # (N, K)
        expected = F.linear(x.float(), masked.float())  # (M, N)
        weight = BlockSparseWeight.from_dense(w, block, block_mask=mask)

        kernel = lambda: block_sparse_linear(x, weight, backend="kernel")  # noqa: E731
        auto = lambda: block_sparse_linear(x, weight)  # noqa: E731
        try:
            error = mismatch(kernel(), expected) or mismatch(auto(), expected)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on to the other points
            error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        if error:
            record["error"] = f"graphprune: {error}"
            print(f"  FAILED {record}", flush=True)
        else:
            record["graphprune_kernel_ms"] = measure(kernel, device)
            record["graphprune_path"] = "dense" if bsr_linear._prefers_dense(weight, m) else "kernel"
            record["graphprune_ms"] = record["graphprune_kernel_ms"] if record["graphprune_path"] == "kernel" else measure(auto, device)

        try:
            w_bsr = masked.to_sparse_bsr((block, block))
            torch_bsr = lambda: F.linear(x, w_bsr)  # noqa: E731
            wrong = mismatch(torch_bsr(), expected)
            if wrong:
                record["torch_bsr_note"] = f"wrong result: {wrong}"
            else:
                record["torch_bsr_ms"] = measure(torch_bsr, device)
        except Exception as e:  # noqa: BLE001 - PyTorch has no BSR kernel for this case; the record says why
            record["torch_bsr_note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        records.append(record)
    return records


def mismatch(y, expected) -> str | None:
    """None if y matches the fp32 reference to the output dtype's precision, else what is wrong."""
    import torch

    if y.shape != expected.shape:
        return f"shape {tuple(y.shape)} != {tuple(expected.shape)}"
    if not torch.isfinite(y).all():
        return "non-finite outputs (unwritten or overflowed)"
    scale = expected.abs().max().clamp_min(1e-6)
    rel = ((y.float() - expected).abs().max() / scale).item()
    limit = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}[y.dtype]
    return None if rel <= limit else f"max error {rel:.2e} of max |y| (limit {limit:.0e})"


def measure(fn, device) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU, a few wall-clock runs under the interpreter."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def plot(records, path, device_name) -> None:
    """Speed-up over dense against sparsity: one panel per (dtype, N) row and block column,
    one line per M (solid: graphprune, dashed: PyTorch BSR), and the ideal 1 / (1 - s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(r["dtype"], r["N"]) for r in records})
    blocks = sorted({r["block"] for r in records})
    tokens = sorted({r["M"] for r in records})
    fig, axes = plt.subplots(len(rows), len(blocks), figsize=(3.6 * len(blocks), 3.0 * len(rows)), squeeze=False,
                             sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sparsities = sorted({r["sparsity"] for r in records})
    for (dtype, n), row_axes in zip(rows, axes):
        for block, ax in zip(blocks, row_axes):
            ax.plot(sparsities, [1 / (1 - s) for s in sparsities], "k:", label="ideal 1/(1-s)")
            for m, color in zip(tokens, colors):
                points = sorted((r["sparsity"], r) for r in records
                                if (r["dtype"], r["N"], r["block"], r["M"]) == (dtype, n, block, m))
                for key, style, label in (("graphprune_ms", "-o", f"M={m}"), ("torch_bsr_ms", "--x", None)):
                    xy = [(s, r["dense_ms"] / r[key]) for s, r in points if r.get(key)]
                    if xy:
                        ax.plot(*zip(*xy), style, color=color, markersize=3, label=label)
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set_title(f"{dtype} N=K={n} block {block}", fontsize=9)
            ax.set_xlabel("block sparsity")
            ax.set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=7, title="solid: graphprune, dashed: torch BSR", title_fontsize=7)
    fig.suptitle(f"block-sparse linear on {device_name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals_report(records, device_name) -> str:
    """The issue's GPU goals, as fractions of the ideal speed-up 1 / (1 - s)."""

    def find(**where):
        return next((r for r in records if all(r.get(k) == v for k, v in where.items())), None)

    def fraction(r):
        if r is None or not r.get("graphprune_ms"):
            return None
        return (r["dense_ms"] / r["graphprune_ms"]) * (1 - r["sparsity"])

    lines = [f"# Block-sparse kernel goals on {device_name}", "", "| goal | measured | met |", "|---|---|---|"]
    big = dict(dtype="bfloat16", N=8192, sparsity=0.9)
    for label, where, target in (
        ("M=4096, 128x128: >= 0.8 of ideal", dict(big, M=4096, block=128), 0.8),
        ("M=4096, 64x64: >= 0.6 of ideal", dict(big, M=4096, block=64), 0.6),
        ("M=1, 64x64: >= 0.7 of ideal", dict(big, M=1, block=64), 0.7),
    ):
        f = fraction(find(**where))
        lines.append(f"| bf16 N=K=8192 s=0.9 {label} | {'n/a' if f is None else f'{f:.2f}'} | "
                     f"{'n/a' if f is None else 'yes' if f >= target else 'no'} |")
    compared = [r for r in records if r.get("torch_bsr_ms") and r.get("graphprune_ms")]
    slower = [r for r in compared if r["graphprune_ms"] >= r["torch_bsr_ms"]]
    lines.append(f"| faster than torch BSR wherever it runs | slower at {len(slower)} of {len(compared)} points | "
                 f"{'n/a' if not compared else 'yes' if not slower else 'no'} |")
    probe = find(dtype="bfloat16", N=8192, M=4096, block=64, sparsity=0.3)
    if probe and probe.get("graphprune_kernel_ms"):
        ratio = probe["dense_ms"] / probe["graphprune_kernel_ms"]
        lines.append(f"| bf16 64x64 M=4096 break-even at <= 30% sparsity | kernel at s=0.3 runs {ratio:.2f}x dense | "
                     f"{'yes' if ratio >= 1 else 'no'} |")
    notes = [f"- slower than torch BSR: {r['dtype']} M={r['M']} N={r['N']} block={r['block']} s={r['sparsity']}: "
             f"{r['graphprune_ms']:.4f} ms vs {r['torch_bsr_ms']:.4f} ms" for r in slower]
    notes += [f"- FAILED CHECK: {r['dtype']} M={r['M']} N={r['N']} block={r['block']} s={r['sparsity']}: {r['error']}"
              for r in records if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


if __name__ == "__main__":
    sys.exit(main())
