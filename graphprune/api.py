"""The public entry points: ``analyze`` and ``compile``.

``compile`` reads top to bottom as the compiler's pipeline::

    trace -> couple (groups) -> score -> select -> shrink-params -> dce
"""
from __future__ import annotations

import gc
import math
import warnings
from contextlib import contextmanager

import torch

from .allocate import (FILL_TOL, RULES, Constraints, allocate, blocked_hint, light_report, original_params, overrides_ceiling,
                       params_read, report, steps_back, unrounded)
from .batches import as_call, not_batches, read_batches, regroup
from .errors import GraphpruneError, GraphpruneWarning, first_line, user_level
from .flops import count_flops, count_params, latency_ratio
from .groups import Analysis, analyze_graph
from .meta_keys import BOUNDED_DIMS, EXAMPLE, FIXED_DIMS, GUARD_SIZES, PYTHON_STATE, SYMBOLIC_DIMS
from . import auto, graph_inputs, hf, module_form, none_inputs
from .pruner import DEFAULT_PIPELINE, Pruner, check_ignore, matching_ratio
from .pass_manager import format_pipeline, parse_pipeline, run_pipeline
from .reconstruct import thin_calibration
from .trace import on_meta, shadow, trace, unwrapped
from .verify import Verification, check_trace, refused_sizes, retried_on_weight_writes, verified, why_not



@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector for one trace-analyze(-rewrite).
    Compiling a deep model allocates hundreds of thousands of small objects
    (fx nodes, index arrays); the collections they trigger walk the whole
    model every time, about a third of the compile time of a 600-conv
    ResNet. Not used around budget searches, which build many candidate
    models: those need the collector to free them."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def analyze(model: torch.nn.Module, example_inputs: tuple, *, ignore=(), example_kwargs=None) -> Analysis:
    """Trace ``model`` and find its channel groups, without changing anything.

    >>> a = graphprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> print(a.summary())          # groups, their sizes and members; what blocked the rest
    """
    model = unwrapped(model)
    ignore = check_ignore(model, ignore)
    with _gc_paused():
        if why_not(model) is None:  # the graph compile prunes: the trace that computes what the model computes
            # (fx misses an in-place update through an alias, r = y; y += z, and the groups it gave missed z's producer)
            return Pruner(model, example_inputs, example_kwargs, tuple(ignore), check_trace=True).analysis
        traced = trace(model, example_inputs, example_kwargs)  # weights on meta: nothing can run the model
        return analyze_graph(traced.gm, traced.method, ignore)


@retried_on_weight_writes
def compile(model: torch.nn.Module, example_inputs: tuple, *, ratio=None, target_flops=None, target_params=None,
            target_latency=None, importance="auto", ignore=(), pipeline=None, example_kwargs=None, calibration=None,
            loss_fn=None, round_to: int | None = None, min_width: int = 1, overrides: dict | None = None,
            latency_inputs: tuple | None = None, ratio_scope: str = "group", reconstruct: bool | None = None,
            verify: bool = True, output: str = "auto", allocation: str = "auto") -> torch.nn.Module:
    """Return a physically smaller copy of ``model``; ``model`` itself is not changed.

    Say how much to remove in one of two ways:

    * ``ratio=r`` removes ``round(r * n)`` units from every prunable group of
      ``n`` units (a unit is a channel, a head, a conv group: whatever must go
      together); ``ratio={"layer3.*": 0.5, "*.mlp.*": 0.3}`` sets it per
      group, by the modules that produce the group's channels. With
      ``ratio_scope="global"`` the fraction applies to all covered units
      together, the lowest-scoring wherever they are.
    * ``target_flops``, ``target_params`` or ``target_latency`` (a fraction
      of the original to keep) lets graphprune allocate widths across groups
      by globally normalised importance; the result never exceeds the
      budget, and ``result.report`` says what was achieved. Every group, and
      every branch of a concatenation inside one, keeps at least a tenth of
      its units (``allocate.MIN_KEEP``) unless the budget can only be met below
      that; ``min_width`` asks for more.

    ``importance="auto"`` (the default) with ``calibration`` tries the data-aware
    criteria (and, for budgets, three allocation rules, and the refit) and keeps
    the candidate whose outputs move least on held-out calibration batches;
    ``result.report.auto`` says what it chose (see ``auto.py``); under ``target_latency``
    the candidates are compared at the FLOPs fraction one latency search lands on, and
    only the winner is searched by timing (``latency_as_flops``). Without
    calibration it is ``l2``. ``reconstruct=None`` lets ``auto`` decide the refit.
    ``allocation`` fixes how a budget is spread over groups instead of letting
    ``auto`` choose: ``"score"`` (units ranked by their group-normalised score),
    ``"per_param"`` (score per parameter a unit holds), ``"measured"`` (the
    held-out output error a unit adds, per unit of the budget it frees: FLOPs,
    parameters, or under ``target_latency`` milliseconds read off a latency table
    timed in place on this device, ``latency_table.py``, ``result.report.latency_table``;
    needs ``calibration``) or ``"uniform"`` (the same fraction from every group, the
    criterion choosing which units). Without ``importance="auto"`` and
    calibration, ``"auto"`` means ``"score"``.

    ``pipeline="deploy"`` also folds BatchNorms and constant per-channel scales into the layers before them,
    LayerNorm affines into the linear layers after them, stores
    convolution weights channels-last where that runs faster on this device
    (timed on the unpruned model, ``result.report.layout``), runs convolutions and
    linears as oneDNN CPU kernels with their activations fused where that is faster
    (``result.report.kernels``), and under a budget
    with ``round_to=None`` (the default) keeps widths in the multiple of 1, 8 or
    16 that runs fastest, timed on the model (``result.report.rounding``; a latency
    budget times the roundings at the same fraction of FLOPs).
    ``round_to=q`` fixes the multiple. Latency budgets are measured on this form. On CPU,
    glibc's default allocator can make a model's speed flip between two bands within one
    process (heap trimmed and regrown around large activations); pin it
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) or use jemalloc/tcmalloc
    where a latency budget must land (see ``bench/deploy_speed.py``).

    ``round_to=q`` keeps every pruned width a multiple of ``q`` channels, along
    every parameter dimension a group spans (a grouped conv's per-group kernel
    width too), and ``min_width=m`` at least ``m`` channels: a head of 64
    channels satisfies ``round_to=8`` alone, so heads go one at a time
    (``Group.unit_multiple``, ``Group.unit_floor``). A group no wider than
    ``q`` channels stays whole.

    ``ignore`` names modules whose output width must stay. ``calibration``
    (an iterable of input tuples, dicts of keyword inputs, or a DataLoader)
    and ``loss_fn(output, batch)`` feed the data-driven criteria (``taylor``,
    ``hessian``, ``fisher``, ``activation``). A tuple with more items than the
    forward takes positionally, ``(x, y)`` from a DataLoader, is the example's
    number of inputs followed by targets: the model gets ``x``, ``loss_fn`` the
    whole batch (``loss_fn=lambda out, b: F.cross_entropy(out, b[1])``).
    ``reconstruct=True`` also refits, in closed form on the calibration
    data, every linear (and 1x1 conv) layer that reads pruned channels, so
    the kept inputs stand in for the removed ones (see ``reconstruct.py``);
    no training, no labels.

    ``verify=True`` (the default) checks the result against its *dead twin*,
    the original with every removed unit zeroed, on the example inputs and at
    another batch size (and sequence length); groups that break it are kept
    whole and the model is pruned again (see ``verify.py``). It first checks
    that the traced graph computes what ``model`` does. It is skipped, and
    ``result.report.verify`` says why, when the weights are on ``meta`` or a
    copy would not fit in memory. ``verify=False`` skips both checks: the trace
    is then taken on trust, and code symbolic tracing misreads (a ``__call__``
    that does more than ``forward``, ``functional_call`` with other weights, a
    size frozen into the graph) comes back wrong.

    ``output="module"`` returns the pruned model as an instance of the user's
    own class (its forward code, its submodules sliced) or raises saying why
    not; ``"graph"`` returns the fx ``GraphModule``; ``"auto"`` (the default)
    returns the module form where it computes what the graph computes, and
    the graph otherwise. ``result.report.form`` says which, and why.

    >>> small = graphprune.compile(model, (x,), ratio=0.5, ignore=["fc"])
    >>> small = graphprune.compile(model, (x,), target_flops=0.5)
    >>> small.report.flops
    """
    model = unwrapped(model)  # torch.compile(model) -> the module it wraps; TorchScript inside is refused
    budgets = {k: v for k, v in (("flops", target_flops), ("params", target_params), ("latency", target_latency)) if v is not None}
    if len(budgets) > 1 or (budgets and ratio is not None):
        raise GraphpruneError("give one of ratio, target_flops, target_params or target_latency")
    for kind_, v in budgets.items():  # checked before tracing: "a" reached a comparison deep in allocate
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise GraphpruneError(f"target_{kind_} must be a fraction of the original in (0, 1], got {v!r}")
    if ratio is None and not budgets and not pipeline:
        warnings.warn(GraphpruneWarning("no ratio or target given: nothing is removed (give ratio=, target_flops=, "
                                        "target_params= or target_latency=)"), stacklevel=user_level())
    if ratio is None:
        ratio = 0.0
    for r in (ratio.values() if isinstance(ratio, dict) else [ratio]):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise GraphpruneError(f"ratio must be a number in [0, 1), got {r!r}")
    for k, r in (overrides or {}).items():  # 5 collapsed its groups to one unit and missed the budget by 0.48
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise GraphpruneError(f"overrides[{k!r}] must be the fraction of that group to remove, in [0, 1), got {r!r}")
    if isinstance(ignore, str):
        ignore = [ignore]  # one module name, not its characters
    if not isinstance(verify, bool):
        raise GraphpruneError(f"verify must be True or False, got {verify!r}")
    wrong = None if calibration is None else not_batches(calibration)
    if wrong:
        raise GraphpruneError(wrong)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise GraphpruneError(f"round_to must be a whole number of channels >= 1 (or None), got {round_to!r}")
    if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 1:
        raise GraphpruneError(f"min_width must be a whole number of channels >= 1, got {min_width!r}")
    if allocation != "auto" and allocation not in RULES:
        raise GraphpruneError(f"allocation must be 'auto' or one of {', '.join(map(repr, RULES))}, got {allocation!r}")
    if allocation != "auto" and not budgets:
        raise GraphpruneError(f"allocation={allocation!r} spreads a budget over groups: give target_flops, "
                              "target_params or target_latency (ratio= removes its fraction from every group)")
    if allocation == "measured" and calibration is None:
        raise GraphpruneError("allocation='measured' measures each group's effect on held-out outputs: give "
                              "calibration batches, or another allocation ('score', 'per_param', 'uniform')")
    if target_latency is not None and on_meta(model):
        raise GraphpruneError("target_latency times the model running, and its weights are on the meta device: "
                              "load them first, or give target_flops or target_params (counted on shapes alone)")
    choosing = importance == "auto" and calibration is not None
    if calibration is not None:
        calibration = read_batches(calibration)  # scored, judged and refit on: read once (a generator gives them once only)
    with _gc_paused():
        p = Pruner(model, example_inputs, example_kwargs, tuple(ignore), importance, calibration, loss_fn, pipeline,
                   bool(reconstruct), check_trace=verify and why_not(model) is None, free_reads=output == "graph")
    kind, target = next(iter(budgets.items()), (None, None))
    for what, patterns in (("ratio", ratio if isinstance(ratio, dict) else None), ("overrides", overrides)):
        missed = [k for k in patterns or () if not any(matching_ratio(g, {k: 0.0}) is not None for g in p.groups)]
        if missed:  # a pattern that names nothing prunable would otherwise prune nothing there, in silence
            warnings.warn(GraphpruneWarning(f"{what} pattern(s) {missed} name no module that produces a prunable "
                                            "group: analyze(model, inputs).summary() lists the groups and their modules"),
                          stacklevel=user_level())
    if not p.groups and not budgets and any(ratio.values() if isinstance(ratio, dict) else [ratio]):
        warnings.warn(GraphpruneWarning(f"nothing to prune: the model has no prunable group and comes back as it "
                                        f"is{blocked_hint(p)}"), stacklevel=user_level())
    meter_kw = {"latency_inputs": latency_inputs} if kind == "latency" else {}
    rounding = None  # pipeline="deploy": the width multiple timed fastest, and the timings
    deploy = (pipeline or "").strip() == "deploy"
    layout = fastest_layout(p) if deploy else None  # before anything is timed
    kernels = fastest_kernels(p) if deploy else None
    if round_to is None and kind is not None and (pipeline or "").strip() == "deploy":
        # a latency budget picks its multiple at the FLOPs fraction of the same size: odd widths make latency
        # jump up and down along the bisection (MobileNetV2 landed at 0.21 for a target of 0.3 without it)
        rounding = fastest_rounding(p, "flops" if kind == "latency" else kind, target, Constraints(1, min_width, overrides))
    asked_round_to = round_to  # the user's; deploy's own choice below is timed, not asked for
    round_to = round_to or (rounding or {}).get("chosen", 1)

    def decide_with(rule: str, budget: tuple | None = None) -> dict:
        by, fraction = budget or (kind, target)
        if by is None:
            with _gc_paused():
                removed = p.removal_for_ratio(ratio, ratio_scope)
            if round_to > 1 or min_width > 1 or overrides:
                removed = Constraints(round_to, min_width, overrides).applied(p, removed)
            return removed
        return allocate(p, by, fraction, Constraints(round_to, min_width, overrides), rule=rule,
                        **(meter_kw if by == "latency" else {}))[0]

    choice, rule = choose_rule(p, decide_with, kind, target, choosing=choosing, allocation=allocation,
                               reconstruct=reconstruct)

    def decide() -> dict:
        return decide_with(rule)

    paths = _module_paths(model, p, output) if verify else None
    if verify:
        out, removed, check = verified_in_classes(p, decide, paths)
    else:
        removed = decide()
        out, check = p.prune(removed, fit=False), Verification("skipped", "verify=False")
    if p.reconstruct or (choice is not None and choice.recalibrate):
        out = fitted(p, removed, out, recalibrate=choice is not None and choice.recalibrate)
    rep = report(p, removed, out, budgets, latency_inputs) if budgets else light_report(p, removed)
    rep.verify = check
    if kind in ("flops", "params") and target - getattr(rep, kind) > FAR_UNDER:
        ceiling = overrides_ceiling(p, kind, overrides, round_to) if overrides else 1.0
        if ceiling < target - FILL_TOL:
            warnings.warn(GraphpruneWarning(
                f"target_{kind}={target} landed at {getattr(rep, kind):.3f}: the ratios overrides fix"
                f"{f' (rounded to round_to={round_to})' if round_to > 1 else ''} keep at most "
                f"{ceiling:.3f} of the original's {'FLOPs' if kind == 'flops' else 'parameters'} with every other group "
                f"whole; lower those ratios or the target"), stacklevel=user_level())
        else:
            _warn_coarse_steps(p, kind, target, getattr(rep, kind), removed, round_to, overrides)
    narrow = [g for g in p.groups if (asked_round_to or 1) > 1 and g.one_multiple_wide(round_to)]
    if narrow and (overrides or any(n for n in (ratio.values() if isinstance(ratio, dict) else [ratio]) if n) or budgets):
        warnings.warn(GraphpruneWarning(
            f"round_to={round_to}: {len(narrow)} group(s) no wider than {round_to} channels stay whole, since no multiple "
            f"of it fits under their width (first: {narrow[0].describe()[:160]}); give a smaller round_to to prune them"),
            stacklevel=user_level())
    off = unrounded(p, removed, round_to) if round_to > 1 else []
    if off:  # bundled units: query heads in balance over their key/value heads, a chunk's equal parts
        name, width, kept, g = off[0]
        why = _bundled(g) or (
            f"a dim that reads several of the {len(g.branches)} branches a concatenation or a shuffle makes, each "
            "rounded on its own, one kept whole at a width that is not a multiple" if len(g.branches) > 1
            else "units that go together")
        warnings.warn(GraphpruneWarning(
            f"round_to={round_to} does not hold on {len(off)} pruned dim(s) (first: {name}, {kept} of {width}): their "
            f"channels go in bundles ({why}); give a round_to those counts allow, or ignore those layers"),
            stacklevel=user_level())
    classes = [b for b in check.blocked if HF_CLASSES in b]
    if classes:  # the budget was met on the other groups; output="graph" would have pruned these
        warnings.warn(GraphpruneWarning(
            f"{len(classes)} group(s) kept whole so that the result stays in the model's own classes, which carry "
            f"generate() and save_pretrained, and whose forward cannot run their pruning (first: {classes[0][:400]}). "
            "output='graph' prunes them, as an fx graph"), stacklevel=user_level())
    sized = [b for b in check.blocked if SIZES_CLASSES in b]
    if sized:  # the traced graph refuses sizes the model takes: no graph could be returned
        warnings.warn(GraphpruneWarning(
            f"{len(sized)} group(s) kept whole so that the result stays in the model's own classes, whose forward "
            f"cannot run their pruning (first: {sized[0][:400]}): the traced graph, which could, does not take every "
            f"input size the model does ({check.notes[0] if check.notes else 'report.verify says which'}). A width the "
            "forward writes as a literal, or reads through a local name, does not follow the pruning"),
            stacklevel=user_level())
    held = [b for b in check.blocked if MODULE_PATHS in b]
    if held:  # a setting's other value, or another size, read a group: it was kept
        # where the traced graph refuses sizes the model takes (or computes them wrongly), output='graph' raises, so
        # the warning had been left out, and a model that came back with nothing removed said nothing (survey 44 F12)
        other = ("output='graph' prunes them: its graph computes the traced path only, and refuses a setting or size it "
                 "can tell it did not trace" if not check.notes and not p.wrong_sizes else
                 "output='graph' is no way out: the traced graph does not take every input size the model does "
                 "(report.verify says which). Compile with an example of the sizes you will run")
        warnings.warn(GraphpruneWarning(
            f"{len(held)} group(s) kept whole so that the result, in the model's own classes, is right on paths the "
            f"trace did not take (first: {held[0][:400]}). {other}"), stacklevel=user_level())
    rep.auto = choice
    rep.rounding = rounding
    rep.layout = layout
    rep.kernels = kernels
    rep.latency_table = p.latency_table
    if target_latency is not None and rep.latency is not None and rep.latency > target_latency:
        # the search met the budget as it timed it; the report's own timing, beside the original, did not
        warnings.warn(GraphpruneWarning(
            f"latency measured at {rep.latency:.3f} of the original, over target_latency={target_latency}: the "
            "timings moved between the search and the report (a busy machine, or a target near the device's "
            "speed steps); time it on an idle machine, or ask for a lower target"), stacklevel=user_level())
    # the module form the self-check passed, where nothing changed the weights since (a refit, recalibration)
    checked = paths.passed[1] if paths is not None and paths.passed and paths.passed[0] is out and not p.reconstruct and not (
        choice is not None and choice.recalibrate) else None
    result, rep.form, rep.form_why = _choose_form(model, out, p, output, rep, checked)
    if kind == "params" and rep.form == "module" and rep.unrun:  # a params budget counts what the forward runs
        idle = sum(t.numel() for t in {id(t): t for n in rep.unrun for t in model.get_submodule(n).parameters()}.values())
        total = count_params(model)  # each tied parameter once, as count_params counts the result
        if idle > 0.01 * total:
            warnings.warn(GraphpruneWarning(
                f"target_params counts the parameters the traced forward runs: {', '.join(rep.unrun[:4])} never run "
                f"({idle / total:.0%} of all parameters), stay whole and are outside it; the result holds "
                f"{count_params(result) / total:.2f} of all parameters. Delete them from the "
                "model (model.aux = None) to count them out, or give a lower target"), stacklevel=user_level())
    _graph_checks(model, p, result, rep, check)
    module_form.record_tree(result)
    result.report = rep
    return result



def _graph_checks(model, p, result, rep, check) -> None:
    """What a graph result must not be returned with, and what it must say: sizes the model takes
    and the graph refuses, or computes wrongly, where the model's own classes were no option (a
    GraphpruneError), a training-mode model traced in eval mode, input dims export fixed or
    bounded (``rep.form_why``). Shared by ``compile`` and ``search``."""
    if check.notes and rep.form == "graph":  # sizes the model takes and the graph refuses: only a module form takes them
        raise GraphpruneError(refused_sizes(check.notes[0]) + f" (the model's own classes were not an option: {rep.form_why})")
    if p.wrong_sizes and rep.form == "graph":  # the module form is held to its twin there (module_form.beyond); the graph is wrong
        raise GraphpruneError(
            f"the traced graph of {type(model).__name__} does not compute what the model computes at every batch size "
            f"its forward tests and every size of 1, before anything is removed ({p.wrong_sizes}), and the model's "
            "own classes, which "
            f"do, were not an option ({rep.form_why}). No model was returned. A tracer answered a question before "
            "the size test unlike Python (type(h) is torch.Tensor, hasattr or callable on a tensor, an is-tracing "
            "check, an except around the test), or torch.export assumed a size of 2 or more (if x.shape[0] == 1, "
            "if x.shape[1] == 1): ask isinstance(h, torch.Tensor) instead, drop the question, give an example of "
            "that size, or pass verify=False to accept a model for the example's sizes only")
    if rep.form == "graph" and p.analysis.method == "export" and model.training and _mode_dependent(model):
        # torch.export records the eval-mode computation: BatchNorm on its running statistics, no dropout,
        # whatever .training says afterwards (raft_large in train mode came back 56-78% off in train mode)
        result.eval()
        warnings.warn(GraphpruneWarning(
            f"{type(model).__name__} is in training mode, but it was traced with torch.export, which records the "
            "eval-mode computation (BatchNorm on running statistics, no dropout): the graph returned computes that "
            "in either mode, so it is returned in eval mode. To fine-tune with batch statistics, prune the model "
            "where it traces with torch.fx (see report.form_why) or fine-tune the original and compile again"),
            stacklevel=user_level())
    elif rep.form == "graph" and p.analysis.method == "export" and _mode_dependent(model, in_either=True):
        # a stock nn.TransformerEncoderLayer comes back so (its fused path refuses the module form): fine-tuned
        # after .train(), it ran no dropout and kept its BatchNorm statistics, with nothing said (survey 31 f03)
        rep.form_why += (". Traced with torch.export, which recorded the eval-mode computation: .train() on the graph "
                         "changes nothing (no dropout, BatchNorm on its running statistics)")
        warnings.warn(GraphpruneWarning(
            f"the result is a graph traced with torch.export from {type(model).__name__}, which holds dropout or "
            "BatchNorm: it computes the eval-mode path whatever .train() says, so fine-tuning it runs no dropout and "
            "updates no batch statistics. To fine-tune, do so on the original and compile again (see report.form_why "
            "for why the model's own classes were not an option)"), stacklevel=user_level())
    elif rep.form == "graph" and p.analysis.method == "symbolic_trace" and module_form.reads_mode(model):
        # fx ran the forward once: ``if self.training`` and F.dropout(training=self.training) took that mode's
        # branch for good, while the graph's torch modules follow .train() (survey 36 F02: no dropout in training)
        mode = "training" if model.training else "eval"
        rep.form_why += (f". Traced with torch.fx in {mode} mode: where the model's own code asks self.training, the "
                         "graph keeps the answer it got then, whatever .train() or .eval() says later (its torch "
                         "modules, BatchNorm and dropout, follow their mode)")
        warnings.warn(GraphpruneWarning(
            f"the result is a graph traced with torch.fx in {mode} mode from {type(model).__name__}, whose own code asks "
            f"self.training: the graph keeps the {mode}-mode path of that code whatever .train() or .eval() says later. "
            "To fine-tune in the other mode, compile the model in that mode, or see report.form_why for why the "
            "model's own classes were not an option"), stacklevel=user_level())
    changed = p.gm.meta.get(PYTHON_STATE) if rep.form == "graph" else None
    if changed:  # a counter that turns a branch after 20 calls agrees with the trace at its first two (survey 54 F1)
        rep.form_why += (f". The model's forward changes Python state on every call ({', '.join(map(str, changed[:4]))}), "
                         "which the graph holds at the value its trace read")
        warnings.warn(GraphpruneWarning(
            f"the result is a graph, and {type(model).__name__}'s forward changes Python state on every call "
            f"({', '.join(map(str, changed[:4]))}): the graph computes what the first call's state gave, checked on two "
            "calls only. Keep such state in a buffer, which a trace computes with, or see report.form_why for why the "
            "model's own classes were not an option"), stacklevel=user_level())
    left = _left_out(p.model, p) if rep.form == "graph" and p.analysis.method == "export" else []
    if left:  # called with one of them, the graph raised Python's bare TypeError (survey 30 f07, f09)
        rep.form_why += (f". Traced with torch.export from the inputs the example gives: {', '.join(left[:6])}"
                         f"{' ...' if len(left) > 6 else ''} (left at their defaults) are no inputs of the graph, "
                         "which refuses them by name; give them in the example to trace them")
        warnings.warn(GraphpruneWarning(  # the reason alone was in form_why; a call raised first (survey 44 F11)
            f"the result is a graph that takes no {', '.join(left[:6])}{' ...' if len(left) > 6 else ''}: torch.export "
            "traced the forward with them at their defaults, and the graph refuses them by name. Give them in the "
            "example (example_kwargs) to trace them, or see report.form_why for why the model's own classes were not "
            "an option"), stacklevel=user_level())
    if rep.form == "graph" and p.analysis.method == "symbolic_trace":
        graph_inputs.guard_given(result)  # an input the example gave that defaults to None: refused as None
    nones = graph_inputs.guard(result, p.model) if rep.form == "graph" and p.analysis.method == "export" else []
    if nones:  # the program holds them as constants: called with a tensor there, it ignored it (survey 31 f08)
        rep.form_why += (f". Traced with {', '.join(f'{n}=None' for n in nones)}, which torch.export holds as "
                         "constants: the graph refuses another value for them")
    fixed = p.gm.meta.get(FIXED_DIMS)
    if rep.form == "graph" and fixed:  # the user's model may take shapes this graph refuses
        rep.form_why += (". Traced with torch.export, which fixed these input dims to the example's size: "
                         f"{', '.join(fixed[:8])}{' ...' if len(fixed) > 8 else ''}")
        refused = _sizes_refused(p, result)
        if refused:  # the graph's guard says only "Guard failed: x.size()[2] == 8" (survey 39 f01)
            warnings.warn(GraphpruneWarning(
                f"the result is a graph traced with torch.export, which fixed input dims to the example's size "
                f"({', '.join(fixed[:4])}{' ...' if len(fixed) > 4 else ''}): {type(model).__name__} takes inputs "
                f"{refused} and the graph refuses them. Compile with an example of the size you will run, or see "
                "report.form_why for why the model's own classes were not an option"), stacklevel=user_level())
    bounded = p.gm.meta.get(BOUNDED_DIMS)
    if rep.form == "graph" and bounded:  # torch.export bounded a size: the graph takes only that span of it
        # a branch on a size bounds it (`if x.shape[1] > 4`), and so does shape arithmetic that holds only on some
        # sizes: heads merged with `y.reshape(B, C, T)` gave T in [2, 7], with no branch in the code (survey 43 F3)
        # each span named by its input dim, and, where several are bounded, measured with the others at the
        # example's: `x.shape[1] > y.shape[1]` gave "2 to 12, 12 to any", and the graph takes x at 20 with y at 25
        spans = [f"input {dims[0][0]} dim {dims[0][1]}: {lo} to {hi if hi is not None else 'any'}" if dims else
                 f"{lo} to {hi if hi is not None else 'any'}" for lo, hi, dims in bounded]
        if len(spans) > 1:
            spans[-1] += ", each with the other sizes at the example's"
        rep.form_why += (". torch.export bounded input sizes, where the forward branches on a size or its shape "
                         f"arithmetic holds only on some, and the graph takes only these: {', '.join(spans)}")
        warnings.warn(GraphpruneWarning(f"the result is a graph that takes only some input sizes ({', '.join(spans)}): "
                                        "torch.export bounded them where the forward branches on a size or its shape "
                                        "arithmetic holds only on some; see report.form_why"), stacklevel=user_level())
    turns = p.gm.meta.get(GUARD_SIZES)
    if rep.form == "graph" and turns:  # `x.shape[1] == 64` at 12 is a guard, Ne(s1, 64), and no bound: 64 is refused
        at = [f"input {dims[0][0]} dim {dims[0][1]} at {size}" for size, dims in turns]
        listed = f"{', '.join(at[:6])}{' ...' if len(at) > 6 else ''}"
        rep.form_why += f". The forward tests sizes for equality, and the graph refuses sizes where a test turns, such as {listed}"
        warnings.warn(GraphpruneWarning(f"the result is a graph that refuses input sizes where the forward's tests of sizes "
                                        f"turn, such as {listed}; see report.form_why"), stacklevel=user_level())


def _sizes_refused(p, result) -> list:
    """The shapes of the first input at another size (``verify.resized_inputs``, of the first few)
    that the user's model takes, where the graph ``result`` refuses it; else []."""
    from .module_form import _takes
    from .verify import _run, _shapes, evaluating, on_copies, resized_inputs

    for args, kwargs in resized_inputs(tuple(p.example_inputs), dict(p.example_kwargs or {}))[:6]:
        if not _takes(p.model, args, kwargs, params=p.param_writes):
            continue
        try:
            with evaluating(result), on_copies(result, params=p.param_writes):  # a KV cache it writes stays as it was
                _run(result, args, kwargs)
        except Exception:  # noqa: BLE001 - a guard of the exported program
            return _shapes((args, kwargs))
        return []
    return []


def _left_out(model, p) -> list[str]:
    """The forward's named parameters the example gives no value for: an exported program has an
    input for each value the example gives, and none for these."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
        given = sig.bind_partial(*p.example_inputs, **dict(p.example_kwargs or {})).arguments
    except (TypeError, ValueError):
        return []
    return [n for n, q in sig.parameters.items() if n not in given and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]


def choose_rule(p, decide_with, kind: str | None, target, *, choosing: bool, allocation: str,
                reconstruct: bool | None) -> tuple:
    """``compile``'s decision once ``p`` is traced and scored: what ``importance="auto"``
    chooses (``auto.choose``, which leaves ``p`` scored by the winning criterion) and
    the allocation rule ``decide_with(rule)`` then spreads the budget by, as
    ``(choice or None, rule)``. ``search`` starts from the same decision."""
    choice = None
    if choosing:
        judged_at = (kind, target) if kind != "latency" else latency_as_flops(p, decide_with("score"))
        with trainable(p):  # candidates judged with their BatchNorms, which recalibration needs (survey 37 F04)
            choice = auto.choose(p, lambda rule: decide_with(rule, judged_at), budgeted=kind is not None,
                                 refit_possible=reconstruct is None and bool(p._ctx.layers),
                                 recalibrate_possible=reconstruct is None, allocation=allocation)
        if judged_at != (kind, target):
            choice.why += (f"; candidates compared at {judged_at[1]:.3f} of the FLOPs (where the latency search "
                           "landed with weight-norm scores), the winner timed")
        p.reconstruct = choice.refit = bool(reconstruct) or choice.refit  # reconstruct=True: on, as asked
    elif allocation == "measured":  # a fixed criterion: its sensitivity probed around its own score allocation
        auto.measure_sensitivity(p, decide_with("score"))
    return choice, choice.allocation if choice else "score" if allocation == "auto" else allocation


@contextmanager
def trainable(p):
    """``p`` building pruned models with the default pipeline: a deploy pipeline folds the
    BatchNorms that auto's judge and a recalibration work on (with them folded, every
    recalibration found none, and the report said it had recalibrated: survey 37 F04)."""
    before = p.pipeline
    p.pipeline = None
    try:
        yield
    finally:
        p.pipeline = before


def fitted(p, removed: dict, out, *, recalibrate: bool):
    """``out`` (``removed`` pruned away) refit where ``p.reconstruct``, and its BatchNorm statistics
    recomputed on the calibration batches where ``recalibrate``. Under a pipeline beyond the
    default, that happens on the default pipeline's model, which the other passes then fold:
    folded first, the BatchNorms were gone before their statistics were."""
    base = out
    if (p.pipeline or DEFAULT_PIPELINE) != DEFAULT_PIPELINE:
        with trainable(p):
            base = p.prune(removed, fit=False)
    if p.reconstruct:
        thin = thin_calibration(p.refit(base, removed))
        if thin:
            warnings.warn(GraphpruneWarning(thin), stacklevel=user_level())
    if recalibrate:  # as auto judged it: statistics of the pruned model on the user's data
        recalibrate_on(base, p, p.calibration)  # (x, y) batches split by the Pruner: x is the input
    if base is out:
        return out
    folded, _ = run_pipeline(base, [(n, o) for n, o in parse_pipeline(p.pipeline) if n != "shrink-params"])
    folded.meta["graphprune"] = dict(out.meta["graphprune"])  # the record of the pipeline asked for
    return folded


def recalibrate_on(out, p, calibration) -> None:
    """BatchNorm statistics of the pruned ``out`` recomputed on the user's calibration
    batches, as ``auto`` judged it (``Choice.recalibrate``)."""
    from .loop import recalibrated

    calls = [as_call(b, p.example_kwargs) for b in calibration]
    recalibrated(out, lambda: [out(*a, **k) for a, k in (regroup(out, a0, k0) for a0, k0 in calls)])


def _mode_dependent(model: torch.nn.Module, *, in_either: bool = False) -> bool:
    """Whether the model holds modules that compute differently in training mode, in training mode
    now (or, ``in_either``, in either mode): a BatchNorm that tracks statistics, a dropout that drops."""
    def differs(m) -> bool:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return m.track_running_stats
        return isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
    return any(differs(m) and (in_either or m.training) for m in model.modules())


ROUNDINGS = (1, 8, 16)
ROUNDING_SLACK = 0.03  # a rounding that lands further under the budget than this is not timed (a 48-wide
# LSTM in multiples of 16 landed at 0.42 for target_flops=0.5, and was taken for the speed of the FLOPs it removed)


def latency_as_flops(p, removed: dict) -> tuple[str, float]:
    """The FLOPs budget ``auto`` compares its candidates at under a latency budget: the
    fraction of FLOPs that ``removed`` (one latency search, on the starting scores) kept.
    Every step of a latency search times a candidate beside the original (ViT-B/16 at
    batch 8 on two cores: about 40 s a reading), and ``auto`` tries seven candidates:
    searched by latency each, a compile took seven searches more than it needs. Judged
    at one equal FLOPs cost instead (counted, not timed), the winner alone is then
    searched by latency, so the result still meets the budget as timed."""
    from .allocate import Meter

    return "flops", Meter(p, "flops")(removed)


def fastest_rounding(p, kind: str, target: float, constraints, *, clock=None) -> dict | None:
    """``pipeline="deploy"`` with no ``round_to``: the width multiple this device runs
    fastest, measured on the model itself. Convolution libraries work on channels
    in blocks and pad the last one, so widths left at arbitrary counts buy little
    of the FLOPs they remove (bench/deploy_speed.py, target_flops=0.25, batch 8,
    2 CPU threads: MobileNetV2 1.47x faster, 2.80x with widths in multiples of
    16, FLOPs alike). A one-layer probe did not predict it (a 64-channel 1x1
    conv ran slower than a 57-channel one), so each rounding's allocation (score
    ranking) is built and timed against the unrounded one, side by side; a
    rounding must be 5% faster to be taken, and land within ``ROUNDING_SLACK`` of the
    target (compared at equal budget, not faster for having removed more; those that
    do not are listed under "too_coarse" with their landings). Returns {"chosen": q, "latency_vs_unrounded": ...},
    or None where no rounding reaches the budget."""
    from dataclasses import replace

    if on_meta(p.gm):
        return None  # nothing runs, so nothing to time: widths stay as allocated
    clock = clock or latency_ratio
    built, coarse = {}, {}
    for q in ROUNDINGS:
        try:
            removed, landed = allocate(p, kind, target, replace(constraints, round_to=q))
        except GraphpruneError:
            continue  # this rounding cannot reach the budget
        if q > 1 and landed < target - ROUNDING_SLACK:
            coarse[q] = round(landed, 3)  # its steps are too coarse here: any speed it had would come from removing more
            continue
        built[q] = p.prune(removed, check=False, fit=False)
    if 1 not in built:
        return None
    if len(built) == 1:
        return {"chosen": 1, "latency_vs_unrounded": {}, "too_coarse": coarse} if coarse else None
    x, kw = p.example_inputs, ({"example_kwargs": p.example_kwargs} if p.example_kwargs else {})
    with torch.no_grad():
        ratios = {q: clock(m, built[1], x, **kw) for q, m in built.items() if q != 1}
    q, r = min(ratios.items(), key=lambda kv: kv[1])
    return {"chosen": q if r < 0.95 else 1, "latency_vs_unrounded": {k: round(v, 3) for k, v in ratios.items()}}


def fastest_layout(p, *, clock=None) -> dict | None:
    """``pipeline="deploy"``: add the ``channels-last`` pass when the model runs
    at least 5% faster with it on this device, timed side by side on the unpruned
    model before any budget is measured (so latency budgets and the width
    rounding are timed in the layout the result will have). The layout is a
    property of the architecture and the device far more than of the widths, so
    one timing decides it. Kept off when the converted model raises (a ``view``
    of an activation needs contiguous strides) or its outputs differ. Sets
    ``p.pipeline``; returns {"channels_last": bool, "why": ..., "latency_vs_contiguous": r}
    or None where the model has no 2-d convolution to convert."""
    from .passes.channels_last import has_convolution

    if not has_convolution(p.gm):
        return None  # nothing to convert: build nothing, time nothing
    found = _timed_pass(p, "channels-last", "channels-last layout", clock, lambda gm: any(
        n.op == "call_method" and n.target == "contiguous" and n.kwargs.get("memory_format") == torch.channels_last
        for n in gm.graph.nodes), baseline="contiguous")
    return None if found is None else dict(zip(("channels_last", "why", "latency_vs_contiguous"), found))


def fastest_kernels(p, *, clock=None) -> dict | None:
    """``pipeline="deploy"``: add the ``onednn-fuse`` pass (convolutions and linears as oneDNN
    kernels with their activations fused) when the unpruned model runs at least 5% faster
    with it, timed like the layout, after it. On the 2-core CPU ConvNeXt-T ran 2.0x and a
    ViT-B MLP 1.4x faster, ResNet-50 and MobileNetV2 2% (so they stay as they were).
    Returns {"onednn": bool, "why": ..., "latency_vs_plain": r}, or None where nothing converts."""
    from .modules import OneDNNConv2d, OneDNNLinear

    if next((t.device.type for t in p.gm.parameters()), "cpu") != "cpu" or not torch.backends.mkldnn.is_available():
        return None  # oneDNN kernels serve CPU inference only (meta weights: nothing to time)
    if not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in p.gm.modules()):
        return None  # nothing to convert: build nothing, time nothing
    found = _timed_pass(p, "onednn-fuse", "oneDNN kernels", clock, lambda gm: any(
        isinstance(m, (OneDNNConv2d, OneDNNLinear)) for m in gm.modules()))
    return None if found is None else dict(zip(("onednn", "why", "latency_vs_plain"), found))


def _timed_pass(p, name: str, what: str, clock, applies, baseline: str = "plain") -> tuple | None:
    """(added, why, latency ratio) for pass ``name`` tried before ``dce`` on the unpruned model:
    added (to ``p.pipeline``) where its outputs equal the plain model's and it times 5% faster;
    None where the pass is in the pipeline already (the user's choice) or changes nothing
    (``applies(model)`` false)."""

    steps = parse_pipeline(p.pipeline or DEFAULT_PIPELINE)
    if any(step == name for step, _ in steps):
        return None
    if p.example_kwargs:  # decided before two copies of the model are built for nothing (an LLM's worth each)
        return False, "not timed: the example has keyword inputs", None
    if on_meta(p.gm):
        return False, "not timed: the weights are on the meta device", None
    at = next((i for i, (step, _) in enumerate(steps) if step == "dce"), len(steps))
    trial = format_pipeline(steps[:at] + [(name, {})] + steps[at:])
    plain = p.prune({}, check=False, fit=False)
    before, p.pipeline = p.pipeline, trial
    try:
        converted = p.prune({}, check=False, fit=False)
    finally:
        p.pipeline = before
    if not applies(converted):
        return None
    x, kw = p.example_inputs, dict(p.example_kwargs or {})
    try:
        with torch.no_grad():
            same = _same_outputs(converted(*x, **kw), plain(*x, **kw))
    except Exception as e:  # noqa: BLE001 - the pass is then not used, and the reason reported
        return False, f"the model with {what} raised {type(e).__name__}: {first_line(e)[:200]}", None
    if not same:
        return False, f"outputs differ with {what}", None
    with torch.no_grad():
        r = (clock or latency_ratio)(converted, plain, x, **({"example_kwargs": kw} if kw else {}))
    faster = r < 0.95
    if faster:
        p.pipeline = trial
    return faster, f"timed {r:.2f}x the {baseline} latency", round(r, 3)


def _same_outputs(a, b) -> bool:
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(fa) != len(fb):
        return False
    for u, v in zip(fa, fb):
        if isinstance(u, torch.Tensor) != isinstance(v, torch.Tensor):
            return False
        if isinstance(u, torch.Tensor):
            if u.shape != v.shape or u.stride() != v.stride():
                return False
            if u.is_floating_point():
                if not torch.allclose(u, v, rtol=1e-4, atol=1e-5 * max(1.0, float(v.abs().max()) if v.numel() else 1.0)):
                    return False
            elif not torch.equal(u, v):
                return False
        elif u != v:
            return False
    return True


def _over_budget(top, p, rep) -> str | None:
    """Why the module form breaks the budget the graph met, or None (and ``rep`` then
    holds the module's own counts).

    The module form runs the user's own ``forward``, which may compute what nothing
    reads (an auxiliary head left in, a WaveNet's last residual conv); the graph's
    ``dce`` dropped that, and the budget was met and reported on the graph. Counted
    on the module, the same widths can be over the budget (or, under a latency budget,
    do more than the graph that was timed)."""
    budgets = rep.budget or {}
    if not budgets:
        return None
    x, kw = p.example_inputs, p.example_kwargs
    flops = count_flops(top, x, kw) / count_flops(p.model, x, kw)
    params = params_read(p, top) / original_params(p)  # as the report divides
    over = [f"{k} {v:.4f} > target_{k}={budgets[k]}" for k, v in (("flops", flops), ("params", params))
            if k in budgets and v > budgets[k] + 1e-9]
    if "latency" in budgets and flops > rep.flops * (1 + 1e-6):  # the timing was of the graph, which does less
        over.append(f"flops {flops:.4f} where the graph that was timed runs {rep.flops:.4f}")
    if over:
        return (f"in the model's own classes the pruned model is over the budget ({'; '.join(over)}): its forward "
                f"computes values nothing reads, which the graph drops (graph: flops {rep.flops:.4f}, params "
                f"{rep.params:.4f})")
    rep.flops, rep.params = flops, params
    return None


def _trace_agrees(model, p, why: str) -> None:
    """With ``verify=False`` nothing checked the trace, and the model's own forward has just
    disagreed with the pruned graph: one of the two is wrong. Symbolic tracing takes
    ``if torch.is_tensor(h)`` the wrong way, and the graph came back 0.5 off at ratio 0
    (survey 18). One run of each, unpruned, on the example says which; a graph that is
    wrong is refused, not returned."""
    if why_not(model) is not None:
        return
    problem, _ = check_trace(shadow(model), p.gm, p.example_inputs, dict(p.example_kwargs or {}))
    if problem:
        raise GraphpruneError(
            f"the traced graph ({p.analysis.method}) does not compute what {type(model).__name__} computes on the "
            f"example, before anything is removed ({problem}), and with verify=False nothing checked it. No model "
            "was returned: pass verify=True, which checks the trace and retraces it with torch.export where it "
            "differs")


def _zeroed_twin(p, out) -> dict | None:
    """The kept slices that state the dead twin by zeroed weights alone, or None where a removed
    group is routed over (a removed expert is one no token goes to: ``verify.twin_graph``)."""
    widths = out.meta["graphprune"]["widths"]
    if any(g.fills and widths.get(g.id, (0, 0))[1] < widths.get(g.id, (0, 0))[0] for g in p.analysis.groups):
        return None
    return out.meta["graphprune"]["kept"]


def _untraced_paths(model, top, out, p, *, unseen=(), refused=()) -> str | None:
    """Why the module form ``top`` of ``out`` differs from its dead twin on a path the eval trace
    did not take (``module_form.beyond``, then ``module_form.trains``), or None."""
    args, kwargs = p.example_inputs, dict(p.example_kwargs or {})
    kept = _zeroed_twin(p, out)
    return (module_form.beyond(model, top, p.gm.meta.get(EXAMPLE, (args, kwargs)), p.gm.meta.get(BOUNDED_DIMS),
                               kept=kept, pruned=out, params=p.param_writes, refused=refused,
                               symbolic=p.gm.meta.get(SYMBOLIC_DIMS), traced=p.gm, turns=p.gm.meta.get(GUARD_SIZES))
            or module_form.trains(model, top, args, kwargs, list(unseen), kept=kept, pruned=out, params=p.param_writes))


MODULE_PATHS = "the model's own classes: "  # in a self-check message: the module form differs on a path the trace did not take


FAR_UNDER = 2 * FILL_TOL  # a budget landing further under its target than this is explained (``_warn_coarse_steps``)


def _bundled(g) -> str | None:
    """Why ``g``'s units go in bundles of their own, or None: what a warning about its steps names."""
    return (f"query heads, kept in the same number for each of their {g.n_parts} key/value heads" if g.part_of is not None
            else "the equal parts a chunk splits them into, kept alike" if g.even is not None
            else f"units kept in multiples of {g.multiple}" if g.multiple > 1 else None)


def _warn_coarse_steps(p, kind: str, target: float, got: float, removed: dict, round_to: int, overrides) -> None:
    """Say why a budget landed far under its target, where the reason is that every step any pruned
    group can take back overshoots it (``allocate.steps_back``): the smallest of them, and the target
    that leaves room for it. A GQA attention at ``target_flops=0.85`` landed at 0.75 with nothing said:
    a key/value head and its query heads go together, and the projection whole with every head kept is
    0.88 (survey 42). Where some step fits (a uniform allocation keeps one fraction everywhere; a step
    that costs nothing), that is not the reason, and nothing is said."""
    steps = [s for s in steps_back(p, kind, removed, round_to, overrides) if s[0] > got + 1e-9]
    if not steps or any(at <= target for at, _, _ in steps):
        return
    at, g, n = min(steps, key=lambda s: s[0])
    what, units = "FLOPs" if kind == "flops" else "parameters", f"{n} unit{'s' if n != 1 else ''}"
    why = _bundled(g) or (f"widths stay multiples of round_to={round_to}" if round_to > 1
                          else "one unit is that large a share of the model")
    warnings.warn(GraphpruneWarning(
        f"target_{kind}={target} landed at {got:.3f} of the original's {what}: no removal found lands nearer, "
        f"since the smallest step any pruned group takes back ({units} of {g.describe()[:160]}; {why}) "
        + ("brings the model back whole" if at >= 1 - 1e-9 else
           f"reaches {at:.3f}, over the target. Ask for target_{kind}={math.ceil(at * 1000 - 1e-6) / 1000:.3f} or "
           "more to leave room for it")
        + (", or give a smaller round_to" if round_to > 1 else "")), stacklevel=user_level())


def _module_paths(model, p, output: str):
    """The self-check's extra test where the result may come back in the user's classes: the
    module form held to its dead twin on the paths the trace did not see (training mode, past
    an export size bound, a flipped flag: ``module_form.trains``, ``module_form.beyond``). A
    mismatch there is a mismatch of the check, so bisection keeps the groups whose removal the
    other path cannot take (a centring over channels in training) whole, and the result stays
    the user's class, right in both modes. Where the module form is out anyway (the forward
    fails on it, or differs from the graph in eval mode: the graph comes back), it says nothing."""
    if (output == "graph" or (p.pipeline or DEFAULT_PIPELINE) != DEFAULT_PIPELINE or why_not(model) is not None
            or isinstance(model, torch.fx.GraphModule)):  # a graph's result is a graph (``_choose_form``)
        return None
    args, kwargs = p.example_inputs, dict(p.example_kwargs or {})

    def check(removed: dict, out, refused=(), fatal: bool = False) -> str | None:
        top, _ = module_form.build(model, out)
        if top is None or any(t.is_meta for t in out.parameters()):
            return None
        why = module_form.differs(top, out, args, kwargs, params=p.param_writes, original=model)
        if why:  # kept whole for the classes where they carry generate(), or where the graph refuses sizes the model takes
            keep = HF_CLASSES if keep_classes["hf"] else SIZES_CLASSES if keep_classes["sizes"] and fatal else None
            if keep and any(len(u) for u in removed.values()) and classes_run():
                keep_classes["kept"] = True  # a group was kept for them: without, the result may be another one
                return f"{keep}{why}"
            return None
        why = _untraced_paths(model, top, out, p, refused=refused)
        if why is None:
            passed[:] = [out, top]  # what _choose_form would run again on the same weights
        return f"{MODULE_PATHS}{why}" if why and module_form.TWIN_DIFFERS in why else None
    # not an attribute set from inside ``check``: a function that refers to itself is a reference
    # cycle, and each compile's models then waited for a full collection (the suite ran out of memory)
    passed: list = []
    check.passed = passed
    # a Hugging Face model's classes carry generate() and save_pretrained: where its forward cannot run a
    # group's pruning (OLMo's LayerNorm without weights over a pruned residual, survey 33 f04), that group
    # is kept whole rather than the model lost to a graph; compile drops this if the budget then fails
    # so is a group that breaks the classes of any model whose traced graph refuses input sizes the model takes
    # (torch.export fixed them): that graph is no result (``_graph_checks``), and the classes are the only form left
    keep_classes = check.keep_classes = {"hf": hf.is_hf(model), "sizes": True, "kept": False}
    base: list = []

    def classes_run() -> bool:
        """Whether the model's classes reproduce its graph with nothing removed: only then is a
        group whose removal they cannot run to blame for a mismatch (computed once)."""
        if not base:
            out = p.prune({}, fit=False)
            top, _ = module_form.build(model, out)
            base.append(top is not None and module_form.differs(top, out, args, kwargs, params=p.param_writes,
                                                                 original=model) is None)
        return base[0]
    return check


HF_CLASSES = "the model's own classes, which carry generate() and save_pretrained: "  # a self-check message
SIZES_CLASSES = "the model's own classes, the one form that takes every input size the model does: "


def verified_in_classes(p, decide, paths):
    """``verify.verified`` with ``paths`` (``_module_paths``) as its extra check, and again without
    keeping groups whole for a Hugging Face model's classes where the budget, or the repair, then
    fails: the model comes back as a graph, as it would have before."""
    unsafe = set(p.unsafe)
    try:
        return verified(p, decide, extra=paths)
    except GraphpruneError:
        if paths is None or not (paths.keep_classes["hf"] or paths.keep_classes["kept"]):
            raise
        p.unsafe = unsafe
        paths.keep_classes.update(hf=False, sizes=False)
        return verified(p, decide, extra=paths)


def _choose_form(model, out, p, output: str, rep, checked=None):
    """(result, "module" or "graph", why): the module form where it is asked for and verified,
    and, counted on it, within the budget (``_over_budget``; ``rep`` then gives its counts).
    ``checked``: the module form of ``out`` the self-check already held to the graph and its twin."""
    if output not in ("auto", "module", "graph"):
        raise GraphpruneError(f"output must be 'auto', 'module' or 'graph', got {output!r}")
    rep.unrun = unseen = module_form.unreached(model, p.gm)
    if output == "graph":
        return out, "graph", "output='graph'"
    if output == "auto" and (p.pipeline or DEFAULT_PIPELINE) != DEFAULT_PIPELINE:
        return out, "graph", f"a custom pipeline ({p.pipeline}) may rewrite the graph beyond the model's own code"
    if isinstance(model, torch.fx.GraphModule):
        # its classes are its graph; a copy of it in "module" form carried the given graph's record in its
        # ``meta``, which ``save`` read instead of this compile's (survey 65 F1)
        if output == "module":
            raise GraphpruneError("cannot return the pruned model in the model's own classes: the model given is an fx "
                                  "GraphModule (a graph graphprune or fx made), whose own form is a graph. Use "
                                  "output='graph' (or 'auto'), or compile the model it was traced from")
        return out, "graph", "the model given is an fx GraphModule: the result is one too"
    if checked is not None and not unseen:
        why = _over_budget(checked, p, rep)
        if not why:
            checked._graphprune = {**out.meta["graphprune"], "form": "module"}
            return checked, "module", MODULE_WHY + _held_to_none(checked, model, p) + _unchecked(p)
    top, why = module_form.build(model, out)
    runs = top is not None and not any(t.is_meta for t in out.parameters())
    if runs:
        why = module_form.differs(top, out, p.example_inputs, dict(p.example_kwargs or {}), params=p.param_writes,
                                  original=model)
        if why and not p.check_trace:
            _trace_agrees(model, p, why)
    if top is not None:  # on meta weights this runs nothing: modules the trace never ran are refused
        why = why or _untraced_paths(model, top, out, p, unseen=unseen)
        if why and why.startswith((module_form.TRAIN_PATH, module_form.TRAIN_FAILS)):
            warnings.warn(GraphpruneWarning(
                f"the result is a graph: {why}. The graph runs the path traced in eval mode in both modes, so "
                "fine-tuning it leaves out what the model's forward does only in training"), stacklevel=user_level())
    if runs:
        why = why or _over_budget(top, p, rep)
    if top is None or why:
        if output == "module":
            custom = (p.pipeline or DEFAULT_PIPELINE) != DEFAULT_PIPELINE
            cause = (f" The pipeline ({p.pipeline}) rewrites the graph beyond the model's own code (folded "
                     "BatchNorms, fused kernels), which the model's classes cannot run." if custom else "")
            raise GraphpruneError(f"cannot return the pruned model in the model's own classes: {why}.{cause} "
                                  "Use output='graph' (or 'auto') for the fx GraphModule"
                                  + (", or the default pipeline for the model's own classes." if custom else "."))
        return out, "graph", why
    top._graphprune = {**out.meta["graphprune"], "form": "module"}
    return top, "module", MODULE_WHY + _held_to_none(top, model, p) + _unchecked(p)


def _unchecked(p) -> str:
    """What ``report.form_why`` says, with a warning, of sizes past a bound too far out to check
    (``module_form.unchecked_bounds``): the model's forward branches there, on a path no check ran."""
    far = module_form.unchecked_bounds(p.gm.meta.get(EXAMPLE), p.gm.meta.get(BOUNDED_DIMS))
    if not far:
        return ""
    sizes = ", ".join(far)
    warnings.warn(GraphpruneWarning(
        f"the result is in the model's own classes, unchecked at sizes {sizes}: torch.export bounded them where the "
        "forward takes another path, too far out to run. Compile with an example of such a size to check it, or pass "
        "output='graph', which refuses those sizes"), stacklevel=user_level())
    return (f". At sizes {sizes} (torch.export bounded them) the forward takes another path, too far out to run: "
            "the module form was not held to its twin there")


MODULE_WHY = "the model's own forward reproduces the pruned graph on the example and another input shape"


def _held_to_none(top, model, p) -> str:
    """Make the module form ``top`` refuse a value where the example gave None (``none_inputs``);
    what ``report.form_why`` says of it."""
    rules = none_inputs.unchecked(model, (p.example_inputs, p.example_kwargs))
    none_inputs.refuse(top, rules)
    return none_inputs.said(rules) if rules else ""
