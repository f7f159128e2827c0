"""Keep and ship on the torchvision zoo: output form, save/load in a fresh process, export, ONNX.

For every torchvision classifier asked for (``--models all``: the 80 of
``torchvision.models.list_models(module=torchvision.models)``, at test_zoo's
small input sizes), compile at ratio 0.5 with the classifier ignored, then:

1. record the form (``module``: the user's class; ``graph``: fx) and why;
2. ``graphprune.save`` it, and in a FRESH Python process (one per model) build
   the original on ``meta`` and ``graphprune.load`` it, comparing outputs with
   the ones the saving process computed (max abs difference; ``identical`` when
   bitwise equal). The loader also reports the difference after copying every
   loaded tensor into fresh storage (``load_aligned_max_abs``): tensors read
   from safetensors sit at 8-byte, not 64-byte, aligned addresses, and some CPU
   kernels round differently on those;
3. ``graphprune.export.export`` it (torch.export, batch dim dynamic) from the
   batch-1 example and run the program at batch 3 against the model;
4. for the models named by ``--onnx`` (or ``all``): ``graphprune.export.to_onnx``
   (``torch.onnx.export(..., dynamo=True)``, dynamic batch) and
   ``check_onnx`` in onnxruntime at batch 3: max |ort - torch| / max |torch|.

``hf_bert_small`` is also accepted as a model name: transformers' BertModel from a
small config with random weights (vocab 100, hidden 64, 2 layers, 4 heads,
intermediate 128), pruned with ``compile(bert, (ids,), ratio=0.25)``; it is
reported apart from the torchvision counts.

Rows are written to the JSON file after every model; ``--resume`` skips the
models already there.

    python bench/keep_zoo.py --models resnet18 vit_b_16 --onnx all          # -> bench/results/keep_zoo.json
    nice -n 10 python bench/keep_zoo.py --models all hf_bert_small --onnx all \\
        --out bench/results/keep_zoo_all.json --resume
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch.utils import _pytree as pytree

import graphprune
from graphprune.export import check_onnx, export, to_onnx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_zoo import KWARGS, NAMES, _classifier, _size  # noqa: E402

BERT = "hf_bert_small"


def _short(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


@contextmanager
def params_on_meta():
    """Every parameter and buffer a constructor registers goes to ``meta``; the
    constructor's own arithmetic stays on the CPU. For RegNet, whose constructor
    computes its widths with tensors and reads them back (``torch.device("meta")``
    cannot run it)."""
    reg_p, reg_b = torch.nn.Module.register_parameter, torch.nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_p(self, name, param)
        if param is not None:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def register_buffer(self, name, tensor, persistent=True):
        reg_b(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = reg_p, reg_b


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def build(name: str) -> torch.nn.Module:
    if name == BERT:
        from transformers import BertModel

        return BertModel(_bert_config())
    return torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))


def build_on_meta(name: str) -> tuple[torch.nn.Module, str]:
    """The original with every tensor on ``meta``, and how it was built."""
    try:
        with torch.device("meta"):
            return build(name), "meta device"
    except Exception:  # noqa: BLE001 - a constructor that computes with tensors (RegNet's widths)
        with params_on_meta():
            model = build(name)
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        return model, "parameters and buffers on meta (constructor computes with tensors)"


def _randomize_zero_linears(model: torch.nn.Module) -> list:
    """Give every Linear whose weight is all zero random weights (std 0.02); their names."""
    done = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            with torch.no_grad():
                torch.nn.init.normal_(m.weight, std=0.02)
            done.append(n)
    return done


def example(name: str, batch: int = 1) -> torch.Tensor:
    if name == BERT:
        return torch.randint(0, 100, (batch, 8))
    s = _size(name)
    return torch.randn(batch, 3, s, s)


def outputs(y) -> list:
    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def rel_diff(got, want) -> float:
    worst = 0.0
    for g, w in zip(outputs(got), outputs(want), strict=True):
        scale = w.abs().max().item()
        d = (g.double() - w.double()).abs().max().item()
        worst = max(worst, d / scale if scale else (0.0 if d == 0 else float("inf")))
    return worst


def fresh_load(name: str, path: str) -> dict:
    """Run in a new process: load ``path`` onto an original built on meta, compare with the saved outputs."""
    torch.set_num_threads(int(os.environ.get("KEEP_ZOO_THREADS", "2")))  # as the saving process
    original, how = build_on_meta(name)
    t = time.perf_counter()
    small = graphprune.load(original, path)
    load_s = time.perf_counter() - t
    data = torch.load(f"{path}/check.pt")
    with torch.no_grad():
        ys = outputs(small(data["x"]))
        diff = max((a - b).abs().max().item() for a, b in zip(ys, data["y"], strict=True))
        same = all(torch.equal(a, b) for a, b in zip(ys, data["y"]))
        for mod in small.modules():  # fresh (aligned) storage for every tensor, same values
            for store in (mod._parameters, mod._buffers):
                for k, v in store.items():
                    if v is not None:
                        store[k] = torch.nn.Parameter(v.detach().clone(), v.requires_grad) if isinstance(v, torch.nn.Parameter) else v.clone()
        aligned = max((a - b).abs().max().item() for a, b in zip(outputs(small(data["x"])), data["y"], strict=True))
    return {"meta_build": how, "loaded_form": "graph" if isinstance(small, torch.fx.GraphModule) else "module",
            "loaded_class": type(small).__name__, "loaded_training": small.training, "load_identical": same, "load_max_abs": diff,
            "load_aligned_max_abs": aligned, "load_only_s": round(load_s, 3)}


def run_fresh(name: str, path: str, threads: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import keep_zoo; "
            f"print('RESULT ' + json.dumps(keep_zoo.fresh_load({name!r}, {path!r})))")
    env = {**os.environ, "KEEP_ZOO_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"load_error": (err[-1] if err else f"exit {proc.returncode}")[:300]}
    return json.loads(line[len("RESULT "):])


def one(name: str, work: Path, do_onnx: bool, threads: int, row: dict) -> dict:
    """Fill ``row`` (kept as far as it got if a step raises)."""
    t_all = time.perf_counter()
    torch.manual_seed(0)
    model = build(name).eval()
    # torchvision's ViT starts with an all-zero head: every output would be 0 and every comparison vacuous
    row["head_reinit"] = _randomize_zero_linears(model)
    x = example(name)
    x3 = example(name, 3)
    row["input"] = list(x.shape)
    t = time.perf_counter()
    if name == BERT:
        small = graphprune.compile(model, (x,), ratio=0.25)
    else:
        small = graphprune.compile(model, (x,), ratio=0.5, ignore=_classifier(model))
    row["compile_s"] = round(time.perf_counter() - t, 3)
    row.update(form=small.report.form, why=small.report.form_why, verify=small.report.verify.status,
               params_kept=round(graphprune.count_params(small) / graphprune.count_params(model), 4))
    del model
    gc.collect()
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    graphprune.save(small, path)
    row["save_s"] = round(time.perf_counter() - t, 3)
    with torch.no_grad():
        ys = outputs(small(x))
        torch.save({"x": x, "y": ys}, path / "check.pt")  # reference data for the check only
    row["out_max_abs"] = max(y.abs().max().item() for y in ys)  # 0 would make every comparison vacuous
    t = time.perf_counter()
    row.update(run_fresh(name, str(path), threads))
    row["load_s"] = round(time.perf_counter() - t, 3)  # the whole fresh process: imports, build, load, check
    t = time.perf_counter()
    try:
        ep = export(small, (x,))
        with torch.no_grad():
            d = rel_diff(ep.module()(x3), small(x3))
        row["export_batch3"] = "ok" if d <= 1e-4 else f"differs: rel {d:.2e}"
        row["export_rel_diff"] = d
    except Exception as e:  # noqa: BLE001 - a failure is a result
        row["export_batch3"] = _short(e)
    row["export_s"] = round(time.perf_counter() - t, 3)
    if do_onnx:
        t = time.perf_counter()
        try:
            to_onnx(small, (x,), path / "model.onnx")
            row["onnx_rel_diff"] = check_onnx(path / "model.onnx", small, (x3,))
            row["onnx"] = "ok" if row["onnx_rel_diff"] <= 1e-4 else "differs"
        except Exception as e:  # noqa: BLE001
            row["onnx"] = _short(e)
        row["onnx_s"] = round(time.perf_counter() - t, 3)
    row["total_s"] = round(time.perf_counter() - t_all, 3)
    return row


def _write(out: Path, rows: dict) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(list(rows.values()), indent=1))
    tmp.replace(out)


def summary(rows: list) -> str:
    tv = [r for r in rows if r["model"] != BERT]
    count = lambda f: sum(1 for r in tv if f(r))  # noqa: E731
    onnx_ok = [r["model"] for r in rows if r.get("onnx") == "ok"]
    onnx_tried = [r for r in rows if "onnx" in r]
    lines = [f"{len(tv)} torchvision models: compiled {count(lambda r: 'form' in r)}, "
             f"module form {count(lambda r: r.get('form') == 'module')}, graph {count(lambda r: r.get('form') == 'graph')}",
             f"loaded in a fresh process onto a meta original: {count(lambda r: 'load_max_abs' in r)}, "
             f"bitwise identical {count(lambda r: r.get('load_identical') is True)}, "
             f"identical once tensors are re-allocated {count(lambda r: r.get('load_aligned_max_abs') == 0.0)}, "
             f"max abs diff {max((r['load_max_abs'] for r in tv if 'load_max_abs' in r), default=float('nan')):.1e}",
             f"torch.export at batch 3 ok {count(lambda r: r.get('export_batch3') == 'ok')}",
             f"ONNX within 1e-4: {len(onnx_ok)} of {len(onnx_tried)} tried: {' '.join(onnx_ok)}"]
    bad = []
    for r in rows:
        why = [f"{k}={r[k]}" for k in ("error", "load_error") if r.get(k)]
        why += [f"{k}={r[k]}" for k in ("export_batch3", "onnx") if r.get(k, "ok") != "ok"]
        if r.get("load_identical") is False:
            why.append(f"fresh load differs by {r['load_max_abs']:.1e} (re-allocated: {r.get('load_aligned_max_abs', float('nan')):.1e})")
        if why:
            bad.append(f"  {r['model']}: " + "; ".join(why))
    return "\n".join(lines + (["failures / differences:"] + bad if bad else []))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", help="torchvision names, 'all' (the 80 classifiers), or hf_bert_small")
    ap.add_argument("--onnx", nargs="*", default=[], help="models to export to ONNX and check in onnxruntime, or 'all'")
    ap.add_argument("--out", default=str(HERE / "results" / "keep_zoo.json"))
    ap.add_argument("--work", default="/tmp/keep_zoo", help="where the saved models go (each removed after its row)")
    ap.add_argument("--keep", action="store_true", help="keep the saved models and ONNX files")
    ap.add_argument("--resume", action="store_true", help="skip the models already in --out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = []
    for n in args.models or ["all"]:
        names += NAMES if n == "all" else [n]
    onnx = set(names) if "all" in args.onnx else set(args.onnx)
    out, work = Path(args.out), Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows: dict = {}
    if args.resume and out.exists():
        rows = {r["model"]: r for r in json.loads(out.read_text())}
    for i, name in enumerate(names):
        if name in rows:
            continue
        row: dict = {"model": name}
        try:
            one(name, work, name in onnx, args.threads, row)
        except Exception as e:  # noqa: BLE001 - a failure is a result
            row["error"] = _short(e)
        if not args.keep:
            shutil.rmtree(work / name, ignore_errors=True)
        rows[name] = row
        _write(out, rows)
        print(f"[{i + 1}/{len(names)}] " + json.dumps({k: v for k, v in row.items() if k != "why"}), flush=True)
        gc.collect()
    print("\n" + summary([rows[n] for n in names if n in rows]))


if __name__ == "__main__":
    main()
