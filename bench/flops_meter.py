"""FLOPs budgets: a candidate's FLOPs read off the slicing plan (``plan_flops``) against every candidate built
on meta and counted (``allocate.PLAN_FLOPS_ON = False``, as before), side by side in one run.

For each model, compile(target_flops=0.5) runs both ways alternately, ``--rounds`` times each; reported: the
median compile time of each, their ratio, the number of candidates built to count, and the landing (the FLOPs
fraction of the returned model, counted on it), which must be the same both ways (the counts are exact).

    python bench/flops_meter.py             # -> bench/results/flops_meter.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torchvision

import graphprune
import graphprune.allocate as allocate

# (name, builder, input): torchvision at small inputs, random weights; below, a small Llama with grouped-query
# attention, Hugging Face's ViT and a bidirectional LSTM
MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), (1, 3, 64, 64)),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(), (1, 3, 64, 64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (1, 3, 64, 64)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), (1, 3, 64, 64)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=64), (1, 3, 64, 64)),
    "swin_t": (lambda: torchvision.models.swin_t(), (1, 3, 64, 64)),
}


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _hf_vit():
    """Hugging Face's ViT-B/16 at 64 px: its exported graph builds its mask with the example's device baked in."""
    import transformers

    cfg = transformers.ViTConfig(image_size=64, patch_size=16)  # ViT-B: 12 layers, 768 wide, 12 heads
    return transformers.ViTForImageClassification(cfg)


class _Speech(torch.nn.Module):
    """A DeepSpeech-like acoustic model: a conv front over 40 mel bins, two bidirectional LSTM layers of 256."""

    def __init__(self):
        super().__init__()
        self.front = torch.nn.Conv1d(40, 128, 5, padding=2)
        self.rnn = torch.nn.LSTM(128, 256, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(512, 29)

    def forward(self, x):                                    # (B, 40, T)
        h = torch.relu(self.front(x)).transpose(1, 2)        # (B, T, 128)
        return self.head(self.rnn(h)[0])                     # (B, T, 29)


def one(model, inputs, plan: bool) -> dict:
    built = []
    real = allocate.Meter._built
    with mock.patch.object(allocate, "PLAN_FLOPS_ON", plan), \
            mock.patch.object(allocate.Meter, "_built", lambda self, removed: built.append(1) or real(self, removed)):
        start = time.perf_counter()
        small = graphprune.compile(model, inputs, target_flops=0.5, importance="l2")
        seconds = time.perf_counter() - start
    landing = graphprune.count_flops(small, inputs) / graphprune.count_flops(model, inputs)
    return {"seconds": seconds, "built": len(built), "landing": landing}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flops_meter.json"))
    ap.add_argument("--models", default=None, help="comma-separated names to run (their rows replace those in --out)")
    args = ap.parse_args()
    cases = {name: (build, (torch.randn(*shape),)) for name, (build, shape) in MODELS.items()}
    cases["llama_gqa_4x256"] = (_llama, (torch.randint(0, 1000, (1, 64)),))
    cases["hf_vit_b16"] = (_hf_vit, (torch.randn(1, 3, 64, 64),))
    cases["speech_bilstm_2x256"] = (_Speech, (torch.randn(1, 40, 100),))
    rows = {}
    if args.models:
        cases = {k: v for k, v in cases.items() if k in args.models.split(",")}
        if Path(args.out).exists():
            rows = json.loads(Path(args.out).read_text())["models"]
    for name, (build, inputs) in cases.items():
        torch.manual_seed(0)
        model = build().eval()
        runs = {"plan": [], "built": []}
        for _ in range(args.rounds):  # alternating, so load on the machine falls on both alike
            for way in ("plan", "built"):
                runs[way].append(one(model, inputs, way == "plan"))
        row = {way: {"seconds_median": statistics.median(r["seconds"] for r in rs), "candidates_built": rs[0]["built"],
                     "landing": rs[0]["landing"]} for way, rs in runs.items()}
        row["speedup"] = row["built"]["seconds_median"] / row["plan"]["seconds_median"]
        row["same_landing"] = all(r["landing"] == runs["built"][0]["landing"] for rs in runs.values() for r in rs)
        rows[name] = row
        print(f"{name:22s} plan {row['plan']['seconds_median']:6.2f} s ({row['plan']['candidates_built']} built)  "
              f"built {row['built']['seconds_median']:6.2f} s ({row['built']['candidates_built']} built)  "
              f"x{row['speedup']:.2f}  landing {row['plan']['landing']:.4f} same={row['same_landing']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"target_flops": 0.5, "rounds": args.rounds, "torch": torch.__version__,
                                          "models": rows}, indent=2))


if __name__ == "__main__":
    main()
