"""Traceable forwards for ``torch.nn`` modules whose own forward cannot be traced by fx.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (and the decoder side
and ``nn.Transformer`` through them) open with checks for their fused fast path that
branch on tensors (``src.dim()``, ``src.is_nested``), so fx could not trace them and
every model holding one went to ``torch.export``: its result a graph, never the
user's classes, and one that ignores ``.train()``. Past the checks each computes its
plain path: these functions are that path, which the tracer (``trace._RuledLeaves``)
runs in place of the module's forward. The fused kernel computes the same up to
rounding, which the trace check allows. A call that gives a mask keeps the module's
own forward (its mask canonicalisation reads the mask's dtype), and so goes to
torch.export as before; so does a subclass, whose forward may be its own.

Each function takes the module and its call's arguments, by the names the module's
forward gives them.
"""
from __future__ import annotations

import torch.nn as nn


def encoder_layer(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    if src_mask is not None or src_key_padding_mask is not None:
        return m.forward(src, src_mask, src_key_padding_mask, is_causal)
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None, is_causal=is_causal)
        x = x + m._ff_block(m.norm2(x))
    else:
        x = m.norm1(x + m._sa_block(x, None, None, is_causal=is_causal))
        x = m.norm2(x + m._ff_block(x))
    return x


def encoder(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if mask is not None or src_key_padding_mask is not None:
        return m.forward(src, mask, src_key_padding_mask, is_causal)
    out = src
    for layer in m.layers:  # with no mask, the encoder's causal detection gives is_causal is True
        out = layer(out, src_mask=None, is_causal=is_causal is True, src_key_padding_mask=None)
    return m.norm(out) if m.norm is not None else out


def decoder(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
            memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    masks = (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask)
    if any(k is not None for k in masks):
        return m.forward(tgt, memory, *masks, tgt_is_causal, memory_is_causal)
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_is_causal=tgt_is_causal is True, memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def transformer(m: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
    masks = (src_mask, tgt_mask, memory_mask, src_key_padding_mask, tgt_key_padding_mask, memory_key_padding_mask)
    if any(k is not None for k in masks):
        return m.forward(src, tgt, *masks, src_is_causal, tgt_is_causal, memory_is_causal)
    memory = m.encoder(src, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


# exact types: a subclass may have a forward of its own
STANDINS = {
    nn.TransformerEncoderLayer: encoder_layer,
    nn.TransformerEncoder: encoder,
    nn.TransformerDecoder: decoder,
    nn.Transformer: transformer,
}
