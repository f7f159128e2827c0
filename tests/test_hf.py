"""Hugging Face models go through torch.export: lossless on dead channels, other batch and sequence sizes run."""
import numpy as np
import pytest
import torch

import graphprune
from oracle import dead_twin, kill_units
from graphprune.pruner import remove_balanced

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64, use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _out(o):
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o.logits


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama_gqa"])
def test_hf_lossless_and_dynamic(build):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    assert kill_units(model, (ids,), 0.25) >= 2
    with torch.no_grad():
        ref = _out(model(ids))
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    assert graphprune.module_form.info(small)["method"] == "export"
    hidden = {n: p.shape[1] for n, p in small.named_parameters() if n.endswith("embed_tokens.weight") or n.endswith("word_embeddings.weight")}
    if build is _llama:  # RMSNorm, exported as pow/mean/rsqrt, no longer pins the residual width
        assert list(hidden.values()) == [48]
    assert graphprune.count_params(small) < graphprune.count_params(model)
    with torch.no_grad():
        out = _out(small(ids))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        other = torch.randint(0, VOCAB, (3, 11))
        torch.testing.assert_close(_out(small(other)), _out(model(other)), rtol=1e-5, atol=1e-4)


def test_a_batch_one_export_compiles_without_the_runtime_check():
    """torch.export traces a batch-1 example at batch 2 (to keep the batch symbolic); the
    between-pass check must rerun the inputs the shapes were recorded with, or every
    exported model refuses ``verify=False`` ("output shapes changed from (2, ...) to (1, ...)")."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    checked = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    unchecked = graphprune.compile(model, (ids,), ratio=0.25, importance="l1", verify=False)
    assert graphprune.module_form.info(unchecked)["method"] == "export"
    with torch.no_grad():
        torch.testing.assert_close(unchecked(ids).logits, checked(ids).logits)


def test_hf_keyword_inputs_with_padding_mask():
    torch.manual_seed(0)
    model = _bert().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    kill_units(model, (ids,), 0.25)
    small = graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25, importance="l1")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = small(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# --------------------------------------------------------------- module form, generate, save/load

def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg)


def _llama_cached():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)  # use_cache=True, as configs ship


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                                bos_token_id=0, eos_token_id=0))


def _bigcode_mqa():
    """Multi-query attention fused into one c_attn (8 query heads, one key/value head): its
    rows over 3 are no head count; the module form set embed_dim from them and was refused."""
    return transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_inner=128, n_positions=64, multi_query=True,
        bos_token_id=0, eos_token_id=0))


def _persimmon():
    """q, k and v interleaved per head in one query_key_value, read back by dense."""
    return transformers.PersimmonForCausalLM(transformers.PersimmonConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _codegen():
    """A fused qkv_proj split over mp_num blocks, read back by out_proj."""
    return transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, n_ctx=64, rotary_dim=8,
        bos_token_id=0, eos_token_id=0))


def _olmo(layers=2):
    """A LayerNorm without weights on the residual stream: the graph prunes the stream, the
    model's own OlmoLayerNorm cannot run that, so the stream stays whole in its classes."""
    return transformers.OlmoForCausalLM(transformers.OlmoConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _mpt():
    """Heads reshaped by the config's n_heads, ALiBi biases per head."""
    return transformers.MptForCausalLM(transformers.MptConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=VOCAB,
                                                              max_seq_len=64, pad_token_id=0))


FAMILIES = {"llama": _llama_cached, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2, "bert": _bert,
            "gpt_bigcode_mqa": _bigcode_mqa, "persimmon": _persimmon, "codegen": _codegen, "mpt": _mpt}
# families whose config can state every pruned width (query heads x head_dim is not tied to hidden_size)
CONFIG_EXPRESSES = {"llama", "qwen2", "mistral"}


def _greedy_no_cache(model, prompt, steps):
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_module_form_generate_and_reload(family, tmp_path):
    """Dead MLP channels and one dead query head per key/value group: pruning is
    lossless in the user's own class; generate() with its cache decodes what
    step-by-step decoding without a cache does; save then load (and, where the
    config states every width, from_pretrained) give identical logits."""
    build = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _out(model(ids))
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    assert small.report.form == "module", small.report.form_why
    assert type(small) is type(model)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    with torch.no_grad():
        got = _out(small(ids))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert small.config is not model.config
    if family in ("llama", "qwen2", "mistral"):
        attn = small.model.layers[0].self_attn
        assert small.config.num_attention_heads == 6 and small.config.num_key_value_heads == 2  # one head of 4 per group
        assert attn.num_key_value_groups == 3 and attn.q_proj.out_features == 6 * attn.head_dim
        assert small.config.intermediate_size == small.model.layers[0].mlp.up_proj.out_features < 128
        assert model.config.num_attention_heads == 8
    if hasattr(small, "generate"):
        prompt = ids[:1, :4]
        out = small.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out.tolist() == _greedy_no_cache(small, prompt, 8).tolist()
    graphprune.save(small, tmp_path)
    manifest = __import__("json").loads((tmp_path / "manifest.json").read_text())
    with torch.device("meta"):
        original = build()
    back = graphprune.load(original, tmp_path)
    assert type(back) is type(model) and not back.training
    with torch.no_grad():
        assert torch.equal(_out(back(ids)), got)
    if family in CONFIG_EXPRESSES:
        assert manifest["from_pretrained"] is True
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(_out(auto(ids)), got)
    else:  # it says why not instead of writing a config that would load a different model
        assert isinstance(manifest["from_pretrained"], str)


def test_hf_per_layer_widths_reload_with_graphprune(tmp_path):
    """Layers pruned to different widths: the config records them, from_pretrained
    is refused in the manifest, graphprune.load rebuilds the model exactly."""
    torch.manual_seed(0)
    model = _llama_cached().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    small = graphprune.compile(model, (ids,), ratio={"model.layers.0.mlp.*": 0.5, "model.layers.1.mlp.*": 0.25})
    assert small.report.form == "module"
    widths = [layer.mlp.up_proj.out_features for layer in small.model.layers]
    assert widths == [64, 96]
    assert [w["intermediate_size"] for w in small.config.graphprune_layers if "intermediate_size" in w] == widths
    graphprune.save(small, tmp_path)
    manifest = __import__("json").loads((tmp_path / "manifest.json").read_text())
    assert "differ" in manifest["from_pretrained"]
    with torch.device("meta"):
        original = _llama_cached()
    back = graphprune.load(original, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


def test_gqa_query_heads_are_balanced_units():
    """Query heads are the units, each in its key/value head's partition; a removal
    keeps as many query heads over every kept key/value head."""
    model = _llama_cached().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    a = graphprune.analyze(model, (ids,))
    heads = [g for g in a.groups if g.part_of is not None]
    assert len(heads) == 2 and all(g.n_units == 8 and g.n_parts == 2 for g in heads)
    assert sorted(np.bincount(heads[0].part_of).tolist()) == [4, 4]
    g = heads[0]
    score = np.arange(8, dtype=float)          # partition 0 (units 0-3) is the cheaper one
    gone = remove_balanced(g, score, 2)
    assert np.bincount(g.part_of[gone], minlength=2).tolist() == [1, 1]
    gone = remove_balanced(g, score, 4)        # a whole key/value group is cheapest here
    assert sorted(gone.tolist()) == [0, 1, 2, 3]
    score = np.array([0, 0, 9, 9, 0, 0, 9, 9], dtype=float)
    assert np.bincount(g.part_of[remove_balanced(g, score, 4)], minlength=2).tolist() == [2, 2]


def test_a_fused_qkv_projection_removes_whole_key_value_heads():
    """Phi-3 projects query, key and value heads with one ``qkv_proj``, so one parameter dim holds
    rows of both kinds: each key/value head goes whole with its query heads, in the model's own
    class. Trying to balance the query heads blocked the whole attention."""
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                  use_cache=False, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    heads = [g for g in graphprune.analyze(model, (ids,)).groups if any("qkv_proj" in p.name and p.axis == 0 for p in g.params)]
    assert [g.n_units for g in heads] == [2]  # no unit for repeat_kv's copy dim, which keeps its size
    small = graphprune.compile(model, (ids,), ratio=0.5, importance="l1")
    attn, d = small.model.layers[0].self_attn, model.model.layers[0].self_attn.head_dim
    assert small.report.form == "module"
    assert attn.qkv_proj.out_features == (4 + 2 * 1) * d and attn.o_proj.in_features == 4 * d
    other = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(small(other).logits, dead_twin(model, small)(other).logits)


def _gated_qwen3_next():
    cfg = transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=0, head_dim=8, mlp_only_layers=[0],
        layer_types=["full_attention"])
    return transformers.Qwen3NextForCausalLM(cfg).eval()


def test_a_module_form_is_checked_under_an_attention_mask_with_padding(monkeypatch):
    """A head count set wrong on the module form (here the count rows // head_dim gave Qwen3-Next's
    gated query projection before the fix below) is read only where attention materialises a mask:
    the self-check, unmasked, passed a module form every padded call then failed. The module form is
    now also run with the first sequence's second half padded, against its dead twin."""
    monkeypatch.setattr(graphprune.hf, "_read_heads", lambda rq, rk, v, out, d: (rq // d, rk // d, d))
    torch.manual_seed(0)
    small = graphprune.compile(_gated_qwen3_next(), (torch.randint(3, VOCAB, (2, 7)),), ratio=0.25, importance="l1")
    assert small.report.form == "graph" and "(an attention mask with padding)" in small.report.form_why


def test_a_query_projection_that_holds_a_gate_per_head_counts_its_heads_by_the_output():
    """Qwen3-Next's ``q_proj`` holds each query head's rows and its output gate's, so its rows over
    head_dim count twice the heads. The module's ``num_key_value_groups`` was set from that count
    (6 for 3): the self-check's unmasked SDPA never reads it, and every masked or eager call failed.
    The output projection reads one value head per query head: the count is taken from it."""
    torch.manual_seed(0)
    small = graphprune.compile(_gated_qwen3_next(), (torch.randint(3, VOCAB, (2, 7)),), ratio=0.25, importance="l1")
    attn = small.model.layers[0].self_attn
    heads, kv = attn.o_proj.in_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
    assert heads < 8 and attn.num_key_value_groups == heads // kv
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        small(ids, attention_mask=mask)  # raised: the size of tensor a (6) must match the size of tensor b (12)
        small.set_attn_implementation("eager")
        small(ids)


def test_whole_kv_group_removal_is_lossless():
    """A dead key/value head with all its query heads goes as one, with k/v rows."""
    torch.manual_seed(0)
    model = _llama_cached().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    attn = model.model.layers[1].self_attn
    d = attn.head_dim
    with torch.no_grad():
        attn.q_proj.weight[4 * d:] = 0       # query heads 4-7 read key/value head 1
        attn.o_proj.weight[:, 4 * d:] = 0
        attn.k_proj.weight[d:] = 0
        attn.v_proj.weight[d:] = 0
        ref = model(ids).logits
    small = graphprune.compile(model, (ids,), ratio={"model.layers.1.self_attn.q_proj": 0.5}, importance="l1")
    a = small.model.layers[1].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features) == (4 * d, d) and a.num_key_value_groups == 4
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_calibration_dicts_and_example_kwargs():
    """Calibration batches may be dicts or tokenizer outputs (a UserDict); example_kwargs apply to them too."""
    from collections import UserDict

    torch.manual_seed(0)
    model = _bert().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 7)), "attention_mask": mask} for _ in range(2)]
    a = graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25,
                           importance="activation", calibration=batches)
    b = graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25,
                           importance="activation", calibration=[UserDict(x) for x in batches])
    c = graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25,
                           importance="activation", calibration=[(x["input_ids"],) for x in batches])
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes(a) == shapes(b) == shapes(c)
    assert graphprune.count_params(a) < graphprune.count_params(model)
    with pytest.raises(graphprune.GraphpruneError, match="calibration batch"):
        graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25, importance="activation",
                           calibration=[{"input_ids": ids, "token_type_ids": ids * 0}])
    # batches of other lengths that give no mask of their own get the example's (7 tokens): the error said only
    # "give batches the model takes" (survey 37 F06a); it names the mask, the dim and the remedy
    with pytest.raises(graphprune.GraphpruneError, match=r"\['attention_mask'\] .* hold 7 entries in dim 1 where this batch has 5"):
        graphprune.compile(model, (ids,), example_kwargs={"attention_mask": mask}, ratio=0.25, importance="activation",
                           calibration=[{"input_ids": torch.randint(0, VOCAB, (2, 5))}])


def test_t5_prunes_inside_heads_in_module_form():
    """T5's relative position bias keeps its head count, so widths go inside the heads;
    key_value_proj_dim/inner_dim follow, and the model stays a T5 that generates."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=2,
                                num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, VOCAB, (2, 7))
    dec = torch.randint(2, VOCAB, (2, 5))
    small = graphprune.compile(model, (ids,), example_kwargs={"decoder_input_ids": dec}, ratio=0.25, importance="l1")
    assert small.report.form == "module", small.report.form_why
    attn = small.encoder.block[0].layer[0].SelfAttention
    assert attn.n_heads == 8 and attn.inner_dim == attn.q.out_features == 8 * attn.key_value_proj_dim < 64
    with torch.no_grad():
        out = small.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.tolist() == small.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False).tolist()


def test_llm_auto_recipe_is_deterministic_under_a_seed():
    """The automatic recipe (criterion, allocation by measured sensitivity, refit) on a
    GQA causal LM: two runs from the same seed give the same choice and the same weights,
    and a budget it reports it meets."""
    def run():
        torch.manual_seed(0)
        model = _llama().eval()
        g = torch.Generator().manual_seed(1)
        cal = [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(4)]
        small = graphprune.compile(model, (cal[0]["input_ids"],), target_params=0.8, calibration=cal)
        return model, small

    (m1, a), (_, b) = run(), run()
    ca, cb = a.report.auto, b.report.auto
    assert (ca.criterion, ca.allocation, ca.refit) == (cb.criterion, cb.allocation, cb.refit)
    assert ca.tried == cb.tried and any(k.endswith("/measured") for k in ca.tried)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.report.params <= 0.8
    assert graphprune.count_params(a) <= 0.8 * graphprune.count_params(m1)


def test_judge_compares_language_model_outputs_by_kl():
    from graphprune.auto import Judge, _LogProbs
    from graphprune.pruner import Pruner

    torch.manual_seed(0)
    model = _llama().eval()
    g = torch.Generator().manual_seed(1)
    cal = [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(2)]
    p = Pruner(model, (cal[0]["input_ids"],), importance="l2")
    judge = Judge(p, cal)
    assert isinstance(judge.refs[0][0], _LogProbs)
    assert judge(p.gm) == 0.0
    mild, hard = (judge(p.prune(p.removal_for_ratio(r), check=False)) for r in (0.1, 0.6))
    assert 0.0 < mild < hard


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def _stops_from_pretrained(path, concrete):
    """Neither AutoModel nor the concrete class builds a model from the directory: a concrete class
    took a missing config.json for an empty config and began building the default size, a 7B Llama
    (survey 27 f14)."""
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoConfig, concrete, concrete.config_class):
        with pytest.raises(Exception, match="graphprune.load"):
            cls.from_pretrained(path)


def test_load_keeps_the_saved_generation_config(tmp_path):
    """load took the fresh original's generation config: generate() ran 20 new tokens where the saved
    model ran 4, with another end token (survey 30 f08)."""
    torch.manual_seed(0)
    model = _llama().eval()
    model.generation_config.max_new_tokens, model.generation_config.eos_token_id = 4, [5, 7]
    small = graphprune.compile(model, (torch.randint(3, VOCAB, (2, 12)),), ratio={"*.mlp.*": 0.25})
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        original = type(model)(model.config)
    back = graphprune.load(original, tmp_path)
    assert back.generation_config.max_new_tokens == 4 and back.generation_config.eos_token_id == [5, 7]
    prompt = torch.randint(8, VOCAB, (1, 5))
    assert torch.equal(back.generate(prompt, do_sample=False, pad_token_id=0),
                       small.generate(prompt, do_sample=False, pad_token_id=0))


def test_load_refuses_an_original_of_another_config_of_the_same_shapes(tmp_path):
    """load compared tensor shapes only: an original with the default rope_theta and rms_norm_eps loaded a
    model saved from one with others, its logits 5.25x their largest magnitude off (survey 30 f18)."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, rope_theta=500000.0, rms_norm_eps=1e-2)).eval()
    small = graphprune.compile(model, (torch.randint(3, VOCAB, (2, 12)),), ratio={"*.mlp.*": 0.25})
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
        rope = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, rms_norm_eps=1e-2))
        same = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(graphprune.GraphpruneError, match="config differs.*rms_norm_eps"):
        graphprune.load(other, tmp_path)
    with pytest.raises(graphprune.GraphpruneError, match="config differs.*rope"):
        graphprune.load(rope, tmp_path)
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(graphprune.load(same, tmp_path)(ids).logits, small(ids).logits, rtol=0, atol=0)


def test_a_config_transformers_refuses_is_not_written_and_load_still_works(tmp_path):
    """A residual stream of 45 over 4 heads: transformers' config validation raised out of
    graphprune.save (a huggingface_hub error, not a GraphpruneError)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (2, 16))
    small = graphprune.compile(transformers.LlamaForCausalLM(cfg).eval(), (ids,), ratio=0.3, importance="l2")
    assert small.report.form == "module" and small.config.hidden_size % 4
    graphprune.save(small, tmp_path)
    manifest = __import__("json").loads((tmp_path / "manifest.json").read_text())
    assert "transformers refuses the pruned config" in manifest["from_pretrained"]
    _stops_from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    with torch.device("meta"):
        original = transformers.LlamaForCausalLM(cfg)
    back = graphprune.load(original, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


def test_an_audio_encoder_prunes_and_keeps_taking_any_waveform_length():
    """Wav2Vec2: the exported graph fixed the waveform's length, so even ratio=0 was refused
    (the model takes other lengths, the graph did not); under verify=False, reading its input
    embeddings (an audio model has none) raised NotImplementedError."""
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, conv_dim=(32, 32, 32), conv_stride=(5, 4, 2),
                                      conv_kernel=(10, 4, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    model, x = transformers.Wav2Vec2ForCTC(cfg).eval(), torch.randn(2, 2560)
    small = graphprune.compile(model, (x,), ratio=0.5)
    assert small.report.form == "module" and graphprune.count_params(small) < graphprune.count_params(model)
    unchecked = graphprune.compile(model, (x,), ratio=0.5, verify=False)  # no NotImplementedError
    assert unchecked.report.form == "module", unchecked.report.form_why
    with torch.no_grad():
        torch.testing.assert_close(unchecked(x).logits, small(x).logits)
    same = graphprune.compile(model, (x,), ratio=0.0)
    x2 = torch.randn(3, 2000)
    with torch.no_grad():
        torch.testing.assert_close(same(x2).logits, model(x2).logits, rtol=1e-4, atol=1e-4)
        assert small(x2).logits.shape == model(x2).logits.shape


def test_whisper_with_keyword_decoder_ids_is_checked_at_a_second_batch():
    """The check grew the features to batch 3 and left the keyword decoder ids at 2: the
    exported graph refused that mix, the model took it, and Whisper was refused at ratio=0."""
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=32,
        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    feats, dec = torch.randn(2, 16, 64), torch.randint(3, VOCAB, (2, 8))
    same = graphprune.compile(model, (feats,), example_kwargs={"decoder_input_ids": dec}, ratio=0.0)
    assert [(3, 16, 64), (3, 8)] in same.report.verify.inputs  # the features and the keyword decoder ids
    f3, d3 = torch.randn(3, 16, 64), torch.randint(3, VOCAB, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(_out(same(f3, decoder_input_ids=d3)), model(f3, decoder_input_ids=d3, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_vision_tower_config_takes_its_width_from_the_patch_conv(family):
    """get_input_embeddings() of CLIP's and SigLIP's vision towers is the patch conv, whose
    weight.shape[1] is the 3 image channels: the config said hidden_size=3 (CLIP, in module
    form), and SigLIP's pooling attention was told embed_dim=3 and fell back to a graph."""
    torch.manual_seed(0)
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
    model = (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)) if family == "clip"
             else transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw))).eval()
    x = torch.randn(2, 3, 32, 32)
    for ratio in (0.0, 0.5):
        small = graphprune.compile(model, (x,), ratio=ratio)
        assert small.report.form == "module", small.report.form_why
        assert small.config.hidden_size == small.get_input_embeddings().out_channels
        assert (ratio > 0) == (graphprune.count_params(small) < graphprune.count_params(model))


def test_a_config_field_that_counts_otherwise_than_the_layers_is_left_alone():
    """ConvBERT's attention holds num_attention_heads // head_ratio heads: even at ratio=0 the
    config was given the layers' 2 for 4, saved so, and from_pretrained failed."""
    from graphprune.hf import from_config_alone

    torch.manual_seed(0)
    cfg = transformers.ConvBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, embedding_size=64, max_position_embeddings=64)
    model, ids = transformers.ConvBertModel(cfg).eval(), torch.randint(0, VOCAB, (2, 16))
    same = graphprune.compile(model, (ids,), ratio=0.0)
    assert same.report.form == "module" and same.config.num_attention_heads == 4
    assert from_config_alone(same) is None


def test_a_config_that_builds_another_model_is_not_left_for_from_pretrained(tmp_path):
    """A pruned Gemma's config states every width, but Gemma scales its embeddings by sqrt(hidden_size):
    from_pretrained loaded the directory without a word and computed logits 1.3% off (survey 13). The
    manifest said so; config.json, which from_pretrained reads, is now pruned_config.json."""
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=128, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (2, 7))
    model = transformers.GemmaForCausalLM(cfg).eval()
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l2")
    assert small.report.form == "module" and small.config.hidden_size == 48
    assert small.generation_config is not model.generation_config  # was the user's own object (survey 13)
    graphprune.save(small, tmp_path, tokenizer=_word_tokenizer())
    manifest = __import__("json").loads((tmp_path / "manifest.json").read_text())
    assert "embed_scale" in manifest["from_pretrained"]
    assert (tmp_path / "pruned_config.json").exists()
    _stops_from_pretrained(tmp_path, transformers.GemmaForCausalLM)
    # the tokenizer saved beside it still loads: AutoTokenizer reads config.json and was stopped too (survey 30 f04)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("w5 w7")["input_ids"] == [5, 7]
    back = graphprune.load(transformers.GemmaForCausalLM(cfg), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


def test_a_sliced_example_input_is_taken_as_its_values():
    """``decoder_input_ids=ids[:, :5]`` (a non-contiguous slice): torch.export guarded its strides, every
    other batch size failed the guard, and compile refused BART telling the user to give a batch of 2 or
    more, at a batch of 2 (survey 13)."""
    torch.manual_seed(0)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    dec = ids[:, :5]
    assert not dec.is_contiguous()
    small = graphprune.compile(bart, (ids,), example_kwargs={"decoder_input_ids": dec}, ratio=0.25, importance="l2")
    assert small.report.form == "module" and graphprune.count_params(small) < graphprune.count_params(bart)


def test_an_original_built_on_meta_with_a_parameter_left_on_the_cpu_loads(tmp_path):
    """Wav2Vec2 built under torch.device("meta") keeps ``masked_spec_embed`` on the CPU (``torch.Tensor(n)``
    ignores the device context): load traced it on the CPU inputs that parameter implied, met the meta
    weights, and refused with 'make the forward traceable' (survey 13)."""
    def build():
        return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=8, intermediate_size=128, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)).eval()

    torch.manual_seed(0)
    model, wav = build(), torch.randn(2, 680)
    small = graphprune.compile(model, (wav,), ratio=0.3, importance="l2")
    graphprune.save(small, tmp_path)
    with torch.device("meta"):
        original = build()
    assert any(not t.is_meta for t in original.parameters())
    back = graphprune.load(original, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(wav).last_hidden_state, small(wav).last_hidden_state)


def test_a_narrow_embedding_projected_up_gives_its_width_to_embedding_size():
    """ELECTRA and ALBERT embed at ``embedding_size`` and project up to ``hidden_size``: the pruned
    embedding's width was written into hidden_size, which the projection still had whole (survey 13)."""
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    model = transformers.ElectraModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l2")
    emb = small.get_input_embeddings().weight.shape[1]
    assert emb < 32 and small.config.embedding_size == emb
    assert small.config.hidden_size == small.embeddings_project.out_features


def test_deberta_v2_attention_comes_back_in_its_own_class():
    """DeBERTa-v2 names its projections query_proj and key_proj: its head count was not read, stayed 8
    over pruned projections, and the result came back as a graph without attention_mask (survey 13)."""
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, intermediate_size=128,
        max_position_embeddings=64)).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    small = graphprune.compile(model, (ids,), ratio=0.3, importance="l2")
    graph = graphprune.compile(model, (ids,), ratio=0.3, importance="l2", output="graph")
    assert small.report.form == "module", small.report.form_why
    assert small.encoder.layer[0].attention.self.num_attention_heads < 8
    with torch.no_grad():
        torch.testing.assert_close(small(ids).last_hidden_state, _out(graph(ids)), rtol=1e-5, atol=1e-5)
        assert small(ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape[-1] == 64


@pytest.mark.parametrize("share", [True, False], ids=["shared_keys", "own_position_projections"])
def test_deberta_v3_relative_attention_prunes_heads(share):
    """DeBERTa-v3's relative attention repeats its position heads over the batch (``repeat``, no rule then)
    and expands positions to ``query.size(0)``, which torch.export writes ``4 * s0`` with the head count
    a constant: the heads stayed whole. Now ``repeat`` has a rule and the size is read off the query at
    run time in the graph (``groups._size_twin``); heads go in both forms, exact at other sizes."""
    torch.manual_seed(0)
    model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        share_att_key=share, norm_rel_ebd="layer_norm", position_biased_input=False)).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    kill_units(model, (ids,), 0.25)
    for output in ("auto", "graph"):
        small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1", output=output)
        q = dict(small.named_parameters())["deberta.encoder.layer.0.attention.self.query_proj.weight"]
        assert q.shape[0] == 48, small.report.verify.blocked
        assert small.report.form == ("module" if output == "auto" else "graph"), small.report.form_why
        twin = dead_twin(model, small)
        for shape in [(2, 7), (3, 11), (1, 4)]:
            x = torch.randint(3, VOCAB, shape)
            with torch.no_grad():
                torch.testing.assert_close(_out(small(x)) if output == "auto" else small(x)[0], twin(x).logits,
                                           rtol=1e-5, atol=1e-5)


def test_a_hugging_face_model_pruned_twice_saves_and_loads(tmp_path):
    """The second step's module form read the first original's widths (the checkpoint's record), folded
    the RMSNorm widths twice and came back as a graph; saved, that graph loaded 16% off (survey 16). The
    module form now loads exactly; a graph pruned from a module form (norm widths already folded into the
    weights) is refused at save."""
    torch.manual_seed(0)
    model = _llama_cached().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    once = graphprune.compile(model, (ids,), ratio=0.25, importance="l2")
    twice = graphprune.compile(once, (ids,), ratio=0.25, importance="l2")
    assert twice.report.form == "module", twice.report.form_why
    graphprune.save(twice, tmp_path / "m")
    back = graphprune.load(_llama_cached(), tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, twice(ids).logits, rtol=0, atol=0)
    graph = graphprune.compile(once, (ids,), ratio=0.25, importance="l2", output="graph")
    with pytest.raises(graphprune.GraphpruneError, match="apply it twice"):
        graphprune.save(graph, tmp_path / "g")


def test_falcon_compiles_though_its_config_derives_head_dim():
    """FalconConfig's head_dim and num_key_value_heads are read-only properties: writing the pruned
    widths into the config raised AttributeError out of compile (survey 22), on both Falcon forms."""
    for kw in ({"new_decoder_architecture": True, "num_kv_heads": 2}, {}):
        cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **kw)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        ids = torch.randint(0, VOCAB, (2, 12))
        small = graphprune.compile(model, (ids,), ratio=0.5, importance="l2")
        assert small.report.form == "module"
        assert graphprune.count_params(small) < graphprune.count_params(model)
        with torch.no_grad():
            small(torch.randint(0, VOCAB, (3, 9)))


def test_save_pretrained_refuses_where_the_config_alone_builds_another_model(tmp_path):
    """Gemma scales its embeddings by the square root of hidden_size: from the pruned config,
    from_pretrained rebuilt the model with another scale, 3.5% off, without a word (survey 22).
    Such a result's save_pretrained refuses; graphprune.save and load rebuild it exactly."""
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    small = graphprune.compile(model, (ids,), ratio=0.5, importance="l2")
    assert small.report.form == "module"
    with pytest.raises(graphprune.GraphpruneError, match="graphprune.save"):
        small.save_pretrained(tmp_path / "hf")
    graphprune.save(small, tmp_path / "gp")
    with torch.device("meta"):
        original = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    back = graphprune.load(original, tmp_path / "gp")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)
    qwen = graphprune.compile(_qwen2(), (ids,), ratio=0.5, importance="l2")  # a config that does rebuild it: saves
    qwen.save_pretrained(tmp_path / "qwen")
    assert (tmp_path / "qwen" / "config.json").exists()


def test_a_round_to_query_heads_cannot_keep_is_said():
    """Query heads are removed in balance over their key/value heads, so round_to=5 on 8 heads over 4
    kept 6 heads without a word while every other group kept multiples of 5 (survey 24)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=344, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with pytest.warns(graphprune.GraphpruneWarning, match=r"round_to=5 does not hold on \d+ pruned dim\(s\) \(first: model\.layers\.\d\.self_attn\.\w_proj\.weight, .*query heads"):
        graphprune.compile(model, (ids,), target_params=0.5, round_to=5, importance="l2")


def test_a_model_pruned_in_steps_loads_though_its_rescaled_eps_rounds_otherwise(tmp_path):
    """Each step rescaled rms_norm_eps for the residual it pruned, and load rescales once for all: the two
    differ in the last digit (1.391304347826087e-06 against ...868e-06), and load refused the model as built
    from another config (survey 33 f08). Config floats compare to rounding; another eps is still refused."""
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=100)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    ids = torch.randint(2, 100, (2, 8))
    steps = graphprune.prune_iteratively(model, (ids,), target_flops=0.5, steps=2, importance="l1", progress=False)
    assert steps.config.hidden_size < 64
    graphprune.save(steps, tmp_path)
    back = graphprune.load(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, steps(ids).logits, rtol=0, atol=0)
    with pytest.raises(graphprune.GraphpruneError, match="config differs.*rms_norm_eps"):
        graphprune.load(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, rms_norm_eps=1.001e-6)), tmp_path)


def test_a_hugging_face_model_keeps_its_classes_where_its_forward_cannot_run_a_groups_pruning():
    """Survey 33 f04: OLMo came back as an fx graph, without generate(), because its LayerNorm
    without weights cannot take a pruned residual stream. The groups the model's own forward
    cannot run are kept whole, said in a warning, and the budget is met on the others; a budget
    that needs them, or output="graph", still prunes them in a graph."""
    torch.manual_seed(0)
    model = _olmo(layers=1).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.warns(graphprune.GraphpruneWarning, match="stays in the model's own classes"):
        small = graphprune.compile(model, (ids,), target_flops=0.5, importance="l1")
    assert small.report.form == "module" and type(small) is type(model) and 0.4 < small.report.flops <= 0.5
    assert small.model.norm.normalized_shape == model.model.norm.normalized_shape  # the stream whole
    assert small.model.layers[0].mlp.up_proj.out_features < 128
    twin = dead_twin(model, small)
    other = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        for x in (ids, other):
            ref = twin(x).logits
            torch.testing.assert_close(small(x).logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    prompt = ids[:1, :4]
    assert small.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist() == \
        _greedy_no_cache(small, prompt, 6).tolist()
    graph = graphprune.compile(model, (ids,), target_flops=0.5, importance="l1", output="graph")
    assert graph.report.form == "graph" and graphprune.count_params(graph) < graphprune.count_params(small)
    deep = graphprune.compile(model, (ids,), target_flops=0.15, importance="l1")  # out of reach with the stream whole
    assert deep.report.form == "graph" and deep.report.flops <= 0.15


def test_mamba_prunes_its_inner_channels():
    """Mamba's mixer (in_proj, a causal depthwise conv cut to the input's length, softplus time steps,
    a state of zeros as wide as the channels, out_proj): its inner channels, most of its weights, were
    held for want of rules for softplus, zeros and the slice, and only the residual width was pruned."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=4, expand=2,
                                   conv_kernel=4, pad_token_id=0)
    model = transformers.MambaForCausalLM(cfg).eval()
    small = graphprune.compile(model, (torch.randint(3, VOCAB, (2, 7)),), ratio=0.25, importance="l1")
    mixer = small.backbone.layers[0].mixer
    assert mixer.out_proj.in_features == 48 and mixer.in_proj.out_features == 2 * 48  # 64 inner channels, 48 kept
    other = torch.randint(3, VOCAB, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(small(other).logits, dead_twin(model, small)(other).logits)


def test_save_pretrained_of_a_config_transformers_refuses_points_to_save(tmp_path):
    """A residual pruned to 45 over 4 heads: transformers' own save_pretrained failed on its config's
    validation and left an empty folder (survey 48 F2); it now refuses as for any config that would not
    rebuild the model, naming graphprune.save, which saves it."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 12))
    small = graphprune.compile(model, (ids,), ratio=0.3)
    assert small.config.hidden_size % small.config.num_attention_heads  # what transformers refuses
    with pytest.raises(graphprune.GraphpruneError, match="cannot write this model's config.*graphprune.save"):
        small.save_pretrained(tmp_path / "hf")
    graphprune.save(small, tmp_path / "gp")
    back = graphprune.load(transformers.LlamaForCausalLM(cfg), tmp_path / "gp")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


@pytest.mark.parametrize("family", ["Helium", "Glm"])
def test_interleaved_rotary_embeddings_leave_heads_prunable(family):
    """Interleaved rotary embeddings slice the head dim with a step (``x[..., ::2]``, ``x[..., 1::2]``).
    The exported slice with a step was an unknown op, which held every dim of its input, the heads
    too: Helium and GLM pruned no query or key/value head where Llama prunes them (survey 50 F01).
    The step holds the sliced dim only, as the same slice in a symbolic trace does; the heads
    prune, the head dim stays, and the result is its dead twin."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                                   intermediate_size=128, max_position_embeddings=64,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    a = graphprune.analyze(model, (ids,))
    assert sum(g.part_of is not None for g in a.groups) == 2 and not any("step" in u for u in a.unsupported)
    small = graphprune.compile(model, (ids,), ratio=0.25, importance="l1")
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 48 and attn.o_proj.in_features == 48 and small.report.verify.status == "passed"
    twin = dead_twin(model, small)
    for x in (ids, torch.randint(3, VOCAB, (3, 11))):
        with torch.no_grad():
            torch.testing.assert_close(small(x).logits, twin(x).logits, rtol=1e-4, atol=1e-5)
