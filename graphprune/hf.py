"""Hugging Face models: inputs, per-layer attributes, configs and checkpoints.

A pruned Hugging Face model in module form is the user's own class (so
``generate()``, its KV cache and ``save_pretrained`` work; where its config
alone would rebuild another model, its ``save_pretrained`` refuses and says to
use ``graphprune.save``, ``guard_save_pretrained``) with every
attribute that states a width made true again:

* per-layer attention and MLP attributes (``num_key_value_groups``,
  ``num_heads``, ``split_size``...), one table row each, computed from the
  layer's own sliced projections;
* RMSNorms over a residual stream that lost channels keep their statistics
  over the original width by folding the width ratio into ``weight`` and
  ``eps`` (exact: the removed channels were zero in the dead twin);
* the config: ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
  ``num_key_value_heads`` and ``head_dim`` where every layer agrees, with the
  per-layer widths recorded in ``config.graphprune_layers`` where they differ.

Whether ``from_pretrained`` can rebuild the result from its config alone is
not assumed: ``from_config_alone`` builds the class from the new config on
``meta`` and compares every tensor shape.
"""
from __future__ import annotations

import copy
import inspect
import math

import torch

from .errors import first_line


def is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "to_dict")


def example_kwargs(model, kwargs: dict | None) -> dict | None:
    """``kwargs`` plus ``use_cache=False`` where ``model`` takes it: a language model
    returns its KV cache by default, which no graph output carries (graphs are
    traced on a config without it, see ``trace.without_cache``); the module form
    is compared with the graph on logits alone."""
    if not is_hf(model) or (kwargs and "use_cache" in kwargs):
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    # GraniteMoE's causal LM takes it through **kwargs, on to its decoder
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {**(kwargs or {}), "use_cache": False} if takes else kwargs


def _rows(mod) -> int | None:
    """Output width of a projection (nn.Linear or GPT-2's transposed Conv1D, or a wrapper
    holding exactly one of them, as Gemma 4's vision tower wraps ``q_proj.linear``)."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0]
    inner = [m for m in mod.modules() if m is not mod and isinstance(getattr(m, "weight", None), torch.Tensor)
             and m.weight.dim() == 2]
    return _rows(inner[0]) if len(inner) == 1 else None


def _child(mod, *names):
    for n in names:
        c = getattr(mod, n, None)
        if isinstance(c, torch.nn.Module):
            return c
    return None


def _heads(mod) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head_dim) of an attention module, from its projections."""
    head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
    if not head_dim:
        return None
    q = _child(mod, "q_proj", "query", "q", "query_proj")  # query_proj, key_proj: DeBERTa-v2
    k = _child(mod, "k_proj", "key", "k", "key_proj")
    if q is not None and k is not None:
        rq, rk = _rows(q), _rows(k)
        if rq is None or rk is None:
            return None
        return _read_heads(rq, rk, _child(mod, "v_proj", "value", "v", "value_proj"), _child(mod, *FUSED_OUT), head_dim)
    fused = _child(mod, *FUSED_QKV)  # GPT-2: q, k and v in one projection
    if fused is not None and not getattr(mod, "is_cross_attention", False) and _rows(fused) is not None:
        rows, inner = _rows(fused), _cols(_child(mod, *FUSED_OUT))
        if inner and inner % head_dim == 0 and (rows - inner) % (2 * head_dim) == 0:
            # the output projection reads the query heads; k and v share the rest (GPTBigCode's
            # multi-query attention fuses h query heads with one key/value head: rows/3 is no head count)
            return inner // head_dim, (rows - inner) // (2 * head_dim), head_dim
        h = rows // 3 // head_dim
        return h, h, head_dim
    return None


def _read_heads(rq: int, rk: int, v, out, head_dim: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) from the projections' widths. The output projection
    reads one value head's width per query head, so where a query head holds more rows than
    ``head_dim`` (Qwen3-Next's ``q_proj`` holds each head's query and its output gate) the count is
    the output's; ``rq // head_dim`` made it 12 of 6, and masked attention failed on it (survey 45 F1)."""
    kv = rk // head_dim
    rv, cols = (_rows(v) if v is not None else None), (_cols(out) if out is not None else None)
    if kv and rv and cols and rv % kv == 0 and cols % (rv // kv) == 0:
        h = cols // (rv // kv)                                   # value heads' width: rv / kv
        if h and rq % h == 0 and rq // h > head_dim and (rq // h) % head_dim == 0:
            return h, kv, head_dim
    return rq // head_dim, kv, head_dim


FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")  # GPT-2, Persimmon, CodeGen, MPT
FUSED_OUT = ("c_proj", "dense", "out_proj", "o_proj")  # the projection that reads the query heads back


def _cols(mod) -> int | None:
    """Input width of a projection (nn.Linear, or GPT-2's transposed Conv1D)."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return w.shape[0] if type(mod).__name__ == "Conv1D" else w.shape[1]


# attribute -> its value from (query heads, key/value heads, head_dim); set where a module has it
ATTENTION_ATTRS = {
    "num_heads": lambda h, kv, d: h,
    "num_attention_heads": lambda h, kv, d: h,
    "num_key_value_heads": lambda h, kv, d: kv,
    "num_key_value_groups": lambda h, kv, d: h // kv,
    "all_head_size": lambda h, kv, d: h * d,
    "split_size": lambda h, kv, d: h * d,
    "embed_dim": lambda h, kv, d: h * d,
    "kv_heads": lambda h, kv, d: kv,  # GPTBigCode
    "kv_dim": lambda h, kv, d: kv * d,
}

MLP_PROJ = ("up_proj", "gate_proj", "fc1", "c_fc", "dense_h_to_4h", "w1")


def _mlp_width(mod) -> int | None:
    """Hidden width of an MLP block (LlamaMLP, GPT2MLP, BertIntermediate...)."""
    name = type(mod).__name__
    proj = _child(mod, *MLP_PROJ) if name.endswith("MLP") else _child(mod, "dense") if name.endswith("Intermediate") else None
    return None if proj is None else _rows(proj)


def _experts_width(mod) -> int | None:
    """Intermediate width of fused MoE experts (Mixtral's ``experts``): ``down_proj`` is
    (E, H, I), or (E, I, H) where the module says ``is_transposed``."""
    w = getattr(mod, "down_proj", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return None
    return w.shape[1] if getattr(mod, "is_transposed", False) else w.shape[2]


def fix_module(mod: torch.nn.Module, original: dict) -> None:
    """Make one module's width attributes true to its sliced parameters.
    ``original``: parameter shapes of the unpruned module, by local name."""
    heads = _heads(mod)
    if heads is not None and heads[1] > 0:
        for attr, fn in ATTENTION_ATTRS.items():
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, fn(*heads))
    width = _mlp_width(mod)
    if width is not None and isinstance(getattr(mod, "intermediate_size", None), int):
        mod.intermediate_size = width
    experts = _experts_width(mod)
    if experts is not None and isinstance(getattr(mod, "intermediate_dim", None), int):
        mod.intermediate_dim = experts
    _fix_per_head_width(mod)
    fix_conv1d(mod)
    if type(mod).__name__.endswith("RMSNorm"):
        _fold_rms(mod, original.get("weight"))


def fix_conv1d(mod: torch.nn.Module) -> None:
    """transformers' Conv1D (GPT-2's layer) views its output to ``x.size()[:-1] + (self.nf,)``: its
    widths follow its weight, laid out (in, out)."""
    if type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "nf", None), int):
        mod.nx, mod.nf = mod.weight.shape


def _fix_per_head_width(mod) -> None:
    """T5-style attention (``n_heads`` x ``key_value_proj_dim``, views with -1 heads): where
    the head count stays (its relative position bias has one column per head), the
    pruned widths are inside the heads."""
    q = _child(mod, "q")
    if q is None or not isinstance(getattr(mod, "key_value_proj_dim", None), int) or not isinstance(getattr(mod, "n_heads", None), int):
        return
    bias = getattr(mod, "relative_attention_bias", None)
    heads = bias.weight.shape[1] if isinstance(bias, torch.nn.Embedding) else mod.n_heads
    inner = _rows(q)
    if inner % heads == 0:
        mod.n_heads, mod.key_value_proj_dim, mod.inner_dim = heads, inner // heads, inner


def _fold_rms(mod, full_shape) -> None:
    """y = x / sqrt(mean(x^2) + eps) * w over the kept H' of H channels equals the
    full-width result when w and eps absorb the width ratio (removed entries are 0):
    mean' = mean * H / H', so eps' = eps * H / H' and w' = w * sqrt(H / H')."""
    w = getattr(mod, "weight", None)
    if w is None or full_shape is None or w.dim() != 1 or w.shape[0] == full_shape[0]:
        return
    ratio = full_shape[0] / w.shape[0]
    attr = next((a for a in ("variance_epsilon", "eps", "epsilon") if isinstance(getattr(mod, a, None), float)), None)
    if attr is None:
        return
    offset = _weight_offset(mod, w)
    setattr(mod, attr, getattr(mod, attr) * ratio)
    # a new tensor: the old one may also be the pruned graph's
    scaled = (w.detach() + offset) * math.sqrt(ratio) - offset
    mod.weight = torch.nn.Parameter(scaled, requires_grad=w.requires_grad)


def _weight_offset(mod, w) -> float:
    """1.0 for norms that scale by ``(1 + w)`` (Gemma), 0.0 for ``w``: what the norm
    gives with its weight zeroed tells which."""
    probe = torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device)
    try:
        mod.weight = torch.nn.Parameter(torch.zeros_like(w), requires_grad=False)
        with torch.no_grad():
            return 1.0 if bool(mod(probe).abs().max() > 0) else 0.0
    except Exception:  # noqa: BLE001 - a norm that cannot run alone: assume the plain form (differs() checks)
        return 0.0
    finally:
        mod.weight = w


def layer_widths(model) -> list[dict]:
    """Per decoder/encoder layer: its attention heads and MLP width."""
    out = []
    for name, mod in model.named_modules():
        heads = _heads(mod)
        if heads is not None:
            out.append({"module": name, "num_attention_heads": heads[0], "num_key_value_heads": heads[1], "head_dim": heads[2]})
        width = _mlp_width(mod)
        if width is not None:
            out.append({"module": name, "intermediate_size": width})
        if _experts_width(mod) is not None:
            out.append({"module": name, "num_experts": mod.down_proj.shape[0]})
    return out


HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim")  # dim: DistilBERT's

# config field -> what sets it: the width every layer agrees on
CONFIG_FIELDS = {
    "num_attention_heads": "num_attention_heads", "n_head": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size", "n_inner": "intermediate_size",
    "head_dim": "head_dim",
    "num_local_experts": "num_experts", "num_experts": "num_experts", "n_routed_experts": "num_experts",
    "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",  # DistilBERT
    # encoder-decoders (BART, mBART, Pegasus, Marian, Whisper): set where encoder and decoder layers agree
    "encoder_attention_heads": "num_attention_heads", "decoder_attention_heads": "num_attention_heads",
    "encoder_ffn_dim": "intermediate_size", "decoder_ffn_dim": "intermediate_size",
}


def _stream_width(emb) -> int | None:
    """The residual width an input embedding writes: an embedding table's columns, a patch
    convolution's or a projection's output channels (CLIP's and SigLIP's vision towers give
    their patch conv: its ``weight.shape[1]`` is the 3 image channels, which became the
    pruned config's ``hidden_size``)."""
    w = getattr(emb, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    if isinstance(emb, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return w.shape[0]
    if isinstance(emb, (torch.nn.Embedding, torch.nn.EmbeddingBag)) or w.dim() == 2:
        return w.shape[1]
    return None


def _agreed(widths: list[dict]) -> dict:
    """{width key: value} for the keys every layer agrees on."""
    out = {}
    for key in set(CONFIG_FIELDS.values()):
        vals = {w[key] for w in widths if key in w}
        if len(vals) == 1:
            out[key] = vals.pop()
    return out


def _input_embeddings(model):
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # audio models (Wav2Vec2) take no token ids
        return None


def _writable(config, field: str) -> bool:
    """Whether ``config.field`` can be set: a property without a setter derives it from other
    fields (FalconConfig.head_dim), and the config then states it through them, or not at all
    (``from_config_alone`` says so, and ``graphprune.save`` writes ``pruned_config.json``)."""
    prop = getattr(type(config), field, None)
    return not isinstance(prop, property) or prop.fset is not None


def update_config(model, original_config, original=None) -> None:
    """Give ``model`` its own config with the pruned widths (the user's stays as it was).
    A config field is written only where, on the unpruned ``original``, it said what the
    layers say: ConvBERT's attention holds ``num_attention_heads // head_ratio`` heads,
    and its config was given the layers' 2 for 4 even at ratio 0."""
    config = copy.deepcopy(original_config)
    for mod in model.modules():  # every module that held the shared config gets the copy
        if mod.__dict__.get("config") is original_config:
            mod.config = config
    emb = _input_embeddings(model)
    hidden = _stream_width(emb)
    before = _stream_width(_input_embeddings(original)) if original is not None else None
    was = getattr(original_config.get_text_config(), "hidden_size", None)
    if hidden is not None and before is not None and was is not None and before != was:
        # the embedding is narrower than the stream and projected up (ALBERT, ELECTRA): its width is
        # embedding_size; hidden_size was given the embedding's pruned width
        if getattr(config, "embedding_size", None) == before:
            config.embedding_size = hidden
        hidden = None
    if hidden is not None:
        for f in HIDDEN_ATTRS:
            if isinstance(getattr(config, f, None), int) and f in config.to_dict() and _writable(config, f):
                setattr(config, f, hidden)
        for mod in model.modules():  # the residual width as layers store it (attention widths are _heads')
            if _heads(mod) is None:
                for f in HIDDEN_ATTRS:
                    if mod.__dict__.get(f) == was:
                        mod.__dict__[f] = hidden
    widths = layer_widths(model)
    agreed = _agreed(widths)
    before = _agreed(layer_widths(original)) if original is not None else {}
    for f, key in CONFIG_FIELDS.items():
        if key in before and isinstance(getattr(original_config, f, None), int) and getattr(original_config, f) != before[key]:
            continue  # the field counts something other than what the layers state
        if key in agreed and f in config.to_dict() or (f == "head_dim" and key in agreed and hasattr(config, "num_key_value_heads")):
            if _writable(config, f):  # Falcon's head_dim and num_key_value_heads are read-only, derived properties
                setattr(config, f, agreed[key])
    eps = {getattr(m, "variance_epsilon") for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")}
    if len(eps) == 1 and isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = eps.pop()
    if any(len({w[k] for w in widths if k in w}) > 1 for k in set(CONFIG_FIELDS.values())):
        config.graphprune_layers = widths  # layers differ: graphprune.load rebuilds them


def guard_save_pretrained(model) -> None:
    """A pruned model whose config alone does not rebuild it (``from_config_alone``: Gemma's
    embedding scale is the square root of the original width) gets a ``save_pretrained`` that
    refuses: the model's own would write a ``config.json`` that ``from_pretrained`` builds into
    another model without a word (3.5% off on a tiny Gemma). ``graphprune.save`` writes the
    directory so that ``from_pretrained`` refuses it and ``graphprune.load`` rebuilds it."""
    why = from_config_alone(model)
    if why is None:
        return
    name = type(model).__name__

    def save_pretrained(*args, **kwargs):
        from .errors import GraphpruneError

        what = ("cannot write this model's config" if why.startswith(REFUSED) else
                "would write a config that from_pretrained builds into another model")
        raise GraphpruneError(f"{name}.save_pretrained {what} ({why}): save with graphprune.save(model, path) and load "
                              "with graphprune.load(original, path)")

    model.save_pretrained = save_pretrained


REFUSED = "transformers refuses the pruned config"


def from_config_alone(model) -> str | None:
    """None if ``type(model)(model.config)`` has every tensor shape ``model`` has
    (so ``from_pretrained`` on a saved directory rebuilds it), else the first difference. A config
    transformers itself refuses to save (hidden size 45 over 4 heads) rebuilds nothing."""
    validate = getattr(model.config, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception as e:  # noqa: BLE001 - what the model's own save_pretrained would raise, from its config
        return f"{REFUSED} ({type(e).__name__}: {str(e).strip().splitlines()[-1].strip()[:160]})"
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as e:  # noqa: BLE001 - the config cannot build the class at all
        return f"the pruned config does not build {type(model).__name__} ({type(e).__name__}: {first_line(e)[:120]})"
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    for n, s in want.items():
        if got.get(n, s) != s:
            return f"{n} would be {got[n]}, not {s}: its layers differ in width"
    theirs = dict(fresh.named_modules())
    for name, mod in model.named_modules():
        other = theirs.get(name)
        if other is None or type(other) is not type(mod):
            return f"{name} is a {type(mod).__name__}, which the config alone does not build"
        for k, v in vars(mod).items():  # widths, scales, epsilons: what forward reads besides tensors
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_") and vars(other).get(k, v) != v:
                return f"{name}.{k} would be {vars(other).get(k)}, not {v}"
    return None
