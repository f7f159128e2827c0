"""Mixture-of-experts: Hugging Face's fused 3-D expert weights (``experts.gate_up_proj``
(E, 2I, H), ``experts.down_proj`` (E, H, I)) under ``grouped_mm`` (``rules.grouped_mm``).
A unit is one intermediate channel of every expert at once; experts, hidden and token
dims keep their widths."""
import numpy as np
import pytest
import torch

import graphprune
from oracle import kill_units, reference, removed_alive

transformers = pytest.importorskip("transformers")

VOCAB = 100
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _mixtral():
    cfg = transformers.MixtralConfig(**BASE, intermediate_size=128, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(**BASE, intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=128, shared_expert_intermediate_size=128, decoder_sparse_step=1)
    return transformers.Qwen2MoeForCausalLM(cfg)


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe}


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_expert_channels_prune_losslessly(family, tmp_path):
    """25% of every group dead, expert channels included: the experts lose exactly those
    channels in every expert, logits equal the dead model's at two shapes, the user's own
    class is kept (its ``intermediate_dim`` true), generate() decodes what the dead model
    decodes, and save/load rebuilds it onto a fresh original on meta."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    other = torch.randint(3, VOCAB, (3, 11))
    kill_units(model, (ids,), 0.25)
    ref, ref_other = reference(model, ids).logits, reference(model, other).logits
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    assert small.report.form == "module", small.report.form_why
    assert removed_alive(model, small) == []
    for big, e in zip(_experts(model), _experts(small)):
        assert tuple(e.gate_up_proj.shape) == (4, 192, 64) and tuple(big.gate_up_proj.shape) == (4, 256, 64)
        assert tuple(e.down_proj.shape) == (4, 64, 96) and e.intermediate_dim == 96 and big.intermediate_dim == 128
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(small(other).logits, ref_other, rtol=1e-5, atol=1e-5 * ref_other.abs().max().item())
        prompt = ids[:1, :4]
        want = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        got = small.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        original = FAMILIES[family]()
    back = graphprune.load(original, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


def test_moe_groups_are_intermediate_channels_of_all_experts():
    """The expert channel group covers gate and up halves (rows i and I + i) and the
    down projection's column i, in every expert; the expert dim and the hidden dim of the
    expert weights are in no group."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    a = graphprune.analyze(model, (torch.randint(3, VOCAB, (2, 7)),))
    assert not any("grouped_mm" in u for u in a.unsupported)
    name = "model.layers.0.mlp.experts"
    g = next(g for g in a.groups if any(s.name == f"{name}.down_proj" for s in g.params))
    slices = {(s.name, s.axis): s.unit_of for s in g.params}
    assert set(slices) == {(f"{name}.gate_up_proj", 1), (f"{name}.down_proj", 2)}
    assert g.n_units == 128
    gate_up = slices[(f"{name}.gate_up_proj", 1)]
    np.testing.assert_array_equal(gate_up[:128], gate_up[128:])
    np.testing.assert_array_equal(gate_up[:128], slices[(f"{name}.down_proj", 2)])
    in_groups = {(s.name, s.axis) for g in a.groups for s in g.params}
    for axis in (0, 2):
        assert (f"{name}.gate_up_proj", axis) not in in_groups
    for axis in (0, 1):
        assert (f"{name}.down_proj", axis) not in in_groups
