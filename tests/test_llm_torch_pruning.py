"""bench/llm_torch_pruning.py on a tiny random GQA LLaMA (4 query over 2 key/value heads)."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "llm_torch_pruning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("llm_torch_pruning", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    return model, batches


def _kept_rows(before, after):
    return [int((before - w).abs().sum(1).argmin()) for w in after]


@pytest.mark.parametrize("method", ["taylor", "magnitude"])
def test_prune_tiny_gqa_llama(bench, tiny, method):
    model, batches = tiny
    small = copy.deepcopy(model)
    res = bench.prune(small, batches, keep=0.8, method=method)
    assert res["method"] == method and res["keep_target"] == 0.8
    assert 0.6 < res["params_kept"] <= 0.8
    assert res["params_kept"] == pytest.approx(bench.count_params(small) / bench.count_params(model))
    assert 2 <= res["tries"] <= 6 and 0 < res["ratio"] < 1 and res["seconds"] > 0
    assert all(p.grad is None for p in small.parameters())
    assert small.lm_head.weight is small.model.embed_tokens.weight  # still tied
    assert small.config.hidden_size == 64  # embeddings ignored: the hidden size stays

    ids = batches[1]["input_ids"]
    with torch.no_grad():
        logits = small(ids).logits
        out = small.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, ids.shape[1], 100)
    assert out.shape == (1, 9)

    # whole query heads (one per kv group here) and MLP channels went, nothing else: the pruned
    # model computes what the dense one does with those inputs to o_proj and down_proj zeroed
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for dense, pruned in zip(masked.model.layers, small.model.layers):
            q = _kept_rows(dense.self_attn.q_proj.weight, pruned.self_attn.q_proj.weight)
            assert pruned.self_attn.k_proj.weight.shape == dense.self_attn.k_proj.weight.shape
            heads = sorted({i // 16 for i in q})
            assert len(q) == 16 * len(heads)
            per_group = [sum(h // 2 == g for h in heads) for g in range(2)]  # 2 query heads per kv head
            assert per_group[0] == per_group[1] > 0
            assert pruned.self_attn.num_key_value_groups == len(heads) // 2
            cols = torch.zeros(dense.self_attn.o_proj.in_features)
            cols[q] = 1
            dense.self_attn.o_proj.weight.mul_(cols)
            g = _kept_rows(dense.mlp.gate_proj.weight, pruned.mlp.gate_proj.weight)
            cols = torch.zeros(dense.mlp.down_proj.in_features)
            cols[g] = 1
            dense.mlp.down_proj.weight.mul_(cols)
        torch.testing.assert_close(small(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)


def test_bad_method(bench, tiny):
    model, batches = tiny
    with pytest.raises(ValueError, match="method"):
        bench.prune(copy.deepcopy(model), batches, keep=0.8, method="random")
