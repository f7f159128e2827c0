"""Hugging Face models go through torch.export: lossless on dead channels, other batch and sequence sizes run."""
import pytest
import torch

import graphprune
from oracle import kill_units

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
