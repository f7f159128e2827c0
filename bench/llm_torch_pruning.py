"""The Torch-Pruning side of the side-by-side LLM benchmark.

``prune(model, batches, keep, method)`` shrinks a Hugging Face LLaMA-family causal
LM (SmolLM2-135M and friends, grouped-query attention included) with
Torch-Pruning's DepGraph ``MetaPruner``, set up the way Torch-Pruning's own LLM
example (``examples/LLMs/prune_llm.py``) sets it up:

* ``num_heads`` maps ``q_proj`` to ``num_attention_heads`` and ``k_proj``/``v_proj``
  to ``num_key_value_heads``; ``prune_num_heads=True``, ``prune_head_dims=False``
  (whole heads go, RoPE stays intact) and ``head_pruning_ratio`` equal to the
  channel ratio; local (uniform per layer) ranking, ``round_to=4``.
* ``lm_head`` and the token embedding are ignored, so the hidden size stays (the
  graphprune side ignores the same two modules). ``prune_hidden=True`` ignores
  only ``lm_head`` as the example does, which prunes the hidden size too.
* Importance: ``method="taylor"`` is LLM-Pruner's first-order criterion,
  ``GroupTaylorImportance`` over gradients of the causal-LM loss (labels =
  input_ids) summed over the calibration batches; ``method="magnitude"`` is
  ``GroupMagnitudeImportance(p=2)`` and needs no data.

One ratio drives everything, so the fraction of parameters kept is a step
function of it. The ratio is searched on fresh deep copies of the model (first
guess from the share of weights the ratio acts on, then straight or secant steps
aimed just under ``keep``; every try re-traces the graph) until the kept fraction
is within ``tol`` under ``keep``; the chosen ratio is then applied to the
caller's model itself, so ``tries`` counts the search plus that final prune.

What Torch-Pruning 1.6 does with GQA (reported in the result's note): only query
heads are removed, the same number (rounded up) out of every key/value group,
and the key/value projections are never cut. With 9 query over 3 kv heads any
ratio in (0, 1/3] removes 3 of the 9 query heads in every layer, (1/3, 2/3]
removes 6.

Worked around, without changing Torch-Pruning's code:

* Its tracer follows RoPE's ``rotate_half`` (two slices of the head dimension and
  a concat) around a cycle whose index mapping never closes, so building the
  pruning group of ``q_proj`` never ends (an endless graph build on GQA LLMs is
  also reported upstream, VainF/Torch-Pruning#527). ``rotate_half`` only mixes dimensions inside
  one head, and only whole heads are removed here, so while the graph is traced
  the model's ``apply_rotary_pos_emb`` is swapped for the element-wise
  ``q*cos + q*sin``, which couples exactly the same heads; the real one is back
  before anything is scored or run.
* GQA is recognised through the ``expand`` inside ``repeat_kv``, which only the
  eager attention runs (SDPA passes ``enable_gqa`` instead), so the trace uses
  ``attn_implementation="eager"``; the model's own setting is restored after.
* The tracer cannot walk a ``ModelOutput``; it traces ``.logits``.
* When the query heads left equal the kv heads (4 over 2 -> 2 over 2, or 9 over
  3 -> 3 over 3) ``MetaPruner`` silently drops the layer's whole attention group
  (see ``_keep_kv_heads``); ``gqa_fix=True`` (default) makes the one edit TP
  intends there. With ``gqa_fix=False`` the note counts the layers left whole.

Checked on a tiny GQA LLaMA (tests/test_llm_torch_pruning.py): the pruned model
computes exactly what the dense one does with the removed heads' and channels'
inputs to ``o_proj``/``down_proj`` zeroed.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time

import torch
import torch.nn as nn

METHODS = ("taylor", "magnitude")
TRACE_TOKENS = 16


def count_params(model: nn.Module) -> int:
    """Unique parameters: a tied embedding/lm_head weight counts once."""
    return sum(p.numel() for p in model.parameters())


def _attentions(model: nn.Module):
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def _mlps(model: nn.Module):
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))]


def _elementwise_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Stand-in for ``apply_rotary_pos_emb`` while tracing: same shapes, no slicing inside a head."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + q * sin, k * cos + k * sin


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Eager attention and an element-wise RoPE for the duration of Torch-Pruning's trace."""
    homes = {sys.modules[type(m).__module__] for m in _attentions(model)}
    missing = [h.__name__ for h in homes if not hasattr(h, "apply_rotary_pos_emb")]
    if missing:
        raise NotImplementedError(f"no apply_rotary_pos_emb in {missing}: only RoPE attention is handled here")
    saved_rope = {h: h.apply_rotary_pos_emb for h in homes}
    saved_attn = model.config._attn_implementation

    def attention(kind):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(kind)
        else:  # older transformers read the config field at call time
            model.config._attn_implementation = kind

    attention("eager")
    for h in homes:
        h.apply_rotary_pos_emb = _elementwise_rope
    try:
        yield
    finally:
        for h, fn in saved_rope.items():
            h.apply_rotary_pos_emb = fn
        attention(saved_attn)


def _taylor_gradients(model: nn.Module, batches) -> None:
    """Leave d(mean causal-LM loss over the batches)/dW in every parameter's ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # no dropout; gradients flow the same
    try:
        for b in batches:
            ids = b["input_ids"]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(batches)
            loss.backward()
    finally:
        model.train(was_training)
        for p, f in flags:
            p.requires_grad_(f)


def _fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the original's ``.grad`` tensors (``Parameter.__deepcopy__`` drops
    them; pruning only reads them and replaces, never writes)."""
    trial = copy.deepcopy(model)
    for (name, p), (name2, q) in zip(model.named_parameters(), trial.named_parameters()):
        assert name == name2
        q.grad = p.grad
    return trial


def _sync_attributes(model: nn.Module) -> dict:
    """Make the HF modules and config agree with the pruned weights (as TP's example does, for this
    transformers version): per-layer head counts and groups, then the config fields."""
    cfg = model.config
    heads, kv_heads, inter = [], [], []
    head_dim = None
    for m in _attentions(model):
        hd = getattr(m, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q, kv = m.q_proj.out_features, m.k_proj.out_features
        if q % hd or kv % hd or (q // hd) % (kv // hd):
            raise RuntimeError(f"pruned attention is not whole heads: q {q}, kv {kv}, head_dim {hd}")
        nq, nkv = q // hd, kv // hd
        m.num_key_value_groups = nq // nkv
        for name, value in (("num_heads", nq), ("num_key_value_heads", nkv), ("hidden_size", q)):
            if hasattr(m, name):  # older transformers keep these on the module
                setattr(m, name, value)
        heads.append(nq)
        kv_heads.append(nkv)
        head_dim = hd
    for m in _mlps(model):
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = m.gate_proj.out_features
        if hasattr(m, "hidden_size"):
            m.hidden_size = m.gate_proj.in_features
        inter.append(m.gate_proj.out_features)
    emb = model.get_input_embeddings()
    cfg.hidden_size = emb.embedding_dim
    cfg.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    cfg.num_attention_heads = max(heads)
    cfg.num_key_value_heads = max(kv_heads)
    cfg.intermediate_size = max(inter)
    return {"attention_heads": sorted(set(heads)), "kv_heads": sorted(set(kv_heads)),
            "intermediate_size": sorted(set(inter)), "hidden_size": cfg.hidden_size}


def _prune_at(model: nn.Module, example: torch.Tensor, method: str, ratio: float,
              prune_hidden: bool, round_to: int, gqa_fix: bool) -> dict:
    """One Torch-Pruning pass over ``model`` (in place) at one ratio."""
    import torch_pruning as tp

    cfg = model.config
    num_heads = {}
    for m in _attentions(model):
        num_heads[m.q_proj] = cfg.num_attention_heads
        num_heads[m.k_proj] = cfg.num_key_value_heads
        num_heads[m.v_proj] = cfg.num_key_value_heads
    ignored = [model.get_output_embeddings()]
    if not prune_hidden:
        ignored.append(model.get_input_embeddings())
    if method == "taylor":
        if any(p.grad is None for m in num_heads for p in m.parameters()):
            raise RuntimeError("taylor importance needs gradients on the model")
        importance = tp.importance.GroupTaylorImportance()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    heads_before = [a.q_proj.out_features for a in _attentions(model)]
    # norm weights: declared with the dim TP would pick anyway (the last), which silences its warning
    loose = [(p, p.dim() - 1) for m in model.modules() if not isinstance(m, (nn.Linear, nn.Embedding))
             for p in m.parameters(recurse=False)]
    with _traceable(model):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=example, importance=importance,
            forward_fn=lambda m, x: m(x, use_cache=False).logits, unwrapped_parameters=loose,
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=ratio, out_channel_groups={}, in_channel_groups={}, round_to=round_to)
    if gqa_fix and cfg.num_key_value_heads < cfg.num_attention_heads:
        _keep_kv_heads(pruner, [p for a in _attentions(model) for p in (a.k_proj, a.v_proj)])
    for group in pruner.step(interactive=True):
        group.prune()
    del pruner
    skipped = sum(a.q_proj.out_features == h for a, h in zip(_attentions(model), heads_before))
    if prune_hidden and getattr(cfg, "tie_word_embeddings", False):
        # each side was cut into its own new Parameter: tie them again
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return {**_sync_attributes(model), "attention_untouched": skipped}


def _keep_kv_heads(pruner, kv_layers) -> None:
    """Carry out what TP 1.6's GQA branch means to do in every case.

    After removing query heads, ``MetaPruner`` empties the key/value projections' entries of the
    group ("disable head pruning for the kv layers if GQA"), but it decides whether the layer is GQA
    from the head counts *after* the removal: once the query heads left equal the kv heads it sees
    no GQA, keeps the kv entries (every kv channel, mapped back from the removed query heads), and
    ``check_pruning_group`` then drops the whole attention group without a word. Emptying the kv
    entries just before that check is the same edit TP makes itself one step earlier.
    """
    kv = set(kv_layers)
    check = pruner.DG.check_pruning_group
    out_fn = pruner.DG.is_out_channel_pruning_fn

    def check_keeping_kv(group):
        for i, (dep, _) in enumerate(group):
            if dep.target.module in kv and out_fn(dep.handler):
                group[i] = (dep, [])
        return check(group)

    pruner.DG.check_pruning_group = check_keeping_kv


def _rounded(history):
    return [(round(r, 4), round(k, 4)) for r, k in history]


def _next_ratio(history, keep: float, slope: float, tol: float) -> float:
    """The next ratio to try, from the (ratio, kept) tries so far; kept falls as the ratio grows.

    With tries on both sides of ``keep``: a secant step between the nearest two, kept inside their
    bracket. With tries on one side only: a straight step from the nearest one using ``slope`` (kept
    fraction lost per unit of ratio). Either way it aims a little under ``keep``.
    """
    aim = keep - tol / 3
    over = [t for t in history if t[1] > keep]
    under = [t for t in history if t[1] <= keep]
    if not under:
        r, k = max(over)
        return min(0.99, r + (k - aim) / slope)
    r1, k1 = max(under, key=lambda t: (t[1], -t[0]))
    below = [t for t in over if t[0] < r1]
    if not below:
        return max(r1 - (aim - k1) / slope, 0.5 * r1)
    r0, k0 = max(below)
    span = r1 - r0
    r = r0 + (k0 - aim) / (k0 - k1) * span if k0 > k1 else r0 + 0.5 * span
    return min(max(r, r0 + 0.02 * span), r1 - 0.02 * span)


def prune(model, batches, keep: float, method: str = "taylor", *, prune_hidden: bool = False,
          round_to: int = 4, gqa_fix: bool = True, max_tries: int = 6, tol: float = 0.001) -> dict:
    """Prune ``model`` in place with Torch-Pruning to at most ``keep`` of its parameters.

    ``batches``: list of ``{"input_ids": LongTensor (1, T)}`` (taylor gradients; the first one
    also feeds the trace). ``max_tries`` counts every prune, the final one on ``model`` included;
    the search stops early once the kept fraction is within ``tol`` under ``keep``.
    Raises ``RuntimeError`` when no tried ratio gets under ``keep``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if max_tries < 2:
        raise ValueError("max_tries must be at least 2 (one search try, one final prune)")
    import torch_pruning  # fail early and clearly when it is missing

    t0 = time.perf_counter()
    dense = count_params(model)
    example = batches[0]["input_ids"][:, :TRACE_TOKENS]
    out = {"method": method, "keep_target": keep}
    if keep >= 1.0:
        return {**out, "params_kept": 1.0, "seconds": time.perf_counter() - t0, "tries": 0, "ratio": 0.0,
                "note": "keep >= 1: nothing pruned"}

    prunable = sum(m.weight.numel() for a in _attentions(model) for m in (a.q_proj, a.o_proj))
    prunable += sum(m.weight.numel() for a in _mlps(model) for m in (a.gate_proj, a.up_proj, a.down_proj))
    if not _attentions(model) or not _mlps(model):
        raise NotImplementedError("expected LLaMA-style q/k/v/o_proj attentions and gate/up/down_proj MLPs")
    mlp = sum(m.weight.numel() for a in _mlps(model) for m in (a.gate_proj, a.up_proj, a.down_proj))
    # the smallest change of the kept fraction: every layer's MLP one `round_to` step wider or narrower
    granule = round_to * sum(a.gate_proj.in_features + a.up_proj.in_features + a.down_proj.out_features
                             for a in _mlps(model)) / dense
    # first guess: as if every prunable weight followed the ratio; later steps: heads move in jumps,
    # so between two tries only the MLP widths follow the ratio smoothly
    guess = min(0.95, (1.0 - keep) * dense / prunable)
    slope = mlp / dense

    history = []  # (ratio, kept fraction) of every search try
    best = None  # the try with the most parameters kept at or under `keep`
    ratio = guess
    had_grads = method == "taylor"
    try:
        if had_grads:
            _taylor_gradients(model, batches)  # once; every trial copy shares these .grad tensors
        for _ in range(max_tries - 1):
            trial = _fresh_copy(model)
            _prune_at(trial, example, method, ratio, prune_hidden, round_to, gqa_fix)
            history.append((ratio, count_params(trial) / dense))
            del trial
            under = [t for t in history if t[1] <= keep]
            if under:
                best = max(under, key=lambda t: (t[1], -t[0]))
                r0, k0 = max((t for t in history if t[1] > keep and t[0] < best[0]), default=(0.0, 1.0))
                # close enough, or the bracket is one step of the MLP widths: nothing fits in between
                if keep - best[1] <= tol or k0 - best[1] <= 1.001 * granule or best[0] - r0 < 1e-3:
                    break
            ratio = _next_ratio(history, keep, slope, tol)
        if best is None:
            raise RuntimeError(f"Torch-Pruning could not get {method} under keep={keep} in {len(history)} "
                               f"tries (ratio, kept): {_rounded(history)}")
        shape = _prune_at(model, example, method, best[0], prune_hidden, round_to, gqa_fix)
    finally:
        if had_grads:
            model.zero_grad(set_to_none=True)
    kept = count_params(model) / dense
    seconds = time.perf_counter() - t0
    n_layers = len(_attentions(model))
    heads = (f"query heads {shape['attention_heads']} over kv heads {shape['kv_heads']}"
             + (f", attention left whole in {shape['attention_untouched']}/{n_layers} layers"
                if shape["attention_untouched"] else ""))
    note = (f"Torch-Pruning {torch_pruning.__version__} MetaPruner as in its LLM example: local ranking, "
            f"channel ratio = head ratio = {best[0]:.4f}, round_to={round_to}, "
            f"{'hidden pruned (lm_head ignored)' if prune_hidden else 'hidden kept (embeddings, lm_head ignored)'}; "
            f"after: {heads}, intermediate {shape['intermediate_size']}, hidden {shape['hidden_size']}; "
            f"GQA: only query heads are removed, equally per kv group, kv projections untouched"
            f"{' (kv entries emptied before the group check, see _keep_kv_heads)' if gqa_fix else ''}; "
            f"RoPE traced element-wise (TP's tracer loops on rotate_half); "
            f"search (ratio, kept): {_rounded(history)}")
    return {**out, "params_kept": kept, "seconds": seconds, "tries": len(history) + 1, "ratio": best[0],
            "note": note, "params": [dense, count_params(model)], **shape}
