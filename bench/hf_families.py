"""Hugging Face families under the dead-channel oracle (issue 13, item 3).

Every family (37 first, 27 more from survey 50 in ``MORE``) is built from a tiny config with random weights (vocab 100,
hidden 64, 2 layers, intermediate 128, 8 query heads over 2 key/value heads
where the family has grouped-query attention, head_dim 8, 64 positions;
nothing downloads), put in ``eval()``, and then, in a fresh Python process per
family:

1. ``graphprune.analyze(model, (x,))``: how it was traced, the prunable groups,
   the unsupported ops (the first few);
2. ``kill_units(model, (x,), 0.25)`` from ``tests/oracle.py``: 25% of the units
   of every prunable group zeroed (query heads balanced over key/value heads);
3. ``small = graphprune.compile(model, (x,), ratio=0.25, importance="l1")``;
4. the reference output, on a copy (``oracle.reference``) of the killed model with
   the whole experts ``small`` removed deleted by hand (``oracle.without_experts``:
   a removed expert is one no token is routed to, which zeroed weights cannot say);
5. recorded: ok / the error (type and first line); the relative error of the
   main output (``logits``, else ``last_hidden_state``, else the first output)
   against the reference, ``max|small - ref| / max|ref|`` (lossless: <= 1e-4),
   also at a second input shape and for ``pooler_output`` where there is one;
   the error against the *dead twin* (the user's model with exactly what
   compile removed zeroed, its own forward) and the removed slices the oracle
   had not killed (``removed_alive``): together they tell an oracle miss from a
   pruning error; parameters kept; ``report.form``/``form_why``/``verify``;
   what was pruned (MLP channels, query heads, key/value heads, hidden size,
   experts), read from the kept indices of every shrunk parameter
   (``module_form.info(small)["kept"]``, original names in either form);
   for causal LMs in module form, whether ``generate()`` with its KV cache gives
   the greedy tokens of ``generate(use_cache=False)`` (8 new tokens from a 4-token
   prompt; the same logits processors run in both), the same check on the unpruned
   model as a control, and whether the pruned model decodes the unpruned model's tokens;
   seconds.

Inputs: token ids (2, 7) for text models (T5: positional ``(input_ids,
attention_mask, decoder_input_ids)``, the full encoder-decoder model), pixel
values (2, 3, 32, 32) for ViT and CLIP's vision tower, log-mel features
(2, 16, 32) for Whisper's encoder (``WhisperEncoder`` alone).

    nice -n 10 .venv/bin/python bench/hf_families.py                  # -> bench/results/hf_families.json
    nice -n 10 .venv/bin/python bench/hf_families.py --families llama t5 --out /tmp/x.json
    nice -n 10 .venv/bin/python bench/hf_families.py --resume         # skip families already in --out

Rows are written after every family. ``--table`` prints the markdown table of
an existing results file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "hf_families.json"

V, H, L, I, NH, NKV, D, P = 100, 64, 2, 128, 8, 2, 8, 64
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LOSSLESS = 1e-4


# ------------------------------------------------------------------ families

def _decoder(config: str, cls: str, **kw):
    import transformers as T

    base = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, num_key_value_heads=NKV,
                intermediate_size=I, max_position_embeddings=P, **TOK)
    return getattr(T, cls)(getattr(T, config)(**{**base, **kw}))


def _t(cls: str, config: str, **kw):
    import transformers as T

    return getattr(T, cls)(getattr(T, config)(**kw))


def _whisper_encoder():
    import transformers as T
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = T.WhisperConfig(vocab_size=V, d_model=H, encoder_layers=L, encoder_attention_heads=NH, encoder_ffn_dim=I,
                          decoder_layers=L, decoder_attention_heads=NH, decoder_ffn_dim=I, num_mel_bins=16,
                          max_source_positions=16, max_target_positions=P, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, decoder_start_token_id=1)
    return WhisperEncoder(cfg)


def _no_cache(model):
    """``use_cache=False`` in every config object of the tree: T5 gives its encoder and
    decoder stacks their own deep copies of the config."""
    for mod in model.modules():
        cfg = mod.__dict__.get("config")
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model


# name -> (builder, input kind, what it is); "causal": token ids and generate(); "text": token ids;
# "seq2seq": (ids, mask, decoder ids); "image": pixel values; "audio": log-mel features
FAMILIES = {
    "llama": (lambda: _decoder("LlamaConfig", "LlamaForCausalLM"), "causal", "LlamaForCausalLM, GQA 8/2"),
    "qwen2": (lambda: _decoder("Qwen2Config", "Qwen2ForCausalLM"), "causal", "Qwen2ForCausalLM, GQA 8/2, qkv bias"),
    "qwen3": (lambda: _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=D), "causal",
              "Qwen3ForCausalLM, GQA 8/2, per-head q_norm/k_norm"),
    "mistral": (lambda: _decoder("MistralConfig", "MistralForCausalLM", head_dim=D), "causal", "MistralForCausalLM, GQA 8/2"),
    "gemma": (lambda: _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=D), "causal",
              "GemmaForCausalLM, GQA 8/2, scaled embeddings, (1 + w) RMSNorm"),
    "gemma2": (lambda: _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=D, query_pre_attn_scalar=D, sliding_window=16),
               "causal", "Gemma2ForCausalLM, GQA 8/2, sandwich norms, softcapping, sliding window"),
    "gemma3": (lambda: _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=D, query_pre_attn_scalar=D, sliding_window=16),
               "causal", "Gemma3ForCausalLM (text), GQA 8/2, per-head q_norm/k_norm, sliding/global layers"),
    "phi3": (lambda: _decoder("Phi3Config", "Phi3ForCausalLM"), "causal", "Phi3ForCausalLM, GQA 8/2, fused qkv_proj and gate_up_proj"),
    "opt": (lambda: _t("OPTForCausalLM", "OPTConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                       ffn_dim=I, word_embed_proj_dim=H, max_position_embeddings=P, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2), "causal", "OPTForCausalLM, MHA 8, learned positions"),
    "falcon": (lambda: _t("FalconForCausalLM", "FalconConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                          num_attention_heads=NH, num_kv_heads=NKV, new_decoder_architecture=True, ffn_hidden_size=I,
                          max_position_embeddings=P, **TOK), "causal",
               "FalconForCausalLM, new decoder architecture, GQA 8/2 in one fused query_key_value"),
    "gpt2": (lambda: _t("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_inner=I, n_positions=P,
                        bos_token_id=0, eos_token_id=0), "causal", "GPT2LMHeadModel, MHA 8, Conv1D c_attn"),
    "gpt_neox": (lambda: _t("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                            num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P, **TOK), "causal",
                 "GPTNeoXForCausalLM, MHA 8, per-head interleaved query_key_value, parallel residual"),
    "bert": (lambda: _t("BertModel", "BertConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                        intermediate_size=I, max_position_embeddings=P), "text", "BertModel, MHA 8, post-norm"),
    "roberta": (lambda: _t("RobertaModel", "RobertaConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                           num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P, pad_token_id=1),
                "text", "RobertaModel, MHA 8, post-norm"),
    "t5": (lambda: _t("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=H, d_kv=D, d_ff=I, num_layers=L,
                      num_decoder_layers=L, num_heads=NH, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           "seq2seq", "T5ForConditionalGeneration (full encoder-decoder), MHA 8, relative position bias"),
    "t5_no_cache": (lambda: _no_cache(FAMILIES["t5"][0]()), "seq2seq",
                    "the same T5ForConditionalGeneration with use_cache=False in every config of its tree (a workaround)"),
    "t5_encoder": (lambda: _t("T5EncoderModel", "T5Config", vocab_size=V, d_model=H, d_kv=D, d_ff=I, num_layers=L, num_heads=NH,
                              pad_token_id=0, eos_token_id=1), "text", "T5EncoderModel, MHA 8, relative position bias"),
    "vit": (lambda: _t("ViTModel", "ViTConfig", image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=L,
                       num_attention_heads=NH, intermediate_size=I), "image", "ViTModel, MHA 8, pooler"),
    "clip_vision": (lambda: _t("CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=8, hidden_size=H,
                               num_hidden_layers=L, num_attention_heads=NH, intermediate_size=I), "image",
                    "CLIPVisionModel, MHA 8, pre/post LayerNorm"),
    "whisper_encoder": (_whisper_encoder, "audio", "WhisperEncoder, MHA 8, conv front end"),
    "mixtral": (lambda: _decoder("MixtralConfig", "MixtralForCausalLM", head_dim=D, num_local_experts=4, num_experts_per_tok=2),
                "causal", "MixtralForCausalLM, GQA 8/2, 4 experts top-2 (fused 3-D expert weights)"),
    "qwen2_moe": (lambda: _decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=I, shared_expert_intermediate_size=I, decoder_sparse_step=1),
                  "causal", "Qwen2MoeForCausalLM, GQA 8/2, 4 experts top-2 plus a gated shared expert"),
    "olmoe": (lambda: _decoder("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2), "causal",
              "OlmoeForCausalLM, GQA 8/2, 4 experts top-2, q_norm/k_norm over whole projections"),
    "qwen3_moe": (lambda: _decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=D, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=I, decoder_sparse_step=1), "causal",
                  "Qwen3MoeForCausalLM, GQA 8/2, 4 experts top-2, per-head q_norm/k_norm"),
    "gpt_oss": (lambda: _decoder("GptOssConfig", "GptOssForCausalLM", head_dim=D, num_local_experts=4, num_experts_per_tok=2,
                                 sliding_window=16, layer_types=["sliding_attention", "full_attention"]), "causal",
                "GptOssForCausalLM, GQA 8/2, 4 experts top-2: router bias, top-k of logits then softmax, expert biases, sinks"),
    "deepseek_v3": (lambda: _decoder("DeepseekV3Config", "DeepseekV3ForCausalLM", n_routed_experts=4, num_experts_per_tok=2,
                                     n_group=1, topk_group=1, moe_intermediate_size=I, first_k_dense_replace=0,
                                     q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=D,
                                     num_key_value_heads=NH), "causal",
                    "DeepseekV3ForCausalLM, MLA, 4 routed experts top-2 (sigmoid scores, correction bias) plus a shared expert"),
    "granitemoe": (lambda: _decoder("GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=4, num_experts_per_tok=2),
                   "causal", "GraniteMoeForCausalLM, GQA 8/2, 4 experts top-2 (its own parallel-experts layer)"),
    "phi": (lambda: _decoder("PhiConfig", "PhiForCausalLM"), "causal", "PhiForCausalLM, GQA 8/2, parallel block, partial rotary"),
    "olmo2": (lambda: _decoder("Olmo2Config", "Olmo2ForCausalLM"), "causal",
              "Olmo2ForCausalLM, GQA 8/2, q_norm/k_norm over whole projections, post-norms"),
    "granite": (lambda: _decoder("GraniteConfig", "GraniteForCausalLM"), "causal", "GraniteForCausalLM, GQA 8/2, multipliers"),
    "stablelm": (lambda: _decoder("StableLmConfig", "StableLmForCausalLM"), "causal",
                 "StableLmForCausalLM, GQA 8/2, LayerNorm, partial rotary"),
    "smollm3": (lambda: _decoder("SmolLM3Config", "SmolLM3ForCausalLM"), "causal", "SmolLM3ForCausalLM, GQA 8/2, NoPE layers"),
    "gptj": (lambda: _t("GPTJForCausalLM", "GPTJConfig", vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_inner=I,
                        n_positions=P, rotary_dim=4, bos_token_id=0, eos_token_id=0), "causal",
             "GPTJForCausalLM, MHA 8, parallel block"),
    "bloom": (lambda: _t("BloomForCausalLM", "BloomConfig", vocab_size=V, hidden_size=H, n_layer=L, n_head=NH, **TOK),
              "causal", "BloomForCausalLM, MHA 8, ALiBi, interleaved query_key_value (MLP 256)"),
    "qwen3_next": (lambda: _decoder("Qwen3NextConfig", "Qwen3NextForCausalLM", head_dim=D, mlp_only_layers=[0, 1],
                                    layer_types=["full_attention"] * L), "causal",
                   "Qwen3NextForCausalLM (full-attention layers), GQA 8/2, q_proj holds a gate per head"),
    "mamba": (lambda: _t("MambaForCausalLM", "MambaConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L, state_size=8,
                         expand=2, conv_kernel=4, **TOK), "causal",
              "MambaForCausalLM, selective state space, causal depthwise conv (inner 128)"),
    "falcon_mamba": (lambda: _t("FalconMambaForCausalLM", "FalconMambaConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                state_size=8, expand=2, conv_kernel=4, **TOK), "causal",
                     "FalconMambaForCausalLM, Mamba with RMS-normed B, C and time steps (inner 128)"),
}


def _jamba():
    import transformers as T
    cfg = T.JambaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, num_key_value_heads=NKV,
                        intermediate_size=I, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
                        mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False, max_position_embeddings=P, **TOK)
    return T.JambaForCausalLM(cfg)


def _recurrent_gemma():
    import transformers as T
    cfg = T.RecurrentGemmaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                 num_key_value_heads=NKV, intermediate_size=I, lru_width=H, attention_window_size=16,
                                 block_types=["recurrent", "attention"], conv1d_width=4, **TOK)
    return T.RecurrentGemmaForCausalLM(cfg)


def _llama4():
    import transformers as T
    cfg = T.Llama4TextConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                             num_key_value_heads=NKV, head_dim=D, intermediate_size=I, intermediate_size_mlp=I,
                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                             max_position_embeddings=P, attention_chunk_size=16, **TOK)
    return T.Llama4ForCausalLM(cfg)


def _zamba2():
    import transformers as T
    cfg = T.Zamba2Config(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, num_key_value_heads=NH,
                         intermediate_size=I, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1,
                         mamba_headdim=16, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"], num_mem_blocks=1,
                         use_shared_attention_adapter=False, adapter_rank=8, use_mem_rope=False,
                         max_position_embeddings=P, **TOK)
    return T.Zamba2ForCausalLM(cfg)


BART = dict(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=NH,
            decoder_attention_heads=NH, encoder_ffn_dim=I, decoder_ffn_dim=I, max_position_embeddings=P,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

# survey 50: families written after the first 37, run once as they are (2026-12-07)
MORE = {
    "fnet": (lambda: _t("FNetForMaskedLM", "FNetConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L, intermediate_size=I,
                        max_position_embeddings=P, use_tpu_fourier_optimizations=False, pad_token_id=0), "text",
             "FNetForMaskedLM, 2-D FFT token mixing over (seq, hidden)"),
    "albert": (lambda: _t("AlbertForMaskedLM", "AlbertConfig", vocab_size=V, embedding_size=32, hidden_size=H,
                          num_hidden_layers=L, num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P,
                          pad_token_id=0), "text", "AlbertForMaskedLM, one layer shared across depth, embedding 32"),
    "mobilebert": (lambda: _t("MobileBertForMaskedLM", "MobileBertConfig", vocab_size=V, hidden_size=H, embedding_size=32,
                              true_hidden_size=32, intra_bottleneck_size=32, num_hidden_layers=L, num_attention_heads=NH,
                              intermediate_size=I, num_feedforward_networks=2, max_position_embeddings=P, pad_token_id=0),
                   "text", "MobileBertForMaskedLM, bottlenecks, NoNorm, stacked FFNs, decoder = [emb^T ; dense]"),
    "codegen": (lambda: _t("CodeGenForCausalLM", "CodeGenConfig", vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_inner=I,
                           n_positions=P, rotary_dim=4, bos_token_id=0, eos_token_id=0), "causal",
                "CodeGenForCausalLM, MHA 8, qkv_proj split mp_num=4, parallel block"),
    "deberta_v2": (lambda: _t("DebertaV2ForMaskedLM", "DebertaV2Config", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                              num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P, relative_attention=True,
                              pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=32, pad_token_id=0),
                   "text", "DebertaV2ForMaskedLM, disentangled attention, relative position buckets"),
    "cohere": (lambda: _decoder("CohereConfig", "CohereForCausalLM", head_dim=D), "causal",
               "CohereForCausalLM, GQA 8/2, parallel block, bias-free LayerNorm, logit_scale"),
    "cohere_qknorm": (lambda: _decoder("CohereConfig", "CohereForCausalLM", head_dim=D, use_qk_norm=True), "causal",
                      "CohereForCausalLM, use_qk_norm: per-head LayerNorm weights (heads, head_dim)"),
    "persimmon": (lambda: _t("PersimmonForCausalLM", "PersimmonConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                             num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P, qk_layernorm=True,
                             partial_rotary_factor=0.5, **TOK), "causal",
                  "PersimmonForCausalLM, MHA 8, fused query_key_value, qk LayerNorm over head_dim, relu2"),
    "mpt": (lambda: _t("MptForCausalLM", "MptConfig", vocab_size=V, d_model=H, n_heads=NH, n_layers=L, expansion_ratio=2,
                       max_seq_len=P, pad_token_id=0, bos_token_id=1, eos_token_id=2), "causal",
            "MptForCausalLM, MHA 8, ALiBi, fused Wqkv, no biases"),
    "swin": (lambda: _t("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                        num_heads=[2, 4], window_size=4, num_labels=10), "image",
             "SwinForImageClassification, window attention, patch merging, relative position bias table"),
    "convnext": (lambda: _t("ConvNextModel", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4,
                            image_size=32), "image", "ConvNextModel, depthwise 7x7, channels-last LayerNorm, layer scale"),
    "dinov2": (lambda: _t("Dinov2Model", "Dinov2Config", image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=L,
                          num_attention_heads=NH, mlp_ratio=2), "image", "Dinov2Model, layer scale, interpolated positions"),
    "modernbert": (lambda: _t("ModernBertForMaskedLM", "ModernBertConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                              num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P,
                              global_attn_every_n_layers=2, local_attention=16, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2), "text",
                   "ModernBertForMaskedLM, fused Wqkv, GLU Wi (chunk), local/global attention"),
    "bart": (lambda: _t("BartForConditionalGeneration", "BartConfig", **BART), "seq2seq",
             "BartForConditionalGeneration (full encoder-decoder), MHA 8, learned positions offset 2"),
    "nemotron": (lambda: _decoder("NemotronConfig", "NemotronForCausalLM", head_dim=D), "causal",
                 "NemotronForCausalLM, GQA 8/2, relu2 up/down MLP, LayerNorm1p, partial rotary"),
    "starcoder2": (lambda: _decoder("Starcoder2Config", "Starcoder2ForCausalLM"), "causal",
                   "Starcoder2ForCausalLM, GQA 8/2, c_fc/c_proj MLP, LayerNorm, biases"),
    "glm": (lambda: _decoder("GlmConfig", "GlmForCausalLM", head_dim=D), "causal",
            "GlmForCausalLM, GQA 8/2, fused gate_up_proj, interleaved partial rotary"),
    "distilbert": (lambda: _t("DistilBertForMaskedLM", "DistilBertConfig", vocab_size=V, dim=H, n_layers=L, n_heads=NH,
                              hidden_dim=I, max_position_embeddings=P, pad_token_id=0), "text",
                   "DistilBertForMaskedLM, MHA 8"),
    "electra": (lambda: _t("ElectraForMaskedLM", "ElectraConfig", vocab_size=V, embedding_size=32, hidden_size=H,
                           num_hidden_layers=L, num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P,
                           pad_token_id=0), "text", "ElectraForMaskedLM, embeddings_project 32->64"),
    "biogpt": (lambda: _t("BioGptForCausalLM", "BioGptConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                          num_attention_heads=NH, intermediate_size=I, max_position_embeddings=P, **TOK), "causal",
               "BioGptForCausalLM, MHA 8, scaled embeddings, learned positions"),
    "xglm": (lambda: _t("XGLMForCausalLM", "XGLMConfig", vocab_size=V, d_model=H, num_layers=L, attention_heads=NH,
                        ffn_dim=I, max_position_embeddings=P, **TOK), "causal", "XGLMForCausalLM, sinusoidal positions"),
    "helium": (lambda: _decoder("HeliumConfig", "HeliumForCausalLM", head_dim=D), "causal", "HeliumForCausalLM, GQA 8/2"),
    "jamba": (_jamba, "causal", "JambaForCausalLM, mamba layer + attention layer with 4 experts top-2"),
    "recurrent_gemma": (_recurrent_gemma, "causal", "RecurrentGemmaForCausalLM, RG-LRU block + local attention block"),
    "pegasus": (lambda: _t("PegasusForConditionalGeneration", "PegasusConfig", **BART), "seq2seq",
                "PegasusForConditionalGeneration, sinusoidal positions, pre-norm"),
    "llama4": (_llama4, "causal", "Llama4ForCausalLM (text), 4 experts top-1 + shared expert, chunked attention"),
    "zamba2": (_zamba2, "causal", "Zamba2ForCausalLM, mamba2 + shared transformer block"),
}
FAMILIES.update(MORE)


def inputs(kind: str, batch: int = 2, seq: int = 7) -> tuple:
    import torch

    g = torch.Generator().manual_seed(batch * 100 + seq)
    if kind == "image":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    if kind == "audio":
        return (torch.randn(batch, 16, 32, generator=g),)  # 2 * max_source_positions frames, fixed
    ids = torch.randint(3, V, (batch, seq), generator=g)
    if kind == "seq2seq":
        return ids, torch.ones_like(ids), torch.randint(3, V, (batch, max(seq - 2, 2)), generator=g)
    return (ids,)


# ------------------------------------------------------------------ one family, in its own process

def _short(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:240] if text else ''}"


def _op(unsupported: str) -> str:
    """The op of one ``analyze(...).unsupported`` line ("node: no rule for OP" or "node: why")."""
    why = unsupported.split(": ", 1)[-1]
    return why.split("no rule for ", 1)[-1].replace("torch._ops.aten.aten::", "aten.")[:80]


def _main_output(o):
    import torch

    if isinstance(o, torch.Tensor):
        return o
    for k in ("logits", "last_hidden_state"):
        t = getattr(o, k, None) if not isinstance(o, dict) else o.get(k)
        if isinstance(t, torch.Tensor):
            return t
    return o[0]


def _pooler(o):
    return getattr(o, "pooler_output", None) if not isinstance(o, dict) else o.get("pooler_output")


def rel_err(got, ref) -> float:
    import torch

    if got.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (got.float() - ref.float()).abs().max().item() / scale


def _out_axis(mod) -> tuple[int, int]:
    """(output axis, input axis) of a 2-D projection weight (GPT-2's Conv1D is transposed)."""
    return (1, 0) if type(mod).__name__ == "Conv1D" else (0, 1)


ATTN_OUT = re.compile(r"(o_proj|out_proj|attention\.output\.dense|self_attn\.dense|self_attention\.dense|attention\.dense"
                      r"|Attention\.o|attn\.c_proj)\.weight$")
KEY = re.compile(r"(k_proj|self\.key|Attention\.k)\.weight$")
FUSED_QKV = re.compile(r"(qkv_proj|query_key_value|c_attn)\.weight$")
UP = re.compile(r"(?<!shared_expert\.)(up_proj|fc1|c_fc|fc_in|dense_h_to_4h|intermediate\.dense|DenseReluDense\.wi|gate_up_proj)\.weight$")
SHARED_UP = re.compile(r"shared_expert\.up_proj\.weight$")
SSM_OUT = re.compile(r"(mixer|mamba)\.out_proj\.weight$")  # Mamba (Jamba: .mamba): the out projection reads the inner channels
EXPERTS = re.compile(r"experts\.gate_up_proj$")


def pruned_kinds(model, info: dict) -> tuple[dict, dict]:
    """What was pruned, read from the shapes: {kind: "before -> after per layer"} for
    the kinds that shrank, and every shrunk parameter as {name: [axis, before, after]}."""
    import numpy as np

    index = {(n, a): np.asarray(v, dtype=np.int64) for (n, a), v in info["kept"].items()}
    kept = {k: len(v) for k, v in index.items()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    mods = dict(model.named_modules())
    shrunk = {}
    for (n, a), k in sorted(kept.items()):
        if n in shapes and k < shapes[n][a]:
            shrunk.setdefault(n, []).append([a, shapes[n][a], k])

    def width(name, axis):
        return kept.get((name, axis), shapes[name][axis])

    found: dict = {}

    def add(kind, before, after):
        found.setdefault(kind, [before, []])[1].append(after)

    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n_heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "attention_head_size", None) or (
        cfg.hidden_size // n_heads if isinstance(n_heads, int) and hasattr(cfg, "hidden_size") else D)
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else D

    def heads(name, axis, kind_heads, kind_dim):
        """Whole heads (blocks of head_dim, the config's) kept, and channels kept inside each kept head."""
        D = head_dim
        total = shapes[name][axis]
        idx = index.get((name, axis), np.arange(total))
        counts = np.bincount(idx // D, minlength=total // D)
        add(kind_heads, total // D, int((counts > 0).sum()))
        for c in sorted(set(counts[counts > 0].tolist())):
            add(kind_dim, D, c)

    for name, shape in shapes.items():
        mod = mods.get(name.rsplit(".", 1)[0])
        out_ax, in_ax = _out_axis(mod) if len(shape) == 2 else (0, 1)
        if SSM_OUT.search(name) and len(shape) == 2:
            add("SSM inner channels", shape[in_ax], width(name, in_ax))
        elif ATTN_OUT.search(name) and len(shape) == 2:
            heads(name, in_ax, "query heads", "value head_dim")
            q_kept = width(name, in_ax)
            fused = next((n for n in shapes if FUSED_QKV.search(n) and n.rsplit(".", 2)[0] == name.rsplit(".", 2)[0]), None)
            if fused is not None:  # (rows kept - query rows kept) / 2 are key/value rows
                f_out = _out_axis(mods.get(fused.rsplit(".", 1)[0]))[0]
                add("key/value heads", (shapes[fused][f_out] - shape[in_ax]) // (2 * D),
                    (width(fused, f_out) - q_kept) // (2 * D))
        elif KEY.search(name) and len(shape) == 2:
            heads(name, out_ax, "key/value heads", "query/key head_dim")
        elif EXPERTS.search(name):
            add("experts", shape[0], width(name, 0))
            add("expert MLP channels", shape[1] // 2, width(name, 1) // 2)
        elif SHARED_UP.search(name):
            add("shared-expert MLP channels", shape[out_ax], width(name, out_ax))
        elif UP.search(name) and len(shape) == 2:
            f = 2 if name.endswith("gate_up_proj.weight") else 1
            add("MLP channels", shape[out_ax] // f, width(name, out_ax) // f)
        elif ("Norm" in type(mod).__name__ and name.endswith(".weight") and len(shape) == 1 and shape[0] == H
              and not re.search(r"[qk]_norm", name)):
            add("hidden size", H, width(name, 0))
    kinds = {}
    for kind, (before, after) in found.items():
        if any(x != before for x in after):
            vals = sorted(set(after))
            kinds[kind] = f"{before} -> {'/'.join(map(str, vals))}"
    if shrunk and not kinds:  # parameters shrank where no name pattern above reads them (ConvNeXt's stages)
        kinds["other"] = f"{len(shrunk)} parameters shrunk"
    return kinds, shrunk


def generate_check(model, kind: str, prompt) -> dict:
    """generate() with its cache against generate() without one: (ok, tokens). Both run the same
    logits processors (a config's forced end token, an end token banned by ``min_new_tokens``), so
    only the cache can tell them apart; a hand-written argmax loop beside them gave false alarms on
    Jamba, BART and Pegasus (survey 50)."""
    import torch

    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(prompt, use_cache=True, **kw)
        ref = model.generate(prompt, use_cache=False, **kw)
    n = min(out.shape[1], ref.shape[1])
    return {"ok": out.tolist() == ref.tolist(), "tokens": out.tolist(), "no_cache": ref.tolist()} if n else {"ok": False}


def run_family(name: str, threads: int) -> dict:
    import torch

    import graphprune
    from graphprune import module_form
    sys.path.insert(0, str(ROOT / "tests"))
    from oracle import dead_twin, kill_units, reference, removed_alive, without_experts

    torch.set_num_threads(threads)
    build, kind, what = FAMILIES[name]
    rec: dict = {"family": name, "what": what, "kind": kind}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = build().eval()
    except Exception as e:  # noqa: BLE001
        return {**rec, "ok": False, "stage": "build", "error": _short(e), "seconds": round(time.perf_counter() - t0, 1)}
    rec["class"] = type(model).__name__
    x = inputs(kind)
    rec["inputs"] = [list(t.shape) for t in x]
    stage = "analyze"
    try:
        a = graphprune.analyze(model, x)
        rec["analysis"] = {"method": a.method, "groups": len(a.groups), "blocked": len(a.blocked),
                           "unsupported_count": len(a.unsupported), "unsupported": [u[:200] for u in a.unsupported[:4]],
                           "unsupported_ops": sorted({_op(u) for u in a.unsupported}),
                           "gqa_groups": sum(g.part_of is not None for g in a.groups),
                           "blocked_with_params": [{"reasons": sorted(set(b.reasons))[:4], "params": b.params[:3],
                                                    "n_params": len(b.params)} for b in a.blocked][:12],
                           "seconds": round(time.perf_counter() - t0, 1)}
        del a
        stage = "kill_units"
        rec["killed_groups"] = kill_units(model, x, 0.25)
        other = inputs(kind, 3, 11)
        stage = "compile"
        t1 = time.perf_counter()
        small = graphprune.compile(model, x, ratio=0.25, importance="l1")
        rec["compile_seconds"] = round(time.perf_counter() - t1, 1)
        stage = "reference"  # whole experts removed are deleted from the reference by hand (zeros cannot say it)
        dead = without_experts(model, small)
        ref, ref_other = reference(dead, *x), reference(dead, *other)
        del dead
        rep = small.report
        rec.update(form=rep.form, form_why=rep.form_why, verify=str(rep.verify),
                   verify_status=getattr(rep.verify, "status", None), verify_blocked=list(getattr(rep.verify, "blocked", [])))
        rec["params_kept"] = round(graphprune.count_params(small) / graphprune.count_params(model), 4)
        rec["groups_pruned"] = sum(1 for b, k in rep.widths.values() if k < b)
        info = module_form.info(small)
        rec["method"] = info.get("method")
        rec["pruned"], rec["shrunk_params"] = pruned_kinds(model, info)
        stage = "run"
        with torch.no_grad():
            out = small(*x)
        rec["rel_err"] = rel_err(_main_output(out), _main_output(ref))
        if _pooler(ref) is not None and _pooler(out) is not None:
            rec["rel_err_pooler"] = rel_err(_pooler(out), _pooler(ref))
        try:
            with torch.no_grad():
                rec["rel_err_other_shape"] = rel_err(_main_output(small(*other)), _main_output(ref_other))
            rec["other_shape"] = [list(t.shape) for t in other]
        except Exception as e:  # noqa: BLE001
            rec["rel_err_other_shape"] = None
            rec["other_shape_error"] = _short(e)
        stage = "twin"
        twin = dead_twin(model, small)
        with torch.no_grad():
            rec["twin_err"] = rel_err(_main_output(out), _main_output(twin(*x)))
        rec["removed_alive"] = removed_alive(model, small)[:6]
        del twin
        rec["lossless"] = rec["rel_err"] <= LOSSLESS
        if kind in ("causal", "seq2seq"):
            stage = "generate"
            if rep.form != "module" or not hasattr(small, "generate"):
                rec["generate"] = {"ok": None, "why": "graph form: no generate()"}
            else:
                prompt = x[0][:1, :4]
                try:
                    g = generate_check(small, kind, prompt)
                    control = generate_check(model, kind, prompt)
                    rec["generate"] = {"ok": g["ok"], "tokens": g.get("tokens"), "no_cache": g.get("no_cache"),
                                       "original_ok": control["ok"],
                                       "same_as_original": g.get("tokens") == control.get("tokens")}
                except Exception as e:  # noqa: BLE001
                    rec["generate"] = {"ok": False, "error": _short(e)}
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, stage=stage, error=_short(e))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# ------------------------------------------------------------------ driver

def _git() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_library": git("status", "--short", "graphprune").splitlines()}


def table(rows: list[dict]) -> str:
    def gen(r):
        g = r.get("generate")
        if g is None:
            return "n/a"
        if g.get("ok") is None:
            return "n/a (graph)"
        if "error" in g:
            return "error"
        ok = "yes" if g["ok"] else "**no**"
        return ok if g.get("original_ok", True) else f"{ok} (original: {'yes' if g['original_ok'] else 'no'})"

    def num(v):
        return "" if v is None else f"{v:.1e}"

    lines = ["| family | lossless (rel. err) | other shape | form | generate = no-cache decode | params kept | pruned | groups | unsupported ops | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("analysis", {})
        if not r.get("ok"):
            lines.append(f"| {r['family']} | **error** at {r.get('stage')}: `{r.get('error', '')[:90]}` | | | | | | "
                         f"{a.get('groups', '')} | {a.get('unsupported_count', '')} | {r.get('seconds')} |")
            continue
        loss = f"yes ({num(r['rel_err'])})" if r["lossless"] else f"**no** ({num(r['rel_err'])}, twin {num(r.get('twin_err'))})"
        kinds = dict(r.get("pruned", {}))
        if kinds.get("query heads") and kinds.get("query heads") == kinds.get("key/value heads"):
            kinds = {("heads" if k == "query heads" else k): v for k, v in kinds.items() if k != "key/value heads"}
        pruned = "; ".join(f"{k} {v}" for k, v in kinds.items()) or "nothing"
        lines.append(f"| {r['family']} | {loss} | {num(r.get('rel_err_other_shape'))} | {r['form']} | {gen(r)} | {r['params_kept']:.3f} | "
                     f"{pruned} | {a.get('groups')} | {a.get('unsupported_count')} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per family")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.worker_out.write_text(json.dumps(run_family(args.worker, args.threads), default=str))
        return
    if args.table:
        print(table(json.loads(args.out.read_text())["families"]))
        return
    import torch
    import transformers

    # rows of families not run this time stay: a --families subset replaces only its own rows
    # (a MoE-only rerun once overwrote the other 27 families' results)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"families": []}
    done = {r["family"] for r in doc["families"]} if args.resume else set()
    doc.update(transformers=transformers.__version__, torch=torch.__version__, git=_git(),
               command="nice -n 10 .venv/bin/python bench/hf_families.py", ratio=0.25, importance="l1",
               lossless_if_rel_err_at_most=LOSSLESS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.families:
        if name in done:
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "row.json"
            cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(path), "--threads", str(args.threads)]
            try:
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                                   env=dict(os.environ))
                row = json.loads(path.read_text()) if path.exists() else {
                    "family": name, "ok": False, "stage": "process", "error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                row = {"family": name, "ok": False, "stage": "process", "error": f"timed out after {args.timeout}s"}
        row.setdefault("seconds", round(time.perf_counter() - t0, 1))
        doc["families"] = [r for r in doc["families"] if r["family"] != name] + [row]
        order = list(FAMILIES)
        doc["families"].sort(key=lambda r: order.index(r["family"]) if r["family"] in order else len(order))
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        status = ("lossless" if row.get("lossless") else f"rel_err {row.get('rel_err')}") if row.get("ok") else row.get("error")
        print(f"{name:16s} {row.get('form', '-'):6s} {status}  ({row['seconds']}s)", flush=True)
    print(table(doc["families"]))


if __name__ == "__main__":
    main()
