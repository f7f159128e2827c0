"""Every timm architecture family at 50% FLOPs, classifier kept (issue 13, item 1).

A *family* is the module of ``timm.models`` a model name comes from
(``timm.list_modules()``: resnet, byobnet, vision_transformer, ...). One model per
family, chosen deterministically: the one with the fewest parameters (counted on
the ``meta`` device, 10 classes) among the family's names, ``test_*`` models
excluded (timm's tiny smoke-test configs are not architectures users prune);
ties go to the shorter, then the alphabetically first name. Random weights,
``eval()``, nothing downloads. A family whose models cannot be built from their
config is a row that says so.

Input: 1 x 3 x 64 x 64 with ``img_size=64`` passed to the constructor where it
takes it; otherwise 64 x 64 without it; otherwise the smallest input its
``pretrained_cfg`` states (``min_input_size``); otherwise its default input size.

For each family, in a fresh process (``--timeout`` seconds, default 180, and a
resident-memory cap, default 5 GB; either is a row that says so):

1. ``small = graphprune.compile(model, (x,), target_flops=0.5, ignore=[classifier],
   importance="l1")``; the classifier is ``pretrained_cfg["classifier"]`` (every
   name it lists that is a module; the last ``nn.Linear`` otherwise).
   Recorded: it runs; the output shape is kept; FLOPs kept,
   ``graphprune.count_flops(small) / count_flops(model)`` (must be at most 0.5);
   parameters kept; batch 3 runs and has the shape of the original's; the result
   against its *dead twin* (``oracle.dead_twin``: the user's model with exactly
   what compile removed zeroed, its own forward), ``twin_err``.
2. The dead-channel oracle of ``tests/oracle.py``, on a fresh copy of the same
   model: ``kill_units(model, (x,), 0.25)``, the reference on a copy
   (``oracle.reference``), ``compile(..., ratio=0.25, importance="l1", ignore=[classifier])``,
   ``oracle_err = max|small - ref| / max|ref|``. Lossless: ``oracle_err <= 1e-4``.
   Where the oracle cannot judge (the dead channels make the reference output
   identically zero, or compile removed slices the oracle did not kill,
   ``removed_alive``), the oracle compile's twin error decides instead, and the
   row says so. ``twin_err`` of step 1 must be at most 1e-4 as well.

Pass: all of the above. The failure cause, first that applies: the exception
(type and first line) with the stage it came from, ``timeout``, ``memory``,
``shape changed``, ``batch 3``, ``not lossless``, ``flops>0.5``. The allocator's
refusal (``target_flops=0.5 cannot be reached``: every group at its minimum width
still keeps more) counts as ``flops>0.5``: safe, but not pruned to the target.

    nice -n 15 .venv/bin/python bench/timm_families.py                 # -> bench/results/timm_families.json
    nice -n 15 .venv/bin/python bench/timm_families.py --families levit nfnet --out /tmp/x.json
    nice -n 15 .venv/bin/python bench/timm_families.py --resume        # skip families already in --out

A run updates the rows of the families it runs and keeps the others of ``--out``.
    .venv/bin/python bench/timm_families.py --table                    # markdown of --out, by failure cause

Rows are written after every family.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "timm_families.json"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from hf_families import _git, _short, rel_err  # noqa: E402 - shared with the Hugging Face bench

TARGET = 0.5
LOSSLESS = 1e-4
SIZE = 64


# ------------------------------------------------------------------ selection

def _params_on_meta(name: str) -> float:
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=10)
        return float(sum(p.numel() for p in m.parameters()))
    except Exception:  # noqa: BLE001 - a model that cannot be built is never the representative
        return math.inf


def representative(family: str) -> tuple[str | None, float]:
    """(name, parameters) of the family's smallest model, ``test_*`` excluded; (None, inf) if none builds."""
    import timm

    names = [n for n in timm.list_models(module=family) if not n.startswith("test_")]
    sized = sorted(((_params_on_meta(n), len(n), n) for n in names))
    if not sized or sized[0][0] == math.inf:
        return None, math.inf
    return sized[0][2], sized[0][0]


# ------------------------------------------------------------------ one family

def classifier_names(model) -> list[str]:
    import torch

    mods = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    found = [n for n in names if n in mods and n]
    return found or [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]


def build(name: str):
    """(model, x, how): random weights, eval, the smallest input it accepts of the tries above."""
    import timm
    import torch

    errors = []
    for kw, size in (({"img_size": SIZE}, SIZE), ({}, SIZE), ({}, "min_input_size"), ({}, "input_size")):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
            if isinstance(size, str):
                if size == "min_input_size" and size not in model.pretrained_cfg:
                    continue
                size = model.pretrained_cfg.get(size, (3, 224, 224))[1]
            x = torch.randn(1, 3, size, size)
            with torch.no_grad():
                copy.deepcopy(model)(x)
            return model, x, {"img_size_kwarg": bool(kw), "input": list(x.shape)}
        except Exception as e:  # noqa: BLE001 - try the next way
            errors.append(_short(e))
    raise RuntimeError(errors[-1])


def _out(o):
    import torch

    return o if isinstance(o, torch.Tensor) else o[0]


def run_family(family: str, name: str) -> dict:
    import torch
    from oracle import dead_twin, kill_units, reference, removed_alive

    import graphprune

    torch.set_num_threads(1)
    row = {"family": family, "model": name}
    stage = "build"
    try:
        model, x, how = build(name)
        row.update(how)
        head = classifier_names(model)
        row["ignore"] = head
        # copies taken before compile runs the model: a forward that caches a tensor computed with grad
        # (EfficientFormer's attention_bias_cache) leaves a module that deepcopy refuses afterwards
        pristine, twin_base = copy.deepcopy(model), copy.deepcopy(model)

        stage = "compile"
        t0 = time.perf_counter()
        small = graphprune.compile(model, (x,), target_flops=TARGET, ignore=head, importance="l1")
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["form"] = small.report.form
        stage = "run"
        with torch.no_grad():
            ref = _out(model(x))
            out = _out(small(x))
            row["shape_kept"] = tuple(out.shape) == tuple(ref.shape)
            twin = dead_twin(twin_base, small)
            row["twin_err"] = rel_err(out, _out(twin(x)))
        row["flops_kept"] = round(graphprune.count_flops(small, (x,)) / graphprune.count_flops(model, (x,)), 4)
        row["params_kept"] = round(graphprune.count_params(small) / graphprune.count_params(model), 4)
        stage = "batch 3"
        x3 = torch.randn(3, *x.shape[1:])
        with torch.no_grad():
            row["batch3"] = tuple(_out(small(x3)).shape) == tuple(_out(model(x3)).shape)
        del small, twin

        stage = "oracle"
        model = pristine
        kill_units(model, (x,), 0.25)
        twin_base = copy.deepcopy(model)
        ref = _out(reference(model, x))
        small = graphprune.compile(model, (x,), ratio=0.25, importance="l1", ignore=head)
        with torch.no_grad():
            out = _out(small(x))
            row["oracle_err"] = rel_err(out, ref) if ref.abs().max() > 0 else None
            row["removed_alive"] = len(removed_alive(model, small))
            row["oracle_twin_err"] = rel_err(out, _out(dead_twin(twin_base, small)(x)))
        judged_by_oracle = row["oracle_err"] is not None and row["removed_alive"] == 0
        row["lossless_by"] = "oracle" if judged_by_oracle else "twin"
        row["lossless"] = (row["oracle_err"] if judged_by_oracle else row["oracle_twin_err"]) <= LOSSLESS \
            and row["twin_err"] <= LOSSLESS
    except Exception as e:  # noqa: BLE001 - a failure is a finding
        row["error"] = f"{stage}: {_short(e)}"
    row["cause"] = cause(row)
    row["pass"] = row["cause"] is None
    return row


def cause(row: dict) -> str | None:
    if "cannot be reached" in row.get("error", ""):  # refused by the allocator: safe, but not pruned to the target
        return "flops>0.5 (" + row["error"].split(": pruning ", 1)[-1].split(";")[0] + ")"
    if "error" in row:
        return row["error"]
    if not row.get("shape_kept"):
        return "shape changed"
    if not row.get("batch3"):
        return "batch 3"
    if not row.get("lossless"):
        return "not lossless"
    if row.get("flops_kept", 1) > TARGET:
        return "flops>0.5"
    return None


# ------------------------------------------------------------------ driver

def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def in_subprocess(family: str, name: str, timeout: float, max_rss: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path, log = Path(d) / "row.json", Path(d) / "stderr.txt"
        cmd = [sys.executable, __file__, "--worker", family, name, "--worker-out", str(path)]
        with open(log, "w") as stderr:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        t0, why = time.perf_counter(), None
        while p.poll() is None:
            if time.perf_counter() - t0 > timeout:
                why = f"timeout after {timeout:.0f}s"
            elif _rss_bytes(p.pid) > max_rss:
                why = f"memory over {max_rss / 2**30:.0f} GB"
            if why:
                p.kill()
                p.wait()
                break
            time.sleep(0.5)
        err = log.read_text(errors="replace")
        if why:
            return {"family": family, "model": name, "cause": why.split(" ")[0], "error": why, "pass": False}
        if path.exists():
            return json.loads(path.read_text())
        return {"family": family, "model": name, "pass": False, "cause": f"process: exit {p.returncode}",
                "error": f"exit {p.returncode}: {err.strip()[-300:]}"}


def _cause_kind(row: dict) -> str:
    """The failure cause as a table section: the exception type with its stage, or the check that failed."""
    c = row.get("cause")
    if c is None:
        return "pass"
    if c in ("timeout", "memory", "shape changed", "batch 3", "not lossless", "flops>0.5"):
        return c
    if c.startswith("flops>0.5 ("):
        return "flops>0.5 (refused: minimum widths keep more)"
    stage, _, rest = c.partition(": ")
    return f"{stage}: {rest.split(':')[0]}" if rest else c


def table(rows: list[dict]) -> str:
    def num(v, fmt=".3f"):
        return "" if v is None else format(v, fmt)

    passed = sum(r.get("pass", False) for r in rows)
    lines = [f"**{passed} / {len(rows)} families pass** (runs, shape kept, batch 3, lossless on dead channels, "
             f"FLOPs kept <= {TARGET}).", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_cause_kind(r), []).append(r)
    order = sorted(groups, key=lambda k: (k == "pass", -len(groups[k]), k))
    lines += ["| cause | families |", "|---|---|"]
    lines += [f"| {k} | {len(groups[k])} |" for k in order]
    lines += ["", "| family | model | cause | FLOPs kept | params kept | lossless (err, by) | s |", "|---|---|---|---|---|---|---|"]
    for k in order:
        for r in sorted(groups[k], key=lambda r: r["family"]):
            err = r.get("oracle_err") if r.get("lossless_by") == "oracle" else r.get("oracle_twin_err")
            loss = "" if "lossless" not in r else f"{'yes' if r['lossless'] else '**no**'} ({num(err, '.1e')}, {r['lossless_by']})"
            c = "pass" if r.get("pass") else f"`{(r.get('cause') or '')[:110]}`"
            lines.append(f"| {r['family']} | {r.get('model') or ''} | {c} | {num(r.get('flops_kept'))} | "
                         f"{num(r.get('params_kept'))} | {loss} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", help="timm.models modules (default: all of timm.list_modules())")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true", help="skip families already in --out")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per family")
    ap.add_argument("--max-rss-gb", type=float, default=5.0)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        args.worker_out.write_text(json.dumps(run_family(*args.worker), default=str))
        return
    if args.table:
        print(table(json.loads(args.out.read_text())["families"]))
        return
    import timm
    import torch

    torch.set_num_threads(1)
    families = args.families or sorted(timm.list_modules())
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"families": []}  # rows of other families stay
    done = {r["family"] for r in doc["families"]} if args.resume else set()
    doc.update(timm=timm.__version__, torch=torch.__version__, git=_git(), target_flops=TARGET, importance="l1",
               oracle_ratio=0.25, lossless_if_rel_err_at_most=LOSSLESS, timeout_s=args.timeout,
               command="nice -n 15 .venv/bin/python bench/timm_families.py")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for family in families:
        if family in done:
            continue
        t0 = time.perf_counter()
        name, params = representative(family)
        if name is None:
            row = {"family": family, "model": None, "pass": False, "cause": "build: no model builds from its config",
                   "error": "no model builds from its config"}
        else:
            row = in_subprocess(family, name, args.timeout, args.max_rss_gb * 2**30)
            row["params_m"] = round(params / 1e6, 2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        doc["families"] = sorted([r for r in doc["families"] if r["family"] != family] + [row], key=lambda r: r["family"])
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"{family:26s} {str(name):36s} {'pass' if row.get('pass') else row.get('cause')}  "
              f"flops {row.get('flops_kept')}  ({row['seconds']}s)", flush=True)
    print(table(doc["families"]))


if __name__ == "__main__":
    main()
