"""Model cost: FLOPs with torch.utils.flop_counter, parameters, CPU latency."""
from __future__ import annotations

import contextlib

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None, *, exclude=()) -> int:
    """Forward FLOPs, less those of the modules named in ``exclude``.

    Runs with grad enabled: under no_grad, nn.MultiheadAttention takes a fused
    fast path that the counter does not see. It runs on meta tensors where the
    forward allows, else on fake ones, else for real on copies of the weights (a
    whole model's worth of memory, for data-dependent shapes alone). It runs on a shadow of ``model``
    (``trace.shadow``: the same parameters, module objects of its own), so a
    forward that caches what it computes (timm's EfficientFormer keeps its
    indexed attention biases) fills the shadow's cache, not the user's; a
    cached tensor with a grad history left in the user's model made it
    refuse ``copy.deepcopy``.
    """
    args, kwargs = copied_inputs(tuple(example_inputs), dict(example_kwargs or {}))  # a forward may write into its inputs
    own = _own(model)
    for run in (_on_meta, _on_fake, _on_copies):  # the cheapest first; the last one's error is raised
        try:
            with FlopCounterMode(display=False, custom_mapping=_more_flops()) as counter:
                run(own, args, kwargs)
            break
        except Exception:  # noqa: BLE001
            if run is _on_copies:
                raise
    total = counter.get_total_flops()
    counts = counter.get_flop_counts()
    for name in exclude:
        key = next((k for k in counts if k.partition(".")[2] == name), None)
        if key is not None:
            total -= sum(counts[key].values())
    return total


def _rnn_layer_flops(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """One fused LSTM layer and direction on the CPU (``aten.mkldnn_rnn_layer``): the input
    and hidden matmuls of every gate at every step. Elsewhere (meta, GRU, RNN) the RNN
    decomposes into ``addmm`` calls the counter already sees."""
    steps = 1
    for s in input_shape[:-1]:
        steps *= s
    return 2 * steps * (w_ih_shape[0] * w_ih_shape[1] + w_hh_shape[0] * w_hh_shape[1])


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Mixture-of-experts matmuls (``aten._grouped_mm``, transformers' ``grouped_mm_fallback``):
    rows (S, K) over experts (E, K, N), each row through one expert, 2 S K N; batched
    (E, M, K) x (E, K, N), 2 E M K N; a split contraction (M, K) x (K, N), 2 M K N."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]


def _onednn_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``mkldnn._convolution_pointwise`` (passes/onednn_fuse.py): a convolution, 2 x output
    elements x (input channels per group x kernel taps); the fused activation is not counted,
    as the counter counts none."""
    per_output = 1
    for s in w_shape[1:]:
        per_output *= s
    elements = 1
    for s in out_shape:
        elements *= s
    return 2 * elements * per_output


def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``mkldnn._linear_pointwise``: rows x (in x out) multiply-adds."""
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return 2 * rows * w_shape[0] * w_shape[1]


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu``, what ``F.scaled_dot_product_attention``
    runs on CPU tensors: the two batched matmuls, 2 B Hq Sq Sk (Dqk + Dv) (grouped-query key and
    value heads are read by every query head of their group). torch's counter has no entry for
    it, so on the CPU attention counted 0 while the budget search, on meta tensors, counted it:
    a ViT with ``target_flops=0.5`` was reported at 0.26, a MobileViT at 0.502."""
    *batch, s_q, d_qk = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    heads = 1
    for s in batch:
        heads *= s
    return 2 * heads * s_q * s_k * (d_qk + d_v)


def _trilinear_flops(s1, s2, s3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs) -> int:
    """``aten._trilinear``, what ``nn.Bilinear``/``F.bilinear`` run: the three operands, each
    unsqueezed at its ``expand`` dims, multiplied over their broadcast shape and summed over
    ``sumdim``; 2 x that shape's size (``x1 W[o] x2``: 2 B out in1 in2). torch's counter has
    none, so a bilinear layer counted 0 and a FLOPs budget cut every other layer for it."""
    def full(shape, expand):
        dims, it = [], iter(shape)
        for d in range(len(shape) + len(expand)):
            dims.append(1 if d in expand else next(it))
        return dims

    total = 1
    for sizes in zip(full(s1, expand1), full(s2, expand2), full(s3, expand3)):
        total *= max(sizes)
    return 2 * total


_MORE_FLOPS = {torch.ops.aten._trilinear: _trilinear_flops}
if hasattr(torch.ops.aten, "mkldnn_rnn_layer"):
    _MORE_FLOPS[torch.ops.aten.mkldnn_rnn_layer] = _rnn_layer_flops
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _MORE_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
if hasattr(torch.ops.aten, "_grouped_mm"):
    _MORE_FLOPS[torch.ops.aten._grouped_mm] = _grouped_mm_flops
if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
    _MORE_FLOPS[torch.ops.mkldnn._convolution_pointwise] = _onednn_conv_flops
    _MORE_FLOPS[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops


def _more_flops() -> dict:
    """Formulas torch's counter lacks; transformers' op is there once transformers registered it."""
    try:
        return {**_MORE_FLOPS, torch.ops.transformers.grouped_mm_fallback: _grouped_mm_flops}
    except (AttributeError, RuntimeError):
        return _MORE_FLOPS


# Where count_flops runs a forward. None touches the user's tensors: nn.Embedding(max_norm=...)
# renormalised the user's rows in place when the count ran on them (survey 12).
def _on_meta(own, args, kwargs) -> None:
    """On meta tensors: shapes are all a count needs."""
    from .trace import to_meta
    from .verify import swapped

    with swapped(own, {id(t): to_meta(t) for t in [*own.parameters(), *own.buffers()]}):
        own(*to_meta(args), **to_meta(kwargs))


def _on_fake(own, args, kwargs) -> None:
    """On fake tensors, for a forward that makes tensors of its own on the CPU (meta cannot mix with them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from .verify import swapped

    from .trace import _quiet_fake_tensors

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    # quiet: a kernel the forward tries and falls back from (transformers' MoE tries torch's bf16-only grouped_mm)
    # was logged with its traceback, 105 error lines for one compile of a small Mixtral
    with swapped(own, {id(t): fake(t) for t in [*own.parameters(), *own.buffers()]}), _quiet_fake_tensors():
        own(*tree_map(fake, args), **tree_map(fake, kwargs))


def _on_copies(own, args, kwargs) -> None:
    """For real (data-dependent shapes), on copies of the weights."""
    from .verify import on_copies

    with on_copies(own):
        own(*args, **kwargs)


def _own(model: torch.nn.Module) -> torch.nn.Module:
    """A shadow of ``model`` to run, with buffers of its own: a forward that updates state
    (BatchNorm statistics in training mode, a fake-quant observer, a step counter) ran on
    the user's buffers whenever a budget was counted (``target_flops``, ``target_params``),
    while ``ratio=`` left them alone."""
    from .trace import shadow

    return shadow(model, own_buffers=True)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def graph_params(gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
    """{id: parameter} of the parameters ``gm``'s graph reads (a module it calls holds
    them, or a ``get_attr`` names them), each once however it is tied. Modules the
    forward never runs (GoogLeNet's auxiliary heads in eval mode) are in a traced
    module tree but not here: budgets count the model as it runs."""
    found: dict[int, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            for t in gm.get_submodule(n.target).parameters():
                found[id(t)] = t
        elif n.op == "get_attr" and n.users:  # torch.export reads every parameter, used or not
            owner, _, attr = n.target.rpartition(".")
            t = (gm.get_submodule(owner) if owner else gm)._parameters.get(attr)
            if t is not None:
                found[id(t)] = t
    return found


def copied_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with every tensor copied: a forward that normalises its input in place
    (``im /= 255``) must not change the caller's tensors."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))


def latency_ms(model: torch.nn.Module, example_inputs: tuple, *, warmup: int = 3, runs: int = 10,
               example_kwargs: dict | None = None) -> float:
    """Median wall time of a forward pass on the inputs' device (on a copy of the inputs), with the
    model's buffers and tensor attributes copied: a latency budget timed the user's model and every
    candidate on their own state, and a forward that counts its calls counted 140 in the user's model."""
    from .verify import _COPY_WEIGHTS, _copies, swapped

    example_inputs, example_kwargs = copied_inputs(tuple(example_inputs), dict(example_kwargs or {}))
    times = []
    own = (swapped(model, _copies(model, params=_COPY_WEIGHTS.get())) if isinstance(model, torch.nn.Module)
           else contextlib.nullcontext())  # any callable may be timed (the CLI times a bound call)
    with torch.no_grad(), own:
        for i in range(warmup + runs):
            t = time.perf_counter()
            model(*example_inputs, **example_kwargs)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def latency_ratio(model: torch.nn.Module, reference: torch.nn.Module, example_inputs: tuple, *, rounds: int = 5,
                  example_kwargs: dict | None = None) -> float:
    """latency of ``model`` over that of ``reference``, measured side by side: the two
    alternate, so load that comes and goes hits both alike, and each keeps its
    fastest round. Other processes only ever add time (on a shared 2-core
    machine one busy neighbour made some rounds of a 2-thread forward several
    times slower), so the fastest round is the least disturbed estimate."""
    mine, theirs = [], []
    example_inputs, kw = copied_inputs(tuple(example_inputs), dict(example_kwargs or {}))  # keyword inputs the forward needs
    for _ in range(rounds):
        theirs.append(latency_ms(reference, example_inputs, warmup=1, runs=3, example_kwargs=kw))
        mine.append(latency_ms(model, example_inputs, warmup=1, runs=3, example_kwargs=kw))
    return min(mine) / min(theirs)
