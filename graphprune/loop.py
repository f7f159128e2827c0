"""The prune / fine-tune loop of the pruning literature, and the regularisers that prepare for it.

``prune_iteratively`` removes FLOPs in ``k`` steps on a schedule (cubic by
default: big steps first while the network is redundant, small ones at the
end, after Zhu & Gupta 2017), recalibrates BatchNorm statistics after each
step, and hands the model to the user's fine-tune function in between.

``bn_l1`` (network slimming, Liu et al. 2017) and ``GroupLasso`` (over
graphprune's groups: every unit's parameters, across every layer they span,
in one L2 norm) are penalties a training loop adds to its loss so that whole
units shrink towards zero before they are removed.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .batches import as_call, positional_capacity, read_batches, split_targets
from .errors import GraphpruneError, first_line
from .flops import count_flops
from .modes import copy_modes
from . import module_form

# kept FLOPs fraction after a fraction t of the steps, for a final target
SCHEDULES = {
    "cubic": lambda target, t: 1 - (1 - target) * (1 - (1 - t) ** 3),
    "linear": lambda target, t: 1 - (1 - target) * t,
    "exponential": lambda target, t: target ** t,
}


def _targets(target: float, steps: int, schedule: str) -> list[float]:
    if schedule not in SCHEDULES:
        raise GraphpruneError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return [SCHEDULES[schedule](target, (i + 1) / steps) for i in range(steps)]


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, calibration: Iterable) -> torch.nn.Module:
    """Recompute every BatchNorm's running statistics from ``calibration`` (input tuples, dicts of keyword inputs).

    Only the BatchNorms run in training mode, under ``no_grad``: dropout and
    anything else that trains differently stays as the model has it, so the
    statistics are those the model will see in use."""
    takes = positional_capacity(model)

    def forward():
        for batch in calibration:
            args, kwargs = as_call(split_targets(batch, takes))  # (x, y) from a DataLoader: x
            try:
                model(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the statistics are put back (recalibrated); say which batch
                raise GraphpruneError(f"recalibrate_bn: the model does not take a calibration batch ({type(e).__name__}: "
                                      f"{first_line(e)[:300]}); the statistics were left as they were. Give batches of "
                                      "its positional inputs, optionally followed by targets, or dicts of keyword "
                                      "inputs") from e

    return recalibrated(model, forward)


def has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def recalibrated(model: torch.nn.Module, forward: Callable[[], object]) -> torch.nn.Module:
    """``model`` with its BatchNorm statistics the cumulative average over what ``forward()`` runs through it.
    Its other buffers are put back as they were: a forward that writes a KV cache or bumps a counter would
    otherwise leave the calibration batches in them."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    stat_ids = {id(t) for m in bns for t in (m.running_mean, m.running_var, m.num_batches_tracked)}
    others = [(t, t.clone()) for t in {id(t): t for t in model.buffers()}.values() if id(t) not in stat_ids]
    saved = [(m.momentum, m.training) for m in bns]
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.training = True
    ok = False
    hooks = _one_sample_batches_skipped(model, bns)
    try:
        with torch.no_grad():
            forward()
        ok = any(int(m.num_batches_tracked) > 0 for m in bns)
    finally:
        for h in hooks:
            h.remove()
        for m, (mom, was), (mean, var, n) in zip(bns, saved, stats):
            m.momentum, m.training = mom, was
            if not ok or int(m.num_batches_tracked) == 0:  # no batch reached it: the statistics it had, not mean 0, var 1
                with torch.no_grad():
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
        with torch.no_grad():
            for t, was in others:
                t.copy_(was)
    if not ok:
        raise GraphpruneError("recalibrating BatchNorm statistics ran no batch through the model (an empty list, a "
                              "generator already used up, or batches that give a BatchNorm one value per channel, "
                              "a batch of one sample: give larger batches): the statistics were left as they were")
    return model


def _one_sample_batches_skipped(model: torch.nn.Module, bns: list) -> list:
    """Hooks that leave out of the statistics a call of ``model`` in which some BatchNorm gets
    one value per channel (a batch of one sample into a BatchNorm1d), which training mode
    refuses: that BatchNorm runs on the statistics so far, and every BatchNorm's statistics go
    back to where the call found them. A batch of 1 among others failed auto with a raw
    ValueError, or not, by the batches' order (survey 37 F01)."""
    state: dict = {"before": None, "skip": False}

    def begin(_mod, _args):
        state["before"] = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
        state["skip"] = False

    def one_value(bn, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() == x.shape[1]:
            state["skip"] = True
            bn.training = False

    def after_bn(bn, _args, _out):
        bn.training = True

    def end(_mod, _args, _out):
        if state["skip"] and state["before"] is not None:
            with torch.no_grad():
                for m, (mean, var, n) in zip(bns, state["before"]):
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)

    hooks = [model.register_forward_pre_hook(begin), model.register_forward_hook(end)]
    for m in bns:
        hooks += [m.register_forward_pre_hook(one_value), m.register_forward_hook(after_bn)]
    return hooks


def prune_iteratively(model: torch.nn.Module, example_inputs: tuple, *, target_flops: float, steps: int = 3,
                      finetune: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None,
                      schedule: str = "cubic", calibration: Iterable | None = None, progress: bool = True,
                      **compile_kw) -> torch.nn.Module:
    """Prune to ``target_flops`` (fraction of the original) in ``steps`` steps.

    After each step BatchNorm statistics are recalibrated from ``calibration``
    (if given), then ``finetune(model)`` runs (it may return a new model or
    train in place). The original model is not changed. A ``pipeline``
    (``"deploy"``) runs after the last step, in a compile that removes nothing:
    every step keeps the model trainable, BatchNorms and all, for its
    recalibration and fine-tune.
    ``overrides`` are fractions of the original's groups: the first step that
    prunes takes them, the later ones hold those groups. The result has each
    module in the mode it has in ``model``, as ``compile`` returns it.

    >>> small = graphprune.prune_iteratively(model, (x,), target_flops=0.5, steps=4, finetune=train_one_epoch,
    ...                                      calibration=[(xb,) for xb, _ in loader])
    """
    from .api import compile
    from .pruner import check_ignore

    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise GraphpruneError(f"target_flops must be a fraction of the original in (0, 1], got {target_flops!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GraphpruneError(f"steps must be a whole number >= 1, got {steps!r}")
    calibration = read_batches(calibration) if calibration is not None else None
    if compile_kw.get("ignore"):  # every step prunes a copy: a module object of the user's model names nothing in it
        compile_kw["ignore"] = check_ignore(model, compile_kw["ignore"])
    kwargs = compile_kw.get("example_kwargs")  # keyword inputs the forward needs, counted with too
    base = count_flops(model, example_inputs, kwargs)
    current, params = model, 1.0
    targets = _targets(target_flops, steps, schedule)
    # pipeline="deploy" folds BatchNorms away: every step stays trainable (the default pipeline), so that its
    # recalibration and fine-tune see BatchNorm, and a last compile that removes nothing folds what they left
    # (the last step folded before its recalibration, which then found no BatchNorm: survey 37 F03)
    fold, step_kw = compile_kw.get("pipeline"), {k: v for k, v in compile_kw.items() if k != "pipeline"}
    for t in tqdm(targets, desc="prune steps", disable=not progress):
        now = count_flops(current, example_inputs, kwargs) / base
        if now > t:
            current = compile(current, example_inputs, target_flops=min(1.0, t / now), calibration=calibration, **step_kw)
            params *= current.report.params or 1.0  # of the step's own input
            if compile_kw.get("overrides"):  # the fraction each names is of the original: taken once, then held
                step_kw = {**step_kw, "overrides": {k: 0.0 for k in compile_kw["overrides"]}}
        if current is model:  # nothing pruned yet (a target of 1.0): recalibrate and fine-tune a copy, never the user's model
            current = copy.deepcopy(model)
        if calibration is not None:
            recalibrate_bn(current, calibration)
        if finetune is not None:
            current = finetune(current) or current
    if fold is not None:
        current = compile(current, example_inputs, target_flops=1.0, pipeline=fold, **step_kw)
        params *= current.report.params or 1.0  # the folded BatchNorms' parameters
    copy_modes(current, model)  # each module in the mode it has in the user's model, as compile returns it
    achieved = count_flops(current, example_inputs, kwargs) / base
    current.report_flops = achieved
    if current is not model and getattr(current, "report", None) is not None:
        # the last compile measured against its own input, the previous step's model: said 0.965 for 0.50
        current.report.flops, current.report.params = achieved, params
        current.report.widths = _widths_from_original(model, example_inputs, compile_kw, current) or current.report.widths
    return current


def _widths_from_original(model, example_inputs, compile_kw: dict, result) -> dict | None:
    """``report.widths`` of a model pruned in steps, against the original: the last step's had its own
    input's groups and widths ({0: (40, 40), 1: (31, 28)} for layers of 64, survey 26). The original's
    groups (``analyze``, the ids its first step pruned by), each counted in what the steps kept of
    it altogether (the record ``save`` writes); None where there was one step."""
    import numpy as np

    from .api import analyze

    kept = (module_form.info(result) or {}).get("first", {}).get("kept")
    if kept is None:
        return None
    groups = analyze(model, example_inputs, ignore=compile_kw.get("ignore", ()),
                     example_kwargs=compile_kw.get("example_kwargs")).groups
    out = {}
    for g in groups:
        member = next((ps for ps in g.params if (ps.name, ps.axis) in kept), None)  # none: the group stayed whole
        left = g.n_units if member is None else len(np.unique(member.unit_of[np.asarray(kept[(member.name, member.axis)])]))
        out[g.id] = (g.n_units, left)
    return out


def bn_l1(model: torch.nn.Module) -> torch.Tensor:
    """Sum of |gamma| over every BatchNorm: add ``lam * bn_l1(model)`` to the loss."""
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class GroupLasso:
    """Group lasso over graphprune's units: sum over units of the L2 norm of all
    the parameters that unit owns, in every layer of its group.

    >>> reg = graphprune.GroupLasso(model, (x,))
    >>> loss = task_loss + 1e-4 * reg(model)
    """

    def __init__(self, model: torch.nn.Module, example_inputs: tuple, **analyze_kw):
        from .api import analyze

        params = dict(model.named_parameters())
        self.slices = []  # (param name, axis, unit_of as tensor, n_units, group index)
        for gi, g in enumerate(analyze(model, example_inputs, **analyze_kw).groups):
            for s in g.params:
                if s.name in params:
                    self.slices.append((s.name, s.axis, torch.as_tensor(s.unit_of), g.n_units, gi))
        self.n_groups = len({s[4] for s in self.slices})

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        per_group: dict[int, torch.Tensor] = {}
        for name, axis, unit_of, n, gi in self.slices:
            w = params.get(name)
            if w is None or w.dim() <= axis or w.shape[axis] != len(unit_of):
                raise GraphpruneError(
                    f"GroupLasso was built on a model whose {name} has {len(unit_of)} entries along dim {axis}; this one "
                    f"{'has no such parameter' if w is None else f'has shape {tuple(w.shape)}'}: build a GroupLasso on "
                    "the model it regularizes (a pruned model needs its own)")
            sq = w.movedim(axis, 0).reshape(w.shape[axis], -1).square().sum(1)  # (size of axis,)
            acc = per_group.get(gi, torch.zeros(n, dtype=sq.dtype, device=sq.device))
            per_group[gi] = acc.index_add(0, unit_of.to(sq.device), sq)
        if not per_group:
            return torch.zeros(())
        return sum(v.clamp_min(1e-12).sqrt().sum() for v in per_group.values())
