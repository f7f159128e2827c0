"""Models the tests never saw: the lossless oracle on a list of timm models.

For each model (random weights, 10 classes), 25% of the units of every group are
made dead (zero in every slice, as in tests/oracle.py), the model is compiled
at ratio 0.25 with ``importance="l1"`` and its classifier ignored, and the
pruned output is compared with the original's. A correct compile reproduces it
to float precision; anything else is either a known limit (LayerNorm over a
pruned dim renormalises over fewer channels) or a bug. A model whose dead
channels make its output identically zero gives ``nan`` (0/0): not a finding.

The reference runs on a copy (``oracle.reference``): a forward that builds state
on its first call (ConViT's ``rel_indices``) would otherwise change the graph
between the oracle's analysis and compile's. Two columns tell an oracle miss from
a pruning error: ``removed_alive`` (parameter slices compile removed that the
oracle did not kill; then ``rel_error`` measures a lossy prune, not a bug) and
``twin_error``, the result against the user's model with exactly what compile
removed zeroed (its own forward, not the graph): that one must be at float precision.

    python bench/timm_survey.py            # -> bench/results/timm_survey.json
    python bench/timm_survey.py resnet18   # some models
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODELS = ["resnet18", "ghostnet_100", "mobilevit_xxs", "efficientformer_l1", "convmixer_768_32", "resmlp_12_224",
          "mixer_b16_224", "poolformer_s12", "levit_128", "rexnet_100", "hrnet_w18_small", "dla34", "cspresnet50",
          "dpn68", "tf_efficientnetv2_b0", "convit_tiny", "deit_tiny_patch16_224", "pit_ti_224", "coat_lite_tiny",
          "tnt_s_patch16_224", "gmlp_ti16_224", "crossvit_tiny_240", "res2net50_14w_8s", "res2next50", "selecsls42b",
          "xception41", "regnetz_b16", "nfnet_l0", "eca_resnet33ts", "lambda_resnet26t"]


def survey(name: str) -> dict:
    import timm
    from oracle import dead_twin, kill_units, reference, removed_alive

    import graphprune
    from graphprune import module_form

    start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    size = min(model.pretrained_cfg.get("input_size", (3, 224, 224))[1], 224)
    x = torch.randn(1, 3, size, size)
    kill_units(model, (x,), 0.25)
    ref = reference(model, x)
    head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
    try:
        small = graphprune.compile(model, (x,), ratio=0.25, importance="l1", ignore=head)
    except graphprune.GraphpruneError as e:
        return {"model": name, "result": "refused", "error": str(e).splitlines()[0][:300]}
    with torch.no_grad():
        out = small(x)
        twin = dead_twin(model, small)(x)
    return {"model": name, "result": "compiled", "method": module_form.info(small)["method"], "form": small.report.form,
            "rel_error": float((out - ref).abs().max() / ref.abs().max()),
            "twin_error": float((out - twin).abs().max() / twin.abs().max()),
            "removed_alive": len(removed_alive(model, small)),
            "param_ratio": round(graphprune.count_params(small) / graphprune.count_params(model), 3),
            "user_model_intact": all(p.device.type == "cpu" for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1)}


def main():
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for name in sys.argv[1:] or MODELS:
        try:
            row = survey(name)
        except Exception as e:  # noqa: BLE001 - a crash is a finding
            row = {"model": name, "result": "crashed", "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not sys.argv[1:]:
        out = Path(__file__).parent / "results" / "timm_survey.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
