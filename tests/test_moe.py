"""Mixture-of-experts: Hugging Face's fused 3-D expert weights (``experts.gate_up_proj``
(E, 2I, H), ``experts.down_proj`` (E, H, I)) under ``grouped_mm`` (``rules.grouped_mm``).
Two groups per layer: intermediate channels of every expert at once, and whole experts
(router rows and expert slices), followed through the routing (``rules.topk``)."""
import numpy as np
import pytest
import torch

import graphprune
from oracle import dead_twin, kill_units, removed_alive, without_experts

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


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**BASE, intermediate_size=128, num_experts=4,
                                                                  num_experts_per_tok=2))


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe}


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_prunes_expert_channels_and_whole_experts_losslessly(family, tmp_path):
    """25% of every channel group dead (expert channels and the hidden size included) and 25%
    of the experts removed: the experts keep exactly the live channels, one expert of four goes in every
    layer, and the result equals the dead model with those experts deleted by hand, at two
    shapes; the user's own class is kept (its expert counts and ``intermediate_dim`` true),
    generate() decodes what that reference decodes, and save/load rebuilds it onto a
    fresh original on meta."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    other = torch.randint(3, VOCAB, (3, 11))
    kill_units(model, (ids,), 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    # the user's model, its config and its expert counts are as they were; nothing is shared
    assert model.config.to_dict() == config and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(e.num_experts == 4 for e in _experts(model))
    assert not {id(p) for p in small.parameters()} & {id(p) for p in model.parameters()}
    assert small.report.form == "module", small.report.form_why
    assert all(" axis 0 " in r and (".gate.weight" in r or ".experts." in r) for r in removed_alive(model, small))
    for big, e, layer in zip(_experts(model), _experts(small), small.model.layers):
        assert tuple(e.gate_up_proj.shape) == (3, 192, 48) and tuple(big.gate_up_proj.shape) == (4, 256, 64)
        assert tuple(e.down_proj.shape) == (3, 48, 96) and e.intermediate_dim == 96 and big.intermediate_dim == 128
        assert e.num_experts == layer.mlp.gate.num_experts == 3 and big.num_experts == 4
    ref_model = without_experts(model, small)
    with torch.no_grad():
        _close(small(ids).logits, ref_model(ids).logits)
        _close(small(other).logits, ref_model(other).logits)
        prompt = ids[:1, :4]
        want = ref_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        got = small.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        original = FAMILIES[family]()
    back = graphprune.load(original, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


def test_a_removed_expert_is_never_routed_to_not_zeroed():
    """Zeroing a removed expert's weights and router row does not give the pruned model
    (a zero logit still wins top-k slots): the self-check's twin writes minus infinity into
    the routing softmax instead. Without that, this test's reference would be wrong."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.25)  # the channels small removes are dead: only the experts differ
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    with torch.no_grad():
        zeroed = dead_twin(model, small)(ids).logits
        deleted = without_experts(model, small)(ids).logits
        got = small(ids).logits
    _close(got, deleted)
    assert not torch.allclose(got, zeroed, rtol=1e-3, atol=1e-3)


def test_top_k_experts_and_grouped_mm_alignment_stay():
    """Top-2 routing over 4 experts and widths read by torch's grouped_mm (16-byte rows):
    a ratio that would leave one expert leaves 2 in every layer, and the hidden and expert
    widths stay multiples of 4 floats, so the user's own forward runs (module form)."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.9)
    small = graphprune.compile(model, (ids,), ratio=0.9, importance="l1")
    assert small.report.form == "module", small.report.form_why
    assert small.report.verify.status == "passed"
    for e in _experts(small):
        n, two_i, h = e.gate_up_proj.shape
        assert n == 2 and two_i // 2 < 32 and h < 64 and (two_i // 2) % 4 == 0 and h % 4 == 0
    with torch.no_grad():
        _close(small(ids).logits, without_experts(model, small)(ids).logits)


def test_a_wrong_expert_rewrite_raises_instead_of_returning_a_model(monkeypatch):
    """If the rewrite left ``histc``'s bins at the old expert count, the offsets would not
    match the experts: compile refuses (the check after each pass) rather than return it."""
    from graphprune.passes import shrink_params

    monkeypatch.setitem(shrink_params.ARG_FIXES, "histc", lambda node, cop, p: False)
    torch.manual_seed(0)
    model = _mixtral().eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with pytest.raises(graphprune.GraphpruneError, match="shrink-params"):
        graphprune.compile(model, (ids,), ratio=0.25, importance="l1")


def test_moe_groups_are_intermediate_channels_of_all_experts():
    """The expert channel group covers gate and up halves (rows i and I + i) and the
    down projection's column i, in every expert; the expert group covers the router's rows
    and the experts' leading dim, keeps top-k of them, and fills the routing softmax in the
    twin; the experts' hidden dim is the residual stream's (tokens gathered to experts by
    ``aten.index``)."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    a = graphprune.analyze(model, (torch.randint(3, VOCAB, (2, 7)),))
    assert not any("grouped_mm" in u for u in a.unsupported)
    name = "model.layers.0.mlp.experts"
    g = next(g for g in a.groups if any(s.name == f"{name}.down_proj" and s.axis == 2 for s in g.params))
    slices = {(s.name, s.axis): s.unit_of for s in g.params}
    assert set(slices) == {(f"{name}.gate_up_proj", 1), (f"{name}.down_proj", 2)}
    assert g.n_units == 128
    gate_up = slices[(f"{name}.gate_up_proj", 1)]
    np.testing.assert_array_equal(gate_up[:128], gate_up[128:])
    np.testing.assert_array_equal(gate_up[:128], slices[(f"{name}.down_proj", 2)])
    hidden = next(g for g in a.groups if any(s.name == "model.embed_tokens.weight" for s in g.params))
    assert {(f"{name}.gate_up_proj", 2), (f"{name}.down_proj", 1)} <= {(s.name, s.axis) for s in hidden.params}
    experts = next(g for g in a.groups if any(s.name == f"{name}.gate_up_proj" and s.axis == 0 for s in g.params))
    assert {(s.name, s.axis) for s in experts.params} == {
        (f"{name}.gate_up_proj", 0), (f"{name}.down_proj", 0), ("model.layers.0.mlp.gate.weight", 0)}
    assert experts.n_units == 4 and experts.min_units == 2 and len(experts.fills) == 1


def test_flops_count_the_experts_matmuls():
    """``count_flops`` counts the experts' grouped matmuls (torch's counter has no formula for
    them): every token times top-k through gate/up (H x 2I) and down (I x H), on the model and
    on its traced graph (transformers' ``grouped_mm_fallback``) alike."""
    from torch.utils.flop_counter import FlopCounterMode

    from graphprune.flops import _cpu_attention_flops, count_flops
    from graphprune.trace import trace

    torch.manual_seed(0)
    model = _mixtral().eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}  # tests/test_flops.py
    with FlopCounterMode(display=False, custom_mapping=attention) as plain:
        model(ids)
    rows = 2 * 16 * 2  # tokens x top-k
    experts = 2 * (2 * rows * 64 * 256 + 2 * rows * 128 * 64)  # two layers
    assert count_flops(model, (ids,)) == plain.get_total_flops() + experts
    assert count_flops(trace(model, (ids,)).gm, (ids,)) == plain.get_total_flops() + experts


def test_counting_an_moe_on_fake_tensors_logs_nothing(capfd):
    """transformers' experts call torch's grouped_mm (bf16 only); counting the model on fake tensors fails
    there, as it may, and count_flops runs it for real, but torch logged each failure with its traceback:
    105 error lines on stderr for one FLOPs-budget compile."""
    from graphprune.flops import count_flops

    torch.manual_seed(0)
    model = _mixtral().eval()
    capfd.readouterr()
    assert count_flops(model, (torch.randint(3, VOCAB, (2, 16)),)) > 0  # on fake tensors it fails, then runs for real
    assert "Traceback" not in capfd.readouterr().err


def test_data_aware_budget_sees_the_experts():
    """With calibration data, the activation criterion scores expert channels by the rows
    the grouped matmul reads and whole experts by the routing they get: no group scores
    zero, so a FLOPs budget lands near its target instead of emptying the experts first. Under
    a FLOPs budget whole experts stay (each token still runs top-k of them); under a params
    budget they may go."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    calib = [(torch.randint(3, VOCAB, (2, 16)),) for _ in range(6)]
    small = graphprune.compile(model, (ids,), importance="activation", target_flops=0.6, calibration=calib)
    assert 0.5 < small.report.flops <= 0.6
    assert all(e.gate_up_proj.shape[1] >= 64 for e in _experts(small)), [tuple(e.gate_up_proj.shape) for e in _experts(small)]
    assert [e.num_experts for e in _experts(small)] == [4, 4]  # fewer experts would save no FLOPs (top-k per token)
    lean = graphprune.compile(model, (ids,), importance="activation", target_params=0.6, calibration=calib)
    assert lean.report.params <= 0.6 and min(e.num_experts for e in _experts(lean)) >= 2


def test_gpt_oss_experts_with_biases_gathered_by_id():
    """GPT-OSS routes by top-k of biased router logits, then a softmax over the k chosen, and
    reads per-expert biases by id (``bias[expert_ids]``): those rows go with their expert.
    Lossless against the model with the removed experts deleted by hand."""
    cfg = transformers.GptOssConfig(**BASE, intermediate_size=32, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.25)
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    kept = (getattr(small, "_graphprune", None) or small.meta["graphprune"])["kept"]
    for i in range(2):
        assert len(kept[(f"model.layers.{i}.mlp.experts.gate_up_proj_bias", 0)]) == 3
        assert len(kept[(f"model.layers.{i}.mlp.router.weight", 0)]) == 3
    with torch.no_grad():
        _close(small(ids).logits, without_experts(model, small)(ids).logits)


def test_granitemoe_experts_in_its_own_class():
    """GraniteMoE keeps its experts in its own parallel-experts layer and takes ``use_cache``
    through ``**kwargs``: whole experts go, the result is its own class, and it equals the
    model with those experts deleted by hand."""
    cfg = transformers.GraniteMoeConfig(**BASE, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.GraniteMoeForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.25)
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    assert small.report.form == "module", small.report.form_why
    assert all(layer.block_sparse_moe.router.num_experts == 3 for layer in small.model.layers)
    with torch.no_grad():
        _close(small(ids).logits, without_experts(model, small)(ids).logits)
