"""``importance="auto"``: choose the criterion, the allocation rule and the refit from the user's data.

One mechanism for every model, CNN or LLM: each choice is a candidate pruned
model at the user's own budget, judged by the one thing the user cares about
before fine-tuning, how far its outputs move from the original's on data the
choice did not see. The calibration batches are split: the even ones score
units and refit layers, the odd ones judge (held out, so a criterion or a refit
that overfits the calibration text loses, as it would on the user's data).
The judge reads a spread subset of the odd ones, ``JUDGE_BATCHES`` of them or
as many as hold ``JUDGE_POSITIONS`` output rows (tokens, samples), whichever is
more: every candidate costs one pass over them, and a user who gives more
calibration data (which the refit needs: see ``thin_calibration``) should not
pay for it once per candidate, while one who gives many one-sample batches
still gets a judge that sees enough samples. The final refit uses every batch.

Candidates:

* criteria: ``activation`` (Wanda-style input norms), ``fluctuation`` (FLAP's
  input variance), ``l2``, and ``taylor``/``fisher`` when a ``loss_fn`` is given;
* allocation, for budgets: units ranked by their normalised score alone, or by
  score per parameter a unit costs (a query head holds as many weights as
  dozens of MLP channels, so a budget is met by fewer, cheaper decisions);
* allocation by measured sensitivity: the winner's scores turned, group by
  group, into the held-out output error each unit adds when the group's
  lowest units alone are dead (``probe``, at two depths, so the curve's bend
  is measured too), then ranked per parameter: layers differ in how much
  the outputs feel them, and a per-group mean cannot tell;
* the user's ``compile(allocation=...)`` fixes the rule instead (``uniform`` too, the
  same fraction from every group): then only criteria and the refit are tried;
* refit (``reconstruct``): on or off, where layers read pruned channels;
* BatchNorm statistics: a pruned conv feeds its BatchNorm a different
  distribution than the running statistics describe, so a model with
  BatchNorms has every candidate judged after its statistics are recomputed
  on the scoring batches (adaptive BN, Li et al. 2020, EagleEye: it ranks
  candidates as fine-tuning later would, where the stale statistics make
  them all look broken); the winner is also judged with the statistics it
  was trained with, and the result gets whichever is better.

Distortion is the relative squared error of all floating outputs,
``sum ||y' - y||^2 / sum ||y||^2`` over the held-out batches, except for a
model whose output names ``logits``: there it is the mean KL divergence of
the candidate's next-token (or class) distribution from the original's, per
position. Squared error of logits saturates (any collapsed model scores about
1), so on SmolLM2 at 65% of its parameters it preferred a candidate with 1000x
the perplexity; KL keeps growing with what a language model loses. Without calibration
data there is nothing to judge by, and ``auto`` is ``l2`` by weight norm.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from . import importance as _importance
from .batches import as_call, regroup
from .meta_keys import POSITIONS, VAL
from .verify import _run, flatten
from .errors import first_line

DATA_CRITERIA = ("activation", "fluctuation", "l2")
LOSS_CRITERIA = ("taylor", "fisher")
JUDGE_BATCHES = 8  # held-out batches the judge reads at least, spread over the held-out ones (a cost bound) ...
JUDGE_POSITIONS = 2048  # ... or as many as hold this many output rows (SmolLM2's judge: 8 windows of 256 tokens)


@dataclass
class Choice:
    """What ``auto`` chose, and the held-out distortion of every candidate."""

    criterion: str
    allocation: str = "score"  # "score", "per_param" or "measured"
    refit: bool = False
    tried: dict = field(default_factory=dict)  # "criterion/allocation[/refit]" -> distortion
    seconds: float = 0.0
    why: str = ""
    recalibrate: bool = False  # BatchNorm statistics recomputed on the calibration batches (EagleEye's adaptive BN)

    def __str__(self) -> str:
        best = min(self.tried.values()) if self.tried else float("nan")
        bn = ", BatchNorm recalibrated" if self.recalibrate else ""
        # a refit the user asked for (reconstruct=True) is not judged: the errors are the candidates' before it
        before = " before the refit" if self.refit and not any(k.endswith("/refit") for k in self.tried) else ""
        return (f"auto chose {self.criterion}, allocation by {self.allocation}, refit {'on' if self.refit else 'off'}{bn} "
                f"(held-out output error{before} {best:.4g}; {len(self.tried)} candidates in {self.seconds:.1f}s)")


def unit_params(g, gm) -> np.ndarray:
    """Parameters one unit of ``g`` holds: the elements of every slice it owns."""
    import operator

    out = np.zeros(g.n_units)
    for s in g.params:
        shape = operator.attrgetter(s.name)(gm).shape
        per_index = int(np.prod([d for i, d in enumerate(shape) if i != s.axis]))
        out += np.bincount(s.unit_of, minlength=g.n_units) * per_index
    return np.maximum(out, 1.0)


def unit_flops(g, gm) -> np.ndarray:
    """Multiply-adds one unit of ``g`` costs per forward: every weight element of
    its slices, times the positions its layer applies it at (the layer's output
    elements per output feature: pixels for a conv, tokens for a linear), read
    off the shapes on the traced graph. Where that is unknown (a weight that
    reaches its op through a transpose) an element counts once, as in
    ``unit_params``; vectors (biases, norm scales) cost nothing here."""
    import operator

    positions = _positions(gm)
    out = np.zeros(g.n_units)
    for s in g.params:
        shape = operator.attrgetter(s.name)(gm).shape
        if len(shape) < 2:
            continue
        per_index = int(np.prod([d for i, d in enumerate(shape) if i != s.axis]))
        out += np.bincount(s.unit_of, minlength=g.n_units) * per_index * positions.get(s.name, 1.0)
    return np.maximum(out, 1.0)


def _positions(gm) -> dict:
    """{parameter name: positions its weight is applied at per forward}, summed over uses."""
    import operator

    cached = gm.meta.get(POSITIONS)
    if cached is not None:
        return cached
    out: dict = {}

    def add(name, weight, node):
        val = node.meta.get(VAL)
        if isinstance(val, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.shape[0]:
            n = _hint(val.numel())
            if n is not None:
                out[name] = out.get(name, 0.0) + n / weight.shape[0]

    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            for pname, t in mod.named_parameters(recurse=False):
                add(f"{n.target}.{pname}", t, n)
        elif n.op == "get_attr":
            try:
                t = operator.attrgetter(n.target)(gm)
            except AttributeError:
                continue
            for u in n.users:
                if u.op == "call_function" and u.args and u.args[0] is not n:  # the weight is an operand, not the data
                    add(n.target, t, u)
    gm.meta[POSITIONS] = out
    return out


def _hint(n) -> int | None:
    """An element count as a number: symbolic sizes of an exported graph (a dynamic
    batch or sequence) at the example's value, or None where there is none."""
    if isinstance(n, int):
        return n
    try:
        return int(n.node.hint)
    except (AttributeError, TypeError):
        return None


def unit_cost(g, gm, kind: str | None) -> np.ndarray:
    """What removing one unit of ``g`` saves, in the budget's own currency, read off the
    graph: FLOPs, or parameters. A latency budget is costed in FLOPs only where no
    latency table can be built (``allocate.unit_costs``): what a unit saves in time
    follows the work it does more than the weights it holds (a late conv holds many
    weights and runs on few pixels)."""
    return unit_flops(g, gm) if kind in ("flops", "latency") else unit_params(g, gm)


def judged(held: list, rows: int | None = None) -> list:
    """The held-out batches the judge reads, evenly spaced (windows of one text in order: all of
    it): ``JUDGE_BATCHES``, or more where each batch gives only ``rows`` output rows."""
    k = JUDGE_BATCHES if not rows else max(JUDGE_BATCHES, -(-JUDGE_POSITIONS // rows))
    if len(held) <= k:
        return list(held)
    return [held[i] for i in np.linspace(0, len(held) - 1, k).round().astype(int)]


def output_rows(p, batch) -> int:
    """Rows the judge compares on one batch: its first output's elements over the last dim."""
    args, kwargs = as_call(batch, p.example_kwargs)
    try:
        t = next(iter(Judge._floats(p.gm, args, kwargs)), None)
    except Exception as e:  # noqa: BLE001 - as the judge says it: a batch the traced graph does not take (survey 37 F07)
        from .pruner import calibration_failed

        raise calibration_failed(p, 'importance="auto" (judging candidates)', e) from e
    t = t.t if isinstance(t, _LogProbs) else t
    return max(1, t.numel() // max(1, t.shape[-1])) if t is not None and t.dim() else 1


def split(calibration) -> tuple[list, list]:
    batches = list(calibration)
    if len(batches) < 2:
        return batches, batches  # one batch: nothing to hold out (said in the report)
    return batches[0::2], batches[1::2]


class Judge:
    """Held-out distortion of candidate models against the original's outputs."""

    def __init__(self, p, held_out: list, recalibrate_on: list | None = None):
        self.p = p
        self.calls = [as_call(b, p.example_kwargs) for b in held_out]
        try:
            self.refs = [self._floats(p.gm, a, k) for a, k in self.calls]
        except Exception as e:  # noqa: BLE001 - a batch the traced graph does not take (export fixed a size)
            from .pruner import calibration_failed

            raise calibration_failed(p, 'importance="auto" (judging candidates)', e) from e
        # BatchNorm statistics are recomputed on these (the scoring batches) before a candidate is judged
        self.recal = None if recalibrate_on is None else [as_call(b, p.example_kwargs) for b in recalibrate_on]

    def recalibrate(self, model) -> None:
        """Recompute ``model``'s BatchNorm statistics on the scoring batches (a candidate we built: never the original)."""
        from .loop import recalibrated

        recalibrated(model, lambda: [model(*a, **k) for a, k in (regroup(model, a0, k0) for a0, k0 in self.recal)])

    @staticmethod
    def _floats(model, args, kwargs) -> list[torch.Tensor]:
        """The outputs to compare: a model that names its output ``logits`` (a language
        model, a Hugging Face classifier) gives its log-probabilities, tagged by type
        (``_LogProbs``); anything else, every floating output as it is."""
        out = _run(model, *regroup(model, args, kwargs))
        logits = out.get("logits") if isinstance(out, Mapping) else None
        if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() >= 2:
            return [_LogProbs(logits.detach().float().log_softmax(-1))]
        return [t.detach() for t in flatten(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def first(self, n: int) -> "Judge":
        """The same judge on its first ``n`` batches only (a cheaper, coarser one)."""
        sub = object.__new__(Judge)
        sub.p, sub.calls, sub.refs, sub.recal = self.p, self.calls[:n], self.refs[:n], self.recal
        return sub

    def __call__(self, model, *, recalibrate: bool = True) -> float:
        if self.recal is not None and recalibrate:
            self.recalibrate(model)
        num = den = 0.0
        for (a, k), ref in zip(self.calls, self.refs):
            got = self._floats(model, a, k)
            for y, r in zip(got, ref):
                if y.shape != r.shape:
                    return float("inf")
                if isinstance(r, _LogProbs):  # KL(original || candidate) per position, in nats
                    num += float((r.t.exp() * (r.t - y.t)).sum(dtype=torch.float64))
                    den += r.t[..., 0].numel()
                    continue
                # in the outputs' own dtype, summed in float64: an LLM's logits are 256 x 49152 a batch
                num += float((y - r).square().sum(dtype=torch.float64))
                den += float(r.square().sum(dtype=torch.float64))
        return num / max(den, 1e-30)


class _LogProbs:
    """Log-probabilities over the last dim, compared by KL divergence rather than squared error."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def shape(self):
        return self.t.shape


def probe(p, judge: Judge, reference: dict, *, batches: int = 2) -> dict:
    """{group id: ((units, error), (more units, error))}: each group alone with its
    lowest-scoring units dead (the dead twin, on the traced original: no model is
    built), the rest of the model untouched, at two depths. The first is what
    ``reference`` (the best allocation so far) removes from the group, or,
    where it removes none, the same fraction as it removes overall; the
    second goes further (2.5 times as many units, up to 90% of the group), because the
    allocation that follows may well take a quiet group that far, and
    errors grow faster than linearly there. One forward pass per group and
    depth over ``batches`` held-out batches; ``allocate.measured_scores``
    turns them into costs on a scale shared by all groups."""
    from .pruner import remove_lowest
    from .verify import Verifier, swapped

    sub = judge.first(batches)
    twin = Verifier(p)
    total = sum(g.n_units for g in p.groups)
    frac = sum(len(u) for u in reference.values()) / max(total, 1)

    def error(g, units) -> float:
        if sub.recal is not None:  # statistics to recompute: on a model of its own, never the traced original
            model = p.prune({g.id: units}, check=False, fit=False)
            try:
                return sub(model)
            finally:
                p.discard(model)
        state = twin.twin_state({g.id: units})
        with swapped(p.gm, state):
            return sub(p.gm, recalibrate=False)

    out = {}
    for g in p.groups:
        units = reference.get(g.id)
        k = len(units) if units is not None and len(units) else min(g.n_units - 1, max(1, int(round(frac * g.n_units))))
        if k < 1:
            continue
        if units is None or len(units) == 0:
            units = remove_lowest(g, p.scores[g.id], k)
        points = [(np.asarray(units), error(g, units))]
        k2 = min(g.n_units - 1, max(k + 1, int(round(min(0.9, 2.5 * k / g.n_units) * g.n_units))))
        if k2 > k:
            more = remove_lowest(g, p.scores[g.id], k2)
            points.append((np.asarray(more), error(g, more)))
        out[g.id] = tuple(points)
    return out


def rules_tried(budgeted: bool, allocation: str = "auto") -> tuple[str, ...]:
    """Allocation rules each criterion is judged with (``measured`` follows, on the winner)."""
    if not budgeted:
        return ("score",)
    if allocation == "auto":
        return ("score", "per_param")
    return ("score",) if allocation == "measured" else (allocation,)


def held_out_judge(p, scoring: list, held: list, recalibrate_possible: bool = True) -> Judge:
    """The judge ``choose`` and ``measure_sensitivity`` read: ``held`` (spread, see ``judged``),
    with BatchNorm statistics recomputed on ``scoring`` where the model has any."""
    from .loop import has_bn

    recal = recalibrate_possible and has_bn(p.gm) and len(p.calibration) > 1
    rows = output_rows(p, held[0]) if len(held) > JUDGE_BATCHES else None  # one forward: only where there is a choice
    return Judge(p, judged(held, rows), scoring if recal else None)


def measure_sensitivity(p, reference: dict) -> None:
    """``p.sensitivity`` for ``allocation="measured"`` under a fixed criterion: the probe
    of ``choose``, judged on the held-out half of the calibration batches."""
    p.sensitivity = probe(p, held_out_judge(p, *split(p.calibration)), reference)


def candidates(loss_fn) -> list[str]:
    return list(DATA_CRITERIA) + (list(LOSS_CRITERIA) if loss_fn is not None else [])


def choose(p, decide_with, *, budgeted: bool, refit_possible: bool, recalibrate_possible: bool = False,
           allocation: str = "auto") -> Choice:
    """Try every candidate on ``p`` (scores swapped in turn) and leave ``p`` scored by
    the winner on all the calibration batches, so the result is the one
    ``importance=<winner>`` (and ``reconstruct=<refit>``) would give. ``decide_with(rule)`` returns a removal under the user's budget
    using ``p.scores`` and the allocation rule. ``allocation`` other than ``"auto"`` fixes
    the rule (the user's ``compile(allocation=...)``): only criteria and the refit are chosen,
    and ``"measured"`` is probed on the criterion that wins by score."""
    start = time.perf_counter()
    scoring, held = split(p.calibration)
    ctx = _importance.ScoreContext(p.gm, p.analysis.groups, scoring, p.loss_fn, p.example_kwargs)
    judge = held_out_judge(p, scoring, held, recalibrate_possible)
    recal = judge.recal is not None
    tried: dict = {}
    notes: list = []
    if recal:
        notes.append("every candidate judged with its BatchNorm statistics recomputed on the scoring batches")
    best = None
    for name in candidates(p.loss_fn):
        try:
            scores = p.score_with(name, ctx)
        except Exception as e:  # noqa: BLE001 - a criterion this model cannot feed is no candidate
            notes.append(f"{name} unavailable ({type(e).__name__}: {first_line(e)[:100]})")
            continue
        p.scores = scores
        for rule in rules_tried(budgeted, allocation):
            removed = decide_with(rule)
            model = p.prune(removed, check=False, fit=False)
            d = judge(model)
            p.discard(model)  # a reference cycle: its weights (an LLM's worth) would wait for a full collection
            tried[f"{name}/{rule}"] = d
            if best is None or d < best[0]:
                best = (d, name, rule, removed, scores)
    d, name, rule, removed, scores = best
    p.scores = scores
    if budgeted and removed and allocation in ("auto", "measured"):  # the winner's criterion, by measured sensitivity
        t = time.perf_counter()
        p.sensitivity = probe(p, judge, removed)
        measured = decide_with("measured")
        model = p.prune(measured, check=False, fit=False)
        dm = judge(model)
        p.discard(model)
        tried[f"{name}/measured"] = dm
        notes.append(f"sensitivity of {len(p.sensitivity)} groups measured in {time.perf_counter() - t:.1f}s")
        if dm < d or allocation == "measured":
            d, rule, removed = dm, "measured", measured
    refit = False
    if refit_possible:
        from . import reconstruct as _reconstruct
        from .pruner import make_plan

        model = p.prune(removed, check=False, fit=False)
        try:
            _reconstruct.refit(model, p.gm, make_plan(p.groups, removed), ctx.layers, ctx._batches("a refit"))
            with_refit = judge(model)
            tried[f"{name}/{rule}/refit"] = with_refit
            refit = with_refit < d
        except Exception as e:  # noqa: BLE001 - a model the refit cannot handle keeps its slices
            notes.append(f"refit unavailable ({type(e).__name__})")
        p.discard(model)
    if recal:  # the statistics as they were, against recomputed: the result gets what judged better
        model = p.prune(removed, check=False, fit=False)
        if refit:
            from . import reconstruct as _reconstruct
            from .pruner import make_plan

            _reconstruct.refit(model, p.gm, make_plan(p.groups, removed), ctx.layers, ctx._batches("a refit"))
        kept_stats = judge(model, recalibrate=False)
        tried[f"{name}/{rule}{'/refit' if refit else ''}/bn-as-trained"] = kept_stats
        recal = kept_stats >= min(v for k, v in tried.items() if not k.endswith("/bn-as-trained"))
        p.discard(model)
    p.scores = p.score_with(name)  # the winner, scored on every batch: what importance=name would give
    why = ("lowest output error on held-out calibration batches (the odd ones; the even ones scored and refit)"
           if len(p.calibration) > 1 else "one calibration batch: scored and judged on the same data")
    return Choice(name, rule, refit, tried, time.perf_counter() - start, "; ".join([why, *notes]), recal)
